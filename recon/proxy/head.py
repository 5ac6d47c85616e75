"""The weight-free proxy head: build it from a Portrait, render it from any camera,
export it as a textured mesh."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..config import ViewsConfig
from ..errors import InputError
from ..types import Portrait
from .landmarks import face_keypoints
from .raycast import render as _render
from .raycast import Shader, single_threaded_ops
from .shape import fit_head
from .surface import StarSurface, grid_directions
from .texture import build_texture

Progress = Callable[[int, int, str], None] | None


@dataclass
class ProxyHead:
    """A star-shaped head r(lat, lon) around the origin with an equirectangular texture.

    radius: (rows, 2*(rows-1)) float64 grid (see recon.proxy.surface for the layout).
    texture: (Ht, Wt, 3) uint8, row 0 = top, column 0 = longitude -pi (the back), the
    face at the centre column.
    """

    radius: np.ndarray
    texture: np.ndarray                     # baked RGB (photo at texture resolution + fill)
    fill: np.ndarray | None = None          # (Ht, Wt, 3) uint8, the texture without the photo
    weight: np.ndarray | None = None        # (Ht, Wt) uint8, photo weight per texel (255 = photo)
    photo: np.ndarray | None = None         # (S, S, 3) uint8 portrait crop, sampled at full resolution
    photo_c2w: np.ndarray | None = None
    photo_K: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.surface = StarSurface(self.radius)
        if self.fill is None or self.weight is None or self.photo is None:
            self._shader = Shader(self.texture)
        else:
            self._shader = Shader(self.fill, self.weight, self.photo, self.photo_c2w, self.photo_K)

    # ------------------------------------------------------------------ render
    def render(self, c2w: np.ndarray, K: np.ndarray, width: int, height: int,
               progress: Progress = None) -> tuple[np.ndarray, np.ndarray]:
        """Render views: c2w (N,4,4) OpenCV cam2world, K (N,3,3) or (3,3) normalised.
        Returns RGBA uint8 (N,H,W,4) (anti-aliased alpha, colour 0 where empty) and
        camera-z depth float32 (N,H,W) (0 where empty)."""
        c2w = np.asarray(c2w, dtype=np.float64)
        K = np.asarray(K, dtype=np.float64)
        if c2w.ndim == 2:
            c2w = c2w[None]
        if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or not np.all(np.isfinite(c2w)):
            raise InputError(f"cameras must be finite (N, 4, 4) cam2world matrices, got shape {c2w.shape}")
        if K.ndim == 2:
            K = np.repeat(K[None], c2w.shape[0], 0)
        if K.shape != (c2w.shape[0], 3, 3) or not np.all(np.isfinite(K)):
            raise InputError(f"intrinsics must be (N, 3, 3) or (3, 3) for N = {c2w.shape[0]}, got {K.shape}")
        if np.any(K[:, 0, 0] > 100) or np.any(K[:, 0, 2] > 2):
            raise InputError(f"intrinsics look like pixels (fx = {K[0, 0, 0]:.1f}), the proxy wants normalised K",
                             hint="use recon.cameras.intrinsics_normalised(K, width, height)")
        if int(width) < 1 or int(height) < 1 or int(width) > 8192 or int(height) > 8192:
            raise InputError(f"render size {width}x{height} is out of range", hint="use 1..8192 pixels per side")
        return _render(self.surface, self._shader, c2w, K, int(width), int(height), progress=progress)

    # ------------------------------------------------------------------ mesh
    def to_mesh(self, rows: int | None = None):
        """The proxy as a textured trimesh (UV sphere topology, seam at the back,
        single-vertex poles per column for UVs). `rows` resamples the grid (default:
        the fitted grid); the mesh interpolates the renderer's surface at its vertices."""
        import trimesh
        from PIL import Image

        rows = int(rows or self.surface.rows)
        if rows < 3:
            raise InputError(f"mesh rows={rows} is too small", hint="use at least 3 rows")
        cols = 2 * (rows - 1)
        d = grid_directions(rows, cols)
        r = self.surface.radius_np(d) if rows != self.surface.rows else self.surface.radius
        d = np.concatenate([d, d[:, :1]], 1)             # duplicated seam column for the UVs
        r = np.concatenate([r, r[:, :1]], 1)
        v = d * r[..., None]
        v[0] = [0.0, r[0].mean(), 0.0]
        v[-1] = [0.0, -r[-1].mean(), 0.0]
        ii, jj = np.meshgrid(np.arange(rows), np.arange(cols + 1), indexing="ij")
        uv = np.stack([jj / cols, 1.0 - ii / (rows - 1)], -1).reshape(-1, 2)
        vid = (ii * (cols + 1) + jj)
        a, b = vid[:-1, :-1], vid[1:, :-1]
        c, e = vid[:-1, 1:], vid[1:, 1:]
        tri1 = np.stack([a, b, c], -1)[1:]              # skip the degenerate fan at the north pole
        tri2 = np.stack([b, e, c], -1)[:-1]             # and at the south pole
        faces = np.concatenate([tri1.reshape(-1, 3), tri2.reshape(-1, 3)])
        material = trimesh.visual.material.SimpleMaterial(image=Image.fromarray(self.texture))
        visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(self.texture), material=material)
        return trimesh.Trimesh(vertices=v.reshape(-1, 3), faces=faces, visual=visual, process=False)

    @property
    def height(self) -> float:
        """World-space height of the head's bounding box."""
        p = self.surface.points()
        return float(p[..., 1].max() - p[..., 1].min())


