"""THE camera convention of portrait3d (PanoHead's), and the only place that
converts it to other conventions (DESIGN §5).

World: +Y up, head centre at the origin, the face looks toward +Z (glTF's frame).
Camera: OpenCV axes (x right, y down, z forward); poses are cam2world 4x4.
Intrinsics are normalised by the image size: fx = fy = 4.2647, cx = cy = 0.5.
PanoHead angles: h = yaw (azimuth), v = pitch; h = v = pi/2 is the frontal camera
at (0, 0, +r). A 25-value *label* is cam2world (16, row-major) + normalised K (9).

User-facing angles are degrees: azimuth 0 = frontal, +90 = camera at +X (the
subject's left side), 180 = back; elevation > 0 = camera above the head.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

RADIUS = 2.7
FOCAL_NORM = 4.2647
INTRINSICS_NORM = np.array([[FOCAL_NORM, 0.0, 0.5], [0.0, FOCAL_NORM, 0.5], [0.0, 0.0, 1.0]])
# Horizontal field of view implied by the normalised focal length: 2*atan(0.5/4.2647).
FOV_DEG = math.degrees(2.0 * math.atan(0.5 / FOCAL_NORM))


# ----------------------------------------------------------------------------- poses
def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / torch.norm(v, dim=-1, keepdim=True)


def lookat_cam2world(h, v, radius: float = RADIUS, lookat=(0.0, 0.0, 0.0)) -> np.ndarray:
    """PanoHead's LookAtPoseSampler.sample with zero spread, evaluated in float32
    exactly as the official code does (so labels match PanoHead bit for bit).

    h, v: scalars or 1-D arrays (radians). Returns float64 (N, 4, 4) or (4, 4).
    """
    scalar = np.ndim(h) == 0 and np.ndim(v) == 0
    h_t = torch.as_tensor(np.atleast_1d(np.asarray(h, dtype=np.float64)), dtype=torch.float32).reshape(-1, 1)
    v_t = torch.as_tensor(np.atleast_1d(np.asarray(v, dtype=np.float64)), dtype=torch.float32).reshape(-1, 1)
    h_t, v_t = torch.broadcast_tensors(h_t, v_t)
    v_t = torch.clamp(v_t, 1e-5, math.pi - 1e-5)
    phi = torch.arccos(1 - 2 * (v_t / math.pi))
    n = h_t.shape[0]
    origins = torch.zeros((n, 3), dtype=torch.float32)
    origins[:, 0:1] = radius * torch.sin(phi) * torch.cos(math.pi - h_t)
    origins[:, 2:3] = radius * torch.sin(phi) * torch.sin(math.pi - h_t)
    origins[:, 1:2] = radius * torch.cos(phi)
    look = torch.tensor(lookat, dtype=torch.float32).expand(n, 3)
    forward = _normalize(_normalize(look - origins))
    up = torch.tensor([0, 1, 0], dtype=torch.float32).expand_as(forward)
    right = -_normalize(torch.cross(up, forward, dim=-1))
    up = _normalize(torch.cross(forward, right, dim=-1))
    rot = torch.eye(4).unsqueeze(0).repeat(n, 1, 1)
    rot[:, :3, :3] = torch.stack((right, up, forward), dim=-1)
    trans = torch.eye(4).unsqueeze(0).repeat(n, 1, 1)
    trans[:, :3, 3] = origins
    c2w = (trans @ rot).double().numpy()
    return c2w[0] if scalar else c2w


def ring_angles(n: int, pitch_v: float = math.pi / 2) -> tuple[np.ndarray, np.ndarray]:
    """The 360 ring: yaw_i = pi/2 + 2*pi*i/n at pitch v; view n/2 is the back."""
    h = np.array([math.pi / 2 + i * 2 * math.pi / n for i in range(n)])
    return h, np.full(n, pitch_v)


def ring_cam2world(n: int, pitch_v: float = math.pi / 2, radius: float = RADIUS) -> np.ndarray:
    h, v = ring_angles(n, pitch_v)
    return lookat_cam2world(h, v, radius)


def elevation_to_v(elevation_deg):
    """Geometric elevation (degrees) -> PanoHead pitch v. PanoHead's polar angle is
    phi = arccos(1 - 2v/pi), so v is not linear in the elevation: v = pi/2 (1 - sin el)."""
    return math.pi / 2 * (1 - np.sin(np.radians(elevation_deg)))


def degrees_to_hv(azimuth_deg, elevation_deg=0.0):
    """User angles (degrees; azimuth 0 = front, +90 = camera at +X; elevation up) -> (h, v)."""
    return (math.pi / 2 + np.radians(azimuth_deg), elevation_to_v(elevation_deg))


def hv_to_degrees(h, v):
    return (np.degrees(np.asarray(h) - math.pi / 2), np.degrees(np.arcsin(1 - 2 * np.asarray(v) / math.pi)))


def orbit_cam2world(azimuth_deg, elevation_deg=0.0, radius: float = RADIUS) -> np.ndarray:
    h, v = degrees_to_hv(np.asarray(azimuth_deg, dtype=np.float64), np.asarray(elevation_deg, dtype=np.float64))
    return lookat_cam2world(h, v, radius)


def camera_center(c2w: np.ndarray) -> np.ndarray:
    return np.asarray(c2w)[..., :3, 3]


def azimuth_elevation_of(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Degrees of a camera centre, inverse of orbit_cam2world (any radius)."""
    c = camera_center(c2w)
    az = np.degrees(np.arctan2(c[..., 0], c[..., 2]))
    el = np.degrees(np.arctan2(c[..., 1], np.hypot(c[..., 0], c[..., 2])))
    return az, el


