"""A star-shaped surface around the origin: radius r(lat, lon) on a spherical grid.

Directions: lon = atan2(x, z) in [-pi, pi) (0 = +Z, the face; +pi/2 = +X), lat =
asin(y) in [-pi/2, pi/2] (+Y up). The radius grid has rows uniform in sin(lat):
sin(lat_i) = 1 - 2i/(H-1) (finest at the equator where the face is; rows 0 and H-1
are the poles, kept constant along lon so the surface is single-valued there; and
no arcsine is needed to look a point up) and columns lon_j = -pi + j*2*pi/W (wrapping).
The surface *is* the bilinear interpolant of that grid: every renderer, the
texture projection and the visibility test evaluate the same function, which is
what makes the proxy's views exactly consistent with each other.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def grid_directions(rows: int, cols: int) -> np.ndarray:
    """Unit directions of the radius-grid nodes: (rows, cols, 3) float64."""
    lat = np.arcsin(np.clip(1.0 - 2.0 * np.arange(rows) / (rows - 1), -1.0, 1.0))
    lon = -math.pi + np.arange(cols) * 2 * math.pi / cols
    return lat_lon_to_dir(lat[:, None], lon[None, :])


def texel_directions(rows: int, cols: int) -> np.ndarray:
    """Unit directions of equirectangular texel centres (row 0 = top): (rows, cols, 3)."""
    lat = math.pi / 2 - (np.arange(rows) + 0.5) * math.pi / rows
    lon = -math.pi + (np.arange(cols) + 0.5) * 2 * math.pi / cols
    return lat_lon_to_dir(lat[:, None], lon[None, :])


def lat_lon_to_dir(lat, lon) -> np.ndarray:
    lat, lon = np.broadcast_arrays(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))
    return np.stack([np.cos(lat) * np.sin(lon), np.sin(lat), np.cos(lat) * np.cos(lon)], axis=-1)


def direction_to_grid(p: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Points (M,3) -> grid_sample coordinates (M,2) in [-1,1]: x = lon/pi, y = -sin(lat)
    (align_corners=True: x = -1 is lon = -pi, y = -1 is the north pole)."""
    x, y, z = p.unbind(-1)
    if norm is None:
        norm = torch.linalg.vector_norm(p, dim=-1)
    lon = torch.atan2(x, z)
    return torch.stack([lon * (1.0 / math.pi), -y / norm.clamp(min=1e-12)], dim=-1)


def fix_poles(r: np.ndarray) -> np.ndarray:
    """Make the pole rows constant (their mean) so the surface is continuous there."""
    r = np.array(r, dtype=np.float64)
    r[0] = r[0].mean()
    r[-1] = r[-1].mean()
    return r


CAP_LAT = math.radians(60.0)   # above this |latitude| the local slope bound is pooled over the cap
BOUND_WINDOW = 8               # half-width (cells) of the window each node's slope bound covers


def _slope_bounds(radius: np.ndarray) -> tuple[np.ndarray, float]:
    """Local bounds on |dr/d(angle)| (per radian) for the tracer.

    Returns G (rows, cols): for each node, the steepest slope of the bilinear surface
    within BOUND_WINDOW cells (pooled over the whole cap above |lat| > CAP_LAT), and
    alpha: an angle such that every direction within alpha of a point lies inside the
    window of each grid node around that point (so G bounds the slope along a step
    whose direction change is below alpha)."""
    rows, cols = radius.shape
    d = grid_directions(rows, cols)

    def ang(a, b):
        return np.arccos(np.clip(np.sum(a * b, -1), -1.0, 1.0))

    g_lat = np.abs(np.diff(radius, axis=0)) / np.maximum(ang(d[1:], d[:-1]), 1e-9)      # (rows-1, cols)
    dl = ang(d, np.roll(d, -1, axis=1))
    g_lon = np.where(dl > 1e-9, np.abs(np.roll(radius, -1, axis=1) - radius) / np.maximum(dl, 1e-9), 0.0)
    g = g_lon.copy()
    g[:-1] = np.maximum(g[:-1], g_lat)
    g[1:] = np.maximum(g[1:], g_lat)
    g = np.maximum(g, np.roll(g_lon, 1, axis=1))
    g *= 1.45                                          # |grad| <= sqrt(2) * max of the two slopes
    k = BOUND_WINDOW
    gp = np.concatenate([g[:, -k:], g, g[:, :k]], axis=1)
    gd = ndimage.maximum_filter(gp, size=(2 * k + 1, 2 * k + 1), mode="nearest")[:, k:-k]
    lat = np.arcsin(np.clip(d[:, 0, 1], -1, 1))
    cap_n, cap_s = lat > CAP_LAT - 1e-9, lat < -CAP_LAT + 1e-9
    # the caps plus the window around them share one bound
    lat_step = np.abs(np.diff(lat))
    for cap in (cap_n, cap_s):
        if cap.any():
            rows_in = np.nonzero(cap)[0]
            lo, hi = max(rows_in.min() - k, 0), min(rows_in.max() + k, rows - 1)
            gd[cap] = max(gd[cap].max(), g[lo:hi + 1].max())
    outside = ~(cap_n | cap_s)
    # window half-width in angle, outside the caps, minus one cell for the bilinear support
    lat_half = (k - 1) * lat_step.min()
    lon_half = (k - 1) * (2 * math.pi / cols) * math.cos(CAP_LAT)
    alpha = float(min(lat_half, lon_half)) if outside.any() else math.pi
    return gd, alpha


