"""PanoHead GAN inversion of the input portrait, the source of DiffPortrait360's
3D-aware noise (DESIGN §6-7): W+ optimisation (projector_withseg.py's recipe: start at
the mean w, noise ramp on w, cosine lr ramps, 0.1*MSE + perceptual + w-norm), then a
short generator fine-tune on the found w (PTI-style), then the ring render.

Randomness (w noise, renderer draws) comes from one explicit torch.Generator.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import cameras
from ..errors import StageError, UsageError
from .generator import PanoHeadGenerator
from .perceptual import PerceptualLoss
from .rings import render_ring, ring_labels

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class InversionConfig:
    w_steps: int = 200
    finetune_steps: int = 5
    w_lr: float = 0.1
    finetune_lr: float = 3e-4
    w_avg_samples: int = 10000
    initial_noise_factor: float = 0.05
    noise_ramp_length: float = 0.75
    lr_rampdown_length: float = 0.25
    lr_rampup_length: float = 0.05
    mse_weight: float = 0.1
    w_norm_weight: float = 1.0
    use_delta_c: bool = True            # the projector shifts the target camera by t_mapping(mean z)
    ray_start: float | None = 2.35      # DiffPortrait360's PanoHead setting; None = the checkpoint's
    target: str = "image"               # 'image' (512^2 SR) or 'image_raw' (neural res; cheap on CPU)
    neural_rendering_resolution: int | None = None
    seed: int = 0


@dataclass
class InversionResult:
    ws: torch.Tensor                    # [1, num_ws, w_dim] optimised W+
    generator: PanoHeadGenerator        # the fine-tuned copy (eval, frozen)
    camera: np.ndarray                  # (25,) label used for the target (incl. delta_c if used)
    renders: np.ndarray                 # (N, H, W, 3) uint8 ring renders
    masks: np.ndarray                   # (N, R, R) uint8 opacity at the neural resolution
    labels: np.ndarray                  # (N, 25) ring cameras
    w_losses: list = field(default_factory=list)
    finetune_losses: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _target_tensor(image: np.ndarray, size: int, device) -> torch.Tensor:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UsageError(f"inversion target must be an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
    if t.shape[-1] != size or t.shape[-2] != size:
        t = F.interpolate(t, size=(size, size), mode="area" if t.shape[-1] > size else "bilinear",
                          align_corners=None if t.shape[-1] > size else False)
    return t


def _w_stats(G: PanoHeadGenerator, n: int, device) -> tuple[torch.Tensor, float, torch.Tensor]:
    """projector_withseg.py: mean/std of w over RandomState(123) z at the 3.14-written frontal camera."""
    z = np.random.RandomState(123).randn(n, G.z_dim)
    c = torch.tensor([cameras.label25(cameras.lookat_cam2world(3.14 / 2, 3.14 / 2))], dtype=torch.float32, device=device)
    with torch.no_grad():
        w = G.mapping(torch.from_numpy(z).to(device), c.repeat(n, 1))[:, :1].cpu().numpy().astype(np.float32)
    w_avg = np.mean(w, axis=0, keepdims=True)
    w_std = float((np.sum((w - w_avg) ** 2) / n) ** 0.5)
    return torch.from_numpy(w_avg).to(device), w_std, torch.from_numpy(np.mean(z, axis=0, keepdims=True)).to(device)


def _optimise_w(G, w_opt, w_start, w_std, config: InversionConfig, gen, render, image_loss, total, progress):
    """projector.py's W+ loop: Adam on w, cosine lr ramp-up/down, decaying w noise."""
    device = w_opt.device
    opt = torch.optim.Adam([w_opt], betas=(0.9, 0.999), lr=config.w_lr)
    w_losses = []
    for step in range(config.w_steps):
        t = step / config.w_steps
        noise_scale = w_std * config.initial_noise_factor * max(0.0, 1.0 - t / config.noise_ramp_length) ** 2
        lr_ramp = min(1.0, (1.0 - t) / config.lr_rampdown_length)
        lr_ramp = (0.5 - 0.5 * math.cos(lr_ramp * math.pi)) * min(1.0, t / config.lr_rampup_length)
        for group in opt.param_groups:
            group["lr"] = config.w_lr * lr_ramp
        w_noise = torch.randn(w_opt.shape, generator=gen, device=gen.device).to(device) * noise_scale
        img = render(G, w_opt + w_noise)
        loss = image_loss(img) + config.w_norm_weight * (w_opt - w_start).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        w_losses.append(float(loss.detach()))
        if not math.isfinite(w_losses[-1]):
            raise StageError(f"PanoHead inversion diverged at W step {step} (loss {w_losses[-1]})", stage="views")
        if progress:
            progress(step + 1, total, f"PanoHead W+ inversion {step + 1}/{config.w_steps} loss {w_losses[-1]:.4f}")
    return w_losses


