"""Exact CPU ray casting of a StarSurface (vectorised torch).

A ray o + t*d enters the head where f = |p| - r(dir(p)) turns negative. We step
from the bounding sphere with safe steps (f divided by a local bound on how fast f
can change along the ray, so no step crosses the surface; never below H_MIN),
bracket the first sign change and refine it to ~1e-6 units. To keep 36 views at
512^2 cheap on two cores:
  1. a coarse pass (every 4th pixel) traces the whole bounding-sphere chord;
  2. fine pixels whose coarse neighbourhood all hit at nearly one depth are solved
     in a tight bracket around the interpolated depth (false position); the others
     trace from just before their neighbours' nearest hit;
  3. silhouette pixels are supersampled (ss x ss rays) for anti-aliased alpha.
Colours are a function of the surface point only (Shader), so every camera sees
the same colour at the same point: the views are exactly consistent.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from .surface import StarSurface

_CHUNK = 1 << 21   # evaluations per marching block (memory bound)


def sphere_interval(o: torch.Tensor, d: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry/exit t of unit rays (M,3) with the sphere |p| = radius; valid mask."""
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - radius * radius
    disc = b * b - c
    valid = disc > 0
    s = torch.sqrt(torch.clamp(disc, min=0))
    t0 = torch.clamp(-b - s, min=1e-4)
    t1 = -b + s
    valid &= t1 > t0
    return t0, t1, valid


def refine(surf: StarSurface, o, d, lo, hi, flo, fhi, bisections: int = 2, secants: int = 4):
    """Root of f on brackets [lo, hi] with f(lo) > 0 > f(hi): a few bisections, then
    Illinois false position (f is smooth along a ray, so it converges fast)."""
    for _ in range(bisections):
        mid = 0.5 * (lo + hi)
        fm = surf.signed(o + mid[:, None] * d)
        inside = fm < 0
        hi, fhi = torch.where(inside, mid, hi), torch.where(inside, fm, fhi)
        lo, flo = torch.where(inside, lo, mid), torch.where(inside, flo, fm)
    side = torch.zeros_like(lo)
    for _ in range(secants):
        t = lo + (hi - lo) * flo / (flo - fhi).clamp(min=1e-12)
        t = torch.minimum(torch.maximum(t, lo), hi)
        ft = surf.signed(o + t[:, None] * d)
        inside = ft < 0
        # Illinois: halve the stale end's value when the same end is kept twice
        flo = torch.where(inside & (side < 0), flo * 0.5, flo)
        fhi = torch.where(~inside & (side > 0), fhi * 0.5, fhi)
        hi, fhi = torch.where(inside, t, hi), torch.where(inside, ft, fhi)
        lo, flo = torch.where(inside, lo, t), torch.where(inside, flo, ft)
        side = torch.where(inside, -torch.ones_like(side), torch.ones_like(side))
    return lo + (hi - lo) * flo / (flo - fhi).clamp(min=1e-12)


