"""A tile-based Gaussian-splat rasterizer in pure PyTorch (CPU fitting and the
reference the CUDA path is checked against).

Same call and same maths as `gsplat.rendering.rasterization` 1.5.3 (pinhole,
classic mode): EWA projection with the eps2d low-pass, opacity-aware 3.33-sigma
radii, alpha = min(0.999, o * exp(-sigma)), alphas below 1/255 skipped,
front-to-back compositing that stops (exclusively) once transmittance would
fall to 1e-4, "ED" = sum(w z) / sum(w), SH colours from camera-to-Gaussian
directions plus 0.5, clamped at 0.

One addition gsplat 1.5.3 does not have: "MD" / "RGB+MD", the median depth: the
camera z along the pixel's ray where accumulated opacity reaches 0.5, each
Gaussian's opacity rising along the ray with its 3D density (Gaussian Opacity
Fields' ray model; `composite` has the formula); 0 where alpha stays below 0.5.
Expected depth averages every layer a pixel sees and the 2DGS median takes the
crossing Gaussian's centre: both lie behind the surface the silhouettes show (on
the benchmark head, benchmarks/bench_fit.py, meshes from them sat ~2-5 % and ~1.9 %
of head height inside, from this one ~1 %). It carries no gradient (rendering for
meshing only). On CUDA, recon.fit.render approximates it with gsplat's standard call.

How it is fast enough on a CPU:
- Gaussians are binned to tiles by their 2D bounding boxes and sorted by
  (image, tile, depth), as gsplat's isect_tiles/isect_offset_encode do. The
  result does not depend on the tile size; on a CPU 8x8 tiles are fastest.
- All tiles of all cameras are composited together, `chunk` Gaussians at a time:
  log(alpha) over a tile's pixels is one small matmul (the 2D quadratic form
  as 6 coefficients against 6 pixel features), transmittance is a cumprod
  inside the chunk, carried across chunks.
- Tiles whose pixels have all terminated drop out of later chunks, so opaque
  surfaces cost only their front layers.
Gradients: projection, SH and the per-intersection coefficients go through
autograd; the compositing is one autograd.Function with a written-out
backward (gsplat's rasterize_to_pixels_bwd maths, vectorised per chunk), which
keeps two [tiles, chunk, pixels] tensors per processed chunk, so memory grows
with the work actually done (bounded by early termination), never N x pixels.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from gsplat.cuda._torch_impl import _persp_proj, _quat_scale_to_covar_preci, _spherical_harmonics, _world_to_cam

ALPHA_THRESHOLD = 1.0 / 255.0   # gsplat skips alphas below this
T_THRESHOLD = 1e-4              # a pixel is done when transmittance would fall to this
ALPHA_MAX = 0.999
RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED", "MD", "RGB+MD")  # MD, RGB+MD: ours only


# ----------------------------------------------------------------------- projection
def project_gaussians(
    means: Tensor,      # [N, 3]
    quats: Tensor,      # [N, 4] wxyz, unnormalised
    scales: Tensor,     # [N, 3] activated
    opacities: Tensor,  # [N] activated
    viewmats: Tensor,   # [C, 4, 4] world-to-camera (OpenCV)
    Ks: Tensor,         # [C, 3, 3] pixels
    width: int,
    height: int,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """gsplat's fused EWA projection (CUDA kernel semantics, non-packed).

    Returns radii [C, N, 2] int32 (0 = culled), means2d [C, N, 2], depths [C, N],
    conics [C, N, 3] (upper triangle of the inverse 2D covariance).
    Culled entries hold finite placeholders so no NaN reaches autograd.
    """
    C = viewmats.shape[0]
    N = means.shape[0]
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)  # [N, 3, 3]
    means_c, covars_c = _world_to_cam(means, covars, viewmats)  # [C, N, 3], [C, N, 3, 3]
    depths = means_c[..., 2]
    in_depth = (depths >= near_plane) & (depths <= far_plane)
    # Points behind the camera would divide by ~0 below; park them at z = 1 (they are culled anyway).
    safe_c = torch.where(in_depth[..., None], means_c, torch.ones_like(means_c))
    means2d, cov2d = _persp_proj(safe_c, covars_c, Ks, width, height)  # [C, N, 2], [C, N, 2, 2]
    cov2d = cov2d + eps2d * torch.eye(2, dtype=cov2d.dtype, device=cov2d.device)
    det = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    ok_det = det > 0
    det = torch.where(ok_det, det, torch.ones_like(det))
    conics = torch.stack([cov2d[..., 1, 1] / det, -(cov2d[..., 0, 1] + cov2d[..., 1, 0]) / 2.0 / det,
                          cov2d[..., 0, 0] / det], dim=-1)  # [C, N, 3]
    with torch.no_grad():
        op = opacities.detach().expand(C, N)
        ok_op = op >= ALPHA_THRESHOLD
        # Opacity-aware extent: beyond it alpha < 1/255 everywhere (gsplat 1.5.3).
        extend = torch.clamp(torch.sqrt(2.0 * torch.log(op.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD)), max=3.33)
        var = torch.stack([cov2d[..., 0, 0], cov2d[..., 1, 1]], dim=-1).detach().clamp(min=0)
        radius = torch.ceil(extend[..., None] * torch.sqrt(var))  # [C, N, 2]
        m = means2d.detach()
        inside = ((m[..., 0] + radius[..., 0] > 0) & (m[..., 0] - radius[..., 0] < width)
                  & (m[..., 1] + radius[..., 1] > 0) & (m[..., 1] - radius[..., 1] < height))
        big = (radius[..., 0] > radius_clip) | (radius[..., 1] > radius_clip)
        valid = in_depth & ok_det & ok_op & big & inside
        radii = torch.where(valid[..., None], radius, torch.zeros_like(radius)).to(torch.int32)
    return radii, means2d, depths, conics


# --------------------------------------------------------------------- tile binning
@torch.no_grad()
def bin_to_tiles(means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int, tile_width: int,
                 tile_height: int) -> tuple[Tensor, Tensor, Tensor]:
    """Intersections of the V visible (image, Gaussian) pairs with the tiles their
    2D bounding boxes touch (gsplat's isect_tiles, unsorted; the caller sorts).

    means2d [V, 2], radii [V, 2] (> 0), depths [V] (unused, kept for gsplat's
    signature). Returns (isect_gauss [M] index into V, isect_tile [M] tile within
    its image, counts_per_gauss [V]).
    """
    tile_xy = means2d / tile_size
    tile_r = radii.to(means2d.dtype) / tile_size
    tmin = torch.floor(tile_xy - tile_r).long()
    tmax = torch.ceil(tile_xy + tile_r).long()
    lim = torch.tensor([tile_width, tile_height], device=means2d.device)
    tmin = torch.minimum(tmin.clamp(min=0), lim)
    tmax = torch.minimum(tmax.clamp(min=0), lim)
    span = (tmax - tmin).clamp(min=0)        # [V, 2]
    counts = span[:, 0] * span[:, 1]         # [V]
    V = means2d.shape[0]
    gid = torch.repeat_interleave(torch.arange(V, device=means2d.device), counts)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(gid.shape[0], device=means2d.device) - start[gid]
    tx = tmin[gid, 0] + local % span[gid, 0]
    ty = tmin[gid, 1] + local // span[gid, 0]
    return gid, ty * tile_width + tx, counts


# ---------------------------------------------------------------------- compositing
class _CompositeTiles(torch.autograd.Function):
    """Front-to-back compositing of R tiles, `chunk` depth-sorted Gaussians at a time.

    q [M+1, 6] holds, for each intersection (and a last sentinel row whose
    alpha is 0), the coefficients of log(alpha) as a quadratic in the
    pixel offset from the tile centre (log o - sigma), so one matmul with the
    pixel features f [6, P] gives every alpha of a chunk; slot [R, L] lists each
    tile's intersections front to back, padded with the sentinel. Per chunk: alpha =
    min(0.999, exp(q . f)) with alphas < 1/255 dropped, transmittance by
    cumprod carried from the previous chunk, weights alpha * T_before for the
    prefix whose T_after stays above 1e-4 (gsplat's exclusive stop). Tiles whose
    pixels have all stopped leave the loop.

    The backward is gsplat's rasterize_to_pixels_bwd maths, vectorised per chunk
    and run back to front: it keeps two [A, K, P] tensors per processed chunk (the
    weights w and r = alpha/(1-alpha), both 0 after the stop) instead of
    autograd's every intermediate.
    """

    @staticmethod
    def forward(ctx, q, col, slot, per_row, feats, outside, chunk, keep_graph, mq=None):
        # q [M+1, 6], col [M+1, D], slot [R, L], per_row [R] list lengths, feats [6, P], outside [R, P] off-image pixels,
        # mq [M+1, 12] when the median depth is wanted (None: not computed): per intersection, the coefficients
        # of den = r^T A r and num = r^T A mu as quadratics in the pixel offset (see `composite`)
        R, L = slot.shape
        P, D = feats.shape[1], col.shape[1]
        acc = q.new_zeros(R, D, P)             # channels-first: the big [A, K, P] tensors are never transposed
        T = q.new_ones(R, P)
        med = q.new_zeros(R, P)                # median depth: z where T reaches 0.5 (0: never)
        done = outside.clone()                 # off-image pixels never keep a tile alive
        active = torch.arange(R, device=q.device)
        saved = []
        for start in range(0, L, chunk):
            active = active[(per_row[active] > start) & ~done[active].all(dim=1)]
            if active.numel() == 0:
                break
            sl = slot[active, start:start + chunk]                       # [A, K]
            qa, ca = q[sl], col[sl]
            alpha = torch.exp(qa @ feats).clamp_(max=ALPHA_MAX)           # [A, K, P]
            torch.threshold_(alpha, ALPHA_THRESHOLD, 0.0)                 # alphas below 1/255 are skipped
            one_minus = 1.0 - alpha
            r = alpha / one_minus              # d log(transmittance after j) / d log(alpha_j), up to sign
            T0, dn = T[active], done[active]
            T0e = T0.masked_fill(dn, 0.0)                                 # done pixels take nothing more
            one_minus[:, 0] *= T0e             # so the cumprod below carries the transmittance in
            T_incl = torch.cumprod(one_minus, dim=1)                      # transmittance after each Gaussian
            keep = T_incl > T_THRESHOLD                                   # a prefix along K: T_incl is monotone
            T_excl = torch.cat([T0e[:, None, :], T_incl[:, :-1]], dim=1)  # transmittance before each Gaussian
            if mq is not None:
                # T is monotone along K, so at most one Gaussian per pixel (over all chunks) takes it across 0.5
                ia, ik, ip = torch.nonzero(keep & (T_excl > 0.5) & (T_incl <= 0.5), as_tuple=True)
                rows = sl[ia, ik]
                f = feats[:, ip].T                                        # [X, 6]
                den = (mq[rows, :6] * f).sum(-1).clamp(min=1e-12)         # r^T A r: along-ray precision
                zstar = (mq[rows, 6:] * f).sum(-1) / den                  # depth of the Gaussian's peak on the ray
                a_need = 1.0 - 0.5 / T_excl[ia, ik, ip]                   # the alpha that takes T to 0.5
                lift = torch.log(alpha[ia, ik, ip] / a_need.clamp(min=1e-12)).clamp(min=0.0)
                med[active[ia], ip] = zstar - torch.sqrt(2.0 * lift / den)
            # torch.where, not a multiply by the bool mask (that would cast the mask first)
            w = torch.where(keep, alpha.mul_(T_excl), 0.0)                # alpha * T_before
            r = torch.where(keep, r, 0.0)
            alive = keep[:, -1]                                           # [A, P] not stopped in this chunk
            # Transmittance after the chunk: the cumprod where the pixel goes on; where it stopped,
            # T0 minus what the kept Gaussians took (sum w = T0 - T_last_kept).
            T_end = torch.where(alive, T_incl[:, -1], T0 - w.sum(dim=1))
            acc[active] += torch.bmm(ca.transpose(1, 2), w)              # [A, D, P]
            T[active] = T_end
            done[active] = ~alive
            if keep_graph:  # plain renders (no grad) need not hold every chunk's tensors
                saved.append((active, sl, w, r, T0, T_end, dn))
        ctx.saved = saved
        ctx.save_for_backward(col, feats)
        ctx.q_shape = q.shape
        ctx.out_shape = (R, D, P)
        ctx.mark_non_differentiable(med)
        return acc, T, med

    @staticmethod
    def backward(ctx, g_acc, g_T, g_med=None):
        col, feats = ctx.saved_tensors
        g_q = col.new_zeros(ctx.q_shape)
        g_col = torch.zeros_like(col)
        R, D, P = ctx.out_shape
        clamp = torch.tensor(ALPHA_MAX, dtype=col.dtype)
        r_clamp = float(clamp / (1.0 - clamp))  # r of a clamped alpha, in the working precision
        g_acc = g_acc.contiguous() if g_acc is not None else col.new_zeros(R, D, P)
        gT = g_T.clone() if g_T is not None else col.new_zeros(R, P)
        for active, sl, w, r, T0, T_end, dn in reversed(ctx.saved):
            G = g_acc[active]                                             # [A, D, P]
            g_col[sl] = torch.bmm(w, G.transpose(1, 2))                   # slots are unique (the sentinel aside)
            wcg = torch.bmm(col[sl], G).mul_(w)                           # w_j (c_j . dL/dpixel)
            incl = torch.cumsum(wcg, dim=1)
            total = incl[:, -1, :].clone()                                # [A, P] (incl is reused in place)
            gTe = gT[active]
            # Everything behind Gaussian j (later ones and the final T) scales with (1 - alpha_j).
            behind = incl.neg_().add_((total + gTe * T_end)[:, None, :])
            # alpha = exp(log alpha) has d alpha = alpha d log alpha, except where it was dropped
            # (r = 0) or clamped at 0.999 (r = r_clamp).
            live = (r > 0) & (r < r_clamp)
            g_s = torch.where(live, wcg.sub_(behind.mul_(r)), 0.0)        # dL/dlog(alpha)
            g_q[sl] = g_s @ feats.transpose(0, 1)
            gT[active] = torch.where(dn, gTe, (total + gTe * T_end) / torch.where(dn, torch.ones_like(T0), T0))
        ctx.saved = None
        return g_q, g_col, None, None, None, None, None, None, None


def _tile_centres(tiles: Tensor, tiles_per_image: int, tile_width: int, tile_size: int, dtype) -> Tensor:
    t = tiles % tiles_per_image
    tx, ty = t % tile_width, t // tile_width
    return torch.stack([(tx.to(dtype) + 0.5) * tile_size, (ty.to(dtype) + 0.5) * tile_size], dim=-1)


def composite(
    means2d: Tensor,     # [V, 2] visible Gaussians (all images concatenated)
    conics: Tensor,      # [V, 3]
    opacities: Tensor,   # [V]
    colors: Tensor,      # [V, D]
    order_gauss: Tensor, # [M] Gaussian of each intersection, sorted by (global tile, depth)
    order_tile: Tensor,  # [M] global tile id = image * tiles_per_image + ty * tile_width + tx
    n_images: int,
    tile_width: int,
    tile_height: int,
    tile_size: int,
    width: int,
    height: int,
    chunk: int = 32,
    median: Optional[tuple[Tensor, Tensor, Tensor]] = None,  # (precision [V, 3, 3], mean [V, 3], K [V, 3, 3]), camera frame
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Composite every tile front to back. Returns colours [I*th*tw, P, D] (without
    background), final transmittance [I*th*tw, P] and, when `median` is given, the
    median depth [I*th*tw, P] (0 where transmittance stays above 0.5; else None);
    P = tile_size^2, row-major.

    Median depth: the camera z along each pixel's ray where the accumulated opacity
    reaches 0.5, with each Gaussian's opacity rising along the ray as its 3D density
    does up to the density's peak on the ray (Gaussian Opacity Fields' ray model).
    A pixel ray is x = z r, r = K^-1 (px, py, 1); with A the camera-frame precision and
    mu the mean, the density is exp(-(z^2 r'Ar - 2 z r'A mu + ...)/2): peak z* = r'A mu / r'Ar,
    spread 1/sqrt(r'Ar). If Gaussian j takes T from T_j > 0.5 to <= 0.5 with alpha a_j,
    0.5 is reached where a_j exp(-(z - z*)^2 r'Ar / 2) = 1 - 0.5 / T_j, in front of z*.
    The silhouette (alpha 0.5) and this depth then mark the same surface: a lone opaque
    blob's depth sits ~1.2 sigma in front of its centre, where its silhouette edge is."""
    device, dtype = means2d.device, means2d.dtype
    D = colors.shape[-1]
    P = tile_size * tile_size
    tiles_per_image = tile_width * tile_height
    n_tiles = n_images * tiles_per_image
    M = order_gauss.shape[0]
    if M == 0:
        return (torch.zeros(n_tiles, P, D, device=device, dtype=dtype) + 0.0 * colors.sum(),
                torch.ones(n_tiles, P, device=device, dtype=dtype) + 0.0 * opacities.sum(),
                None if median is None else torch.zeros(n_tiles, P, device=device, dtype=dtype))

    # log(alpha) at pixel offset (lx, ly) from the tile centre is a quadratic in (lx, ly):
    # log o - [.5a(lx-dx)^2 + .5c(ly-dy)^2 + b(lx-dx)(ly-dy)], (dx, dy) = mean - centre.
    d = means2d[order_gauss] - _tile_centres(order_tile, tiles_per_image, tile_width, tile_size, dtype)
    a, b, c = conics[order_gauss].unbind(-1)
    dx, dy = d[:, 0], d[:, 1]
    q = torch.stack([-0.5 * a, -0.5 * c, -b, a * dx + b * dy, c * dy + b * dx,
                     torch.log(opacities[order_gauss]) - (0.5 * a * dx * dx + 0.5 * c * dy * dy + b * dx * dy)], -1)
    col = colors[order_gauss]

    with torch.no_grad():
        # Ragged per-tile lists -> padded [R, L] over the R non-empty tiles; padding
        # points at a sentinel intersection whose alpha is exp(-1e4) = 0.
        rows, row_of, per_row = torch.unique_consecutive(order_tile, return_inverse=True, return_counts=True)
        R = rows.shape[0]
        pos = torch.arange(M, device=device) - (torch.cumsum(per_row, 0) - per_row)[row_of]
        L = int(per_row.max())
        slot = torch.full((R, L), M, dtype=torch.long, device=device)
        slot[row_of, pos] = torch.arange(M, device=device)
        local = torch.arange(tile_size, device=device, dtype=dtype) + 0.5 - tile_size / 2.0
        ly, lx = torch.meshgrid(local, local, indexing="ij")
        lx, ly = lx.reshape(-1), ly.reshape(-1)
        feats = torch.stack([lx * lx, ly * ly, lx * ly, lx, ly, torch.ones_like(lx)], dim=0)  # [6, P]
        t_in_img = rows % tiles_per_image
        pid = torch.arange(P, device=device)
        px = (t_in_img % tile_width)[:, None] * tile_size + (pid % tile_size)[None]
        py = (t_in_img // tile_width)[:, None] * tile_size + (pid // tile_size)[None]
        outside = (px >= width) | (py >= height)  # [R, P]
    sentinel_q = torch.zeros(1, 6, dtype=dtype, device=device)
    sentinel_q[0, 5] = -1e4
    q = torch.cat([q, sentinel_q], 0)                                    # [M+1, 6]
    col = torch.cat([col, col.new_zeros(1, D)], 0)                       # [M+1, D]
    keep_graph = torch.is_grad_enabled() and (q.requires_grad or col.requires_grad)
    mq = None
    if median is not None:
        with torch.no_grad():
            prec, mu, Kv = (t.detach()[order_gauss] for t in median)
            fx, fy, cx, cy = Kv[:, 0, 0], Kv[:, 1, 1], Kv[:, 0, 2], Kv[:, 1, 2]
            tc = _tile_centres(order_tile, tiles_per_image, tile_width, tile_size, dtype)
            c0 = torch.stack([(tc[:, 0] - cx) / fx, (tc[:, 1] - cy) / fy, torch.ones_like(fx)], -1)  # ray at the tile centre
            Ac0 = (prec @ c0[:, :, None])[..., 0]
            Amu = (prec @ mu[:, :, None])[..., 0]
            # r = c0 + (lx / fx, ly / fy, 0) for the pixel offset (lx, ly); feats order lx^2, ly^2, lx ly, lx, ly, 1
            den = torch.stack([prec[:, 0, 0] / fx ** 2, prec[:, 1, 1] / fy ** 2, 2 * prec[:, 0, 1] / (fx * fy),
                               2 * Ac0[:, 0] / fx, 2 * Ac0[:, 1] / fy, (c0 * Ac0).sum(-1)], -1)
            zero = torch.zeros_like(fx)
            num = torch.stack([zero, zero, zero, Amu[:, 0] / fx, Amu[:, 1] / fy, (c0 * Amu).sum(-1)], -1)
            mq = torch.cat([torch.cat([den, num], -1), den.new_zeros(1, 12)], 0)            # [M+1, 12]
            mq[-1, 5] = 1.0                                                               # sentinel: never crosses
    acc, T, med = _CompositeTiles.apply(q, col, slot, per_row, feats, outside, chunk, keep_graph, mq)
    out = torch.zeros(n_tiles, P, D, device=device, dtype=dtype).index_copy(0, rows, acc.transpose(1, 2))
    T_all = torch.ones(n_tiles, P, device=device, dtype=dtype).index_copy(0, rows, T)
    med_all = None if mq is None else torch.zeros(n_tiles, P, device=device, dtype=dtype).index_copy(0, rows, med)
    return out, T_all, med_all


# ---------------------------------------------------------------------- entry point
def rasterization(
    means: Tensor,          # [N, 3]
    quats: Tensor,          # [N, 4] wxyz, unnormalised
    scales: Tensor,         # [N, 3] activated (exp'd)
    opacities: Tensor,      # [N] activated (sigmoid'd)
    colors: Tensor,         # [N, D] | [C, N, D] | SH [N, K, 3] | [C, N, K, 3]
    viewmats: Tensor,       # [C, 4, 4] world-to-camera, OpenCV
    Ks: Tensor,             # [C, 3, 3] pixels
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: Optional[int] = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Optional[Tensor] = None,  # [C, D]
    render_mode: str = "RGB",
    chunk: int = 32,
) -> tuple[Tensor, Tensor, dict]:
    """Drop-in for `gsplat.rasterization` (pinhole, classic, no batch dims).

    Returns render_colors [C, H, W, X], render_alphas [C, H, W, 1], meta. `meta`
    always uses gsplat's non-packed layout (radii [C, N, 2], means2d [C, N, 2],
    depths, conics, opacities); `packed` is accepted for call compatibility and
    changes nothing in the images.
    """
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode {render_mode!r} is not one of {RENDER_MODES}")
    N = means.shape[0]
    C = viewmats.shape[0]
    assert means.shape == (N, 3) and quats.shape == (N, 4) and scales.shape == (N, 3), (means.shape, quats.shape, scales.shape)
    assert opacities.shape == (N,), opacities.shape
    assert viewmats.shape == (C, 4, 4) and Ks.shape == (C, 3, 3), (viewmats.shape, Ks.shape)
    dtype = means.dtype

    radii, means2d, depths, conics = project_gaussians(
        means, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near_plane, far_plane, radius_clip)
    vis = (radii > 0).all(dim=-1)                       # [C, N]
    cam_ids, gids = torch.nonzero(vis, as_tuple=True)   # (camera, gaussian) of the V visible pairs

    # Colours of the visible pairs.
    if sh_degree is None:
        if colors.dim() == 2:
            assert colors.shape[0] == N, colors.shape
            col = colors[gids]
        else:
            assert colors.shape[:2] == (C, N), colors.shape
            col = colors[cam_ids, gids]
    else:
        assert colors.shape[-1] == 3 and (sh_degree + 1) ** 2 <= colors.shape[-2], colors.shape
        campos = torch.inverse(viewmats)[:, :3, 3]      # [C, 3]
        dirs = means[gids] - campos[cam_ids]            # [V, 3]
        shs = colors[gids] if colors.dim() == 3 else colors[cam_ids, gids]
        col = torch.clamp_min(_spherical_harmonics(sh_degree, dirs, shs) + 0.5, 0.0)
    z = depths[cam_ids, gids][:, None]
    if render_mode in ("RGB+D", "RGB+ED"):
        col = torch.cat([col, z], dim=-1)
    elif render_mode in ("D", "ED"):
        col = z
    elif render_mode == "MD":
        col = torch.zeros_like(z)       # only the median channel below is wanted
    median = None
    if render_mode in ("MD", "RGB+MD"):
        with torch.no_grad():
            _, preci = _quat_scale_to_covar_preci(quats.detach(), scales.detach(), compute_covar=False, compute_preci=True)
            R = viewmats[:, :3, :3].detach()
            prec_c = R[cam_ids] @ preci[gids] @ R[cam_ids].transpose(1, 2)          # [V, 3, 3] camera frame
            mu_c = (R[cam_ids] @ means.detach()[gids][:, :, None])[..., 0] + viewmats[cam_ids, :3, 3].detach()
            median = (prec_c, mu_c, Ks.detach()[cam_ids])
    D = col.shape[-1]

    tile_width = math.ceil(width / tile_size)
    tile_height = math.ceil(height / tile_size)
    tiles_per_image = tile_width * tile_height
    with torch.no_grad():
        gsel, tile, _ = bin_to_tiles(means2d[cam_ids, gids], radii[cam_ids, gids], depths[cam_ids, gids],
                                     tile_size, tile_width, tile_height)
        gtile = cam_ids[gsel] * tiles_per_image + tile
        # Sort by (image, tile, depth); ties keep Gaussian order like gsplat's stable radix sort.
        V = gids.shape[0]
        depth_rank = torch.empty(V, dtype=torch.long, device=means.device)
        depth_rank[torch.sort(depths[cam_ids, gids], stable=True).indices] = torch.arange(V, device=means.device)
        order = torch.sort(gtile * max(V, 1) + depth_rank[gsel], stable=True).indices
        order_gauss, order_tile = gsel[order], gtile[order]

    tile_cols, tile_T, tile_med = composite(
        means2d[cam_ids, gids], conics[cam_ids, gids], opacities[gids], col, order_gauss, order_tile,
        C, tile_width, tile_height, tile_size, width, height, chunk=chunk, median=median)
    if median is not None:
        tile_cols = tile_med[..., None] if render_mode == "MD" else torch.cat([tile_cols, tile_med[..., None]], -1)
        D = tile_cols.shape[-1]
    # [C*th*tw, ts*ts, D] -> [C, H, W, D]
    img = tile_cols.reshape(C, tile_height, tile_width, tile_size, tile_size, D).permute(0, 1, 3, 2, 4, 5)
    img = img.reshape(C, tile_height * tile_size, tile_width * tile_size, D)[:, :height, :width]
    T = tile_T.reshape(C, tile_height, tile_width, tile_size, tile_size).permute(0, 1, 3, 2, 4)
    T = T.reshape(C, tile_height * tile_size, tile_width * tile_size)[:, :height, :width, None]
    alphas = 1.0 - T

    if backgrounds is not None:
        bg = backgrounds.to(dtype)
        if render_mode in ("RGB+D", "RGB+ED", "RGB+MD"):     # depth channels take no background
            bg = torch.cat([bg, torch.zeros(C, 1, dtype=dtype, device=bg.device)], dim=-1)
        elif render_mode in ("D", "ED", "MD"):
            bg = torch.zeros(C, 1, dtype=dtype, device=bg.device)
        img = img + T * bg[:, None, None, :]
    if render_mode in ("ED", "RGB+ED"):
        img = torch.cat([img[..., :-1], img[..., -1:] / alphas.clamp(min=1e-10)], dim=-1)

    meta = {
        "radii": radii, "means2d": means2d, "depths": depths, "conics": conics,
        "opacities": opacities.expand(C, N), "tile_width": tile_width, "tile_height": tile_height,
        "tile_size": tile_size, "width": width, "height": height, "n_cameras": C,
        "n_isects": int(order_gauss.shape[0]), "backend": "torch-tiles",
    }
    return img, alphas, meta
