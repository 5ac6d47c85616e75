"""Official DiffPortrait360 checkpoint (flat `.th` state dict) -> diffusers-format folder.

Layout written by `convert_checkpoint`:
    out/unet/, appearance/, controlnet/, vae/      config.json + diffusion_pytorch_model.safetensors
    out/text_encoder/                              config.json + model.safetensors
    out/text_context.safetensors                   {"context": float32 [1,77,C]} (empty prompt)
    out/portrait3d_weights.json                    provenance, dtype, model kind, config

Every official key is either mapped to exactly one target tensor or ignored with a stated
reason; every target tensor must be filled and shapes must agree, otherwise WeightsError.
Tensors are read from a memory-mapped checkpoint and written one at a time, so the
conversion of the 10.8 GB file never holds more than one tensor copy in RAM.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError, WeightsError
from ..rundir import file_digest
from .models import MODEL_KINDS, SUBMODELS, DP360Config, DP360Models
from .models.motion import sinusoid_table

CONVERTER_VERSION = "1"
FORMAT_NAME = "portrait3d-dp360-diffusers"
MANIFEST = "portrait3d_weights.json"
CONTEXT_FILE = "text_context.safetensors"

# DDPM schedule buffers of LatentDiffusion: recomputed by the scheduler (fp16 recipe).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
)
PREFIXES = (
    ("model.diffusion_model.", "unet"),
    ("control_model.", "appearance"),
    ("pose_control_model.", "controlnet"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.transformer.", "text_encoder"),
)
WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "appearance": "diffusion_pytorch_model.safetensors",
    "controlnet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

Progress = Callable[[int, int, str], None]


# ----------------------------------------------------------------------------- key mapping
def _resblock(tail: list[str]) -> str | None:
    for i in (1, 2):
        name = _RES.get(".".join(tail[:i]))
        if name is not None and len(tail) == i + 1:
            return f"{name}.{tail[i]}"
    return None


def _unet_family_key(rest: str, cfg: DP360Config, net: str) -> str | None:
    """LDM UNet-family key (prefix stripped) -> diffusers key; None if it has no place."""
    p = rest.split(".")
    nrb, levels = cfg.num_res_blocks, cfg.attention_levels
    n = len(levels)
    try:
        if p[0] == "time_embed" and len(p) == 3:
            return {"0": "time_embedding.linear_1", "2": "time_embedding.linear_2"}[p[1]] + "." + p[2]
        if p[0] == "input_blocks":
            i, k, tail = int(p[1]), int(p[2]), p[3:]
            if i == 0:
                return "conv_in." + ".".join(tail) if k == 0 else None
            b, j = divmod(i - 1, nrb + 1)
            if b >= n:
                return None
            if j < nrb:
                if k == 0:
                    r = _resblock(tail)
                    return f"down_blocks.{b}.resnets.{j}.{r}" if r else None
                if k == 1 and levels[b]:
                    return f"down_blocks.{b}.attentions.{j}." + ".".join(tail)
                return None
            if k == 0 and tail[0] == "op" and b < n - 1:
                return f"down_blocks.{b}.downsamplers.0.conv." + ".".join(tail[1:])
            return None
        if p[0] == "middle_block":
            k, tail = int(p[1]), p[2:]
            if k in (0, 2):
                r = _resblock(tail)
                return f"mid_block.resnets.{k // 2}.{r}" if r else None
            return "mid_block.attentions.0." + ".".join(tail) if k == 1 else None
        if net in ("unet", "appearance") and p[0] == "output_blocks":
            i, k, tail = int(p[1]), int(p[2]), p[3:]
            b, j = divmod(i, nrb + 1)
            level = n - 1 - b
            if level < 0:
                return None
            if k == 0:
                r = _resblock(tail)
                return f"up_blocks.{b}.resnets.{j}.{r}" if r else None
            upsampler = j == nrb and level > 0 and tail[0] == "conv"
            if k == 1 and levels[level]:
                return f"up_blocks.{b}.attentions.{j}." + ".".join(tail)
            if (k == 1 and not levels[level] and upsampler) or (k == 2 and levels[level] and upsampler):
                return f"up_blocks.{b}.upsamplers.0." + ".".join(tail)
            return None
        if net == "unet" and p[0] == "out" and len(p) == 3:
            return {"0": "conv_norm_out", "2": "conv_out"}[p[1]] + "." + p[2]
        if net == "unet" and p[0] in ("input_blocks_motion_module", "output_blocks_motion_module"):
            if p[2] != "0" or p[3] != "temporal_transformer":
                return None
            side = "down" if p[0].startswith("input") else "up"
            return f"{side}_motion_modules.{int(p[1])}." + ".".join(p[4:])
        if net == "controlnet":
            if p[0] == "input_hint_block" and len(p) == 3:
                idx = int(p[1])
                if idx % 2:
                    return None
                m, last = idx // 2, len(cfg.hint_channels) * 2 - 1
                name = "conv_in" if m == 0 else "conv_out" if m == last else f"blocks.{m - 1}" if m < last else None
                return f"controlnet_cond_embedding.{name}.{p[2]}" if name else None
            if p[0] == "zero_convs" and p[2] == "0" and len(p) == 4:
                return f"controlnet_down_blocks.{int(p[1])}.{p[3]}"
            if p[0] == "middle_block_out" and p[1] == "0" and len(p) == 3:
                return f"controlnet_mid_block.{p[2]}"
    except (KeyError, ValueError, IndexError):
        return None
    return None


def _vae_key(rest: str, cfg: DP360Config) -> tuple[str, bool] | None:
    """LDM VAE key -> (diffusers key, squeeze 1x1 conv to linear)."""
    p = rest.split(".")
    n = len(cfg.vae_ch_mult)
    try:
        if p[0] in ("quant_conv", "post_quant_conv") and len(p) == 2:
            return rest, False
        side = p[0]
        if side not in ("encoder", "decoder"):
            return None
        q = p[1:]
        if q[0] in ("conv_in", "conv_out") and len(q) == 2:
            return rest, False
        if q[0] == "norm_out" and len(q) == 2:
            return f"{side}.conv_norm_out.{q[1]}", False
        if q[0] == "mid":
            if q[1] in ("block_1", "block_2") and len(q) == 4:
                sub = "conv_shortcut" if q[2] == "nin_shortcut" else q[2]
                return f"{side}.mid_block.resnets.{int(q[1][-1]) - 1}.{sub}.{q[3]}", False
            if q[1] == "attn_1" and len(q) == 4 and q[2] in _VAE_ATTN:
                return f"{side}.mid_block.attentions.0.{_VAE_ATTN[q[2]]}.{q[3]}", q[2] != "norm" and q[3] == "weight"
            return None
        if q[0] in ("down", "up"):
            i = int(q[1])
            if (q[0] == "down") != (side == "encoder") or i >= n:
                return None
            b = i if side == "encoder" else n - 1 - i
            blocks = "down_blocks" if side == "encoder" else "up_blocks"
            if q[2] == "block" and len(q) == 6:
                sub = "conv_shortcut" if q[4] == "nin_shortcut" else q[4]
                return f"{side}.{blocks}.{b}.resnets.{int(q[3])}.{sub}.{q[5]}", False
            if q[2] in ("downsample", "upsample") and q[3] == "conv" and len(q) == 5:
                kind = "downsamplers" if q[2] == "downsample" else "upsamplers"
                return f"{side}.{blocks}.{b}.{kind}.0.conv.{q[4]}", False
    except (ValueError, IndexError):
        return None
    return None


@dataclass
class ConversionPlan:
    """items[net] = [(target_key, official_key, squeeze_1x1)] in target state_dict order."""

    cfg: DP360Config
    items: dict[str, list[tuple[str, str, bool]]]
    ignored: dict[str, str]  # official key -> reason
    target_shapes: dict[str, dict[str, tuple[int, ...]]] = field(repr=False, default_factory=dict)

    def ignored_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.ignored.values():
            out[r] = out.get(r, 0) + 1
        return out


_TARGETS: dict[str, dict] = {}


def target_state_shapes(cfg: DP360Config) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of every target tensor, from networks built on the meta device (no memory)."""
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _TARGETS:
        _TARGETS[key] = {name: {k: tuple(v.shape) for k, v in cfg.build(name, "meta").state_dict().items()}
                         for name in SUBMODELS}
    return _TARGETS[key]


