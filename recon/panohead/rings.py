"""Camera-condition rings: one fixed PanoHead identity rendered at the ring's poses.

DiffPortrait360's camera ControlNet is conditioned on renders of a single PanoHead
identity (the official code reads 32 precomputed PNGs). We render them for any ring:
identity z = RandomState(seed).randn(1, z_dim) (gen_samples.py's convention, seed 0
by default), mapped with truncation 0.7 from the *frontal* camera; every view is then
synthesised at its ring camera WITHOUT t_mapping's delta_c (as DiffPortrait360 and
gen_samples/gen_videos do). Renders are cached on disk keyed by the weights' identity,
the ring, the seed and the truncation.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import cameras
from ..errors import UsageError
from .generator import PanoHeadGenerator
from .renderer import RenderDraws

CACHE_VERSION = 1
Progress = Callable[[int, int, str], None]


def ring_labels(num_views: int, pitches: float | Sequence[float] = 0.0, pi: float = math.pi) -> np.ndarray:
    """(N, 25) float32 labels of the ring yaw_i = pi/2 + 2*pi*i/N. `pitches` are camera
    elevations in degrees (0 = level, PanoHead v = pi/2; > 0 = camera above the head):
    one value for the whole ring, or one per view. pi=3.14 reproduces DiffPortrait360's
    official ring, which is written with 3.14 (yaw and pitch)."""
    if num_views < 1:
        raise UsageError(f"a ring needs at least 1 view, got {num_views}")
    elev = np.atleast_1d(np.asarray(pitches, dtype=np.float64))
    if elev.size == 1:
        elev = np.full(num_views, float(elev[0]))
    if elev.shape != (num_views,) or not np.all(np.isfinite(elev)) or np.any(np.abs(elev) >= 90):
        raise UsageError(f"pitches must be one elevation or {num_views} elevations in (-90, 90) degrees, got {pitches!r}")
    if pi == math.pi:
        h, _ = cameras.ring_angles(num_views)
    else:
        h = np.array([pi / 2 + 2 * pi * i / num_views for i in range(num_views)])
    v = pi / 2 - np.radians(elev)
    c2w = cameras.lookat_cam2world(h, v)
    return np.array([cameras.label25(m) for m in c2w], dtype=np.float32)


def frontal_label() -> np.ndarray:
    return np.array(cameras.label25(cameras.lookat_cam2world(math.pi / 2, math.pi / 2)), dtype=np.float32)


def identity_ws(G: PanoHeadGenerator, seed: int = 0, truncation: float = 0.7, device=None) -> torch.Tensor:
    device = device or next(G.parameters()).device
    z = torch.from_numpy(np.random.RandomState(seed).randn(1, G.z_dim)).to(device)
    c = torch.from_numpy(frontal_label())[None].to(device)
    with torch.no_grad():
        return G.mapping(z, c, truncation_psi=truncation)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in ~[-1, 1] -> (B, H, W, 3) uint8, as gen_samples.py writes PNGs."""
    return (img.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8).cpu().numpy()


def _view_draws(G: PanoHeadGenerator, views: list[int], seed: int, device, nrr: int | None = None) -> RenderDraws:
    """Renderer uniforms of each view from its own torch.Generator(seed + view), drawn in
    the official order, so a view's render does not depend on how views are batched."""
    r = (nrr or G.config.neural_rendering_resolution) ** 2
    d, di = G.config.depth_resolution, G.config.depth_resolution_importance
    us, ui = [], []
    for i in views:
        g = torch.Generator().manual_seed(seed + i)
        us.append(torch.rand((1, r, d, 1), generator=g))
        ui.append(torch.rand((r, di), generator=g))
    return RenderDraws(torch.cat(us).to(device), torch.cat(ui).to(device))


def render_ring(G: PanoHeadGenerator, ws: torch.Tensor, labels: np.ndarray, *, seed: int = 0,
                output: str = "image", batch: int = 1, progress: Progress | None = None,
                return_masks: bool = False, render_overrides: dict | None = None,
                neural_rendering_resolution: int | None = None):
    """Render ws [1, num_ws, w_dim] at each label (N, 25), `batch` views per call. View i's
    renderer draws come from torch.Generator(seed + i), so a view does not depend on
    batching or order (image_depth would: its clamp spans the batch; it is not returned).
    output 'image' = the 512^2 SR image, 'image_raw' = the neural render.
    Returns (N, H, W, 3) uint8 [, masks (N, R, R) uint8 at the neural resolution]."""
    if output not in ("image", "image_raw"):
        raise UsageError(f"unknown ring output {output!r}", hint="use image or image_raw")
    device = ws.device
    n = len(labels)
    imgs, masks = [], []
    with torch.no_grad():
        planes = G.planes(ws)
        for start in range(0, n, batch):
            idx = list(range(start, min(n, start + batch)))
            draws = _view_draws(G, idx, seed, device, neural_rendering_resolution)
            c = torch.from_numpy(labels[idx]).to(device)
            k = len(idx)
            out = G.synthesis(ws.expand(k, -1, -1), c, planes=planes.expand(k, -1, -1, -1, -1), draws=draws,
                              superresolution=(output == "image"), neural_rendering_resolution=neural_rendering_resolution,
                              **(render_overrides or {}))
            imgs.append(to_uint8(out[output].float()))
            if return_masks:
                m = out["image_mask"].float().clamp(0, 1)[:, 0]
                masks.append((m * 255 + 0.5).to(torch.uint8).cpu().numpy())
            if progress:
                progress(idx[-1] + 1, n, f"rendered view {idx[-1] + 1}/{n}")
    img = np.concatenate(imgs)
    return (img, np.concatenate(masks)) if return_masks else img


def _cache_key(G: PanoHeadGenerator, labels: np.ndarray, seed: int, truncation: float, output: str) -> str:
    from .convert import weights_id
    blob = json.dumps({"v": CACHE_VERSION, "weights": weights_id(G), "labels": labels.round(6).tolist(),
                       "seed": seed, "truncation": truncation, "output": output,
                       "render": {k: v for k, v in G.config.to_dict().items()
                                  if k in ("neural_rendering_resolution", "depth_resolution",
                                           "depth_resolution_importance", "ray_start", "ray_end")}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def render_condition_ring(G: PanoHeadGenerator, num_views: int, pitches: float | Sequence[float] = 0.0, *,
                          seed: int = 0, truncation: float = 0.7, cache_dir: str | os.PathLike | None = None,
                          device: str | torch.device | None = None, progress: Progress | None = None,
                          output: str = "image", batch: int | None = None, pi: float = math.pi) -> np.ndarray:
    """Camera-condition images of the fixed identity on a ring: (N, 512, 512, 3) uint8
    (output='image'; 'image_raw' gives the neural-resolution render). Cached in
    cache_dir as ring_<key>.npy when cache_dir is given."""
    labels = ring_labels(num_views, pitches, pi)
    key = _cache_key(G, labels, seed, truncation, output)
    path = Path(cache_dir) / f"ring_{key}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[0] == num_views:
                if progress:
                    progress(num_views, num_views, f"condition ring from cache {path.name}")
                return arr
        except (OSError, ValueError):
            pass  # unreadable cache entry: render again and overwrite it
    dev = torch.device(device) if device is not None else next(G.parameters()).device
    if next(G.parameters()).device != dev:
        G = G.to(dev)
    ws = identity_ws(G, seed, truncation, dev)
    if batch is None:
        batch = 4 if dev.type == "cuda" else 1
    arr = render_ring(G, ws, labels, seed=seed, output=output, batch=batch, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial.npy")
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, path)
    return arr
