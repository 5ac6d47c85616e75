"""Fit the proxy's head shape to the portrait: a base ellipsoid sized from the matte,
scaled per image-plane direction until its silhouette from the portrait camera
matches the matte, plus a face relief (nose, brows, eye sockets, lips, chin,
cheekbones) placed from the landmarks."""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from scipy import ndimage

from .. import cameras
from ..errors import InputError
from ..types import Portrait
from .landmarks import FaceKeypoints
from .raycast import render_view
from .surface import StarSurface, fix_poles, grid_directions

DEPTH_RATIO = 1.15     # head half-depth (front-back) / visible half-width (skull plus hair)
N_BINS = 360           # image-plane directions of the silhouette profile
IOD_CM = 6.3           # adult inter-ocular distance, the unit of the face relief
HEAD_EXPONENT = 2.5    # superellipsoid exponent of the base head
BUST_DEPTH_FRONT = 0.2  # bust half-depth toward the portrait camera / its in-plane radius (passes under the chin)
BUST_DEPTH_BACK = 0.3   # and away from it


def clean_mask(alpha: np.ndarray) -> np.ndarray:
    """Matte -> the largest foreground blob with its holes filled (bool)."""
    m = np.asarray(alpha) > 127
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
    if n <= 1:
        raise InputError("the portrait's alpha matte is empty", hint="check the matte (preprocess --set preprocess.matte=...)")
    keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    m = ndimage.binary_fill_holes(lab == keep)
    if m.mean() < 0.01:
        raise InputError(f"the portrait's matte covers only {100 * m.mean():.2f}% of the crop",
                         hint="the head should fill the centre of the aligned crop")
    return m


def matte_is_uninformative(mask: np.ndarray) -> bool:
    """True when the matte cannot outline a head: it fills (nearly) the whole crop, e.g.
    preprocess ran with matte=none, or the segmentation took the background too."""
    top = mask[0].mean()
    sides = 0.5 * (mask[:, 0].mean() + mask[:, -1].mean())
    return bool(mask.mean() > 0.92 or (top > 0.5 and sides > 0.7))


def matte_from_landmarks(kp: FaceKeypoints, shape: tuple[int, int]) -> np.ndarray:
    """A head-and-neck matte from the face key points and adult proportions (in
    inter-ocular distances: skull and hair half-width 1.3, crown 1.9 above the eyes)."""
    h, w = shape
    right, down = kp.axes
    top = kp.eye_mid - 1.9 * kp.iod * down
    centre = 0.5 * (top + kp.chin)
    half_h = 0.5 * float(np.linalg.norm(kp.chin - top))
    angle = math.degrees(math.atan2(right[1], right[0]))
    out = np.zeros((h, w), np.uint8)
    cv2.ellipse(out, (int(round(centre[0])), int(round(centre[1]))), (int(round(1.3 * kp.iod)), int(round(half_h))),
                angle, 0, 360, 1, -1)
    neck = np.array([kp.chin - 0.85 * kp.iod * right - 0.5 * kp.iod * down, kp.chin + 0.85 * kp.iod * right - 0.5 * kp.iod * down,
                     kp.chin + 0.85 * kp.iod * right + 3 * h * down, kp.chin - 0.85 * kp.iod * right + 3 * h * down])
    cv2.fillPoly(out, [np.round(neck).astype(np.int32)], 1)
    return out.astype(bool)


