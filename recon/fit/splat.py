"""Fit Gaussian splats to a ViewSet (DESIGN §8).

Recipe: visual-hull initialisation; loss (1-w)*L1 + w*(1-SSIM) on a random
background (target composited over the same colour) + alpha L1 against the
masks; Adam with per-parameter learning rates; MCMC upkeep (3DGS as MCMC,
Kheradmand et al. 2024; recon.fit.strategy: gsplat's MCMCStrategy on CUDA, the
same recipe in PyTorch elsewhere): low-opacity Gaussians are relocated onto live
ones and the count grows by 5% per refinement up to cfg.max_gaussians, with the
paper's opacity/scale correction so a relocation does not change the image;
SH degree ramped up to cfg.sh_degree; Gaussians whose centres leave the views'
visual hull (cfg.prune_outside) are relocated like dead ones. Held-out views give
PSNR/SSIM/IoU.
Checkpoints (params, Adam state, step, RNG) make a killed fit resume.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import time
from dataclasses import asdict
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import cameras
from ..config import FitConfig
from ..errors import InputError, StageError
from ..runtime import resolve_device
from ..types import Scene, ViewSet
from .backend import select_rasterizer
from .losses import alpha_iou, psnr, ssim
from .strategy import MIN_OPACITY, RefineSchedule, make_strategy, resolve_strategy

SH_C0 = 0.28209479177387814
CKPT_NAME = "ckpt.pt"
CKPT_VERSION = 1
PARAM_NAMES = ("means", "quats", "scales", "opacities", "sh0", "shN")

Progress = Callable[[int, int, str], None]


# --------------------------------------------------------------------------- views
def prepare_views(views: ViewSet, resolution: int) -> dict:
    """Views resized (area) to `resolution` on the long side, as float tensors.

    Returns rgb [N, H, W, 3], mask [N, H, W, 1] in [0, 1], viewmats [N, 4, 4]
    (world-to-camera), Ks [N, 3, 3] in pixels, width, height.
    """
    if len(views) == 0:
        raise InputError("the ViewSet holds no views", hint="fit needs posed RGBA views")
    H0, W0 = views.resolution
    scale = resolution / max(H0, W0)
    W, H = max(1, round(W0 * scale)), max(1, round(H0 * scale))
    img = torch.from_numpy(np.ascontiguousarray(views.images)).float().div_(255.0).permute(0, 3, 1, 2)
    if (H, W) != (H0, W0):
        img = F.interpolate(img, size=(H, W), mode="area")
    img = img.permute(0, 2, 3, 1).contiguous()
    if views.meta.get("alpha_missing"):
        img[..., 3] = 1.0  # no matte: every pixel is foreground
    c2w = np.asarray(views.c2w, dtype=np.float64)
    if not np.all(np.isfinite(c2w)):
        raise InputError("a view's camera holds non-finite numbers", hint="check the views' dataset.json")
    viewmats = torch.tensor(cameras.world_to_camera(c2w), dtype=torch.float32)
    Ks = torch.tensor(cameras.intrinsics_pixels(views.K, W, H), dtype=torch.float32)
    return {"rgb": img[..., :3].contiguous(), "mask": img[..., 3:].contiguous(), "viewmats": viewmats, "Ks": Ks,
            "width": W, "height": H}


def split_views(n: int, holdout_every: int) -> tuple[list[int], list[int]]:
    """Every k-th view (the k-th, 2k-th, ...: never the frontal view 0) is held out."""
    if holdout_every <= 1 or n < 2:
        return list(range(n)), []
    test = [i for i in range(n) if i % holdout_every == holdout_every - 1]
    train = [i for i in range(n) if i not in test]
    return (train, test) if train else (list(range(n)), [])


# ---------------------------------------------------------------------------- init
def _scene_bound(viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int) -> float:
    """Half-size of a cube around the origin that every camera's frustum covers at
    the origin's depth (the head lives there), with a margin."""
    c2w = torch.inverse(viewmats.double())
    dist = c2w[:, :3, 3].norm(dim=-1)
    half = torch.minimum(dist * (width / 2) / Ks[:, 0, 0].double(), dist * (height / 2) / Ks[:, 1, 1].double())
    return float(half.max()) * 1.15


