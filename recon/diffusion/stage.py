"""The `backview` and `views` stages on the DiffPortrait360 back-end (DESIGN §1, §6).

Stage functions take and return the typed contracts (Portrait, BackView, ViewSet) and
never touch the run directory. Camera-condition images come from `views.condition_dir`
(the official 32-PNG ring of inference_data.zip, or any folder of PNGs with an optional
dataset.json); rendering rings from PanoHead is not part of this module.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import cameras
from ..config import ViewsConfig
from ..errors import InputError, MissingError, UsageError, WeightsError
from ..imageio_safe import read_png_rgba
from ..types import BackView, Portrait, ViewSet

Progress = Callable[[int, int, str], None]
BACKGROUND = 255  # the models were trained on portraits matted onto white

_PIPES: dict = {}


# ---------------------------------------------------------------------- pipelines
def load_pipeline(folder: str | os.PathLike, kind: str, device: torch.device, dtype: torch.dtype):
    """Converted weights folder -> BackViewPipeline (kind backhead) or Portrait360Pipeline (dp360)."""
    from .convert import load_models
    from .pipeline_360 import Portrait360Pipeline
    from .pipeline_backview import BackViewPipeline, PromptContext
    from .scheduling import make_scheduler

    key = (str(Path(folder).resolve()), kind, str(device), str(dtype))
    if key in _PIPES:
        return _PIPES[key]
    m = load_models(folder, dtype=dtype, device=device)
    cls = Portrait360Pipeline if kind == "dp360" else BackViewPipeline
    ctx = PromptContext.from_tensor(m.context().cpu())
    pipe = cls(vae=m.vae, unet=m.unet, appearance=m.appearance, controlnet=m.controlnet,
               scheduler=make_scheduler(), text_context=ctx)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    _PIPES.clear()  # keep one pipeline resident: two full models do not fit next to each other on small GPUs
    _PIPES[key] = pipe
    return pipe


def clear_cache() -> None:
    _PIPES.clear()


def _weights_folder(cfg: ViewsConfig, kind: str) -> Path:
    from ..weights import find_weights, weights_home

    home = Path(cfg.weights_dir).expanduser() if cfg.weights_dir else weights_home()
    path = find_weights(kind, home)
    if path is None:
        raise WeightsError(f"converted {kind} weights not found in {home}",
                           hint="run `portrait3d weights download` (or use --backend proxy)")
    return path


# ---------------------------------------------------------------- condition images
def _natural_key(p: Path):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)]


def load_condition_ring(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(images (M,H,W,3) uint8, c2w (M,4,4), K (M,3,3), camera source) of a folder of ring PNGs.

    With a dataset.json its cameras are used; without one the PNGs, in natural name order,
    are taken as the ring yaw_i = pi/2 + 2 pi i / M at pitch pi/2 (view M/2 = back).
    """
    from ..weights import condition_ring_dir

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"camera-condition folder {root} does not exist",
                         hint="set views.condition_dir to the official ring (inference_data.zip, "
                              "`portrait3d weights download`) or a folder of ring PNGs")
    d = root if any(p.suffix.lower() == ".png" for p in root.iterdir()) else condition_ring_dir(root)
    if d is None:
        raise InputError(f"no PNG images in {root}", hint="the condition folder must hold the ring's camera images")
    if (d / "dataset.json").is_file():
        entries = cameras.read_dataset_json(d / "dataset.json")
        paths = [d / name for name, _, _ in entries]
        c2w = np.stack([e[1] for e in entries])
        K = np.stack([e[2] for e in entries])
        source = "dataset.json"
    else:
        paths = sorted((p for p in d.iterdir() if p.suffix.lower() == ".png"), key=_natural_key)
        c2w = cameras.ring_cam2world(len(paths))
        K = np.repeat(cameras.INTRINSICS_NORM[None], len(paths), axis=0)
        source = "assumed ring order (no dataset.json)"
    imgs = []
    for p in paths:
        if not p.is_file():
            raise InputError(f"{d}/dataset.json names {p.name} but the file is missing")
        rgba = read_png_rgba(p)
        imgs.append(_over_white(rgba))
    if len({im.shape for im in imgs}) != 1:
        raise InputError(f"condition images in {d} have different sizes")
    return np.stack(imgs), c2w, K, source


