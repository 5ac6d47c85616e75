"""Render a fitted Scene from arbitrary cameras (turntables, meshing, `render` CLI)."""
from __future__ import annotations

import numpy as np
import torch

from .. import cameras
from ..errors import InputError
from ..runtime import resolve_device
from ..types import Scene
from .backend import select_rasterizer

DEPTH_MODES = ("median", "expected")
MEDIAN_BINS = 32      # depth slabs of the gsplat (CUDA) median depth


def median_depth_binned(rast, means, quats, scales, opacities, viewmats, Ks, width: int, height: int,
                        bins: int = MEDIAN_BINS) -> torch.Tensor:
    """Median depth [C, H, W] through gsplat's standard call (its 1.5.3 kernels have no
    median mode), 0 where alpha stays below 0.5. An approximation of our rasterizer's
    exact "MD" (see recon.fit.rasterize.composite for the ray model).

    The visible Gaussians' camera-z range is cut into `bins` slabs; one pass renders,
    per slab k, W_k = sum of the compositing weights w of its Gaussians, Z_k = sum w z and
    S_k = sum w s (s: the Gaussian's depth spread along the ray through its centre),
    3 x bins colour channels per camera. Weights are alpha times transmittance in depth
    order, so 1 - cumsum W is the transmittance at the slab ends. In the slab k where it
    falls to 0.5, with T_k before it, the slab acts as one Gaussian of alpha W_k / T_k at
    depth Z_k / W_k and spread S_k / W_k: the same formula as the exact mode. It is exact
    when that slab holds the crossing Gaussian alone, and off by less than a slab otherwise.
    """
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci

    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    mu = torch.einsum("cij,nj->cni", R, means) + t[:, None]                             # [C, N, 3] camera frame
    z = mu[..., 2]
    _, preci = _quat_scale_to_covar_preci(quats, scales, compute_covar=False, compute_preci=True)
    prec_c = torch.einsum("cij,njk,clk->cnil", R, preci, R)                              # R P R^T
    mAm = torch.einsum("cni,cnij,cnj->cn", mu, prec_c, mu).clamp(min=1e-12)
    spread = z.abs() / mAm.sqrt()                                  # along the centre ray, in camera z
    front = (z > 0.01) & (opacities[None] > 1.0 / 255.0)
    lo = torch.where(front, z, torch.full_like(z, float("inf"))).amin(1, keepdim=True)
    hi = torch.where(front, z, torch.full_like(z, -float("inf"))).amax(1, keepdim=True)
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.maximum(torch.where(torch.isfinite(hi), hi, lo), lo + 1e-6)
    k = ((z - lo) / (hi - lo) * bins).floor().clamp(0, bins - 1).long()                  # [C, N]
    onehot = torch.nn.functional.one_hot(k, bins).to(means.dtype)                          # [C, N, bins]
    colors = torch.cat([onehot, onehot * z[..., None], onehot * spread[..., None]], -1)    # [C, N, 3 bins]
    img, alpha, _ = rast(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=None,
                         backgrounds=None, render_mode="RGB")
    W, Z, S = img[..., :bins], img[..., bins:2 * bins], img[..., 2 * bins:]
    cum = torch.cumsum(W, -1)
    reach = cum >= 0.5
    hit = reach.any(-1) & (alpha[..., 0] >= 0.5)
    first = torch.where(hit, reach.to(torch.int8).argmax(-1), torch.zeros_like(hit, dtype=torch.long))[..., None]
    Wk = W.gather(-1, first)[..., 0].clamp(min=1e-12)
    T_before = (1.0 - (cum - W).gather(-1, first)[..., 0]).clamp(min=0.5)
    a_need = 1.0 - 0.5 / T_before
    lift = torch.log((Wk / T_before) / a_need.clamp(min=1e-12)).clamp(min=0.0)
    med = Z.gather(-1, first)[..., 0] / Wk - S.gather(-1, first)[..., 0] / Wk * torch.sqrt(2.0 * lift)
    return torch.where(hit, med, torch.zeros_like(med))


