"""Overlapping frame windows over the view ring (DESIGN §6).

The view-consistency module was trained on 8-frame windows. The official code
cuts 32 views into 4 disjoint windows, which leaves seams at 7|8, 15|16, 23|24 and
31|0. Here every denoising step predicts eps for windows that overlap and wrap
around the ring (view N-1 is next to view 0), and blends the predictions where
windows overlap, so no pair of neighbouring views is ever split for good.

CFG is linear, so blending guided eps equals blending each pass then guiding.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UsageError
from .scheduling import guided_eps

WINDOW_MODES = ("circular", "independent")
WEIGHTINGS = ("cosine", "equal")


@dataclass(frozen=True)
class WindowPlan:
    num_frames: int
    windows: tuple[tuple[int, ...], ...]   # frame indices of each window, in window order
    weights: torch.Tensor                  # (window_size,) float32 blend weight by position
    mode: str

    @property
    def window_size(self) -> int:
        return len(self.windows[0])

    def coverage(self) -> torch.Tensor:
        """(N,) summed blend weight per frame (> 0 for every frame)."""
        cov = torch.zeros(self.num_frames)
        for w in self.windows:
            cov.index_add_(0, torch.tensor(w), self.weights)
        return cov


def position_weights(size: int, weighting: str = "cosine") -> torch.Tensor:
    """Blend weight of each window position. Cosine: sin(pi (j + 1/2) / W), which
    trusts a window least at its edges, where it sees only one side of a view."""
    if weighting == "equal":
        return torch.ones(size)
    if weighting == "cosine":
        j = torch.arange(size, dtype=torch.float64)
        return torch.sin(math.pi * (j + 0.5) / size).float()
    raise UsageError(f"unknown window weighting {weighting!r}", hint=f"use one of {', '.join(WEIGHTINGS)}")


def plan_windows(num_frames: int, window_size: int = 8, stride: int = 4, mode: str = "circular",
                 weighting: str = "cosine") -> WindowPlan:
    """Windows over `num_frames` views.

    circular: ceil(N / stride) windows of `window_size` consecutive views (mod N),
      starts spread evenly over the ring; N <= window_size gives one window of all N.
    independent: the official layout, N / window_size disjoint windows.
    """
    if mode not in WINDOW_MODES:
        raise UsageError(f"unknown window mode {mode!r}", hint=f"use one of {', '.join(WINDOW_MODES)}")
    if num_frames < 1 or window_size < 1:
        raise UsageError(f"cannot plan windows for {num_frames} frames of window size {window_size}")
    if num_frames <= window_size:
        windows = (tuple(range(num_frames)),)
        return WindowPlan(num_frames, windows, position_weights(num_frames, weighting), mode)
    if mode == "independent":
        if num_frames % window_size:
            raise UsageError(f"independent windows need a view count divisible by {window_size}, got {num_frames}",
                             hint="use views.windows=circular, or a multiple of the window size")
        windows = tuple(tuple(range(s, s + window_size)) for s in range(0, num_frames, window_size))
        return WindowPlan(num_frames, windows, position_weights(window_size, weighting), mode)
    if not 1 <= stride <= window_size:
        raise UsageError(f"window stride {stride} must be in 1..{window_size}",
                         hint="a stride larger than the window leaves views between windows unpredicted")
    count = math.ceil(num_frames / stride)
    starts = sorted({round(k * num_frames / count) for k in range(count)})
    windows = tuple(tuple((s + j) % num_frames for j in range(window_size)) for s in starts)
    return WindowPlan(num_frames, windows, position_weights(window_size, weighting), mode)


def _batches(plan: WindowPlan, max_frames_per_batch: int, can_batch: bool) -> list[list[int]]:
    """Group window indices so one forward holds at most max_frames_per_batch frames (>= 1 window).
    A denoiser that cannot tell windows apart in one batch gets one window per call."""
    per = max(1, max_frames_per_batch // plan.window_size) if can_batch else 1
    ids = list(range(len(plan.windows)))
    return [ids[i:i + per] for i in range(0, len(ids), per)]


def _eps_kwargs(denoiser, frames_per_window: int) -> dict:
    # A denoiser whose eps takes `num_frames` (frames per window) can run several windows in
    # one batch; one without it treats a whole batch as one video, so it gets one window per call.
    try:
        params = inspect.signature(denoiser.eps).parameters
    except (TypeError, ValueError):
        return {}
    return {"num_frames": frames_per_window} if "num_frames" in params else {}


def windowed_eps(denoiser, x: torch.Tensor, t, context: torch.Tensor, *, bank, cam_images: torch.Tensor | None,
                 plan: WindowPlan, guidance: float, max_frames_per_batch: int = 32,
                 on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Guided eps for all N frames: every window's CFG prediction, blended.

    x (N,4,h,w); cam_images (N,3,H,W) or None; bank from denoiser.reference_banks (computed
    once per step by the caller and shared by every window). Returns (N,4,h,w) float32.
    """
    n = x.shape[0]
    if n != plan.num_frames:
        raise ValueError(f"latents have {n} frames, the window plan {plan.num_frames}")
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    wsum = torch.zeros((n,), dtype=torch.float32, device=x.device)
    kw = _eps_kwargs(denoiser, plan.window_size)
    weights = plan.weights.to(x.device)
    batches = _batches(plan, max_frames_per_batch, can_batch=bool(kw) or plan.window_size == 1)
    for bi, batch in enumerate(batches):
        idx = torch.tensor([f for w in batch for f in plan.windows[w]], device=x.device)
        xb = x.index_select(0, idx)
        cb = cam_images.index_select(0, idx.to(cam_images.device)) if cam_images is not None else None
        eps_c = denoiser.eps(xb, t, context, bank=bank, cam_images=cb, **kw).float()
        if guidance != 1.0:
            eps_u = denoiser.eps(xb, t, context, bank=None, cam_images=None, **kw).float()
            eps = guided_eps(eps_c, eps_u, guidance)
        else:
            eps = eps_c
        wb = weights.repeat(len(batch))                                   # (B*W,)
        acc.index_add_(0, idx, eps * wb.view(-1, *([1] * (eps.ndim - 1))))
        wsum.index_add_(0, idx, wb)
        if on_batch is not None:
            on_batch(bi + 1, len(batches))
    return acc / wsum.view(-1, *([1] * (acc.ndim - 1)))
