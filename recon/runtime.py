"""Devices, dtypes and seeds are decided here and nowhere else (DESIGN §3)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from .errors import MissingError, UsageError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    reason: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(requested: str = "auto") -> tuple[torch.device, str]:
    """Return (device, why). `requested` is auto|cpu|cuda|cuda:N."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        if cuda_available():
            return torch.device("cuda"), f"CUDA device found ({torch.cuda.get_device_name(0)})"
        return torch.device("cpu"), "no CUDA device found"
    if requested == "cpu":
        return torch.device("cpu"), "requested"
    if requested.startswith("cuda"):
        if not cuda_available():
            raise MissingError(
                f"--device {requested} was requested but torch sees no CUDA device",
                hint="use --device cpu or auto, or install a CUDA build of torch",
            )
        return torch.device(requested), "requested"
    raise UsageError(f"unknown device {requested!r}", hint="use auto, cpu, cuda or cuda:N")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise UsageError(f"unknown dtype {name!r}", hint="use fp32, fp16, bf16 or auto")
    dt = _DTYPES[name]
    if device.type == "cpu" and dt == torch.float16:
        # fp16 matmuls on CPU are slow and partly unsupported: refuse, do not guess.
        raise UsageError("fp16 on CPU is not supported", hint="use --set views.dtype=fp32 or bf16 on CPU")
    return dt


def runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    dev, why = resolve_device(device)
    return Runtime(dev, resolve_dtype(dtype, dev), why)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for explicit randomness."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_threads(n: int | None = None) -> None:
    """Use every core we are given (CI has 2); env OMP_NUM_THREADS wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    if n:
        torch.set_num_threads(n)
