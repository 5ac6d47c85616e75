"""Densification upkeep of a splat fit: 3DGS as MCMC (Kheradmand et al. 2024).

Two implementations of the same recipe, chosen by `fit.strategy`:

  gsplat-mcmc  gsplat 1.5.3's `MCMCStrategy` (CUDA only: its relocation and noise
               kernels are CUDA ops). Used on a CUDA device by default. gsplat's
               DefaultStrategy is not offered: its opacity reset is broken in 1.5.3.
  torch-mcmc   our pure-PyTorch form (recon.fit.splat.SplatModel.relocate/grow):
               the same relocation with the paper's Eq. 9 opacity/scale correction
               and 5 % growth per refinement, without the position noise. The CPU path.

Both refine on the same schedule (`RefineSchedule`, in completed steps) and both
treat Gaussians the fit marks as out of bounds as dead, so they are relocated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MissingError, UsageError

STRATEGIES = ("auto", "gsplat-mcmc", "torch-mcmc")
MIN_OPACITY = 0.005          # dead below this (gsplat's default)


@dataclass(frozen=True)
class RefineSchedule:
    """Refinement happens after completed step `done` when start <= done < stop and done % every == 0."""

    every: int
    start: int
    stop: int

    @classmethod
    def for_steps(cls, steps: int) -> "RefineSchedule":
        every = max(10, steps // 12)
        return cls(every=every, start=max(every, steps // 10), stop=int(steps * 0.8))

    def due(self, done: int) -> bool:
        return self.start <= done < self.stop and done % self.every == 0


def resolve_strategy(requested: str, device: torch.device) -> str:
    """auto -> gsplat-mcmc on CUDA, torch-mcmc elsewhere; gsplat-mcmc off CUDA is a usage error."""
    if requested not in STRATEGIES:
        raise UsageError(f"unknown fit.strategy {requested!r}", hint=f"use one of {', '.join(STRATEGIES)}")
    if requested == "auto":
        return "gsplat-mcmc" if device.type == "cuda" else "torch-mcmc"
    if requested == "gsplat-mcmc" and device.type != "cuda":
        raise UsageError("fit.strategy=gsplat-mcmc needs a CUDA device (gsplat's relocation kernels are CUDA ops)",
                         hint="use fit.strategy=auto or torch-mcmc on a CPU")
    return requested


class TorchMCMC:
    """Our relocation + growth (recon.fit.splat.SplatModel does the tensor work)."""

    name = "torch-mcmc"

    def __init__(self, cap_max: int, schedule: RefineSchedule, gen: torch.Generator):
        self.cap_max, self.schedule, self.gen = int(cap_max), schedule, gen

    def step(self, model, done: int, means_lr: float, out_of_bounds: torch.Tensor | None = None) -> tuple[int, int]:
        """After the optimiser step `done` (1-based). Returns (relocated, grown)."""
        if not self.schedule.due(done):
            return 0, 0
        dead = torch.sigmoid(model.params["opacities"].detach()) <= MIN_OPACITY
        if out_of_bounds is not None:
            dead |= out_of_bounds
        relocated = model.relocate(dead, self.gen)
        grown = model.grow(min(self.cap_max - model.n, int(0.05 * model.n)), self.gen)
        return relocated, grown


class GsplatMCMC:
    """gsplat's MCMCStrategy driving a SplatModel's params and per-parameter Adams.

    SplatModel keeps one single-group Adam per parameter, which is the layout
    `MCMCStrategy.check_sanity` requires; gsplat swaps the tensors in `model.params`
    and the optimiser state in place, so the model stays consistent.
    """

    name = "gsplat-mcmc"

    def __init__(self, cap_max: int, schedule: RefineSchedule, noise_lr: float = 5e5):
        try:
            from gsplat.strategy import MCMCStrategy
        except ImportError as e:
            raise MissingError(f"gsplat's MCMCStrategy cannot be imported ({e})",
                               hint="pip install gsplat==1.5.3, or use fit.strategy=torch-mcmc") from None
        # gsplat refines when step > refine_start_iter and step % refine_every == 0, with
        # the step we pass being `done`: start - 1 makes `done >= start` as in RefineSchedule.
        self.strategy = MCMCStrategy(cap_max=int(cap_max), noise_lr=float(noise_lr),
                                     refine_start_iter=schedule.start - 1, refine_stop_iter=schedule.stop,
                                     refine_every=schedule.every, min_opacity=MIN_OPACITY)
        self.schedule = schedule
        self.state = self.strategy.initialize_state()
        self._checked = False

    def step(self, model, done: int, means_lr: float, out_of_bounds: torch.Tensor | None = None) -> tuple[int, int]:
        if not self._checked:
            self.strategy.check_sanity(model.params, model.opt)
            self._checked = True
        relocated = 0
        n0 = model.n
        if self.schedule.due(done):
            with torch.no_grad():
                if out_of_bounds is not None and out_of_bounds.any():
                    # gsplat relocates by opacity only: make the escaped Gaussians dead
                    model.params["opacities"][out_of_bounds] = torch.logit(torch.tensor(MIN_OPACITY / 2))
                relocated = int((torch.sigmoid(model.params["opacities"]) <= MIN_OPACITY).sum())
        # `info` is unused by MCMCStrategy; lr scales the position noise as in gsplat's trainer
        self.strategy.step_post_backward(model.params, model.opt, self.state, done, {}, lr=means_lr)
        return relocated, model.n - n0


def make_strategy(name: str, cap_max: int, schedule: RefineSchedule, gen: torch.Generator):
    if name == "gsplat-mcmc":
        return GsplatMCMC(cap_max, schedule)
    if name == "torch-mcmc":
        return TorchMCMC(cap_max, schedule, gen)
    raise UsageError(f"unknown fit.strategy {name!r}", hint=f"use one of {', '.join(STRATEGIES[1:])}")


__all__ = ["STRATEGIES", "RefineSchedule", "resolve_strategy", "TorchMCMC", "GsplatMCMC", "make_strategy"]