class StarSurface:
    """r(lat, lon) as a bilinear grid; evaluates inside/outside for points in torch."""

    def __init__(self, radius: np.ndarray):
        radius = fix_poles(radius)
        if radius.ndim != 2 or radius.shape[0] < 3 or radius.shape[1] < 4 or not np.all(radius > 0):
            raise ValueError(f"radius grid must be (H>=3, W>=4) and positive, got {radius.shape}")
        self.radius = radius                               # (H, W) float64
        self.rows, self.cols = radius.shape
        # One wrapped column appended so grid_sample's align_corners=True grid spans lon -pi..pi.
        padded = np.concatenate([radius, radius[:, :1]], axis=1)
        self._grid = torch.as_tensor(padded, dtype=torch.float32)[None, None].contiguous()
        self.r_max = float(radius.max())
        self.r_min = float(radius.min())
        # |d/dt (|p| - r(dir p))| <= 1 + G/|p| along a unit ray while the direction stays
        # within `bound_angle` of where G was looked up: the tracer's safe step
        slope, self.bound_angle = _slope_bounds(radius)
        both = np.stack([radius, slope], 0)
        both = np.concatenate([both, both[:, :, :1]], axis=2)
        self._grid2 = torch.as_tensor(both, dtype=torch.float32)[None].contiguous()
        self.slope_max = float(slope.max())

    # ------------------------------------------------------------------ lookups
    def radius_at(self, p: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
        """Surface radius in the direction of points p (..., 3) (any length, not 0)."""
        shape = p.shape[:-1]
        g = direction_to_grid(p.reshape(-1, 3), None if norm is None else norm.reshape(-1))
        out = F.grid_sample(self._grid, g[None, None], mode="bilinear", align_corners=True, padding_mode="border")
        return out.reshape(shape)

    def signed_and_slope(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(f, local slope bound G, |p|) for points p (M, 3)."""
        n = torch.linalg.vector_norm(p, dim=-1)
        g = direction_to_grid(p, n)
        out = F.grid_sample(self._grid2, g[None, None], mode="bilinear", align_corners=True, padding_mode="border")
        return n - out[0, 0, 0], out[0, 1, 0], n

    def signed(self, p: torch.Tensor) -> torch.Tensor:
        """< 0 inside the head, > 0 outside (radial distance to the surface)."""
        n = torch.linalg.vector_norm(p, dim=-1)
        return n - self.radius_at(p, n)

    def radius_np(self, dirs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.radius_at(torch.as_tensor(np.asarray(dirs), dtype=torch.float32)).double().numpy()

    # ------------------------------------------------------------------ geometry
    def points(self) -> np.ndarray:
        """Grid node positions (H, W, 3)."""
        return grid_directions(self.rows, self.cols) * self.radius[..., None]

    def normals_at(self, dirs: np.ndarray, eps: float = 1e-3) -> np.ndarray:
        """Outward unit normals of the surface at directions dirs (..., 3), by finite
        differences of the surface point along two tangent directions."""
        d = np.asarray(dirs, dtype=np.float64)
        d = d / np.linalg.norm(d, axis=-1, keepdims=True)
        up = np.where(np.abs(d[..., 1:2]) > 0.9, np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
        t1 = np.cross(up, d)
        t1 /= np.linalg.norm(t1, axis=-1, keepdims=True)
        t2 = np.cross(d, t1)

        def pt(v):
            v = v / np.linalg.norm(v, axis=-1, keepdims=True)
            return v * self.radius_np(v)[..., None]

        dp1 = pt(d + eps * t1) - pt(d - eps * t1)
        dp2 = pt(d + eps * t2) - pt(d - eps * t2)
        n = np.cross(dp1, dp2)
        n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
        flip = np.sum(n * d, axis=-1, keepdims=True) < 0
        return np.where(flip, -n, n)
