"""Convert an official PanoHead network-snapshot .pkl into a safe, code-free folder:

    out/generator.safetensors   G_ema's state dict (official key names)
    out/config.json             PanoHeadConfig + provenance (source sha256, weights sha256)

The .pkl is read only through the restricted loader (safe_pickle); nothing in it runs.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import OutputError, WeightsError
from .generator import PanoHeadConfig, PanoHeadGenerator

WEIGHTS_NAME = "generator.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "portrait3d-panohead-v1"

Progress = Callable[[int, int, str], None]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def convert_checkpoint(src: Path, out: Path, progress: Progress | None = None) -> dict:
    """Official PanoHead .pkl (G_ema) -> out/generator.safetensors + out/config.json.
    Returns the config.json content."""
    from safetensors.torch import save_file

    from .safe_pickle import load_network_snapshot

    src, out = Path(src), Path(out)
    step = (lambda i, msg: progress(i, 4, msg)) if progress else (lambda i, msg: None)
    step(0, f"hashing {src.name}")
    if not src.is_file():
        raise WeightsError(f"no PanoHead checkpoint at {src}", hint="pass the network-snapshot .pkl")
    src_sha = sha256_file(src)
    step(1, "reading G_ema with the restricted unpickler")
    snap = load_network_snapshot(src, key="G_ema")
    if snap.class_name != "TriPlaneGenerator":
        raise WeightsError(f"{src}: G_ema is a {snap.class_name}, not PanoHead's TriPlaneGenerator")
    config = PanoHeadConfig.from_init_kwargs(snap.init_kwargs, snap.runtime)
    step(2, "checking the weights against the generator")
    with torch.device("meta"):
        G = PanoHeadGenerator(config)
    expected = {k: tuple(v.shape) for k, v in G.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in snap.state_dict.items()}
    if expected != got:
        miss = sorted(set(expected) - set(got))[:5]
        extra = sorted(set(got) - set(expected))[:5]
        bad = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:5]
        raise WeightsError(f"{src}: weights do not fit PanoHead (missing {miss}, unexpected {extra}, wrong shape {bad})")
    step(3, f"writing {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e}") from None
    tmp = out / (WEIGHTS_NAME + ".partial")
    save_file({k: v.contiguous() for k, v in snap.state_dict.items()}, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, out / WEIGHTS_NAME)
    info = {
        "format": FORMAT,
        "class_name": snap.class_name,
        "config": config.to_dict(),
        "source": {"name": src.name, "sha256": src_sha, "bytes": src.stat().st_size},
        "weights_sha256": sha256_file(out / WEIGHTS_NAME),
        "num_params": int(sum(v.numel() for k, v in snap.state_dict.items())),
        "official_init_kwargs": snap.init_kwargs,
    }
    tmpc = out / (CONFIG_NAME + ".partial")
    tmpc.write_text(json.dumps(info, indent=1))
    os.replace(tmpc, out / CONFIG_NAME)
    step(4, "done")
    return info


def load_generator(folder: Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> PanoHeadGenerator:
    """A converted folder -> PanoHeadGenerator in eval mode with frozen weights.
    `G.weights_id` is the weights' sha256 (for cache keys)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_p, w_p = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_p.is_file() or not w_p.is_file():
        raise WeightsError(f"{folder} is not a converted PanoHead folder ({CONFIG_NAME} + {WEIGHTS_NAME})",
                           hint="run `portrait3d weights convert panohead` on the official .pkl first")
    try:
        info = json.loads(cfg_p.read_text())
        config = PanoHeadConfig.from_dict(info["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{cfg_p} is not a PanoHead config ({e.__class__.__name__}: {e})") from None
    if info.get("format") != FORMAT:
        raise WeightsError(f"{cfg_p} has format {info.get('format')!r}, expected {FORMAT!r}")
    try:
        sd = load_file(str(w_p))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"cannot read {w_p}: {e}", hint="the file is truncated or corrupt; convert again") from None
    G = PanoHeadGenerator(config)
    G.load_official_state_dict(sd)
    G.weights_id = info.get("weights_sha256") or ""
    return G.eval().requires_grad_(False).to(device=device, dtype=dtype)


def weights_id(G: PanoHeadGenerator) -> str:
    """A stable identity of G's weights: the converted file's sha256 when known, else a
    hash of the tensors themselves (covers in-memory / fine-tuned generators)."""
    wid = getattr(G, "weights_id", "")
    if wid:
        return wid
    h = hashlib.sha256(json.dumps(G.config.to_dict(), sort_keys=True).encode())
    for k, v in G.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