def _shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _fail(problem: str, keys: list[str], hint: str | None = None) -> None:
    shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    raise WeightsError(f"{problem}: {shown}", hint=hint)


def plan_conversion(official: Mapping[str, object], cfg: DP360Config, targets=None) -> ConversionPlan:
    """Map every official key. `official` maps key -> tensor (any device, meta included) or
    shape. Raises WeightsError on any unmapped, missing or mis-shaped key."""
    targets = targets or target_state_shapes(cfg)
    text_prefix = "text_model." if any(k.startswith("text_model.") for k in targets["text_encoder"]) else ""
    items: dict[str, dict[str, tuple[str, bool]]] = {n: {} for n in SUBMODELS}
    ignored: dict[str, str] = {}
    unexpected: list[str] = []
    bad_shape: list[str] = []
    has_motion = any("_motion_module." in k for k in official)
    if has_motion != cfg.has_motion:
        what = "has" if has_motion else "has no"
        raise WeightsError(
            f"the checkpoint {what} view-consistency (motion) modules, so it is not the {cfg.kind} model",
            hint="the 360 model is model_state-*.th (--model dp360); the back-view model is back_head-*.th (--model backhead)",
        )
    for key, value in official.items():
        if key in SCHEDULE_BUFFERS:
            if _shape(value) != (1000,):
                bad_shape.append(f"{key} {list(_shape(value))} != [1000]")
            ignored[key] = "DDPM schedule buffer (recomputed by the scheduler)"
            continue
        net = rest = None
        for prefix, name in PREFIXES:
            if key.startswith(prefix):
                net, rest = name, key[len(prefix):]
                break
        if net is None:
            unexpected.append(key)
            continue
        squeeze = False
        if net == "text_encoder":
            if rest == "text_model.embeddings.position_ids" and rest.replace("text_model.", text_prefix, 1) not in targets[net]:
                ignored[key] = "CLIP position_ids buffer (constant arange, not persistent in newer transformers)"
                continue
            tk = text_prefix + rest[len("text_model."):] if rest.startswith("text_model.") else None
        elif net == "vae":
            r = _vae_key(rest, cfg)
            tk, squeeze = r if r else (None, False)
        else:
            if net == "unet" and rest.endswith(".pos_encoder.pe") and "_motion_module." in rest:
                _check_pe(key, value, cfg)
                ignored[key] = "motion-module sinusoidal PE buffer (recomputed; checked equal)"
                continue
            tk = _unet_family_key(rest, cfg, net)
        if tk is None or tk not in targets[net]:
            unexpected.append(key)
            continue
        if tk in items[net]:
            unexpected.append(f"{key} (duplicate target {net}.{tk})")
            continue
        want = targets[net][tk]
        have = _shape(value)
        if squeeze:
            have = have[:2] if len(have) == 4 and have[2:] == (1, 1) else have
        if have != want:
            bad_shape.append(f"{key} {list(_shape(value))} vs {net}.{tk} {list(want)}")
        items[net][tk] = (key, squeeze)
    if unexpected:
        _fail(f"checkpoint has {len(unexpected)} unexpected key(s) for the {cfg.kind} model", unexpected,
              hint="is this the right checkpoint and model kind (dp360 / backhead) and the right config?")
    if bad_shape:
        _fail(f"checkpoint has {len(bad_shape)} tensor(s) of the wrong shape", bad_shape,
              hint="the checkpoint does not match the expected model size")
    missing = [f"{n}.{k}" for n in SUBMODELS for k in targets[n] if k not in items[n]]
    if missing:
        _fail(f"checkpoint is missing {len(missing)} tensor(s)", missing,
              hint="the file is incomplete or from a different model")
    ordered = {n: [(tk, *items[n][tk]) for tk in targets[n]] for n in SUBMODELS}
    return ConversionPlan(cfg, ordered, ignored, targets)


