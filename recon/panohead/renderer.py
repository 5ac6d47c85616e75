"""Tri-grid volume rendering: rays, tri-grid sampling, OSG decoder, MipRayMarcher2 and
stratified + importance sampling, as PanoHead's ImportanceRenderer computes them.

The renderer is stochastic even at inference (stratified jitter and inverse-CDF
importance draws). Randomness is explicit here: pass a `torch.Generator`, or inject
the uniform draws (`RenderDraws`) to reproduce a recorded render exactly. With
neither, draws come from the global torch RNG in the official order, so
`torch.manual_seed(s)` before a call reproduces the official model's output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .networks import FullyConnectedLayer


@dataclass
class RenderDraws:
    """Uniform draws of one render: u_stratified [B, R, D, 1], u_importance [B*R, Di]."""

    u_stratified: torch.Tensor | None = None
    u_importance: torch.Tensor | None = None


class _Uniform:
    """Draws in the official order from an injected tensor, a generator, or the global RNG."""

    def __init__(self, generator: torch.Generator | None, draws: RenderDraws | None, record: bool = False):
        self.generator, self.draws, self.record = generator, draws, record
        self.recorded = RenderDraws()

    def _draw(self, name: str, shape, device) -> torch.Tensor:
        given = getattr(self.draws, name) if self.draws is not None else None
        if given is not None:
            if tuple(given.shape) != tuple(shape):
                raise ValueError(f"injected {name} has shape {tuple(given.shape)}, expected {tuple(shape)}")
            u = given.to(device=device, dtype=torch.float32)
        elif self.generator is not None:
            u = torch.rand(shape, generator=self.generator, device=self.generator.device).to(device)
        else:
            u = torch.rand(shape, device=device)
        if self.record:
            setattr(self.recorded, name, u.detach().clone())
        return u


def ray_bundle(cam2world: torch.Tensor, intrinsics: torch.Tensor, resolution: int):
    """Pixel-centre rays. cam2world [B,4,4], normalised intrinsics [B,3,3] ->
    origins [B, R*R, 3], unit directions [B, R*R, 3]; ray index = row * R + col."""
    n, m = cam2world.shape[0], resolution ** 2
    dev = cam2world.device
    cam_locs = cam2world[:, :3, 3]
    fx, fy = intrinsics[:, 0, 0], intrinsics[:, 1, 1]
    cx, cy, sk = intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 0, 1]
    ar = torch.arange(resolution, dtype=torch.float32, device=dev)
    uv = torch.stack(torch.meshgrid(ar, ar, indexing="ij")) * (1.0 / resolution) + (0.5 / resolution)
    uv = uv.flip(0).reshape(2, -1).transpose(1, 0).unsqueeze(0).repeat(n, 1, 1)  # (u = col, v = row)
    x_cam, y_cam = uv[:, :, 0].view(n, -1), uv[:, :, 1].view(n, -1)
    z_cam = torch.ones((n, m), device=dev)
    x_lift = (x_cam - cx.unsqueeze(-1) + cy.unsqueeze(-1) * sk.unsqueeze(-1) / fy.unsqueeze(-1)
              - sk.unsqueeze(-1) * y_cam / fy.unsqueeze(-1)) / fx.unsqueeze(-1) * z_cam
    y_lift = (y_cam - cy.unsqueeze(-1)) / fy.unsqueeze(-1) * z_cam
    cam_rel = torch.stack((x_lift, y_lift, z_cam, torch.ones_like(z_cam)), dim=-1)
    world = torch.bmm(cam2world, cam_rel.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
    dirs = F.normalize(world - cam_locs[:, None, :], dim=2)
    origins = cam_locs.unsqueeze(1).repeat(1, dirs.shape[1], 1)
    return origins, dirs


def sample_trigrid(planes: torch.Tensor, coords: torch.Tensor, box_warp: float, depth: int) -> torch.Tensor:
    """planes [B, 3, 32*depth, H, W] (channel = c*depth + d), coords [B, M, 3] world ->
    features [B, 3, M, 32]. Plane grids (W, H, D): (x,y,z), (x,z,y), (y,z,x); trilinear,
    align_corners=False, zero padding."""
    b, n_planes, cd, h, w = planes.shape
    m = coords.shape[1]
    c = cd // depth
    feats = planes.reshape(b * n_planes, c, depth, h, w)
    q = (2 / box_warp) * coords
    x, y, z = q[..., 0], q[..., 1], q[..., 2]
    grid = torch.stack([torch.stack([x, y, z], -1), torch.stack([x, z, y], -1), torch.stack([y, z, x], -1)], 1)
    grid = grid.reshape(b * n_planes, 1, 1, m, 3).float()
    out = F.grid_sample(feats, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.permute(0, 4, 3, 2, 1).reshape(b, n_planes, m, c)


class OSGDecoder(nn.Module):
    """Mean of the 3 plane features -> FC 32->64 -> Softplus -> FC 64->33 (sigma, 32 features)."""

    def __init__(self, n_features: int = 32, hidden: int = 64, out_features: int = 32,
                 lr_multiplier: float = 1.0, activation: str = "none"):
        super().__init__()
        self.activation = activation
        self.net = nn.Sequential(FullyConnectedLayer(n_features, hidden, lr_multiplier=lr_multiplier), nn.Softplus(),
                                 FullyConnectedLayer(hidden, 1 + out_features, lr_multiplier=lr_multiplier))

    def forward(self, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = sampled.mean(1)
        n, m, c = x.shape
        x = self.net(x.reshape(n * m, c)).view(n, m, -1)
        rgb, sigma = x[..., 1:], x[..., 0:1]
        if self.activation == "sigmoid":
            rgb = torch.sigmoid(rgb) * (1 + 2 * 0.001) - 0.001
        elif self.activation == "lrelu":
            rgb = F.leaky_relu(rgb, 0.2) * (2 ** 0.5)
        return rgb, sigma


def crop_density(sigma: torch.Tensor, xyz: torch.Tensor, box_warp: float, crop: float = 0.1) -> torch.Tensor:
    """Samples with |x| or |z| beyond box_warp/2 - crop get raw sigma -1000 (y is free)."""
    inside = (xyz[..., [0, 2]].abs() <= (box_warp / 2 - crop)).all(dim=-1, keepdim=True)
    return torch.where(inside, sigma, torch.full_like(sigma, -1e3))


def ray_march(colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor):
    """MipRayMarcher2 (softplus clamp). colors [B,R,S,C], densities/depths [B,R,S,1] ->
    rgb [B,R,C], depth [B,R,1] (clamped to the min/max of *all* depths), weights [B,R,S-1,1]."""
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = (densities[:, :, :-1] + densities[:, :, 1:]) / 2
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    densities_mid = F.softplus(densities_mid - 1)
    alpha = 1 - torch.exp(-(densities_mid * deltas))
    alpha_shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * torch.cumprod(alpha_shifted, -2)[:, :, :-1]
    rgb = torch.sum(weights * colors_mid, -2)
    depth = torch.sum(weights * depths_mid, -2) / weights.sum(2)
    depth = torch.nan_to_num(depth, float("inf"))
    depth = torch.clamp(depth, torch.min(depths), torch.max(depths))
    return rgb, depth, weights


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, u: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Inverse-CDF sampling. bins [Nr, S+1], weights [Nr, S], u [Nr, Ni] in [0, 1)."""
    n_rays, n_s = weights.shape
    weights = weights + eps
    pdf = weights / torch.sum(weights, -1, keepdim=True)
    cdf = torch.cumsum(pdf, -1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)
    u = u.contiguous()
    n_imp = u.shape[1]
    inds = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(inds - 1, 0)
    above = torch.clamp_max(inds, n_s)
    inds_sampled = torch.stack([below, above], -1).view(n_rays, 2 * n_imp)
    cdf_g = torch.gather(cdf, 1, inds_sampled).view(n_rays, n_imp, 2)
    bins_g = torch.gather(bins, 1, inds_sampled).view(n_rays, n_imp, 2)
    denom = cdf_g[..., 1] - cdf_g[..., 0]
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)
    return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