def visual_hull(mask: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, grid: int = 64,
                bound: float | None = None) -> tuple[torch.Tensor, float]:
    """Carve a grid^3 voxel grid with the masks [N, H, W, 1]; a voxel survives if it lies
    inside every view's image with mask > 0.5 there (on a ring of views the subject is
    in every frame, so outside a frame means outside the subject).
    Returns (occupancy [g, g, g] bool, bound)."""
    N, H, W, _ = mask.shape
    bound = bound or _scene_bound(viewmats, Ks, W, H)
    lin = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 * bound - bound
    pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    occ = torch.ones(pts.shape[0], dtype=torch.bool)
    for i in range(N):
        pc = pts @ viewmats[i, :3, :3].T + viewmats[i, :3, 3]
        z = pc[:, 2]
        uv = (pc @ Ks[i].T)[:, :2] / z.clamp(min=1e-6)[:, None]
        u, v = uv[:, 0].floor().long(), uv[:, 1].floor().long()
        seen = (z > 1e-6) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
        m = torch.zeros_like(occ)
        m[seen] = mask[i, v[seen], u[seen], 0] > 0.5
        occ &= m
    return occ.reshape(grid, grid, grid), bound


def init_from_hull(data: dict, train: list[int], num: int, gen: torch.Generator,
                   hull: tuple[torch.Tensor, float] | None = None) -> np.ndarray:
    """`num` points on the visual hull's surface voxels (jittered inside the voxel).
    `hull`: (occupancy, bound) from `visual_hull` when already computed."""
    occ, bound = hull if hull is not None else visual_hull(data["mask"][train], data["viewmats"][train], data["Ks"][train])
    if not occ.any():
        raise InputError("the visual hull of the views is empty: no 3D point is inside every view's alpha mask",
                         hint="the masks do not agree with the cameras; check dataset.json and the views' alpha")
    g = occ.shape[0]
    pad = F.pad(occ[None, None].float(), (1, 1, 1, 1, 1, 1), value=0.0)
    inner = F.max_pool3d(1.0 - pad, 3, stride=1)[0, 0] < 0.5   # all 26 neighbours occupied
    surface = occ & ~inner
    cells = torch.nonzero(surface if surface.sum() >= 16 else occ).float()
    pick = torch.randint(0, cells.shape[0], (num,), generator=gen)
    voxel = 2 * bound / g
    pts = (cells[pick] + torch.rand(num, 3, generator=gen)) * voxel - bound
    return pts.numpy()


def outside_hull(means: torch.Tensor, occ: torch.Tensor, bound: float, margin: int = 2) -> torch.Tensor:
    """(N,) bool: centres outside the visual hull grown by `margin` voxels (or outside its
    grid). Every mask says nothing of the head is there, so a Gaussian whose centre
    drifted there is a floater or a background-fitting layer: the fit relocates it."""
    g = occ.shape[0]
    grown = occ[None, None].float()
    if margin > 0:
        grown = F.max_pool3d(grown, 2 * margin + 1, stride=1, padding=margin)
    grown = grown[0, 0] > 0.5
    ijk = torch.floor((means.detach().float().cpu() + bound) / (2 * bound) * g).long()
    in_grid = ((ijk >= 0) & (ijk < g)).all(dim=1)
    ijk = ijk.clamp(0, g - 1)
    inside = grown[ijk[:, 0], ijk[:, 1], ijk[:, 2]] & in_grid
    return (~inside).to(means.device)


def colours_from_views(points: torch.Tensor, data: dict, idx: list[int]) -> torch.Tensor:
    """Each point takes its colour from the nearest camera that sees it (a cheap
    stand-in for occlusion-aware colouring; the fit corrects it within steps)."""
    rgb, vm, Ks = data["rgb"][idx], data["viewmats"][idx], data["Ks"][idx]
    H, W = rgb.shape[1:3]
    out = torch.full((points.shape[0], 3), 0.5)
    best = torch.full((points.shape[0],), float("inf"))
    for i in range(len(idx)):
        pc = points @ vm[i, :3, :3].T + vm[i, :3, 3]
        z = pc[:, 2]
        uv = (pc @ Ks[i].T)[:, :2] / z.clamp(min=1e-6)[:, None]
        u, v = uv[:, 0].floor().long(), uv[:, 1].floor().long()
        seen = (z > 1e-6) & (u >= 0) & (u < W) & (v >= 0) & (v < H) & (z < best)
        out[seen] = rgb[i, v[seen], u[seen]]
        best[seen] = z[seen]
    return out