@torch.no_grad()
def render_scene(scene: Scene, c2w: np.ndarray, K_norm: np.ndarray, width: int, height: int, *,
                 background=(1.0, 1.0, 1.0), device="cpu", chunk: int = 8,
                 depth: str = "median") -> tuple[np.ndarray, np.ndarray]:
    """Render `scene` from N cameras (recon.cameras convention: cam2world OpenCV, normalised K).

    Returns (rgba (N, H, W, 4) uint8, depth (N, H, W) float32). With a background,
    RGB is composited over it; with background=None, RGB is straight (un-premultiplied)
    colour. Alpha is the splats' coverage. Depth is camera z, 0 where nothing was
    rendered (the ViewSet convention): depth="median" (default) is the z where
    accumulated opacity along the ray reaches 0.5 (0 where alpha < 0.5): the surface
    the alpha-0.5 silhouettes show; depth="expected" is sum(w z) / alpha, which the
    Gaussians behind the surface pull inward (benchmarks/bench_fit.py measures both).
    On CPU the median is exact (our rasterizer's "RGB+MD"); with gsplat on CUDA it
    comes from a second, binned pass (`median_depth_binned`). `chunk` cameras render at once.
    """
    if depth not in DEPTH_MODES:
        raise InputError(f"render_scene depth={depth!r} is not one of {DEPTH_MODES}")
    c2w = np.asarray(c2w, dtype=np.float64).reshape(-1, 4, 4)
    K_norm = np.asarray(K_norm, dtype=np.float64)
    if K_norm.shape == (3, 3):
        K_norm = np.broadcast_to(K_norm, (c2w.shape[0], 3, 3))
    if K_norm.shape != (c2w.shape[0], 3, 3):
        raise InputError(f"render_scene needs one K per camera: c2w {c2w.shape}, K {K_norm.shape}")
    if width < 1 or height < 1:
        raise InputError(f"render size {width}x{height} must be positive")
    missing = [k for k in ("means", "quats", "scales", "opacities", "sh0") if k not in scene.params]
    if missing:
        raise InputError(f"scene is missing splat parameters {missing}", hint="fit the scene again")
    dev = device if isinstance(device, torch.device) else resolve_device(device)[0]
    rast = select_rasterizer(dev)
    p = {k: v.to(dev).float() for k, v in scene.params.items()}
    colors = torch.cat([p["sh0"], p["shN"]], 1) if "shN" in p and p["shN"].numel() else p["sh0"]
    sh_degree = min(scene.sh_degree, int(round(colors.shape[1] ** 0.5)) - 1)
    means, quats = p["means"], p["quats"]
    scales, opac = torch.exp(p["scales"]), torch.sigmoid(p["opacities"])
    viewmats = torch.tensor(cameras.world_to_camera(c2w), dtype=torch.float32, device=dev)
    Ks = torch.tensor(cameras.intrinsics_pixels(K_norm, width, height), dtype=torch.float32, device=dev)
    rgba_out = np.empty((c2w.shape[0], height, width, 4), np.uint8)
    depth_out = np.empty((c2w.shape[0], height, width), np.float32)
    for s in range(0, c2w.shape[0], max(1, chunk)):
        vm, K = viewmats[s:s + chunk], Ks[s:s + chunk]
        bg = None if background is None else torch.tensor(background, dtype=torch.float32, device=dev).expand(vm.shape[0], 3)
        exact_median = depth == "median" and rast.name == "torch-tiles"
        img, alpha, _ = rast(means, quats, scales, opac, colors, vm, K, width, height, sh_degree=sh_degree,
                             backgrounds=bg, render_mode="RGB+MD" if exact_median else "RGB+ED")
        rgb, z = img[..., :3], img[..., 3]
        a = alpha[..., 0]
        if depth == "median" and not exact_median:   # gsplat: no median mode, a second pass
            z = median_depth_binned(rast, means, quats, scales, opac, vm, K, width, height)
        if background is None:
            rgb = torch.where(a[..., None] > 1e-6, rgb / a[..., None].clamp(min=1e-6), torch.zeros_like(rgb))
        z = torch.where(a > 1e-3, z, torch.zeros_like(z))
        rgba = torch.cat([rgb, a[..., None]], -1).clamp(0, 1)
        rgba_out[s:s + vm.shape[0]] = (rgba * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        depth_out[s:s + vm.shape[0]] = z.cpu().numpy()
    return rgba_out, depth_out