def _check_portrait(p: Portrait) -> None:
    img, a = np.asarray(p.image), np.asarray(p.alpha)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"portrait image must be (S, S, 3) uint8, got {img.shape} {img.dtype}")
    if a.shape != img.shape[:2]:
        raise InputError(f"portrait alpha {a.shape} does not match the image {img.shape[:2]}")
    if min(img.shape[:2]) < 16:
        raise InputError(f"portrait crop {img.shape[1]}x{img.shape[0]} is too small", hint="the aligned crop is 512x512")
    c2w = np.asarray(p.c2w, dtype=np.float64)
    if c2w.shape != (4, 4) or not np.all(np.isfinite(c2w)):
        raise InputError(f"portrait camera must be a finite 4x4 cam2world, got shape {c2w.shape}")
    K = np.asarray(p.K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[0, 0] > 100:
        raise InputError("portrait intrinsics must be a finite normalised 3x3 K (fx ~ 4.26)")


def build_proxy(portrait: Portrait, cfg: ViewsConfig, progress: Progress = None) -> ProxyHead:
    """Fit the proxy head to a preprocessed portrait (CPU, no weights)."""
    _check_portrait(portrait)
    detail = int(cfg.proxy_detail)
    tex_size = int(cfg.proxy_texture)
    if not 16 <= detail <= 2048:
        raise InputError(f"views.proxy_detail={detail} is out of range", hint="use 16..2048 (default 256)")
    if not 16 <= tex_size <= 8192:
        raise InputError(f"views.proxy_texture={tex_size} is out of range", hint="use 16..8192 (default 1024)")
    with single_threaded_ops():
        return _build(portrait, detail, tex_size, int(cfg.seed), progress)


def _build(portrait: Portrait, detail: int, tex_size: int, seed: int, progress: Progress) -> ProxyHead:
    t0 = time.perf_counter()
    total = 7

    def step(i, msg):
        if progress is not None:
            progress(i, total, msg)

    kp = face_keypoints(portrait.landmarks)
    step(1, f"face key points ({kp.layout} layout)")

    def fit_progress(i, n, msg):
        step(1 + min(i, 5), msg)

    radius, fit_info, cam, mask = fit_head(portrait, kp, detail, progress=fit_progress)
    surf = StarSurface(radius)
    tex, fill, weight, tex_info = build_texture(portrait.image, mask, surf, cam, kp, tex_size, seed=seed)
    step(total, "proxy texture painted")
    notes = list(fit_info.pop("notes", []))
    if kp.layout == "bbox":
        notes.append(f"landmark layout with {len(portrait.landmarks)} points is unknown: face features placed "
                     "from the landmarks' bounding box")
    info = {"landmark_layout": kp.layout, "fit": fit_info, "texture": tex_info, "notes": notes,
            "detail": detail, "texture_size": tex_size, "build_seconds": round(time.perf_counter() - t0, 3)}
    u8 = lambda x: np.clip(x + 0.5, 0, 255).astype(np.uint8)  # noqa: E731
    head = ProxyHead(radius=radius, texture=u8(tex), fill=u8(fill), weight=u8(weight * 255.0),
                     photo=np.ascontiguousarray(portrait.image), photo_c2w=np.asarray(portrait.c2w, dtype=np.float64),
                     photo_K=np.asarray(portrait.K, dtype=np.float64), info=info)
    head.info["height"] = head.height
    return head