def _knn_mean_dist(points: torch.Tensor, k: int = 3, block: int = 2048) -> torch.Tensor:
    out = torch.empty(points.shape[0])
    for s in range(0, points.shape[0], block):
        d = torch.cdist(points[s:s + block], points)
        out[s:s + block] = d.topk(min(k + 1, points.shape[0]), largest=False).values[:, 1:].mean(-1)
    return out


def init_params(points: np.ndarray, data: dict, train: list[int], sh_degree: int, gen: torch.Generator) -> dict:
    pts = torch.as_tensor(np.asarray(points, dtype=np.float32)).reshape(-1, 3)
    if pts.shape[0] == 0 or not torch.isfinite(pts).all():
        raise InputError(f"init_points must be a non-empty finite (N, 3) array, got {tuple(np.shape(points))}")
    n = pts.shape[0]
    rgb = colours_from_views(pts, data, train)
    dist = _knn_mean_dist(pts).clamp(min=1e-4) if n > 1 else torch.full((1,), 0.01)
    k = (sh_degree + 1) ** 2 - 1
    return {
        "means": pts,
        "quats": torch.nn.functional.normalize(torch.rand(n, 4, generator=gen) - 0.5, dim=-1),
        "scales": torch.log(dist)[:, None].repeat(1, 3),
        "opacities": torch.logit(torch.full((n,), 0.5)),
        "sh0": ((rgb - 0.5) / SH_C0)[:, None, :],
        "shN": torch.zeros(n, k, 3),
    }


# ------------------------------------------------------------------ MCMC upkeep
def _binoms(n_max: int) -> torch.Tensor:
    b = torch.zeros(n_max, n_max)
    for n in range(n_max):
        for k in range(n + 1):
            b[n, k] = math.comb(n, k)
    return b


def relocation_correction(opac: torch.Tensor, scales: torch.Tensor, counts: torch.Tensor,
                          n_max: int = 51) -> tuple[torch.Tensor, torch.Tensor]:
    """3DGS-as-MCMC Eq. 9: a Gaussian split into n copies keeps its rendered footprint
    when each copy has opacity 1-(1-o)^(1/n) and its scale is corrected (the
    pure-torch form of gsplat's CUDA `compute_relocation`)."""
    n = counts.clamp(1, n_max).to(opac.dtype)
    new_o = 1.0 - torch.pow(1.0 - opac, 1.0 / n)
    b = _binoms(n_max).to(opac)
    denom = torch.zeros_like(opac)
    for i in range(1, n_max + 1):
        ks = torch.arange(i, dtype=opac.dtype, device=opac.device)
        term = (b[i - 1, :i] * (-1.0) ** ks * new_o[:, None] ** (ks + 1) / torch.sqrt(ks + 1)).sum(-1)
        denom = denom + torch.where(n >= i, term, torch.zeros_like(term))
    new_scales = (opac / denom)[:, None] * scales
    return new_o.clamp(min=0.005, max=1 - 1e-6), new_scales


