"""A ground-truth head generated in code (no downloads) for benchmarks and tests.

Shape: a star-shaped surface r(direction) around the origin (recon.proxy's
StarSurface, so the proxy's exact ray caster renders it): an ellipsoid cranium with
smooth radial bumps for the nose, brow, chin, cheeks, ears and a neck stub, in our
world frame (+Y up, face toward +Z, ~0.5 units tall: what a PanoHead ring camera
frames). Texture: an equirectangular albedo with distinct features everywhere (skin
with soft blotches, eyes, brows, lips, a hairline and hair with stripes on the back,
coloured ear patches) so that held-out views test appearance from every side.

    head = gt_head()                                    # GTHead
    rgba, depth = head.render(c2w, K, 128, 128)         # exact renders (uint8 RGBA, camera-z depth)
    mesh = head.mesh()                                  # trimesh of the same surface
    chamfer(points_a, points_b)                         # symmetric mean distance
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh

from .. import cameras
from ..proxy.raycast import Shader, render
from ..proxy.surface import StarSurface, grid_directions, texel_directions


def _bump(dirs: np.ndarray, centre, height: float, sigma: float, stretch=(1.0, 1.0, 1.0)) -> np.ndarray:
    """height * exp(-angle^2 / 2 sigma^2) around `centre` (angles in radians; `stretch`
    scales the direction axes first to make elongated bumps)."""
    c = np.asarray(centre, dtype=np.float64)
    c /= np.linalg.norm(c)
    d = dirs * np.asarray(stretch, dtype=np.float64)
    d = d / np.linalg.norm(d, axis=-1, keepdims=True)
    ang = np.arccos(np.clip(d @ c, -1.0, 1.0))
    return height * np.exp(-0.5 * (ang / sigma) ** 2)


def head_radius(dirs: np.ndarray) -> np.ndarray:
    """Radius of the GT head along unit directions (..., 3)."""
    a = np.array([0.165, 0.205, 0.19])                       # ellipsoid semi-axes x, y, z
    r = 1.0 / np.sqrt(((dirs / a) ** 2).sum(-1))
    for centre, h, s, st in (
        ((0.0, -0.08, 1.0), 0.045, 0.11, (1.6, 0.8, 1.0)),    # nose: narrow, long vertically
        ((0.0, 0.18, 1.0), 0.012, 0.20, (0.6, 1.5, 1.0)),     # brow ridge: wide
        ((0.0, -0.55, 0.85), 0.028, 0.18, (1.0, 1.0, 1.0)),   # chin
        ((0.45, -0.15, 0.88), 0.012, 0.20, (1.0, 1.0, 1.0)),  # cheeks
        ((-0.45, -0.15, 0.88), 0.012, 0.20, (1.0, 1.0, 1.0)),
        ((1.0, 0.0, -0.12), 0.035, 0.10, (1.0, 0.7, 1.4)),    # ears
        ((-1.0, 0.0, -0.12), 0.035, 0.10, (1.0, 0.7, 1.4)),
        ((0.0, -1.0, -0.1), 0.095, 0.33, (1.0, 1.0, 1.0)),    # neck stub
        ((0.0, 0.5, -0.85), 0.018, 0.35, (1.0, 1.0, 1.0)),    # occiput / hair volume
    ):
        r = r + _bump(dirs, centre, h, s, st)
    return r


def _smooth_noise(dirs: np.ndarray, rng: np.random.Generator, n: int = 24, width: float = 0.35) -> np.ndarray:
    """Sum of random Gaussian blobs on the sphere in [-1, 1] (a low-frequency pattern)."""
    out = np.zeros(dirs.shape[:-1])
    for _ in range(n):
        c = rng.normal(size=3)
        out += rng.uniform(-1, 1) * _bump(dirs, c, 1.0, width)
    return np.clip(out, -1, 1)


def head_texture(rows: int = 256, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Equirectangular albedo (rows, cols, 3), 0..255 float32."""
    rng = np.random.default_rng(seed)
    d = texel_directions(rows, cols)
    x, y, z = d[..., 0], d[..., 1], d[..., 2]
    skin = np.array([224.0, 172.0, 140.0])
    col = skin + 18.0 * _smooth_noise(d, rng)[..., None] * np.array([1.0, 0.8, 0.7])
    def paint(mask, colour, soft=None):
        nonlocal col
        m = mask.astype(np.float64) if soft is None else soft
        col = col * (1 - m[..., None]) + np.asarray(colour, np.float64) * m[..., None]
    # hair: above a hairline that is high at the front and low at the back, with stripes
    hairline = 0.55 - 0.75 * np.clip(-z, 0, 1) ** 1.2 - 0.1 * np.clip(z, 0, 1)
    hair = 1 / (1 + np.exp(-(y - hairline) / 0.03))
    lon = np.arctan2(x, z)
    stripes = 0.5 + 0.5 * np.sin(9 * lon + 6 * y)
    hair_col = np.stack([70 + 50 * stripes, 45 + 30 * stripes, 30 + 15 * stripes], -1)
    col = col * (1 - hair[..., None]) + hair_col * hair[..., None]
    # eyes (white with a dark iris), brows, lips, ear patches
    for sx in (-1, 1):
        e = np.array([0.36 * sx, 0.12, 0.92])
        paint(_bump(d, e, 1.0, 0.075) > 0.5, (245, 245, 240))
        paint(_bump(d, e, 1.0, 0.035) > 0.5, (60, 90, 150))
        paint(_bump(d, e, 1.0, 0.015) > 0.5, (15, 15, 20))
        paint(_bump(d, [0.36 * sx, 0.3, 0.9], 1.0, 0.09, (0.6, 2.2, 1.0)) > 0.5, (80, 55, 40))
        paint(_bump(d, [sx, 0.0, -0.12], 1.0, 0.09) > 0.5, (200, 120, 120))
    paint(_bump(d, [0.0, -0.4, 0.92], 1.0, 0.1, (0.55, 2.2, 1.0)) > 0.5, (170, 60, 70))
    return np.clip(col, 0, 255).astype(np.float32)


