"""`portrait3d doctor`: what this installation can do, and how to fix what it can't."""
from __future__ import annotations

import importlib
import os
import platform
import shutil
import sys


def _check(name: str, ok: bool, detail: str, hint: str = "", required: bool = True) -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail, "hint": hint, "required": required}


def _version(mod: str) -> str | None:
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "installed")
    except Exception:  # noqa: BLE001 - any import failure means "absent" here
        return None


def run_checks() -> list[dict]:
    checks = [_check("python", sys.version_info >= (3, 10), platform.python_version(), "portrait3d needs Python 3.10+")]
    tv = _version("torch")
    checks.append(_check("torch", tv is not None, tv or "not importable", "pip install torch"))
    cuda, cuda_detail = False, "no CUDA device"
    if tv:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            cuda_detail = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    checks.append(_check("cuda", cuda, cuda_detail, "the diffusion back-end and fast fitting need an NVIDIA GPU", required=False))
    gv = _version("gsplat")
    checks.append(_check("gsplat", gv is not None, (gv or "absent") + ("" if cuda else " (CPU: our rasterizer is used)"),
                         "pip install gsplat==1.5.3", required=False))
    dv = _version("diffusers")
    checks.append(_check("diffusers", dv is not None, dv or "absent", "pip install diffusers"))
    mp = _version("mediapipe")
    checks.append(_check("face models", mp is not None, f"mediapipe {mp} (face mesh + selfie segmentation, offline)" if mp else "mediapipe absent",
                         "pip install mediapipe==0.10.21"))
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        checks.append(_check("ffmpeg", os.path.exists(exe), exe, "pip install imageio-ffmpeg"))
    except Exception as e:  # noqa: BLE001
        checks.append(_check("ffmpeg", False, str(e), "pip install imageio-ffmpeg"))
    try:
        from .weights import list_weights

        rows = list_weights()
        present = [r for r in rows if r.get("usable")]
        checks.append(_check("weights", bool(present), ", ".join(r["kind"] for r in present) or "none found (proxy back-end only)",
                             "portrait3d weights download", required=False))
    except ImportError as e:
        checks.append(_check("weights", False, f"weights module unavailable: {e}", "", required=False))
    ns = shutil.which("ns-train")
    checks.append(_check("nerfstudio", ns is not None, ns or "ns-train not on PATH",
                         "install nerfstudio in its own environment (pip install nerfstudio) and put ns-train on PATH",
                         required=False))
    node = shutil.which("node")
    checks.append(_check("node (glTF validator)", node is not None, node or "absent", "apt-get install nodejs npm", required=False))
    return checks