class SplatModel:
    """Parameters (leaf tensors) with one Adam each, resizable for relocation/growth."""

    def __init__(self, params: dict, lrs: dict, device: torch.device):
        self.lrs = dict(lrs)
        self.params = {k: params[k].detach().to(device).float().clone().requires_grad_(True) for k in PARAM_NAMES}
        self.opt = {k: torch.optim.Adam([self.params[k]], lr=self.lrs[k], eps=1e-15) for k in PARAM_NAMES}

    @property
    def n(self) -> int:
        return int(self.params["means"].shape[0])

    def zero_grad(self):
        for o in self.opt.values():
            o.zero_grad(set_to_none=True)

    def step(self, means_lr: float):
        self.opt["means"].param_groups[0]["lr"] = means_lr
        for o in self.opt.values():
            o.step()

    def _replace(self, name: str, new: torch.Tensor, state_fn):
        old = self.params[name]
        p = new.detach().clone().requires_grad_(True)
        opt = self.opt[name]
        st = opt.state.pop(old, None)
        opt.param_groups[0]["params"] = [p]
        if st:
            opt.state[p] = {k: (state_fn(v) if torch.is_tensor(v) and v.shape == old.shape else v) for k, v in st.items()}
        self.params[name] = p

    @torch.no_grad()
    def relocate(self, dead: torch.Tensor, gen: torch.Generator) -> int:
        """Move the dead Gaussians onto live ones sampled by opacity (MCMC relocation)."""
        opac = torch.sigmoid(self.params["opacities"])
        dead_idx = torch.nonzero(dead).squeeze(1)
        alive_idx = torch.nonzero(~dead).squeeze(1)
        if dead_idx.numel() == 0 or alive_idx.numel() == 0:
            return 0
        probs = opac[alive_idx].cpu()
        src = alive_idx[torch.multinomial(probs, dead_idx.numel(), replacement=True, generator=gen).to(alive_idx.device)]
        self._split(src, dead_idx)
        return int(dead_idx.numel())

    @torch.no_grad()
    def grow(self, n_new: int, gen: torch.Generator) -> int:
        """Add n_new Gaussians as copies of live ones sampled by opacity (MCMC growth)."""
        if n_new <= 0:
            return 0
        opac = torch.sigmoid(self.params["opacities"]).cpu()
        src = torch.multinomial(opac, n_new, replacement=True, generator=gen).to(self.params["means"].device)
        n0 = self.n
        for name in PARAM_NAMES:
            p = self.params[name]
            self._replace(name, torch.cat([p, p[src]], 0),
                          lambda v: torch.cat([v, torch.zeros((n_new,) + v.shape[1:], dtype=v.dtype, device=v.device)], 0))
        self._split(src, torch.arange(n0, n0 + n_new, device=src.device))
        return n_new

    @torch.no_grad()
    def _split(self, src: torch.Tensor, dst: torch.Tensor):
        """dst become copies of src; src and its copies share its opacity/scale (Eq. 9)."""
        counts = torch.bincount(src, minlength=self.n)[src] + 1
        o, s = relocation_correction(torch.sigmoid(self.params["opacities"][src]),
                                     torch.exp(self.params["scales"][src]), counts)
        for name in PARAM_NAMES:
            self.params[name][dst] = self.params[name][src]
        self.params["opacities"][src] = torch.logit(o)
        self.params["opacities"][dst] = torch.logit(o)
        self.params["scales"][src] = torch.log(s)
        self.params["scales"][dst] = torch.log(s)
        for name in PARAM_NAMES:  # fresh Adam moments for everything that moved
            st = self.opt[name].state.get(self.params[name], {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k][src] = 0
                    st[k][dst] = 0

    # checkpoint state
    def state(self) -> dict:
        out = {"params": {k: v.detach().cpu() for k, v in self.params.items()}, "adam": {}}
        for k in PARAM_NAMES:
            st = self.opt[k].state.get(self.params[k], {})
            out["adam"][k] = {n: (v.detach().cpu() if torch.is_tensor(v) else torch.tensor(float(v)))
                              for n, v in st.items()}
        return out

    @classmethod
    def from_state(cls, state: dict, lrs: dict, device: torch.device) -> "SplatModel":
        m = cls(state["params"], lrs, device)
        for k in PARAM_NAMES:
            st = state["adam"].get(k, {})
            if st:
                m.opt[k].state[m.params[k]] = {n: v.to(device) if n != "step" else v.clone() for n, v in st.items()}
        return m


# -------------------------------------------------------------------- checkpoints
def _fingerprint(views: ViewSet, cfg: FitConfig, init_points) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(views.images).tobytes())
    h.update(np.ascontiguousarray(views.c2w, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(views.K, dtype=np.float64).tobytes())
    if init_points is not None:
        h.update(np.ascontiguousarray(init_points, dtype=np.float32).tobytes())
    return h.hexdigest()


def save_checkpoint(path: pathlib.Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: pathlib.Path, fingerprint: str) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"fit checkpoint {path} cannot be read ({e.__class__.__name__})",
                         hint="delete it to restart the fit from scratch") from None
    if not isinstance(ck, dict) or ck.get("version") != CKPT_VERSION or "params" not in ck:
        raise InputError(f"{path} is not a portrait3d fit checkpoint", hint="delete it to restart the fit")
    if ck.get("fingerprint") != fingerprint:
        raise InputError(f"fit checkpoint {path} was written for other views or fit settings",
                         hint="delete it (or use a fresh run directory) to fit from scratch")
    return ck