def select_ring(images: np.ndarray, c2w: np.ndarray, num_views: int) -> np.ndarray:
    """Indices of `num_views` evenly spaced views out of an M-view ring (M a multiple of N)."""
    m = len(images)
    if m == num_views:
        return np.arange(m)
    if m % num_views == 0:
        return np.arange(0, m, m // num_views)
    raise UsageError(f"the condition ring has {m} views, views.num_views is {num_views}",
                     hint=f"set views.num_views to {m} or a divisor of it, or give a condition ring of {num_views} views")


def _back_index(c2w: np.ndarray) -> int:
    az, _ = cameras.azimuth_elevation_of(c2w)
    return int(np.argmin(np.abs(((az - 180.0) + 180.0) % 360.0 - 180.0)))


# ------------------------------------------------------------------------ images
def _over_white(rgba: np.ndarray) -> np.ndarray:
    """(H,W,3|4) uint8 -> (H,W,3) uint8 composited on the white background."""
    if rgba.shape[-1] == 3:
        return rgba
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (rgba[..., :3].astype(np.float32) * a + BACKGROUND * (1.0 - a)).round().astype(np.uint8)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    import cv2

    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(img, (size, size), interpolation=interp)


def background_key_alpha(rgb: np.ndarray, threshold: float = 24.0) -> np.ndarray:
    """Alpha of a generated view by keying its background: the border's median colour,
    flood-filled from the border (so white eyes or teeth inside the head stay opaque).
    rgb (H,W,3) uint8 -> (H,W) uint8."""
    import cv2

    img = rgb.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    near = (np.linalg.norm(img - bg, axis=-1) < threshold).astype(np.uint8)
    n, labels = cv2.connectedComponents(near, connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, edge[edge > 0]) & (near > 0)
    alpha = np.where(background, 0, 255).astype(np.uint8)
    alpha = cv2.morphologyEx(alpha, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    return cv2.GaussianBlur(alpha, (3, 3), 0)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ------------------------------------------------------------------------ stages
def diffusion_backview(portrait: Portrait, cfg: ViewsConfig, runtime, progress: Progress | None = None, *,
                       condition_image: np.ndarray | None = None) -> BackView:
    """Back-of-head image from the back-view model, camera at azimuth 180.

    condition_image: (H,W,3) uint8 camera image at azimuth 180 (e.g. rendered by
    PanoHead); if None it is taken from the ring in cfg.condition_dir."""
    from .. import cameras

    pipe = load_pipeline(_weights_folder(cfg, "backhead"), "backhead", runtime.device, runtime.dtype)
    if condition_image is not None:
        ring = np.asarray(condition_image)[None, ..., :3]
        c2w = cameras.orbit_cam2world(180.0, cfg.elevation)[None]
        K = cameras.INTRINSICS_NORM[None]
        source, bi = "panohead", 0
    else:
        if not cfg.condition_dir:
            raise MissingError("the back-view model needs the 180 degree camera-condition image",
                               hint="convert PanoHead weights (`portrait3d weights download`) or set views.condition_dir "
                                    "to the official ring")
        ring, c2w, K, source = load_condition_ring(cfg.condition_dir)
        bi = _back_index(c2w)
    size = ring.shape[1]
    if cfg.low_memory:
        pipe.enable_low_memory(runtime.device)
    out = pipe(_resize(_over_white(portrait.rgba), size), ring[bi:bi + 1],
               num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, eta=cfg.eta,
               generator=_generator(cfg.seed), official_schedule=cfg.official_schedule,
               reference_latent=cfg.reference_latent, output_type="np", progress=progress)
    rgb = _resize(_to_uint8(out.images[0]), cfg.resolution)
    alpha = background_key_alpha(rgb)
    return BackView(np.dstack([rgb, alpha]), c2w[bi], K[bi], backend="diffusion",
                    meta={"model": "DiffPortrait360 back-view", "steps": cfg.steps, "guidance": cfg.guidance,
                          "eta": cfg.eta, "seed": cfg.seed, "condition_view": bi, "condition_cameras": source,
                          "alpha_source": "background_key", "official_schedule": cfg.official_schedule})


def diffusion_views(portrait: Portrait, backview: BackView, cfg: ViewsConfig, runtime, *,
                    condition_images: np.ndarray | None = None, noise_renders: np.ndarray | None = None,
                    progress: Progress | None = None) -> ViewSet:
    """N ring views from the 360 model.

    condition_images: (N,H,W,3|4) uint8 camera images of the ring at cfg.num_views /
      cfg.elevation; if None they are read from cfg.condition_dir.
    noise_renders: optional (N,H,W,3|4) uint8 renders of this subject at the same cameras
      (PanoHead inversion or the proxy head): the 3D-aware noise; with an alpha channel they
      also give the views' alpha.
    """
    n = cfg.num_views
    if condition_images is not None:
        cond = np.asarray(condition_images)
        if cond.ndim != 4 or cond.shape[0] != n:
            raise InputError(f"condition_images must be ({n}, H, W, 3), got {cond.shape}")
        cond = np.stack([_over_white(c) for c in cond])
        v = _ring_pitch(cfg.elevation)
        c2w = cameras.ring_cam2world(n, v)
        K = np.repeat(cameras.INTRINSICS_NORM[None], n, axis=0)
        source = "given (ring at views.elevation)"
    else:
        if not cfg.condition_dir:
            raise MissingError("the 360 model needs camera-condition images of the ring",
                               hint="set views.condition_dir to the official 32-PNG ring (`portrait3d weights download`), "
                                    "or render a ring with PanoHead")
        ring, rc2w, rK, source = load_condition_ring(cfg.condition_dir)
        idx = select_ring(ring, rc2w, n)
        cond, c2w, K = ring[idx], rc2w[idx], rK[idx]
        if cfg.elevation != 0.0 and source != "dataset.json":
            raise UsageError(f"views.elevation={cfg.elevation} but the condition ring in {cfg.condition_dir} is at 0",
                             hint="use views.elevation=0 with this ring, or a ring rendered at that elevation")
    size = cond.shape[1]
    renders, alpha_src = None, "background_key"
    if noise_renders is not None and cfg.noise != "none":
        nr = np.asarray(noise_renders)
        if nr.ndim != 4 or nr.shape[0] != n:
            raise InputError(f"noise_renders must be ({n}, H, W, 3|4), got {nr.shape}")
        renders = np.stack([_resize(_over_white(r), size) for r in nr])
        if nr.shape[-1] == 4:
            alpha_src = "noise_renders"
    pipe = load_pipeline(_weights_folder(cfg, "dp360"), "dp360", runtime.device, runtime.dtype)
    frame_batch = cfg.frame_batch
    if cfg.low_memory:
        pipe.enable_low_memory(runtime.device)
        frame_batch = min(frame_batch, pipe.max_frames_per_batch)
    out = pipe(_resize(_over_white(portrait.rgba), size), _resize(_over_white(backview.image), size), cond, renders,
               num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, eta=cfg.eta,
               generator=_generator(cfg.seed), window_mode=cfg.windows, window_size=cfg.window_size,
               window_stride=cfg.window_stride, window_weighting=cfg.window_weighting,
               max_frames_per_batch=frame_batch, official_schedule=cfg.official_schedule,
               reference_latent=cfg.reference_latent, output_type="np", progress=progress)
    rgb = np.stack([_resize(im, cfg.resolution) for im in _to_uint8(out.images)])
    if alpha_src == "noise_renders":
        alpha = np.stack([_resize(np.ascontiguousarray(a[..., 3]), cfg.resolution) for a in np.asarray(noise_renders)])
    else:
        alpha = np.stack([background_key_alpha(im) for im in rgb])
    names = [f"view_{i:03d}.png" for i in range(n)]
    return ViewSet(np.concatenate([rgb, alpha[..., None]], axis=-1), np.asarray(c2w, dtype=np.float64),
                   np.asarray(K, dtype=np.float64), names, backend="diffusion", preview=False,
                   meta={"model": "DiffPortrait360", "steps": cfg.steps, "guidance": cfg.guidance, "eta": cfg.eta,
                         "seed": cfg.seed, "windows": cfg.windows, "window_size": cfg.window_size,
                         "window_stride": cfg.window_stride, "official_schedule": cfg.official_schedule,
                         "condition_cameras": source, "noise": "3d" if renders is not None else "gaussian",
                         "alpha_source": alpha_src, "model_resolution": int(size)})


def _ring_pitch(elevation_deg: float) -> float:
    """PanoHead pitch v of a ring at this user elevation (cameras.degrees_to_hv)."""
    return float(cameras.degrees_to_hv(0.0, elevation_deg)[1])