@dataclass
class GTHead:
    surface: StarSurface
    texture: np.ndarray        # (rows, cols, 3) 0..255
    shader: Shader

    def render(self, c2w: np.ndarray, K: np.ndarray, width: int, height: int, progress=None):
        """Exact renders: RGBA uint8 (N, H, W, 4) (anti-aliased silhouettes), depth float32 (N, H, W)."""
        return render(self.surface, self.shader, c2w, K, width, height, progress=progress)

    def mesh(self) -> trimesh.Trimesh:
        """The radius grid as a triangle mesh (the bilinear surface's nodes, poles merged)."""
        pts = self.surface.points()                           # (H, W, 3)
        H, W = pts.shape[:2]
        verts = [pts[0, 0][None], pts[1:-1].reshape(-1, 3), pts[-1, 0][None]]
        v = np.concatenate(verts)
        idx = lambda i, j: 1 + (i - 1) * W + (j % W)  # noqa: E731  (rows 1..H-2)
        faces = []
        for j in range(W):
            faces.append((0, idx(1, j + 1), idx(1, j)))
            faces.append((len(v) - 1, idx(H - 2, j), idx(H - 2, j + 1)))
        for i in range(1, H - 2):
            for j in range(W):
                a, b, c, e = idx(i, j), idx(i, j + 1), idx(i + 1, j), idx(i + 1, j + 1)
                faces += [(a, b, e), (a, e, c)]
        return trimesh.Trimesh(v, np.array(faces), process=False)

    @property
    def height(self) -> float:
        p = self.surface.points()
        return float(p[..., 1].max() - p[..., 1].min())


def gt_head(rows: int = 257, cols: int = 512, tex_rows: int = 256, seed: int = 0) -> GTHead:
    dirs = grid_directions(rows, cols)
    surf = StarSurface(head_radius(dirs))
    tex = head_texture(tex_rows, 2 * tex_rows, seed)
    return GTHead(surf, tex, Shader(tex))


def ring_and_holdout(num_ring: int = 36, holdout_azimuths=tuple(range(5, 360, 30)),
                     holdout_elevations=(20.0, -15.0)) -> tuple[np.ndarray, np.ndarray]:
    """Training ring (PanoHead ring, elevation 0) and held-out cameras at other yaws and
    pitches (alternating elevations), as cam2world arrays."""
    ring = cameras.ring_cam2world(num_ring)
    az = np.asarray(holdout_azimuths, dtype=np.float64)
    el = np.array([holdout_elevations[i % len(holdout_elevations)] for i in range(len(az))])
    return ring, cameras.orbit_cam2world(az, el)


def sample_surface(mesh: trimesh.Trimesh, n: int, seed: int = 0) -> np.ndarray:
    pts, _ = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(pts)


def chamfer(a: np.ndarray, b: np.ndarray) -> dict:
    """Symmetric Chamfer distance of point sets (mean of both directions' mean nearest
    distances), plus each direction and the 95th percentiles."""
    from scipy.spatial import cKDTree

    dab = cKDTree(b).query(a)[0]
    dba = cKDTree(a).query(b)[0]
    return {"chamfer": 0.5 * (dab.mean() + dba.mean()), "to_gt": float(dab.mean()), "from_gt": float(dba.mean()),
            "to_gt_p95": float(np.percentile(dab, 95)), "from_gt_p95": float(np.percentile(dba, 95))}


def views_of(head: GTHead, c2w: np.ndarray, size: int, names_prefix: str = "view", progress=None):
    """A ViewSet of exact renders (with depth) from cameras c2w."""
    from ..types import ViewSet

    K = np.repeat(cameras.INTRINSICS_NORM[None], len(c2w), 0)
    rgba, depth = head.render(c2w, K, size, size, progress=progress)
    return ViewSet(rgba, np.asarray(c2w, dtype=np.float64), K, [f"{names_prefix}_{i:03d}.png" for i in range(len(c2w))],
                   depth=depth, backend="gt_head", meta={"generator": "recon.testing.gt_head"})


def head_height_of(points: np.ndarray) -> float:
    return float(np.ptp(np.asarray(points)[:, 1]))


__all__ = ["GTHead", "gt_head", "head_radius", "head_texture", "ring_and_holdout", "sample_surface", "chamfer",
           "views_of", "head_height_of"]
