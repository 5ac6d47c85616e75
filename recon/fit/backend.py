"""Which rasterizer renders splats: gsplat's CUDA kernels on a CUDA device, our
tile-based PyTorch rasterizer (recon.fit.rasterize) elsewhere. Both take the
same call and give the same images (tests/test_rasterize_gpu.py checks that)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MissingError

# Our CPU rasterizer is exact for any tile size; 8x8 tiles waste fewer
# Gaussian-pixel pairs than gsplat's 16x16 and run ~2x faster on a CPU.
CPU_TILE_SIZE = 8


@dataclass(frozen=True)
class Rasterizer:
    fn: Callable
    name: str
    why: str
    tile_size: int | None = None  # None: use the caller's

    def __call__(self, means, quats, scales, opacities, colors, viewmats, Ks, width, height, *,
                 sh_degree=None, backgrounds=None, render_mode="RGB", tile_size=16):
        """gsplat.rasterization's call (non-packed, classic, pinhole)."""
        return self.fn(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                       sh_degree=sh_degree, backgrounds=backgrounds, render_mode=render_mode,
                       tile_size=self.tile_size or tile_size, packed=False)


def select_rasterizer(device: torch.device | str) -> Rasterizer:
    """gsplat on CUDA, ours on CPU; `.name` and `.why` say which and why."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from gsplat import rasterization as gsplat_rasterization
            from gsplat.cuda._backend import _C  # noqa: F401  (the compiled kernels)
        except Exception as e:  # the CUDA extension failed to build or load
            raise MissingError(f"gsplat's CUDA rasterizer could not be loaded ({e.__class__.__name__}: {e})",
                               hint="install a CUDA build of gsplat 1.5.3 matching your torch, or use --device cpu") from None
        if _C is None:
            raise MissingError("gsplat's CUDA extension is not available for this torch/CUDA",
                               hint="install a CUDA build of gsplat 1.5.3 matching your torch, or use --device cpu")
        return Rasterizer(gsplat_rasterization, "gsplat-cuda", f"CUDA device {device}: gsplat 1.5.3 kernels")
    from .rasterize import rasterization

    return Rasterizer(rasterization, "torch-tiles", f"{device.type} device: gsplat's rasterizers need CUDA, "
                      "using portrait3d's tile-based PyTorch rasterizer (same maths)", tile_size=CPU_TILE_SIZE)