def radial_profile(mask: np.ndarray, c0: np.ndarray, n_bins: int = N_BINS, extend: float = 1.25):
    """Farthest foreground radius (pixels) from c0 in each of n_bins image directions
    (angle psi measured from +x toward +y, i.e. clockwise on screen). Where the
    foreground reaches the image border (neck, shoulders, long hair) the profile is
    extended to `extend` x the border distance: the body goes on outside the crop."""
    h, w = mask.shape
    psi = np.arange(n_bins) * 2 * math.pi / n_bins
    radii = np.arange(0, 1.5 * max(h, w), 0.5)
    xs = c0[0] + np.cos(psi)[:, None] * radii[None, :]
    ys = c0[1] + np.sin(psi)[:, None] * radii[None, :]
    ix, iy = np.floor(xs).astype(int), np.floor(ys).astype(int)
    inside = (ix >= 0) & (iy >= 0) & (ix < w) & (iy < h)
    fg = np.zeros_like(inside)
    fg[inside] = mask[iy[inside], ix[inside]]
    last_in = inside.sum(1) - 1                       # rays start inside, so inside is a prefix
    rho = np.where(fg.any(1), radii[np.argmax(np.where(fg, radii[None, :], -1), axis=1)], 0.0)
    cut = fg[np.arange(n_bins), np.maximum(last_in, 0)] & (last_in >= 0)
    rho = np.where(cut, radii[np.maximum(last_in, 0)] * extend, rho)
    return np.maximum(rho, 2.0), cut


def star_hull(mask: np.ndarray, c0: np.ndarray, n_bins: int = 720) -> np.ndarray:
    """The smallest region star-shaped around c0 that holds the mask (bool). A star-shaped
    head's silhouette is star-shaped around the origin's projection, so this is the best
    silhouette the proxy can match (concavities such as neck-shoulder notches fill in)."""
    rho, _ = radial_profile(mask, c0, n_bins, extend=1.0)
    psi = np.arange(n_bins) * 2 * math.pi / n_bins
    pts = np.stack([c0[0] + np.cos(psi) * (rho + 0.5), c0[1] + np.sin(psi) * (rho + 0.5)], -1)
    out = np.zeros(mask.shape, np.uint8)
    cv2.fillPoly(out, [np.round(pts * 16).astype(np.int32)], 1, shift=4)
    return out.astype(bool) | mask


def _circ_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter1d(x, sigma, mode="wrap")


def _interp_circ(table: np.ndarray, psi: np.ndarray) -> np.ndarray:
    n = table.shape[0]
    f = np.mod(psi, 2 * math.pi) * n / (2 * math.pi)
    i0 = np.floor(f).astype(int) % n
    w = f - np.floor(f)
    return table[i0] * (1 - w) + table[(i0 + 1) % n] * w