def march(surf: StarSurface, o: torch.Tensor, d: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
          step: float, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """First surface crossing in [t0, t1] with samples every `step` (rays (M,3), unit d).
    Returns (t, status): 1 = hit, 0 = no crossing, -1 = already inside at t0."""
    m = o.shape[0]
    t_hit = torch.full((m,), float("inf"))
    status = torch.zeros(m, dtype=torch.int8)
    if m == 0:
        return t_hit, status
    f0 = surf.signed(o + t0[:, None] * d)
    status[f0 < 0] = -1
    active = torch.nonzero(f0 >= 0).squeeze(1)
    f_prev = f0[active]
    k0 = 0
    while active.numel():
        oa, da, ta = o[active], d[active], t0[active]
        ks = torch.arange(k0 + 1, k0 + block + 1, dtype=torch.float32) * step
        ts = ta[:, None] + ks[None, :]                                       # (A, block)
        f = surf.signed(oa[:, None, :] + ts[..., None] * da[:, None, :])    # (A, block)
        inside = f < 0                       # beyond the bounding sphere f > 0 by itself
        hit = inside.any(1)
        if hit.any():
            first = torch.argmax(inside.to(torch.int8), dim=1)[hit]
            rows = torch.nonzero(hit).squeeze(1)
            fcat = torch.cat([f_prev[:, None], f], 1)
            idx = active[hit]
            hi = ts[rows, first]
            t_hit[idx] = refine(surf, o[idx], d[idx], hi - step, hi, fcat[rows, first], fcat[rows, first + 1])
            status[idx] = 1
        keep = ~hit & (ts[:, -1] < t1[active])
        active, f_prev = active[keep], f[keep, -1]
        k0 += block
    return t_hit, status


SMOOTH_SPAN = 0.02  # coarse-neighbourhood depth range below which a pixel is refined in a tight bracket
NEAR_MARGIN = 0.05  # fine rays start this far before the nearest hit of their coarse neighbours
H_MIN = 0.003   # smallest tracing step in world units (~2.4 px at 512; thinner features can be missed)


def trace(surf: StarSurface, o: torch.Tensor, d: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor,
          h_min: float = H_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    """First crossing in [t0, t1] by safe stepping: along a unit ray f = |p| - r(dir p)
    changes by at most (1 + G/|p|) per unit of t, G being the surface's local slope
    bound, valid while the direction turns less than surf.bound_angle. A step of
    f / (1 + G/|p|) (capped to keep that turn) therefore cannot cross the surface.
    Steps never go below h_min: only features thinner than that can be missed.
    Returns (t, status) like march()."""
    m = o.shape[0]
    t_hit = torch.full((m,), float("inf"))
    status = torch.zeros(m, dtype=torch.int8)
    if m == 0:
        return t_hit, status
    turn = 0.9 * surf.bound_angle
    f, g, n = surf.signed_and_slope(o + t0[:, None] * d)
    status[f < 0] = -1
    keep = f >= 0
    active = torch.nonzero(keep).squeeze(1)
    oa, da, ta, t1a = o[active], d[active], t0[active], t1[active]
    fa, ga, na = f[keep], g[keep], n[keep]
    live = torch.ones(active.numel(), dtype=torch.bool)
    # brackets of the rays that crossed, refined together at the end
    b_idx, b_lo, b_hi, b_flo, b_fhi = [], [], [], [], []
    while active.numel():
        # |p| shrinks by at most the step itself: bound it from below by 0.9 |p| with step <= 0.1 |p|
        near = 0.9 * na
        step = torch.minimum(fa / (1.0 + ga / near), torch.minimum(turn * near, 0.1 * na))
        tn = ta + torch.clamp(step, min=h_min)
        fn, gn, nn_ = surf.signed_and_slope(oa + tn[:, None] * da)
        hit = (fn < 0) & live
        if hit.any():
            b_idx.append(active[hit])
            b_lo.append(ta[hit])
            b_hi.append(tn[hit])
            b_flo.append(fa[hit])
            b_fhi.append(fn[hit])
        live = live & ~hit & (tn < t1a)
        ta, fa, ga, na = tn, fn, gn, nn_
        n_live = int(live.sum())
        if n_live == 0:
            break
        if n_live < 0.75 * live.numel():       # compact once a quarter of the rays are done
            k = torch.nonzero(live).squeeze(1)
            active, oa, da, ta, t1a, fa, ga, na = (x[k] for x in (active, oa, da, ta, t1a, fa, ga, na))
            live = torch.ones(k.numel(), dtype=torch.bool)
    if b_idx:
        idx = torch.cat(b_idx)
        t_hit[idx] = refine(surf, o[idx], d[idx], torch.cat(b_lo), torch.cat(b_hi), torch.cat(b_flo), torch.cat(b_fhi))
        status[idx] = 1
    return t_hit, status


def cast(surf: StarSurface, o: torch.Tensor, d: torch.Tensor, step: float | None = None,
         t_start: torch.Tensor | None = None, t_end: torch.Tensor | None = None) -> torch.Tensor:
    """First hit along rays from the bounding-sphere entry (or t_start, when later) to its
    exit (or t_end, when earlier): Lipschitz tracing, or uniform steps of `step` when
    given (a brute-force reference). t (M,), inf where the ray misses."""
    t = torch.full((o.shape[0],), float("inf"))
    t0, t1, valid = sphere_interval(o, d, surf.r_max * 1.001)
    if t_start is not None:
        t0 = torch.maximum(t0, t_start)
    if t_end is not None:
        t1 = torch.minimum(t1, t_end)
    valid &= t0 < t1

    def run(oo, dd, a, b):
        return march(surf, oo, dd, a, b, step) if step is not None else trace(surf, oo, dd, a, b)

    idx = torch.nonzero(valid).squeeze(1)
    for s in range(0, idx.numel(), _CHUNK // 16):
        sl = idx[s:s + _CHUNK // 16]
        th, st = run(o[sl], d[sl], t0[sl], t1[sl])
        # status -1: t_start was already inside the head; trace the whole chord instead
        redo = st == -1
        if redo.any():
            r = sl[redo]
            t0r, t1r, _ = sphere_interval(o[r], d[r], surf.r_max * 1.001)
            th[redo], st[redo] = run(o[r], d[r], t0r, t1r)
        t[sl] = torch.where(st == 1, th, torch.full_like(th, float("inf")))
    return t


def camera_rays(c2w: np.ndarray, K: np.ndarray, width: int, height: int, xs: np.ndarray, ys: np.ndarray):
    """Rays through continuous pixel positions (xs, ys) (pixel centres at +0.5).
    Returns origin (3,), unit world directions (M,3) and the t->camera-z factor (M,)."""
    fx, fy, cx, cy = K[0, 0] * width, K[1, 1] * height, K[0, 2] * width, K[1, 2] * height
    xc = (np.asarray(xs, dtype=np.float64) - cx) / fx
    yc = (np.asarray(ys, dtype=np.float64) - cy) / fy
    dc = np.stack([xc, yc, np.ones_like(xc)], -1)
    n = np.linalg.norm(dc, axis=-1)
    dw = (dc / n[:, None]) @ np.asarray(c2w, dtype=np.float64)[:3, :3].T
    o = torch.as_tensor(np.asarray(c2w, dtype=np.float64)[:3, 3], dtype=torch.float32)
    return o, torch.as_tensor(dw, dtype=torch.float32), torch.as_tensor(1.0 / n, dtype=torch.float32)


def texture_tensor(tex: np.ndarray) -> torch.Tensor:
    """Equirectangular texture (Ht, Wt, C) -> (1, C, Ht, Wt+2) with wrapped edge columns."""
    t = torch.as_tensor(np.asarray(tex, dtype=np.float32))
    t = torch.cat([t[:, -1:], t, t[:, :1]], 1)
    return t.permute(2, 0, 1)[None].contiguous()


def sample_texture(tex: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of a texture_tensor() at the directions of p (M,3) -> (M, C).
    Texel (i, j) has its centre at lat = pi/2 - (i+0.5)*pi/Ht, lon = -pi + (j+0.5)*2*pi/Wt."""
    ht, wt = tex.shape[2], tex.shape[3] - 2
    x, y, z = p.unbind(-1)
    lon = torch.atan2(x, z)
    lat = torch.atan2(y, torch.sqrt(x * x + z * z))
    fj = (lon + math.pi) * (wt / (2 * math.pi)) + 0.5        # padded column coordinate
    fi = torch.clamp((math.pi / 2 - lat) * (ht / math.pi) - 0.5, 0, ht - 1)
    g = torch.stack([fj * (2.0 / (wt + 1)) - 1, fi * (2.0 / max(ht - 1, 1)) - 1], -1)
    out = F.grid_sample(tex, g[None, None], mode="bilinear", align_corners=True, padding_mode="border")
    return out[0, :, 0].T


class Shader:
    """Colour of surface points, a function of the point only (so every camera agrees):
    an equirectangular fill texture, blended toward the portrait photo projected through
    its camera with the per-texel weight stored in the texture's 4th channel. Sampling
    the photo directly keeps the face at the photo's full resolution."""

    def __init__(self, fill: np.ndarray, weight: np.ndarray | None = None, photo: np.ndarray | None = None,
                 photo_c2w: np.ndarray | None = None, photo_K: np.ndarray | None = None):
        rgbw = np.dstack([np.asarray(fill, np.float32),
                          np.zeros(fill.shape[:2], np.float32) if weight is None else np.asarray(weight, np.float32)])
        self.tex = texture_tensor(rgbw)
        self.photo = None
        if photo is not None and weight is not None:
            h, w = photo.shape[:2]
            self.photo = torch.as_tensor(np.asarray(photo, np.float32)).permute(2, 0, 1)[None].contiguous()
            c2w = np.asarray(photo_c2w, dtype=np.float64)
            self.R = torch.as_tensor(c2w[:3, :3], dtype=torch.float32)
            self.C = torch.as_tensor(c2w[:3, 3], dtype=torch.float32)
            K = np.asarray(photo_K, dtype=np.float64)
            # normalised image coords -> grid_sample's [-1, 1] (align_corners=False)
            self.fx, self.fy = float(2 * K[0, 0]), float(2 * K[1, 1])
            self.cx, self.cy = float(2 * K[0, 2] - 1), float(2 * K[1, 2] - 1)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        s = sample_texture(self.tex, p)                              # (M, 4)
        rgb, w = s[:, :3], (s[:, 3:4] / 255.0).clamp(0, 1)
        if self.photo is None:
            return rgb
        q = (p - self.C) @ self.R                                    # camera coordinates
        z = q[:, 2:3].clamp(min=1e-6)
        g = torch.cat([self.fx * q[:, 0:1] / z + self.cx, self.fy * q[:, 1:2] / z + self.cy], 1)
        ph = F.grid_sample(self.photo, g[None, None], mode="bilinear", align_corners=False,
                           padding_mode="border")[0, :, 0].T
        return rgb * (1 - w) + ph * w


def _pool(x: torch.Tensor, mode: str) -> torch.Tensor:
    x4 = x[None, None].float()
    if mode == "max":
        y = F.max_pool2d(F.pad(x4, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    else:
        y = -F.max_pool2d(F.pad(-x4, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return y[0, 0]


def render_view(surf: StarSurface, tex: Shader | None, c2w: np.ndarray, K: np.ndarray, width: int, height: int,
                coarse: int = 4, ss: int = 2, step: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One view: RGB float (H,W,3) 0..255 (straight alpha), alpha float (H,W) 0..1, camera-z depth (H,W)."""
    big = 1e9
    # 1. coarse pass: full march at every `coarse`-th pixel
    hc, wc = math.ceil(height / coarse), math.ceil(width / coarse)
    cy_, cx_ = np.meshgrid((np.arange(hc) + 0.5) * coarse, (np.arange(wc) + 0.5) * coarse, indexing="ij")
    o, d, _ = camera_rays(c2w, K, width, height, cx_.ravel(), cy_.ravel())
    tc = cast(surf, o.expand_as(d), d, step).reshape(hc, wc)
    hitc = torch.isfinite(tc)
    any_hit = _pool(hitc, "max") > 0
    all_hit = _pool(hitc, "min") > 0
    tmin = _pool(torch.where(hitc, tc, torch.full_like(tc, big)), "min")
    tmax = _pool(torch.where(hitc, tc, torch.full_like(tc, -big)), "max")
    # t predicted by bilinear interpolation of the coarse samples (only used where all hit)
    tpred = F.interpolate(torch.where(hitc, tc, tmin)[None, None], scale_factor=coarse, mode="bilinear",
                          align_corners=False)[0, 0, :height, :width].reshape(-1)

    def up(x):
        return x.repeat_interleave(coarse, 0).repeat_interleave(coarse, 1)[:height, :width].reshape(-1)

    any_f, all_f, tmin_f, tmax_f = up(any_hit), up(all_hit), up(tmin), up(tmax)

    # 2. fine pass
    fy_, fx_ = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    o, d, zf = camera_rays(c2w, K, width, height, fx_.ravel(), fy_.ravel())
    n_pix = height * width
    t = torch.full((n_pix,), float("inf"))
    # smooth interior: a tight bracket around the prediction, then false position
    smooth = torch.nonzero(all_f & (tmax_f - tmin_f < SMOOTH_SPAN)).squeeze(1)
    span = 0.004 + 0.5 * (tmax_f[smooth] - tmin_f[smooth])
    lo, hi = tpred[smooth] - span, tpred[smooth] + span
    os_, ds = o.expand(smooth.numel(), 3), d[smooth]
    flo, fhi = surf.signed(os_ + lo[:, None] * ds), surf.signed(os_ + hi[:, None] * ds)
    ok = (flo > 0) & (fhi < 0)
    good = smooth[ok]
    t[good] = refine(surf, os_[ok], ds[ok], lo[ok], hi[ok], flo[ok], fhi[ok], bisections=1, secants=4)
    # everything else near the surface: march from just before the nearest neighbour's hit
    rest = torch.cat([smooth[~ok], torch.nonzero(any_f & ~(all_f & (tmax_f - tmin_f < SMOOTH_SPAN))).squeeze(1)])
    if rest.numel():
        t[rest] = cast(surf, o.expand(rest.numel(), 3), d[rest], step, t_start=tmin_f[rest] - NEAR_MARGIN)
    hit = torch.isfinite(t).reshape(height, width)

    rgb = torch.zeros(n_pix, 3)
    alpha = hit.reshape(-1).float()
    depth = torch.where(torch.isfinite(t), t * zf, torch.zeros_like(t))
    if tex is not None:
        hi_idx = torch.nonzero(torch.isfinite(t)).squeeze(1)
        rgb[hi_idx] = tex(o + t[hi_idx, None] * d[hi_idx])

    # 3. supersample the silhouette band for anti-aliased alpha
    if ss > 1:
        edge = (_pool(hit, "max") != _pool(hit, "min")).reshape(-1)
        eidx = torch.nonzero(edge).squeeze(1)
        if eidx.numel():
            t2 = t.reshape(height, width)
            tn = _pool(torch.where(hit, t2, torch.full_like(t2, big)), "min").reshape(-1)[eidx]
            tx = _pool(torch.where(hit, t2, torch.full_like(t2, -big)), "max").reshape(-1)[eidx]
            ey, ex = (eidx // width).double().numpy(), (eidx % width).double().numpy()
            offs = (np.arange(ss) + 0.5) / ss
            sy = (ey[:, None, None] + offs[None, :, None]).repeat(ss, 2).reshape(-1)
            sx = (ex[:, None, None] + offs[None, None, :]).repeat(ss, 1).reshape(-1)
            so, sd, sz = camera_rays(c2w, K, width, height, sx, sy)
            # the subsamples lie within a pixel of hits at depths [tn, tx]: march only around them
            stt = cast(surf, so.expand_as(sd), sd, step, t_start=(tn - NEAR_MARGIN).repeat_interleave(ss * ss),
                       t_end=(tx + 0.15).repeat_interleave(ss * ss))
            sh = torch.isfinite(stt)
            n_hit = sh.reshape(-1, ss * ss).float().sum(1)
            alpha[eidx] = n_hit / (ss * ss)
            sdep = torch.where(sh, stt * sz, torch.zeros_like(stt)).reshape(-1, ss * ss).sum(1)
            # depth stays the pixel centre's where the centre hits (exact for reprojection);
            # partly covered pixels whose centre misses get their hit subsamples' mean
            centre_hit = torch.isfinite(t[eidx])
            depth[eidx] = torch.where(centre_hit, depth[eidx],
                                      torch.where(n_hit > 0, sdep / n_hit.clamp(min=1), torch.zeros_like(sdep)))
            if tex is not None:
                scol = torch.zeros(sd.shape[0], 3)
                hidx = torch.nonzero(sh).squeeze(1)
                scol[hidx] = tex(so + stt[hidx, None] * sd[hidx])
                rgb[eidx] = scol.reshape(-1, ss * ss, 3).sum(1) / n_hit.clamp(min=1)[:, None]
    return (rgb.reshape(height, width, 3).numpy(), alpha.reshape(height, width).numpy(),
            depth.reshape(height, width).numpy().astype(np.float32))


@contextlib.contextmanager
def single_threaded_ops():
    """Run torch ops single-threaded inside the block (restored after): the proxy's
    loops are many small ops, where intra-op threads cost more than they give."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def render(surf: StarSurface, tex: Shader | None, c2w: np.ndarray, K: np.ndarray, width: int, height: int,
           progress=None, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Batch of views -> RGBA uint8 (N,H,W,4), depth float32 (N,H,W) (0 where empty).

    The tracer runs thousands of small tensor ops per view; intra-op threads only add
    barrier waits there (7x slower on a busy 2-core machine), so views are rendered in
    parallel instead: as many worker threads as torch has intra-op threads, each op
    single-threaded (torch releases the GIL inside ops). Results do not depend on it."""
    c2w = np.asarray(c2w, dtype=np.float64).reshape(-1, 4, 4)
    K = np.asarray(K, dtype=np.float64).reshape(-1, 3, 3)
    if K.shape[0] == 1 and c2w.shape[0] > 1:
        K = np.repeat(K, c2w.shape[0], 0)
    n = c2w.shape[0]
    out = np.zeros((n, height, width, 4), np.uint8)
    dep = np.zeros((n, height, width), np.float32)
    workers = max(1, min(torch.get_num_threads(), n))

    def one(i):
        with torch.no_grad():
            return render_view(surf, tex, c2w[i], K[i], width, height, **kw)

    with single_threaded_ops():
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=workers)
            results = pool.map(one, range(n))
        else:
            pool, results = None, map(one, range(n))
        for i, (rgb, a, z) in enumerate(results):
            out[i, ..., :3] = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
            out[i, ..., 3] = np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)
            out[i, ..., :3][out[i, ..., 3] == 0] = 0
            dep[i] = z
            if progress is not None:
                progress(i + 1, n, f"proxy view {i + 1}/{n}")
        if pool is not None:
            pool.shutdown()
    return out, dep