# ------------------------------------------------------------------------- intrinsics
def intrinsics_pixels(K_norm: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised K -> pixel K (pixel centres at +0.5, gsplat/OpenCV convention)."""
    K = np.array(K_norm, dtype=np.float64).copy()
    K[..., 0, :] *= width
    K[..., 1, :] *= height
    return K


def pixel_rays(c2w: np.ndarray, K_norm: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rays through one camera's pixel centres: (origin (3,), unit world directions
    (H, W, 3), camera z per unit of ray length (H, W)), so depth = t * z_per_t."""
    K = intrinsics_pixels(K_norm, width, height)
    jj, ii = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    dc = np.stack([(jj - K[0, 2]) / K[0, 0], (ii - K[1, 2]) / K[1, 1], np.ones_like(jj)], -1)
    dcn = dc / np.linalg.norm(dc, axis=-1, keepdims=True)
    c2w = np.asarray(c2w, np.float64)
    return c2w[:3, 3].copy(), dcn @ c2w[:3, :3].T, dcn[..., 2]


def intrinsics_normalised(K_pix: np.ndarray, width: int, height: int) -> np.ndarray:
    K = np.array(K_pix, dtype=np.float64).copy()
    K[..., 0, :] /= width
    K[..., 1, :] /= height
    return K


# ------------------------------------------------------------------------ conversions
def world_to_camera(c2w: np.ndarray) -> np.ndarray:
    """gsplat `viewmats`: world-to-camera, OpenCV axes."""
    return np.linalg.inv(np.asarray(c2w, dtype=np.float64))


def to_opengl_c2w(c2w: np.ndarray) -> np.ndarray:
    """nerfstudio / Blender camera: OpenGL axes (x right, y up, z backward)."""
    return np.asarray(c2w, dtype=np.float64) @ np.diag([1.0, -1.0, -1.0, 1.0])


def from_opengl_c2w(c2w_gl: np.ndarray) -> np.ndarray:
    return np.asarray(c2w_gl, dtype=np.float64) @ np.diag([1.0, -1.0, -1.0, 1.0])


def nerfstudio_to_world(transform, scale) -> tuple[np.ndarray, np.ndarray, float]:
    """Inverse of nerfstudio's dataparser normalisation (`dataparser_transforms.json`).

    nerfstudio maps a point p of the transforms.json frame (our world: we write
    `to_opengl_c2w` poses, which change camera axes only) to p_ns = scale * (R p + t),
    with transform = [R | t] (3x4). Returns (A, b, k) with p = k * A @ p_ns + b:
    A = R^T (a rotation), b = -R^T t, k = 1 / scale.
    """
    T = np.asarray(transform, dtype=np.float64)
    if T.shape == (4, 4):
        T = T[:3]
    if T.shape != (3, 4) or not np.all(np.isfinite(T)):
        raise InputError(f"nerfstudio dataparser transform must be a finite 3x4 matrix, got shape {T.shape}",
                         hint="read it from the run's dataparser_transforms.json")
    s = float(scale)
    if not (math.isfinite(s) and s > 0):
        raise InputError(f"nerfstudio dataparser scale {scale!r} is not a positive number",
                         hint="read it from the run's dataparser_transforms.json")
    R, t = T[:, :3], T[:, 3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise InputError("nerfstudio dataparser transform's 3x3 part is not a rotation",
                         hint="only orientation methods up / pca / vertical / none (rotations) are supported")
    return R.T, -R.T @ t, 1.0 / s


def world_to_gltf(points: np.ndarray, head_height_world: float, head_height_m: float) -> np.ndarray:
    """Our world already is glTF's frame (+Y up, face toward +Z): only a scale to metres."""
    return np.asarray(points, dtype=np.float64) * (head_height_m / head_height_world)


# ---------------------------------------------------------------------------- labels
def label25(c2w: np.ndarray, K_norm: np.ndarray = INTRINSICS_NORM) -> list[float]:
    return [float(x) for x in np.asarray(c2w).reshape(16)] + [float(x) for x in np.asarray(K_norm).reshape(9)]


def parse_label25(label) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(label, dtype=np.float64)
    if arr.shape != (25,) or not np.all(np.isfinite(arr)):
        raise InputError(f"camera label must be 25 finite numbers, got shape {arr.shape}",
                         hint="labels are cam2world (16, row-major) + normalised K (9)")
    c2w, K = arr[:16].reshape(4, 4), arr[16:].reshape(3, 3)
    if not np.allclose(c2w[3], [0, 0, 0, 1], atol=1e-4):
        raise InputError("camera label's cam2world bottom row is not (0, 0, 0, 1)",
                         hint="labels are cam2world (16, row-major) + normalised K (9)")
    return c2w, K


def write_dataset_json(path: str | os.PathLike, entries: list[tuple[str, list[float]]]) -> None:
    """PanoHead / DiffPortrait360 `dataset.json`: {"labels": [[name, [25 floats]], ...]}."""
    data = {"labels": [[name, [float(x) for x in lab]] for name, lab in entries]}
    Path(path).write_text(json.dumps(data, indent=1))


def read_dataset_json(path: str | os.PathLike) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Returns [(name, cam2world 4x4, K_norm 3x3)]; loud about every malformation."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no dataset.json at {path}", hint="a views folder needs RGBA PNGs plus a dataset.json of camera labels")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e.__class__.__name__}: {e})", hint="expected {\"labels\": [[name, [25 floats]], ...]}") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, list) or not labels:
        raise InputError(f"{path} has no 'labels' list", hint="expected {\"labels\": [[name, [25 floats]], ...]}")
    out = []
    for i, item in enumerate(labels):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise InputError(f"{path}: label {i} is not [name, [25 floats]]", hint="expected {\"labels\": [[name, [25 floats]], ...]}")
        try:
            c2w, K = parse_label25(item[1])
        except (TypeError, ValueError):
            raise InputError(f"{path}: label {i} ({item[0]}) is not 25 numbers", hint="labels are cam2world (16) + normalised K (9)") from None
        out.append((item[0], c2w, K))
    return out