def invert(G: PanoHeadGenerator, image: np.ndarray, label: Sequence[float], *, num_views: int = 36,
           pitches: float | Sequence[float] = 0.0, config: InversionConfig = InversionConfig(),
           perceptual: PerceptualLoss | None = None, ring_output: str = "image", ring_batch: int | None = None,
           progress: Progress | None = None) -> InversionResult:
    """Invert `image` (aligned 512^2 portrait, uint8) seen from camera `label` (25 values),
    fine-tune a copy of G on it and render the ring (num_views, pitches in degrees)."""
    if config.target not in ("image", "image_raw"):
        raise UsageError(f"unknown inversion target {config.target!r}", hint="use image or image_raw")
    device = next(G.parameters()).device
    notes = []
    if perceptual is None:
        notes.append("no perceptual network given: pixel (MSE) loss only")
    else:
        perceptual = perceptual.to(device)
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(config.seed)
    overrides = {"ray_start": config.ray_start} if config.ray_start is not None else {}
    nrr = config.neural_rendering_resolution

    res = G.img_resolution if config.target == "image" else (nrr or G.config.neural_rendering_resolution)
    target = _target_tensor(image, res, device)
    target_feats = perceptual.prepare(target) if perceptual is not None else None
    c = torch.tensor(np.asarray(label, dtype=np.float32)[None], device=device)
    w_avg, w_std, z_mean = _w_stats(G, config.w_avg_samples, device)
    if config.use_delta_c:
        with torch.no_grad():
            c, _ = G.apply_delta_c(z_mean, c, truncation_psi=1.0)

    def render(Gm, ws):
        out = Gm.synthesis(ws, c, generator=gen, neural_rendering_resolution=nrr,
                           superresolution=(config.target == "image"), **overrides)
        return out[config.target]

    def image_loss(img):
        loss = config.mse_weight * (target - img).square().mean()
        if perceptual is not None:
            loss = loss + perceptual(target_feats, img).mean()
        return loss

    total = config.w_steps + config.finetune_steps + 1
    w_opt = w_avg.detach().clone().repeat(1, G.num_ws, 1).requires_grad_(True)
    w_start = w_opt.detach().clone()
    flags = [p.requires_grad for p in G.parameters()]
    G.requires_grad_(False)  # gradients flow to w only; restored below
    try:
        w_losses = _optimise_w(G, w_opt, w_start, w_std, config, gen, render, image_loss, total, progress)
    finally:
        for p, f in zip(G.parameters(), flags):
            p.requires_grad_(f)
    ws = w_opt.detach()

    G_ft = copy.deepcopy(G).train().requires_grad_(True)
    opt = torch.optim.Adam(G_ft.parameters(), betas=(0.9, 0.999), lr=config.finetune_lr)
    ft_losses = []
    for step in range(config.finetune_steps):
        loss = image_loss(render(G_ft, ws))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ft_losses.append(float(loss.detach()))
        if progress:
            progress(config.w_steps + step + 1, total, f"PanoHead fine-tune {step + 1}/{config.finetune_steps}")
    G_ft.eval().requires_grad_(False)
    if hasattr(G, "weights_id"):
        G_ft.weights_id = ""  # fine-tuned: not the converted file's weights any more

    labels = ring_labels(num_views, pitches)
    if ring_batch is None:
        ring_batch = 4 if device.type == "cuda" else 1
    with torch.no_grad():
        renders, masks = render_ring(G_ft, ws, labels, seed=config.seed, output=ring_output, batch=ring_batch,
                                     return_masks=True, render_overrides=overrides, neural_rendering_resolution=nrr)
    if progress:
        progress(total, total, "PanoHead ring rendered")
    return InversionResult(ws, G_ft, c[0].cpu().numpy(), renders, masks, labels, w_losses, ft_losses, notes)


def invert_portrait(G: PanoHeadGenerator, portrait, **kwargs) -> InversionResult:
    """recon.types.Portrait -> InversionResult (target = its aligned image, camera = its label)."""
    return invert(G, portrait.image, portrait.label, **kwargs)


def coarse_geometry(G: PanoHeadGenerator, ws: torch.Tensor, resolution: int = 64, level: float = 10.0,
                    chunk: int = 2 ** 18) -> np.ndarray:
    """Surface points of the density field: raw sigma sampled on a resolution^3 grid over
    the tri-grid box ([-box_warp/2, box_warp/2]^3, with the renderer's |x|,|z| <= 0.4 crop),
    marching cubes at `level` (EG3D's shape-extraction threshold on raw sigma).
    Returns (P, 3) float32 world points (the mesh vertices)."""
    from skimage.measure import marching_cubes

    device = ws.device
    half = G.config.box_warp / 2
    lin = torch.linspace(-half, half, resolution, device=device)
    grid = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(1, -1, 3)  # [1, R^3, 3] (x, y, z)
    with torch.no_grad():
        planes = G.planes(ws)
        sigma = G.sample_density(None, grid, planes=planes, chunk=chunk)[0, :, 0]
    crop = (grid[0, :, [0, 2]].abs() > half - 0.1).any(-1)
    sigma = torch.where(crop, torch.full_like(sigma, -1e3), sigma)
    vol = sigma.reshape(resolution, resolution, resolution).float().cpu().numpy()
    if not (vol.min() < level < vol.max()):
        raise StageError(f"the PanoHead density field never crosses level {level} "
                         f"(sigma in [{vol.min():.3g}, {vol.max():.3g}])",
                         hint="lower the level or check the inversion", stage="views")
    verts, _, _, _ = marching_cubes(vol, level=level)
    step = (2 * half) / (resolution - 1)
    return (verts * step - half).astype(np.float32)