# -------------------------------------------------------------------------- fit
def _render(rast, params: dict, sh_degree: int, data: dict, idx: list[int], bg: torch.Tensor, device):
    colors = torch.cat([params["sh0"], params["shN"]], 1)
    img, alpha, _ = rast(params["means"], params["quats"], torch.exp(params["scales"]),
                         torch.sigmoid(params["opacities"]), colors, data["viewmats"][idx].to(device),
                         data["Ks"][idx].to(device), data["width"], data["height"], sh_degree=sh_degree,
                         backgrounds=bg)
    return img, alpha


@torch.no_grad()
def evaluate(rast, params: dict, sh_degree: int, data: dict, idx: list[int], device, batch: int = 4) -> dict:
    """PSNR / SSIM over white and alpha IoU of the views `idx`."""
    if not idx:
        return {}
    preds, alphas = [], []
    for s in range(0, len(idx), batch):
        ii = idx[s:s + batch]
        img, alpha = _render(rast, params, sh_degree, data, ii, torch.ones(len(ii), 3, device=device), device)
        preds.append(img.clamp(0, 1).cpu())
        alphas.append(alpha.cpu())
    pred, alpha = torch.cat(preds), torch.cat(alphas)
    m = data["mask"][idx]
    target = data["rgb"][idx] * m + (1 - m)
    return {"psnr": psnr(pred, target), "ssim": float(ssim(pred, target)), "alpha_iou": alpha_iou(alpha, m)}