def _check_pe(key: str, value, cfg: DP360Config) -> None:
    if not isinstance(value, torch.Tensor) or value.is_meta:
        return
    c = value.shape[-1]
    ref = sinusoid_table(value.shape[1], c)
    if value.shape[1] != cfg.motion_max_len or not torch.allclose(value.float(), ref, atol=1e-6, rtol=0):
        raise WeightsError(f"{key} is not the sinusoidal position table of length {cfg.motion_max_len} this model recomputes")


# ------------------------------------------------------------------------- reading the .th
def load_official_state_dict(src: str | Path) -> dict[str, torch.Tensor]:
    """Load a flat official state dict safely (weights_only, memory-mapped)."""
    src = Path(src)
    if not src.is_file():
        raise WeightsError(f"checkpoint {src} does not exist", hint="pass the path of the official .th file")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), first)
        raise WeightsError(f"refusing to load {src.name}: it is not a plain tensor checkpoint ({detail})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, AttributeError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"cannot read {src.name} as a torch checkpoint (truncated or not a checkpoint?): {first}",
                           hint="re-download the file and check its size") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # Lightning .ckpt wrapper; the released .th files are flat
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{src.name} holds a {type(obj).__name__}, not a state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        _fail(f"{src.name} is not a flat state dict of tensors; non-tensor entries", bad)
    return dict(obj)


