"""Gaussian splat files: INRIA 3DGS `.ply` and antimatter15 `.splat`, writers and readers.

Parameters are gsplat's (recon.types.Scene): means (N,3), quats (N,4) wxyz,
scales (N,3) log, opacities (N,) logit, sh0 (N,1,3), shN (N,K,3).

INRIA .ply (binary little endian, float32 properties in this order):
    x y z nx ny nz f_dc_0..2 f_rest_0..(3K-1) opacity scale_0..2 rot_0..3
f_rest is channel-major (all K coefficients of R, then G, then B), opacity is
the logit, scales the log, rot the quaternion wxyz (unnormalised is allowed).

.splat (32 bytes per Gaussian, no header): position 3 x f32, scale 3 x f32
(linear, exp'd), colour RGBA 4 x u8 (rgb = 0.5 + SH_C0 * dc, a = sigmoid(opacity)),
rotation 4 x u8 ((q/|q|) * 128 + 128, wxyz); sorted by -(scale product * opacity)
so viewers that stream the file draw the biggest, most opaque splats first.
It is lossy (no higher SH, 8-bit colour and rotation).

Frame. We write the asset frame of the GLB (+Y up, face toward +Z, metres, same
pivot) so the splats overlay the mesh exactly. Viewers differ: SuperSplat (and
the PlayCanvas engine) assume PLY/.splat data are stored "Y down" the way
COLMAP-trained scenes are, and rotate every PLY/.splat 180 degrees about Z on
load; our +Y-up files therefore appear upside down there (undo it with rotation
z = 180 in SuperSplat's transform panel, or write with `supersplat_upright=True`,
which stores the 180-degree Z rotation so SuperSplat shows the head upright, at the
cost of no longer overlaying the GLB).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..types import Scene

SH_C0 = 0.28209479177387814
MAX_SPLATS = 50_000_000          # refuse headers that promise more than this
_PLY_MAGIC = b"ply\n"


# --------------------------------------------------------------------- transforms
def _np(params: dict, key: str) -> np.ndarray:
    v = params[key]
    return v.detach().cpu().numpy().astype(np.float32) if isinstance(v, torch.Tensor) else np.asarray(v, np.float32)


def scene_arrays(scene: Scene) -> dict[str, np.ndarray]:
    p = scene.params
    n = scene.num_gaussians
    out = {k: _np(p, k) for k in ("means", "quats", "scales", "opacities", "sh0")}
    out["opacities"] = out["opacities"].reshape(n)
    out["sh0"] = out["sh0"].reshape(n, 1, 3)
    out["shN"] = _np(p, "shN").reshape(n, -1, 3) if "shN" in p and p["shN"].numel() else np.zeros((n, 0, 3), np.float32)
    return out


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of wxyz quaternions (broadcasting)."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack([aw * bw - ax * bx - ay * by - az * bz, aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx, aw * bz + ax * by - ay * bx + az * bw], -1)


def _sh_m_of_index(k: int) -> int:
    """m of the (k+1)-th coefficient in degree order (index 0 of shN is l=1, m=-1)."""
    j = k + 1
    l = int(math.isqrt(j))
    return j - l * l - l


def transform_arrays(arr: dict, pivot, scale: float, rotate_z180: bool = False) -> dict:
    """p' = R (p - pivot) * scale with R = identity or 180 degrees about Z.

    Log scales shift by log(scale); a Z half-turn multiplies rotations by
    (0, 0, 0, 1) and the real SH coefficient of order m by (-1)^m.
    """
    out = {k: v.copy() for k, v in arr.items()}
    out["means"] = ((arr["means"] - np.asarray(pivot, np.float32)) * scale).astype(np.float32)
    out["scales"] = (arr["scales"] + math.log(scale)).astype(np.float32)
    if rotate_z180:
        out["means"][:, :2] *= -1
        rz = np.array([0.0, 0.0, 0.0, 1.0], np.float32)
        out["quats"] = quat_mul(rz, arr["quats"]).astype(np.float32)
        sign = np.array([(-1.0) ** abs(_sh_m_of_index(k)) for k in range(arr["shN"].shape[1])], np.float32)
        out["shN"] = arr["shN"] * sign[None, :, None]
    return out


# -------------------------------------------------------------------- INRIA .ply
def ply_property_names(num_rest: int) -> list[str]:
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(num_rest)] + ["opacity", "scale_0", "scale_1", "scale_2",
                                                          "rot_0", "rot_1", "rot_2", "rot_3"])


def write_splat_ply(path: str | os.PathLike, arr: dict) -> Path:
    """INRIA 3DGS layout (what SuperSplat, gsplat's viewers and the INRIA viewer read)."""
    path = Path(path)
    n = arr["means"].shape[0]
    k = arr["shN"].shape[1]
    rest = np.ascontiguousarray(arr["shN"].transpose(0, 2, 1)).reshape(n, 3 * k)   # channel-major
    cols = [arr["means"], np.zeros((n, 3), np.float32), arr["sh0"].reshape(n, 3), rest,
            arr["opacities"].reshape(n, 1), arr["scales"], arr["quats"]]
    data = np.ascontiguousarray(np.concatenate(cols, 1).astype("<f4"))
    names = ply_property_names(3 * k)
    header = ("ply\nformat binary_little_endian 1.0\ncomment portrait3d Gaussian splats (INRIA 3DGS layout)\n"
              f"element vertex {n}\n" + "".join(f"property float {p}\n" for p in names) + "end_header\n")
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(data.tobytes())
    return path


_PLY_TYPES = {"float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8", "uchar": "u1", "uint8": "u1",
              "char": "i1", "int8": "i1", "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2",
              "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4"}


def read_splat_ply(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an INRIA-layout splat .ply (any property order, float or double) defensively."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != _PLY_MAGIC:
            raise InputError(f"{path} is not a PLY file", hint="expected a 3DGS .ply (binary_little_endian)")
        header_lines, read = [], 4
        while True:
            line = f.readline(1024)
            read += len(line)
            if not line or read > 65536:
                raise InputError(f"{path}: PLY header has no end_header", hint="the file is truncated or not a PLY")
            text = line.decode("ascii", errors="replace").strip()
            if text == "end_header":
                break
            header_lines.append(text)
        n, props, fmt, element = None, [], None, None
        for text in header_lines:
            parts = text.split()
            if not parts or parts[0] in ("comment", "obj_info"):
                continue
            if parts[0] == "format":
                fmt = parts[1] if len(parts) > 1 else None
            elif parts[0] == "element":
                element = parts[1] if len(parts) > 1 else None
                if element == "vertex":
                    try:
                        n = int(parts[2])
                    except (IndexError, ValueError):
                        raise InputError(f"{path}: bad element line {text!r}") from None
                elif n is not None:
                    raise InputError(f"{path}: element {element!r} after the splats is not supported",
                                     hint="expected a single vertex element (3DGS layout)")
            elif parts[0] == "property" and element == "vertex":
                if len(parts) != 3 or parts[1] not in _PLY_TYPES:
                    raise InputError(f"{path}: unsupported property {text!r}", hint="3DGS .ply files hold scalar float properties")
                props.append((parts[2], _PLY_TYPES[parts[1]]))
        if fmt != "binary_little_endian":
            raise InputError(f"{path}: PLY format {fmt!r} is not supported", hint="expected binary_little_endian")
        if n is None or not 0 <= n <= MAX_SPLATS:
            raise InputError(f"{path}: vertex count {n} is missing or out of range (max {MAX_SPLATS})")
        dtype = np.dtype(props)
        if size - read < n * dtype.itemsize:
            raise InputError(f"{path}: truncated ({size - read} data bytes for {n} splats of {dtype.itemsize} bytes)")
        rec = np.frombuffer(f.read(n * dtype.itemsize), dtype=dtype, count=n)
    names = set(dtype.names)
    need = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [p for p in need if p not in names]
    if missing:
        raise InputError(f"{path}: not a 3DGS splat file (missing {', '.join(missing)})",
                         hint="expected INRIA 3DGS properties (x y z f_dc_* opacity scale_* rot_*)")
    rest = sorted((p for p in names if p.startswith("f_rest_")), key=lambda s: int(s[7:]))
    if len(rest) % 3 or [int(p[7:]) for p in rest] != list(range(len(rest))):
        raise InputError(f"{path}: f_rest_* properties are not a multiple of 3 consecutive indices")
    col = lambda *ps: np.stack([rec[p].astype(np.float32) for p in ps], 1)  # noqa: E731
    k = len(rest) // 3
    shn = col(*rest).reshape(n, 3, k).transpose(0, 2, 1) if k else np.zeros((n, 0, 3), np.float32)
    return {"means": col("x", "y", "z"), "quats": col("rot_0", "rot_1", "rot_2", "rot_3"),
            "scales": col("scale_0", "scale_1", "scale_2"), "opacities": rec["opacity"].astype(np.float32),
            "sh0": col("f_dc_0", "f_dc_1", "f_dc_2").reshape(n, 1, 3), "shN": np.ascontiguousarray(shn)}


def sh_degree_of(shN: np.ndarray) -> int:
    k = shN.shape[1]
    d = int(round(math.sqrt(k + 1))) - 1
    if (d + 1) ** 2 - 1 != k:
        raise InputError(f"{k} higher-order SH coefficients is not (deg+1)^2 - 1 for any degree")
    return d


def arrays_to_scene(arr: dict) -> Scene:
    return Scene({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arr.items()},
                 sh_degree=sh_degree_of(arr["shN"]))


# ----------------------------------------------------------------------- .splat
_SPLAT_DTYPE = np.dtype([("pos", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])
assert _SPLAT_DTYPE.itemsize == 32


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def write_dot_splat(path: str | os.PathLike, arr: dict) -> Path:
    path = Path(path)
    n = arr["means"].shape[0]
    scale = np.exp(arr["scales"].astype(np.float64))
    alpha = _sigmoid(arr["opacities"].astype(np.float64))
    order = np.argsort(-(scale.prod(1) * alpha), kind="stable")
    q = arr["quats"].astype(np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    rec = np.empty(n, _SPLAT_DTYPE)
    rec["pos"] = arr["means"]
    rec["scale"] = scale
    rgb = 0.5 + SH_C0 * arr["sh0"].reshape(n, 3).astype(np.float64)
    rec["rgba"][:, :3] = np.clip(np.round(rgb * 255.0), 0, 255)
    rec["rgba"][:, 3] = np.clip(np.round(alpha * 255.0), 0, 255)
    rec["rot"] = np.clip(np.round(q * 128.0 + 128.0), 0, 255)
    path.write_bytes(rec[order].tobytes())
    return path


def read_dot_splat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Back to gsplat parameters (degree 0; alpha 0/255 clamp to finite logits)."""
    path = Path(path)
    size = path.stat().st_size
    if size % 32:
        raise InputError(f"{path} is {size} bytes, not a multiple of 32", hint="a .splat file holds 32-byte records")
    if size // 32 > MAX_SPLATS:
        raise InputError(f"{path} holds {size // 32} splats, over the {MAX_SPLATS} limit")
    rec = np.fromfile(path, dtype=_SPLAT_DTYPE)
    n = len(rec)
    a = np.clip(rec["rgba"][:, 3].astype(np.float64) / 255.0, 0.5 / 255, 1 - 0.5 / 255)
    q = (rec["rot"].astype(np.float32) - 128.0) / 128.0
    with np.errstate(divide="ignore"):
        scales = np.log(np.maximum(rec["scale"].astype(np.float64), 1e-30))
    return {"means": rec["pos"].astype(np.float32), "quats": q, "scales": scales.astype(np.float32),
            "opacities": np.log(a / (1 - a)).astype(np.float32),
            "sh0": ((rec["rgba"][:, :3].astype(np.float32) / 255.0 - 0.5) / SH_C0).reshape(n, 1, 3),
            "shN": np.zeros((n, 0, 3), np.float32)}