class PortraitCamera:
    """The portrait's camera in crop pixels."""

    def __init__(self, portrait: Portrait):
        self.h, self.w = portrait.alpha.shape
        self.c2w = np.asarray(portrait.c2w, dtype=np.float64)
        self.K = np.asarray(portrait.K, dtype=np.float64)
        self.Kp = cameras.intrinsics_pixels(self.K, self.w, self.h)
        self.R, self.C = self.c2w[:3, :3], self.c2w[:3, 3]
        self.z_origin = float(-self.C @ self.R[:, 2])   # camera-z depth of the head centre
        if self.z_origin <= 0.5:
            raise InputError(f"the portrait camera is {self.z_origin:.3f} units in front of the head centre",
                             hint="the camera must look at the head from outside (PanoHead radius 2.7)")

    def to_cam(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X) - self.C) @ self.R

    def project(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World points (...,3) -> pixel coords (...,2) and camera depth (...)."""
        Xc = self.to_cam(X)
        z = Xc[..., 2]
        zs = np.where(np.abs(z) < 1e-9, 1e-9, z)
        x = self.Kp[0, 0] * Xc[..., 0] / zs + self.Kp[0, 2]
        y = self.Kp[1, 1] * Xc[..., 1] / zs + self.Kp[1, 2]
        return np.stack([x, y], -1), z

    def px_to_world(self, px: float, depth: float | None = None) -> float:
        return px * (self.z_origin if depth is None else depth) / self.Kp[0, 0]


def _silhouette_profile(surf: StarSurface, cam: PortraitCamera, zoom: float, size: int):
    """Render the surface's silhouette through a zoomed-out copy of the portrait camera
    and return its radial profile converted to crop pixels."""
    K = cam.K.copy()
    K[0, 0] /= zoom
    K[1, 1] /= zoom
    with torch.no_grad():
        _, alpha, _ = render_view(surf, None, cam.c2w, K, size, size, ss=1)
    hit = alpha > 0.5
    c0_crop = cam.project(np.zeros(3))[0]
    # crop pixel -> wide pixel: normalised coordinate shrinks by zoom about the principal point
    scale = size / (zoom * cam.w)
    c0_w = (c0_crop - cam.Kp[:2, 2]) * scale + np.array([cam.K[0, 2], cam.K[1, 2]]) * size
    rho, _ = radial_profile(hit, c0_w, extend=1.0)
    return rho / scale, hit


def _smax(a: np.ndarray, b: np.ndarray, k: float = 8.0) -> np.ndarray:
    """Smooth maximum of two positive radii (the union of two star-shaped bodies)."""
    m = np.maximum(np.maximum(a, b), 1e-9)
    return m * ((a / m) ** k + (b / m) ** k) ** (1.0 / k)


def fit_silhouette(cam: PortraitCamera, mask: np.ndarray, kp: FaceKeypoints, yaw_deg: float, detail: int,
                   iterations: int = 6, progress=None) -> tuple[np.ndarray, dict]:
    """Radius grid (detail+1, 2*detail) whose silhouette from the portrait camera matches `mask`.

    The shape is the smooth union of a head and a bust, both star-shaped around the origin:
    - head: an ellipsoid sized from the matte (half-depth DEPTH_RATIO x half-width, chin
      from the landmarks), scaled per image-plane direction psi near its rim so its
      silhouette follows the hair outline (at most +35% above, +5% below the face);
    - bust: where the matte reaches beyond the head below it (neck, shoulders), a flat
      ellipse per image-plane direction with in-plane radius rho(psi) and depth
      BUST_DEPTH_FRONT x rho in front (thin enough to pass under the chin) and
      BUST_DEPTH_BACK x rho behind.
    Both are refined by rendering the silhouette and comparing radial profiles."""
    c0 = cam.project(np.zeros(3))[0]
    ix, iy = int(np.clip(c0[0], 0, cam.w - 1)), int(np.clip(c0[1], 0, cam.h - 1))
    if not mask[iy, ix]:
        raise InputError(f"the matte does not cover the head centre's projection (pixel {ix}, {iy})",
                         hint="the aligned crop should have the head in the middle; check the matte and the pose")
    rho_mask, cut = radial_profile(mask, c0)
    rho_mask = _circ_smooth(rho_mask, 1.0)
    psi_bins = np.arange(N_BINS) * 2 * math.pi / N_BINS

    def sector(center, half=math.radians(15)):
        dlt = np.abs((psi_bins - center + math.pi) % (2 * math.pi) - math.pi)
        return dlt <= half

    sides = (sector(0.0) | sector(math.pi)) & ~cut
    side = np.median(rho_mask[sides]) if sides.any() else np.median(rho_mask)
    top = np.median(rho_mask[sector(1.5 * math.pi, math.radians(8))])
    half_w = cam.px_to_world(side)
    yaw = math.radians(yaw_deg)
    ax = half_w / math.sqrt(math.cos(yaw) ** 2 + (DEPTH_RATIO * math.sin(yaw)) ** 2)
    az = DEPTH_RATIO * ax
    ay_top = cam.px_to_world(top)
    chin_px = max(float(kp.chin[1] - c0[1]), 0.3 * top)
    ay_bot = max(cam.px_to_world(chin_px) * 1.02, 0.5 * ay_top)

    dirs = grid_directions(detail + 1, 2 * detail)
    ay = np.where(dirs[..., 1] > 0, ay_top, ay_bot)
    # a superellipsoid (exponent HEAD_EXPONENT > 2): heads are broader and flatter in
    # front than an ellipsoid, which keeps the projected face from wrapping round too soon
    n = HEAD_EXPONENT
    r_base = (np.abs(dirs[..., 0] / ax) ** n + np.abs(dirs[..., 1] / ay) ** n + np.abs(dirs[..., 2] / az) ** n) ** (-1.0 / n)
    dc = dirs @ cam.R                                  # directions in camera axes
    psi = np.arctan2(dc[..., 1], dc[..., 0])
    w_rim = 1.0 - dc[..., 2] ** 2                      # cos^2 of the angle out of the image plane
    half_diag = cam.px_to_world(0.5 * math.hypot(cam.w, cam.h))
    r_cap = 1.3 * half_diag
    zoom = 1.6
    size = int(min(224, max(64, zoom * 0.5 * max(cam.w, cam.h))))

    # the base head's own silhouette, to split the matte into head and bust
    rho_head0, _ = _silhouette_profile(StarSurface(r_base), cam, zoom, size)
    below = np.sin(psi_bins)                           # image y is down: > 0 below the centre
    grow = 1.05 + 0.30 * (1 - np.clip((below + 0.1) / 0.4, 0, 1))
    head_target = np.minimum(rho_mask, grow * rho_head0)
    body_bins = (rho_mask > 1.04 * head_target) & (below > 0.15)
    body_bins = ndimage.binary_opening(body_bins, iterations=2, structure=np.ones(3), border_value=0) \
        if body_bins.sum() > 6 else np.zeros_like(body_bins)
    body_w = _circ_smooth(body_bins.astype(np.float64), 2.0)
    s = np.ones(N_BINS)                                # head scale per psi
    rho_body = np.where(body_bins, rho_mask, 0.0)      # bust in-plane radius (crop pixels)

    def compose(s, rho_body):
        head = r_base * (1.0 + (_interp_circ(s, psi) - 1.0) * w_rim)
        rb = np.array([cam.px_to_world(x) for x in rho_body]) * body_w
        rb_dir = _interp_circ(rb, psi)
        cos2 = w_rim
        depth = np.where(dc[..., 2] < 0, BUST_DEPTH_FRONT, BUST_DEPTH_BACK) * rb_dir   # camera z < 0: toward it
        body = 1.0 / np.sqrt(cos2 / np.maximum(rb_dir, 1e-6) ** 2 + (1 - cos2) / np.maximum(depth, 1e-6) ** 2)
        # smoothing (>= 1 grid cell, ~2 degrees) rounds the bust's thin rim, which a coarse
        # grid would otherwise turn into ripples and specks in side views
        return smooth_grid(np.minimum(_smax(head, body), r_cap), max(1.0, detail / 90.0))

    err = float("inf")
    for it in range(iterations):
        surf = StarSurface(compose(s, rho_body))
        rho_r, _ = _silhouette_profile(surf, cam, zoom, size)
        ratio = rho_mask / np.maximum(rho_r, 1.0)
        err = float(np.median(np.abs(ratio - 1.0)))
        if progress is not None:
            progress(it + 1, iterations, f"fitting the head silhouette (median error {100 * err:.1f}%)")
        if err < 0.005:
            break
        head_ratio = np.clip(head_target / np.maximum(rho_r, 1.0), 0.75, 1.33)
        s = _circ_smooth(np.where(body_bins, s, s * head_ratio), 1.0)
        rho_body = np.where(body_bins, rho_body * np.clip(ratio, 0.8, 1.25), 0.0)
    r = compose(s, rho_body)
    info = {"half_axes": [ax, ay_top, az], "chin_half_axis": ay_bot, "silhouette_median_error": err,
            "r_cap": r_cap, "bust_fraction": float(body_bins.mean())}
    return r, info


def _gauss(a, b, ca, cb, sa, sb):
    return np.exp(-0.5 * (((a - ca) / sa) ** 2 + ((b - cb) / sb) ** 2))


def face_relief(cam: PortraitCamera, kp: FaceKeypoints, r: np.ndarray) -> np.ndarray:
    """Radial offsets (world units) that carve a face into the front of the head."""
    rows, cols = r.shape
    dirs = grid_directions(rows, cols)
    pts = dirs * r[..., None]
    px, _ = cam.project(pts)
    right, down = kp.axes
    rel = (px - kp.eye_mid) / max(kp.iod, 1e-6)
    a, b = rel @ right, rel @ down                     # face coordinates in inter-ocular units
    na, nb = (kp.nose - kp.eye_mid) @ right / kp.iod, (kp.nose - kp.eye_mid) @ down / kp.iod
    ma, mb = (kp.mouth - kp.eye_mid) @ right / kp.iod, (kp.mouth - kp.eye_mid) @ down / kp.iod
    ca, cb = (kp.chin - kp.eye_mid) @ right / kp.iod, (kp.chin - kp.eye_mid) @ down / kp.iod
    mouth_w = max(kp.mouth_half_width / kp.iod, 0.2)

    # nose ridge: from the nasion to the tip, rising and widening
    p0 = np.array([0.0, 0.08])
    seg = np.array([na, nb]) - p0
    seg_len2 = max(float(seg @ seg), 1e-6)
    tau = np.clip(((a - p0[0]) * seg[0] + (b - p0[1]) * seg[1]) / seg_len2, 0.0, 1.0)
    dist2 = (a - p0[0] - tau * seg[0]) ** 2 + (b - p0[1] - tau * seg[1]) ** 2
    h = (0.4 + 1.2 * tau) * np.exp(-0.5 * dist2 / (0.08 + 0.07 * tau) ** 2)
    h += 0.6 * _gauss(a, b, na, nb - 0.02, 0.26, 0.14)                        # nose wings
    for ex in (-0.5, 0.5):
        h -= 0.75 * _gauss(a, b, ex, 0.0, 0.24, 0.17)                         # eye sockets
        h += 0.35 * _gauss(a, b, ex, 0.0, 0.11, 0.08)                         # eyeballs
        h += 0.35 * _gauss(a, b, ex * 0.9, -0.33, 0.35, 0.12)                 # brow ridge
        h += 0.30 * _gauss(a, b, ex * 1.25, 0.45, 0.28, 0.25)                 # cheekbones
    h += 0.35 * _gauss(a, b, ma, mb, 0.8 * mouth_w, 0.14)                     # lips
    h += 0.30 * _gauss(a, b, 0.5 * (na + ma), 0.5 * (nb + mb), 0.45, 0.3)     # upper jaw
    h += 0.35 * _gauss(a, b, ca, cb - 0.18, 0.28, 0.18)                       # chin
    face_depth = cam.z_origin - 0.9 * np.max(r)
    cm = cam.px_to_world(kp.iod, face_depth) / IOD_CM                          # world units per cm
    facing = -(dirs @ cam.R)[..., 2]                   # cosine toward the portrait camera
    w = np.clip((facing - 0.3) / 0.45, 0, 1)
    w = w * w * (3 - 2 * w)
    return h * cm * w


def smooth_grid(r: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing that wraps in longitude."""
    pad = int(3 * sigma) + 1
    rp = np.concatenate([r[:, -pad:], r, r[:, :pad]], axis=1)
    rp = ndimage.gaussian_filter(rp, sigma, mode="nearest")
    return rp[:, pad:-pad]


def fit_head(portrait: Portrait, kp: FaceKeypoints, detail: int, progress=None) -> tuple[np.ndarray, dict, PortraitCamera, np.ndarray]:
    """Radius grid of the proxy head, fit info, the portrait camera and the cleaned mask."""
    cam = PortraitCamera(portrait)
    mask = clean_mask(portrait.alpha)
    notes = []
    if matte_is_uninformative(mask):
        mask = matte_from_landmarks(kp, mask.shape)
        notes.append(f"the matte covers {100 * (portrait.alpha > 127).mean():.0f}% of the crop and outlines no head: "
                     "the proxy used a head-and-neck outline from the face landmarks instead")
    r, info = fit_silhouette(cam, mask, kp, portrait.yaw_deg, detail, progress=progress)
    r = r + face_relief(cam, kp, r)
    r = fix_poles(smooth_grid(r, max(detail / 256.0, 0.5)))
    info["notes"] = notes
    return np.maximum(r, 1e-3), info, cam, mask
