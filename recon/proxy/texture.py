"""The proxy head's equirectangular texture (row 0 = top, column 0 = longitude -pi,
the back seam; longitude 0 = the face).

Front: the photo projected through the portrait camera wherever the surface is
visible from it, weighted by how squarely it faces the camera (grazing texels
would be stretched smears). Everywhere else: the projected colours pulled outward
(pull-push fill), fading into a prior painted from the image's own colours (hair
from the top of the matte, the colour of the head's sides at each height, hair
over the back down to a hairline estimated from the sides), with baked soft
top light and low-frequency + strand noise made from 3D noise on the sphere, so
the texture is seamless at the wrap-around and has no holes.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from scipy import ndimage

from .landmarks import FaceKeypoints
from .raycast import cast
from .shape import PortraitCamera
from .surface import StarSurface, texel_directions


def _smoothstep(x, e0, e1):
    t = np.clip((np.asarray(x, dtype=np.float64) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


# ------------------------------------------------------------------- fills
def _up2(a: np.ndarray) -> np.ndarray:
    """2x bilinear upsampling (half-pixel aligned), wrapping in x, clamped in y."""
    left, right = np.roll(a, 1, axis=1), np.roll(a, -1, axis=1)
    x = np.empty((a.shape[0], 2 * a.shape[1]) + a.shape[2:], a.dtype)
    x[:, 0::2] = 0.75 * a + 0.25 * left
    x[:, 1::2] = 0.75 * a + 0.25 * right
    up = np.concatenate([x[:1], x[:-1]], 0)
    dn = np.concatenate([x[1:], x[-1:]], 0)
    y = np.empty((2 * x.shape[0],) + x.shape[1:], x.dtype)
    y[0::2] = 0.75 * x + 0.25 * up
    y[1::2] = 0.75 * x + 0.25 * dn
    return y


def pull_push(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Fill an (H, W, C) image where the weight w (H, W) in [0,1] is low from the
    weighted colours around it, across scales (no streaks, wraps in x)."""
    h, wd = w.shape
    if min(h, wd) <= 2 or w.sum() <= 0:
        mean = (img * w[..., None]).sum((0, 1)) / max(w.sum(), 1e-8)
        return np.broadcast_to(mean, img.shape).copy() if w.sum() > 0 else img.copy()
    ph, pw = h % 2, wd % 2
    if ph or pw:
        img = np.concatenate([img, img[:, :pw]], 1) if pw else img
        w = np.concatenate([w, w[:, :pw]], 1) if pw else w
        img = np.concatenate([img, img[-ph:]], 0) if ph else img
        w = np.concatenate([w, w[-ph:]], 0) if ph else w
    H, W = w.shape
    cw = (img * w[..., None]).reshape(H // 2, 2, W // 2, 2, -1).sum((1, 3))
    ws = w.reshape(H // 2, 2, W // 2, 2).sum((1, 3))
    coarse = np.where(ws[..., None] > 0, cw / np.maximum(ws, 1e-8)[..., None], 0.0)
    filled_coarse = pull_push(coarse, np.minimum(ws, 1.0))
    up = _up2(filled_coarse)
    out = img * w[..., None] + up * (1 - w[..., None])
    return out[:h, :wd]


def sphere_noise(dirs: np.ndarray, rng: np.random.Generator, cells: int, order: int = 3) -> np.ndarray:
    """Smooth value noise in 3D evaluated on unit directions: seamless on the sphere, ~N(0,1)."""
    grid = rng.standard_normal((cells, cells, cells))
    grid = ndimage.gaussian_filter(grid, 0.7, mode="wrap")
    grid /= grid.std() + 1e-8
    coords = (dirs.reshape(-1, 3).T + 1.0) * 0.5 * (cells - 1)
    v = ndimage.map_coordinates(grid, coords, order=order, mode="nearest")
    return v.reshape(dirs.shape[:-1])


def strand_noise(dirs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise stretched along meridians (hair falls from the crown): fine across
    longitude, coarse along latitude; evaluated on a cylinder so it wraps."""
    lon = np.arctan2(dirs[..., 0], dirs[..., 2])
    lat = np.arcsin(np.clip(dirs[..., 1], -1, 1))
    n_across, n_along = 96, 8
    grid = rng.standard_normal((n_across, n_across, n_along))
    coords = np.stack([(np.cos(lon) + 1) * 0.5 * (n_across - 1), (np.sin(lon) + 1) * 0.5 * (n_across - 1),
                       (lat / math.pi + 0.5) * (n_along - 1)], 0).reshape(3, -1)
    v = ndimage.map_coordinates(grid, coords, order=1, mode="nearest").reshape(dirs.shape[:-1])
    return v / (v.std() + 1e-8)


# ---------------------------------------------------------------- colours
def _robust_colour(pixels: np.ndarray) -> np.ndarray | None:
    if pixels.shape[0] < 8:
        return None
    return np.median(pixels.astype(np.float64), axis=0)


def image_colours(image: np.ndarray, mask: np.ndarray, kp: FaceKeypoints) -> dict:
    """Hair colour (top of the matte), skin colour (cheeks), and the colour of the
    head's sides per image row (a band inside each side of the silhouette)."""
    h, w = mask.shape
    img = image.astype(np.float64)
    rows = np.nonzero(mask.any(1))[0]
    y_top = int(rows[0])
    right, down = kp.axes
    y_brow = float((kp.eye_mid - 0.6 * kp.iod * down)[1])
    band_end = int(max(y_top + 2, y_top + 0.45 * (y_brow - y_top)))
    yy, xx = np.mgrid[0:h, 0:w]
    hair_px = image[mask & (yy >= y_top) & (yy < band_end)]
    skin_sel = np.zeros_like(mask)
    for s in (-0.6, 0.6):
        c = kp.eye_mid + right * s * kp.iod + down * 0.75 * kp.iod
        skin_sel |= (xx - c[0]) ** 2 + (yy - c[1]) ** 2 < (0.16 * kp.iod) ** 2
    skin = _robust_colour(image[mask & skin_sel])
    if skin is None:
        skin = _robust_colour(image[mask]) if mask.sum() >= 8 else np.array([180.0, 140.0, 120.0])
    hair = _robust_colour(hair_px)
    if hair is None:
        hair = skin * 0.5
    # per-row side colours
    side = np.full((h, 3), np.nan)
    er = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    for y in range(h):
        xs = np.nonzero(er[y])[0]
        if xs.size < 6:
            continue
        x0, x1 = xs[0], xs[-1]
        bw = max(3, int(0.12 * (x1 - x0)))
        sel = np.concatenate([xs[xs < x0 + bw], xs[xs > x1 - bw]])
        side[y] = np.median(img[y, sel], axis=0)
    valid = ~np.isnan(side[:, 0])
    if valid.any():
        idx = np.arange(h)
        for c in range(3):
            side[:, c] = np.interp(idx, idx[valid], side[valid, c])
        side = ndimage.gaussian_filter1d(side, max(2.0, 0.3 * kp.iod), axis=0, mode="nearest")
    else:
        side[:] = skin
    # hairline at the back: hair reaches at least the mouth's height, lower when the
    # sides below the eyes stay hair-coloured (long hair)
    d_hair = np.linalg.norm(side - hair, axis=1)
    hairy = (d_hair < np.linalg.norm(side - skin, axis=1)) & (d_hair < max(30.0, 0.6 * np.linalg.norm(hair - skin)))
    y_eye = int(np.clip(kp.eye_mid[1], 0, h - 1))
    y_hl = float(kp.mouth[1])
    y = y_eye
    while y < h - 1 and hairy[y]:
        y += 1
    y_hl = float(np.clip(max(y_hl, y), 0, h - 1))
    return {"hair": hair, "skin": skin, "side": side, "hairline_y": y_hl}


# ---------------------------------------------------------------- texture
def build_texture(image: np.ndarray, mask: np.ndarray, surf: StarSurface, cam: PortraitCamera,
                  kp: FaceKeypoints, size: int, seed: int = 0):
    """Returns (baked, fill, weight, info): baked (size//2, size, 3) float32 0..255 is the
    full texture (for meshes); fill is the same without the photo; weight (size//2, size)
    in [0,1] is how much of the projected photo each texel shows."""
    ht, wt = max(size // 2, 4), max(size, 8)
    dirs = texel_directions(ht, wt)
    r = surf.radius_np(dirs)
    pts = dirs * r[..., None]
    normals = surf.normals_at(dirs)
    px, z = cam.project(pts)
    to_cam = cam.C - pts
    dist = np.linalg.norm(to_cam, axis=-1)
    cos = np.sum(normals * to_cam, -1) / np.maximum(dist, 1e-9)
    h, w = mask.shape
    inside = (z > 0) & (px[..., 0] >= 0) & (px[..., 0] <= w - 1) & (px[..., 1] >= 0) & (px[..., 1] <= h - 1)
    cand = inside & (cos > 0.02)

    # visibility: the portrait camera's ray toward the texel must not hit the head earlier
    visible = np.zeros_like(cand)
    idx = np.nonzero(cand.ravel())[0]
    if idx.size:
        d = (-to_cam.reshape(-1, 3)[idx]) / dist.reshape(-1)[idx, None]
        o = torch.as_tensor(cam.C, dtype=torch.float32).expand(idx.size, 3)
        with torch.no_grad():
            t = cast(surf, o, torch.as_tensor(d, dtype=torch.float32),
                     t_end=torch.as_tensor(dist.reshape(-1)[idx] + 0.01, dtype=torch.float32)).numpy()
        visible.reshape(-1)[idx] = t >= dist.reshape(-1)[idx] - 2e-3 * max(surf.r_max, 0.1)

    mx, my = px[..., 0].astype(np.float32), px[..., 1].astype(np.float32)
    proj = cv2.remap(image.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    # trust the matte's interior only: its edge pixels carry background colour
    inner = cv2.erode(mask.astype(np.uint8) * 255, np.ones((5, 5), np.uint8))
    inner = cv2.GaussianBlur(inner, (0, 0), 1.5).astype(np.float32) / 255.0
    m_at = cv2.remap(inner, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    wproj = _smoothstep(cos, 0.25, 0.6) * visible * np.clip(m_at, 0, 1)

    cols = image_colours(image, mask, kp)
    rows_px = np.clip(np.round(px[..., 1]), 0, h - 1).astype(int)
    rows_px = np.where(z > 0, rows_px, 0)
    side = cols["side"][rows_px]
    _, down = kp.axes
    hair_line = 1.0 - _smoothstep(px[..., 1], cols["hairline_y"] - 0.2 * kp.iod, cols["hairline_y"] + 0.3 * kp.iod)
    back = _smoothstep(-dirs[..., 2], -0.35, 0.15)                 # face is +Z: back is -Z
    top = _smoothstep(dirs[..., 1], 0.55, 0.85)
    hair_w = np.clip(np.maximum(hair_line * back, top), 0, 1)
    prior = side * (1 - hair_w[..., None]) + cols["hair"] * hair_w[..., None]

    filled = pull_push(proj, (wproj > 0.05).astype(np.float64) * np.maximum(wproj, 0.3))
    known = (wproj > 0.3).astype(np.uint8)
    pad = wt // 2
    unk = np.concatenate([1 - known[:, -pad:], 1 - known, 1 - known[:, :pad]], 1).astype(np.uint8)
    dist_t = cv2.distanceTransform(unk, cv2.DIST_L2, 5)[:, pad:-pad] if known.any() else np.full(known.shape, 1e9, np.float32)
    ang = dist_t * (math.pi / ht)
    near = np.exp(-(ang / 0.22) ** 2)[..., None]
    base = filled * near + prior * (1 - near)

    rng = np.random.default_rng(seed)
    low = sphere_noise(dirs, rng, 10)
    strands = strand_noise(dirs, rng)
    light = np.array([0.0, 0.75, 0.66])
    light /= np.linalg.norm(light)
    shade = 0.8 + 0.2 * np.clip(normals @ light, 0, 1)
    mod = shade * (1.0 + 0.05 * low + 0.05 * strands * hair_w)
    fill = np.clip(base * mod[..., None], 0, 255)
    tex = np.clip(wproj[..., None] * proj + (1 - wproj[..., None]) * fill, 0, 255)
    info = {"hair_rgb": cols["hair"].round(1).tolist(), "skin_rgb": cols["skin"].round(1).tolist(),
            "projected_fraction": float((wproj > 0.5).mean()), "hairline_y": cols["hairline_y"]}
    return tex.astype(np.float32), fill.astype(np.float32), wproj.astype(np.float32), info