def fit_splats(views: ViewSet, cfg: FitConfig, *, device="cpu", checkpoint_dir: pathlib.Path | None = None,
               init_points: np.ndarray | None = None, progress: Progress | None = None) -> tuple[Scene, dict]:
    """Fit Gaussian splats to `views`. Returns (Scene with CPU params, metrics)."""
    t_start = time.perf_counter()
    dev = device if isinstance(device, torch.device) else resolve_device(device)[0]
    rast = select_rasterizer(dev)
    if cfg.steps < 1:
        raise InputError(f"fit.steps={cfg.steps} must be >= 1")
    data = prepare_views(views, cfg.resolution)
    n_views = len(views)
    train, test = split_views(n_views, cfg.holdout_every)
    lrs = {"means": cfg.lr_means, "quats": cfg.lr_quats, "scales": cfg.lr_scales,
           "opacities": cfg.lr_opacities, "sh0": cfg.lr_sh0, "shN": cfg.lr_shN}
    fp = _fingerprint(views, cfg, init_points)
    ckpt_path = pathlib.Path(checkpoint_dir) / CKPT_NAME if checkpoint_dir is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    # The visual hull seeds the Gaussians and bounds them: centres that leave it are relocated.
    hull = None
    if cfg.prune_outside or init_points is None:
        hull = visual_hull(data["mask"][train], data["viewmats"][train], data["Ks"][train])
        if not hull[0].any():
            raise InputError("the visual hull of the views is empty: no 3D point is inside every view's alpha mask",
                             hint="the masks do not agree with the cameras; check dataset.json and the views' alpha")
    resumed_from = None
    psnr_init = None
    if ckpt_path is not None and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, fp)
        model = SplatModel.from_state(ck, lrs, dev)
        gen.set_state(ck["rng"])
        step0 = int(ck["step"])
        resumed_from = step0
        psnr_init = ck.get("psnr_init")
        psnr_init = None if psnr_init is None else float(psnr_init)
    else:
        pts = init_points if init_points is not None else init_from_hull(data, train, cfg.num_init, gen, hull)
        model = SplatModel(init_params(pts, data, train, cfg.sh_degree, gen), lrs, dev)
        step0 = 0
    if model.n > cfg.max_gaussians:
        raise InputError(f"{model.n} initial Gaussians exceed fit.max_gaussians={cfg.max_gaussians}",
                         hint="raise fit.max_gaussians or pass fewer init points")
    if psnr_init is None:
        psnr_init = evaluate(rast, model.params, 0, data, train, dev)["psnr"]

    steps = cfg.steps
    schedule = RefineSchedule.for_steps(steps)
    upkeep = make_strategy(resolve_strategy(cfg.strategy, dev), cfg.max_gaussians, schedule, gen)
    sh_interval = max(1, steps // (cfg.sh_degree + 1)) if cfg.sh_degree > 0 else steps + 1
    batch = max(1, min(cfg.batch_views, len(train)))
    relocated = grown = pruned = 0
    loss_v = float("nan")
    for step in range(step0, steps):
        sh_deg = min(cfg.sh_degree, step // sh_interval)
        perm = torch.randperm(len(train), generator=gen)[:batch]
        idx = [train[int(i)] for i in perm]
        bg = torch.rand(batch, 3, generator=gen).to(dev)
        img, alpha = _render(rast, model.params, sh_deg, data, idx, bg, dev)
        rgb, m = data["rgb"][idx].to(dev), data["mask"][idx].to(dev)
        target = rgb * m + (1 - m) * bg[:, None, None, :]
        l1 = (img - target).abs().mean()
        loss = (1 - cfg.ssim_weight) * l1 + cfg.ssim_weight * (1 - ssim(img, target))
        loss = loss + cfg.alpha_weight * (alpha - m).abs().mean()
        # MCMC regularisers: unneeded Gaussians fade and become relocation targets.
        scales = torch.exp(model.params["scales"])
        loss = loss + 0.01 * torch.sigmoid(model.params["opacities"]).mean() + 0.01 * scales.mean()
        if cfg.flatten_weight > 0:
            # Flat Gaussians (surfels, 2DGS-like): off by default. Measured on the GT head
            # (benchmarks/bench_fit.py, preview): weight 1 and 10 made the mesh worse
            # (Chamfer 1.13 % -> 1.34 % / more outliers), so 3D Gaussians stay the default.
            loss = loss + cfg.flatten_weight * scales.min(dim=1).values.mean()
        model.zero_grad()
        loss.backward()
        loss_v = float(loss.detach())
        if not math.isfinite(loss_v):
            raise StageError(f"the fit diverged at step {step} (loss {loss_v})",
                             hint="lower fit.lr_* or check the views", stage="fit")
        means_lr = cfg.lr_means * 0.01 ** (step / steps)
        model.step(means_lr)
        with torch.no_grad():
            model.params["quats"].data = F.normalize(model.params["quats"].data, dim=-1)
        done = step + 1
        out = None
        if cfg.prune_outside and schedule.due(done):
            out = outside_hull(model.params["means"], *hull)
            pruned += int((out & (torch.sigmoid(model.params["opacities"].detach()) > MIN_OPACITY)).sum())
        r, g = upkeep.step(model, done, means_lr, out)
        relocated, grown = relocated + r, grown + g
        if progress is not None:
            progress(done, steps, f"loss {loss_v:.4f}, {model.n} gaussians")
        if ckpt_path is not None and cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0 and done < steps:
            save_checkpoint(ckpt_path, {"version": CKPT_VERSION, "fingerprint": fp, "step": done,
                                        "rng": gen.get_state(), "psnr_init": psnr_init, **model.state()})

    sh_final = min(cfg.sh_degree, max(0, (steps - 1) // sh_interval))
    tr = evaluate(rast, model.params, sh_final, data, train, dev)
    te = evaluate(rast, model.params, sh_final, data, test, dev)
    metrics = {
        "steps": steps, "seconds": time.perf_counter() - t_start, "num_gaussians": model.n,
        "train_psnr": tr["psnr"], "train_ssim": tr["ssim"], "train_alpha_iou": tr["alpha_iou"],
        "test_psnr": te.get("psnr"), "test_ssim": te.get("ssim"), "test_alpha_iou": te.get("alpha_iou"),
        "init_psnr": psnr_init, "final_loss": loss_v, "train_views": train, "test_views": test,
        "resolution": [data["height"], data["width"]], "resumed_from": resumed_from,
        "relocated": relocated, "grown": grown, "pruned_outside": pruned, "strategy": upkeep.name,
        "rasterizer": rast.name, "rasterizer_why": rast.why,
    }
    params = {k: v.detach().cpu().float().contiguous() for k, v in model.params.items()}
    scene = Scene(params=params, sh_degree=cfg.sh_degree,
                  meta={"rasterizer": rast.name, "steps": steps, "num_gaussians": model.n})
    return scene, metrics
