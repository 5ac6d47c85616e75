"""Render a fitted Scene from arbitrary cameras (turntables, meshing, `render` CLI)."""
from __future__ import annotations

import numpy as np
import torch

from .. import cameras
from ..errors import InputError
from ..runtime import resolve_device
from ..types import Scene
from .backend import select_rasterizer


@torch.no_grad()
def render_scene(scene: Scene, c2w: np.ndarray, K_norm: np.ndarray, width: int, height: int, *,
                 background=(1.0, 1.0, 1.0), device="cpu", chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Render `scene` from N cameras (recon.cameras convention: cam2world OpenCV, normalised K).

    Returns (rgba (N, H, W, 4) uint8, depth (N, H, W) float32). With a background,
    RGB is composited over it; with background=None, RGB is straight (un-premultiplied)
    colour. Alpha is the splats' coverage. Depth is the expected camera-z depth,
    0 where nothing was rendered (the ViewSet convention). `chunk` cameras render at once.
    """
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
        img, alpha, _ = rast(means, quats, scales, opac, colors, vm, K, width, height, sh_degree=sh_degree,
                             backgrounds=bg, render_mode="RGB+ED")
        rgb, depth = img[..., :3], img[..., 3]
        a = alpha[..., 0]
        if background is None:
            rgb = torch.where(a[..., None] > 1e-6, rgb / a[..., None].clamp(min=1e-6), torch.zeros_like(rgb))
        depth = torch.where(a > 1e-3, depth, torch.zeros_like(depth))
        rgba = torch.cat([rgb, a[..., None]], -1).clamp(0, 1)
        rgba_out[s:s + vm.shape[0]] = (rgba * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        depth_out[s:s + vm.shape[0]] = depth.cpu().numpy()
    return rgba_out, depth_out