@dataclass
class RenderOptions:
    ray_start: float = 2.25
    ray_end: float = 3.3
    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    box_warp: float = 1.0
    triplane_depth: int = 3
    density_noise: float = 0.0


def render_trigrid(planes: torch.Tensor, decoder: OSGDecoder, origins: torch.Tensor, dirs: torch.Tensor,
                   opt: RenderOptions, rng: _Uniform, chunk: int | None = None):
    """Coarse + importance passes. Returns features [B,R,C], depth [B,R,1], mask [B,R,1],
    depths_fine [B,R,Di,1]."""
    b, r, _ = origins.shape
    d = opt.depth_resolution
    depths = torch.linspace(opt.ray_start, opt.ray_end, d, device=origins.device).reshape(1, 1, d, 1).repeat(b, r, 1, 1)
    delta = (opt.ray_end - opt.ray_start) / (d - 1)
    depths = depths + rng._draw("u_stratified", (b, r, d, 1), origins.device) * delta

    def run(dep):
        s = dep.shape[2]
        xyz = (origins.unsqueeze(-2) + dep * dirs.unsqueeze(-2)).reshape(b, -1, 3)
        colors, sigma = _decode(planes, decoder, xyz, opt, chunk)
        if opt.density_noise > 0:
            sigma = sigma + torch.randn_like(sigma) * opt.density_noise
        sigma = crop_density(sigma, xyz, opt.box_warp)
        return colors.reshape(b, r, s, -1), sigma.reshape(b, r, s, 1)

    colors_c, sigma_c = run(depths)
    n_imp = opt.depth_resolution_importance
    if n_imp <= 0:
        rgb, depth, weights = ray_march(colors_c, sigma_c, depths)
        return rgb, depth, weights.sum(2), None
    with torch.no_grad():
        _, _, w = ray_march(colors_c, sigma_c, depths)
        z = depths.reshape(b * r, d)
        w = w.reshape(b * r, -1)
        w = F.max_pool1d(w.unsqueeze(1).float(), 2, 1, padding=1)
        w = F.avg_pool1d(w, 2, 1).squeeze(1) + 0.01
        z_mid = 0.5 * (z[:, :-1] + z[:, 1:])
        u = rng._draw("u_importance", (b * r, n_imp), origins.device)
        depths_fine = sample_pdf(z_mid, w[:, 1:-1], u).detach().reshape(b, r, n_imp, 1)
    colors_f, sigma_f = run(depths_fine)
    all_depths = torch.cat([depths, depths_fine], -2)
    all_colors = torch.cat([colors_c, colors_f], -2)
    all_sigma = torch.cat([sigma_c, sigma_f], -2)
    _, idx = torch.sort(all_depths, dim=-2)
    all_depths = torch.gather(all_depths, -2, idx)
    all_colors = torch.gather(all_colors, -2, idx.expand(-1, -1, -1, all_colors.shape[-1]))
    all_sigma = torch.gather(all_sigma, -2, idx)
    rgb, depth, weights = ray_march(all_colors, all_sigma, all_depths)
    return rgb, depth, weights.sum(2), depths_fine


def _decode(planes, decoder, xyz, opt: RenderOptions, chunk: int | None):
    if chunk is None or xyz.shape[1] <= chunk:
        return decoder(sample_trigrid(planes, xyz, opt.box_warp, opt.triplane_depth))
    outs = [decoder(sample_trigrid(planes, xyz[:, i:i + chunk], opt.box_warp, opt.triplane_depth))
            for i in range(0, xyz.shape[1], chunk)]
    return torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)