# ------------------------------------------------------------------------- building models
def _convert_tensor(t: torch.Tensor, squeeze: bool, dtype: torch.dtype | None, device=None) -> torch.Tensor:
    if squeeze and t.ndim == 4:
        t = t[:, :, 0, 0]
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    return t


def _fill_nonpersistent(model: torch.nn.Module, device) -> None:
    """Networks built on meta and loaded with assign=True still have meta non-persistent
    buffers (motion PE, CLIP position_ids): recompute them on the real device."""
    device = torch.device(device)
    if device.type == "meta":
        return
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if hasattr(mod, "_init_nonpersistent_buffers"):
                mod._init_nonpersistent_buffers(device)
            elif name == "position_ids":
                mod._buffers[name] = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
            else:
                raise RuntimeError(f"no way to initialise buffer {name} of {type(mod).__name__}")


def _load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], device) -> torch.nn.Module:
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(f"weights do not fit {type(model).__name__}: {str(e).splitlines()[0]}") from None
    _fill_nonpersistent(model, device)
    return model.eval().requires_grad_(False)


def build_from_official_state_dict(
    sd: Mapping[str, torch.Tensor],
    config: DP360Config,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DP360Models:
    """Official flat state dict -> DP360Models in memory (tests, no files written)."""
    plan = plan_conversion(sd, config)
    nets = {}
    for name in SUBMODELS:
        model = config.build(name, "meta")
        tensors = {tk: _convert_tensor(sd[ok], sq, dtype, device) for tk, ok, sq in plan.items[name]}
        nets[name] = _load_into(model, tensors, device)
    return DP360Models(config=config, **nets)


# ---------------------------------------------------------------------- safetensors writer
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def _write_safetensors_streaming(path: Path, specs: list[tuple[str, tuple, torch.dtype]], get, metadata: dict,
                                 tick: Callable[[str], None] | None = None) -> None:
    """safetensors file written tensor by tensor: header from shapes, then `get(name)` each."""
    header: dict = {"__metadata__": metadata}
    off = 0
    for name, shape, dt in specs:
        n = dt.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, dt in specs:
            t = get(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dt:
                raise RuntimeError(f"{name}: got {tuple(t.shape)} {t.dtype}, header says {shape} {dt}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            if tick:
                tick(name)




_DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _write_networks(tmp: Path, sd, plan: ConversionPlan, tdtype: torch.dtype, tick) -> dict:
    """Write the five networks and the text context into `tmp`; returns per-network counts."""
    cfg = plan.cfg
    counts = {}
    for name in SUBMODELS:
        meta_model = cfg.build(name, "meta")
        d = tmp / name
        d.mkdir()
        if name == "text_encoder":
            (d / "config.json").write_text(meta_model.config.to_json_string())
        else:
            meta_model.save_config(d)
        ref = dict(meta_model.state_dict())
        specs = []
        lookup = {}
        for tk, ok, sq in plan.items[name]:
            dt = tdtype if ref[tk].is_floating_point() else ref[tk].dtype
            specs.append((tk, plan.target_shapes[name][tk], dt))
            lookup[tk] = (ok, sq, dt)

        def get(tk, _lookup=lookup):
            ok, sq, dt = _lookup[tk]
            return _convert_tensor(sd[ok], sq, dt)

        _write_safetensors_streaming(d / WEIGHT_FILES[name], specs, get, {"format": "pt"},
                                     tick=lambda k, _n=name: tick(f"{_n}.{k}"))
        counts[name] = {"tensors": len(specs),
                        "parameters": int(sum(p.numel() for p in meta_model.parameters()))}
        del meta_model, ref

    # Empty-prompt context from the fp32 source weights, before any down-cast.
    text = cfg.build("text_encoder", "meta")
    text = _load_into(text, {tk: _convert_tensor(sd[ok], sq, torch.float32) for tk, ok, sq in plan.items["text_encoder"]}, "cpu")
    from .text import encode_empty_prompt

    context = encode_empty_prompt(text).cpu().contiguous()
    _write_safetensors_streaming(tmp / CONTEXT_FILE, [("context", tuple(context.shape), torch.float32)],
                                 lambda _k: context, {"format": "pt", "prompt": ""})
    del text
    tick("text context")
    return counts


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    model: str,
    dtype: str = "fp16",
    progress: Progress | None = None,
    config: DP360Config | None = None,
    sha256: bool = False,
    overwrite: bool = False,
) -> dict:
    """Convert an official checkpoint into a diffusers-format folder; returns the manifest.

    `model`: "dp360" (model_state-340000.th) or "backhead" (back_head-230000.th).
    `config`: hyper-parameters (default: the released SD1.5-size model of that kind).
    """
    if model not in MODEL_KINDS:
        raise UsageError(f"unknown model kind {model!r}", hint="use dp360 or backhead")
    if dtype not in _DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}", hint="use fp16, bf16 or fp32")
    cfg = config or DP360Config.full(model)
    if cfg.kind != model:
        raise UsageError(f"config is for the {cfg.kind} model but --model is {model}")
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"output folder {out} is not empty", hint="choose a new folder or pass overwrite")
        if not (out / MANIFEST).is_file():
            raise UsageError(f"refusing to overwrite {out}: it is not a converted weights folder")
    t0 = time.time()
    sd = load_official_state_dict(src)
    plan = plan_conversion(sd, cfg)
    tdtype = _DTYPE_NAMES[dtype]
    total = sum(len(v) for v in plan.items.values()) + 1
    step = [0]

    def tick(msg: str) -> None:
        step[0] += 1
        if progress:
            progress(step[0], total, msg)

    tmp = out.parent / (out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        counts = _write_networks(tmp, sd, plan, tdtype, tick)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise WeightsError(f"cannot write the converted weights to {tmp}: {e}",
                               hint="check free disk space (about half the checkpoint size for fp16)") from None
        raise

    manifest = {
        "format": FORMAT_NAME,
        "converter_version": CONVERTER_VERSION,
        "model": model,
        "dtype": dtype,
        "source_file": src.name,
        "source_bytes": src.stat().st_size,
        "source_sha256": file_digest(src) if sha256 else None,
        "official_keys": len(sd),
        "ignored_keys": plan.ignored_by_reason(),
        "networks": counts,
        "config": cfg.to_dict(),
        "seconds": round(time.time() - t0, 2),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest


# ------------------------------------------------------------------------------- loading
def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{folder} is not a converted DiffPortrait360 folder ({MANIFEST} missing)",
                           hint="convert the official checkpoint with `portrait3d weights convert`") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if m.get("format") != FORMAT_NAME or m.get("converter_version") != CONVERTER_VERSION:
        raise WeightsError(f"{path} is format {m.get('format')!r} v{m.get('converter_version')!r}, "
                           f"expected {FORMAT_NAME!r} v{CONVERTER_VERSION}", hint="convert the checkpoint again")
    return m


def _load_net(folder: Path, name: str, dtype: torch.dtype, device) -> torch.nn.Module:
    from diffusers import AutoencoderKL, ControlNetModel
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models import DP360UNet

    d = folder / name
    wpath = d / WEIGHT_FILES[name]
    if not (d / "config.json").is_file() or not wpath.is_file():
        raise WeightsError(f"{d} is incomplete (config.json or {wpath.name} missing)", hint="convert the checkpoint again")
    with torch.device("meta"):
        if name == "text_encoder":
            model = CLIPTextModel(CLIPTextConfig.from_json_file(d / "config.json"))
        else:
            cls = {"unet": DP360UNet, "appearance": DP360UNet, "controlnet": ControlNetModel, "vae": AutoencoderKL}[name]
            model = cls.from_config(cls.load_config(d))
    dev = torch.device(device)
    try:
        where = f"cuda:{dev.index or 0}" if dev.type == "cuda" else str(dev)
        tensors = load_file(wpath, device=where)
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"cannot read {wpath}: {e}", hint="convert the checkpoint again") from None
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return _load_into(model, tensors, dev)


def load_models(
    folder: str | Path,
    dtype: torch.dtype | str = torch.float16,
    device: str | torch.device = "cpu",
    *,
    text_encoder: bool = False,
) -> DP360Models:
    """Load a converted folder. The text encoder is only loaded when asked for (the cached
    empty-prompt context is all the sampler needs)."""
    folder = Path(folder)
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise UsageError(f"unknown dtype {dtype!r}", hint="use fp16, bf16 or fp32")
        dtype = _DTYPE_NAMES[dtype]
    manifest = read_manifest(folder)
    cfg = DP360Config.from_dict(manifest["config"])
    nets = {n: _load_net(folder, n, dtype, device) for n in ("unet", "appearance", "controlnet", "vae")}
    if text_encoder:
        nets["text_encoder"] = _load_net(folder, "text_encoder", dtype, device)
    from safetensors.torch import load_file

    try:
        context = load_file(folder / CONTEXT_FILE, device="cpu")["context"].float().to(device)
    except Exception as e:  # noqa: BLE001 - any failure here means a broken folder
        raise WeightsError(f"cannot read {folder / CONTEXT_FILE}: {e}", hint="convert the checkpoint again") from None
    return DP360Models(config=cfg, text_context=context, **nets)
