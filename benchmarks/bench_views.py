"""Views-stage cost: our DiffPortrait360 pipeline vs an official-equivalent configuration.

    python benchmarks/bench_views.py                     # CPU: tiny models (the default there)
    python benchmarks/bench_views.py --full --views 32   # CUDA: SD1.5-size models, random weights, 512^2, 50 steps
    python benchmarks/bench_views.py --json out.json

Both runs sample N views from the same inputs (random weights: only the cost is measured).
- ours: circular overlapping windows (stride 4) over all N views, windows batched up to
  --frame-batch frames, the appearance net once per step on one copy, no ControlNet in the
  unconditional pass, weights in --dtype (fp16 on CUDA).
- official-equivalent: what the released inference does: N/8 independent 8-frame windows
  run one after another, per window and step the appearance net on 8 copies of the
  reference and 8 of the back view, the ControlNet also run in the unconditional pass and
  discarded, fp32 weights under fp16 autocast (CUDA; plain fp32 on CPU).
Both include the VAE encodes (portrait, back view, N noise renders) and the N decodes.
A third row runs our pipeline on the official window layout, to separate the waste removed
from the extra cost of overlapping windows. Reports seconds per view, peak GPU memory
(CUDA) or process peak RSS (CPU, monotonic over the run), and ratios.
Note: the circular plan does ~2x the window evaluations of the official one (every view
is in two windows), so "ours faster" comes from the removed waste, batching and dtype.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.diffusion.denoiser import Denoiser  # noqa: E402
from recon.diffusion.models import DP360Config  # noqa: E402
from recon.diffusion.models.bank import FeatureBank  # noqa: E402
from recon.diffusion.pipeline_360 import Portrait360Pipeline  # noqa: E402
from recon.diffusion.pipeline_backview import PromptContext  # noqa: E402
from recon.diffusion.scheduling import OfficialDDIMSchedule, make_scheduler, q_sample  # noqa: E402

TINY_CLIP = {"vocab_size": 49408, "hidden_size": 8, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}


def tiny_config() -> DP360Config:
    """The fixtures' tiny360 hyper-parameters (README §3.1), built in code."""
    return replace(DP360Config.full("dp360"), image_size=16, model_channels=32, channel_mult=(1, 1, 1, 1),
                   context_dim=8, vae_ch=32, vae_ch_mult=(1, 1, 1, 1), vae_num_res_blocks=1, vae_resolution=128,
                   clip=dict(TINY_CLIP))


def build(cfg: DP360Config, device, dtype) -> dict:
    torch.manual_seed(0)
    nets = {n: cfg.build(n, device=device, dtype=dtype) for n in ("unet", "appearance", "controlnet", "vae")}
    ctx = PromptContext.from_tensor(torch.randn(1, 77, cfg.context_dim)).to(device)
    return dict(**nets, text_context=ctx)


def inputs(n: int, side: int, device):
    g = torch.Generator().manual_seed(1)
    img = lambda k: (torch.rand(k, 3, side, side, generator=g) * 2 - 1).to(device)  # noqa: E731
    return img(1), img(1), img(n), img(n)  # portrait, back view, camera images, noise renders


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process lifetime peak)


@torch.no_grad()
def run_ours(nets, n, steps, side, device, dtype, frame_batch, stride, mode="circular") -> float:
    pipe = Portrait360Pipeline(scheduler=make_scheduler(), **nets)
    pipe.set_progress_bar_config(disable=True)
    portrait, back, cams, renders = inputs(n, side, device)
    sync(device)
    t0 = time.perf_counter()
    pipe(portrait, back, cams, renders, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
         window_mode=mode, window_stride=stride, max_frames_per_batch=frame_batch, output_type="pt")
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def run_official_equivalent(nets, n, steps, side, device, autocast: bool) -> float:
    """The released sampler's cost structure, with our modules (same maths per window)."""
    den = Denoiser(nets["unet"], nets["appearance"], nets["controlnet"])
    vae = nets["vae"]
    ctx = nets["text_context"]().to(device)
    scale = 0.18215
    portrait, back, cams, renders = inputs(n, side, device)
    g = torch.Generator().manual_seed(0)
    amp = torch.autocast("cuda", dtype=torch.float16) if (autocast and device.type == "cuda") else _null()
    sync(device)
    t0 = time.perf_counter()
    with amp:
        enc = lambda x: scale * vae.encode(x).latent_dist.sample(g)  # noqa: E731 - a sample, as official
        ref, bk = enc(portrait), enc(back)
        fea = torch.cat([enc(renders[i:i + 8]) for i in range(0, n, 8)])
        x_T = q_sample(fea.float(), torch.randn(fea.shape, generator=g).to(device))
        sched = OfficialDDIMSchedule(steps, eta=0.5)
        outs = []
        for w in range(0, n, 8):                      # independent windows, one after another
            sl = slice(w, w + 8)
            f = cams[sl].shape[0]
            x = x_T[sl]
            for i, t in enumerate(sched.timesteps.tolist()):
                # appearance net on f copies of the reference and f of the back view (official)
                rb = den.appearance.write_bank(ref.expand(f, -1, -1, -1), torch.full((f,), t, device=device),
                                               ctx.expand(f, -1, -1))
                bb = den.appearance.write_bank(bk.expand(f, -1, -1, -1), torch.full((f,), t, device=device),
                                               ctx.expand(f, -1, -1))
                bank = FeatureBank([torch.cat([r[:1], b[:1]]) for r, b in zip(rb.entries, bb.entries)])
                e_c = den.eps(x, t, ctx, bank=bank, cam_images=cams[sl])
                den.controlnet_residuals(x, t, ctx, cams[sl])        # computed, then discarded (official)
                e_u = den.eps(x, t, ctx)
                e = e_u + 3.0 * (e_c - e_u)
                x, _ = sched.step(i, e, x, torch.randn(x.shape, generator=g).to(device))
            outs.append(vae.decode(x / scale).sample)
    sync(device)
    return time.perf_counter() - t0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="SD1.5-size models (default on CUDA)")
    ap.add_argument("--tiny", action="store_true", help="tiny models (default on CPU)")
    ap.add_argument("--views", type=int, default=None, help="N views (default 32 full, 16 tiny)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50 full, 4 tiny)")
    ap.add_argument("--resolution", type=int, default=None, help="image side (default 512 full, 128 tiny)")
    ap.add_argument("--dtype", default=None, help="our weights: fp16 | bf16 | fp32 (default fp16 CUDA, fp32 CPU)")
    ap.add_argument("--frame-batch", type=int, default=32)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--skip-official", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    full = a.full or (device.type == "cuda" and not a.tiny)
    cfg = DP360Config.full("dp360") if full else tiny_config()
    n = a.views or (32 if full else 16)
    steps = a.steps or (50 if full else 4)
    side = a.resolution or (512 if full else 128)
    dname = a.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dname]
    if n % 8:
        ap.error("--views must be a multiple of 8 (the official layout has N/8 windows)")
    rows = []

    reset_peak(device)
    nets = build(cfg, device, dtype)
    ours = run_ours(nets, n, steps, side, device, dtype, a.frame_batch, a.stride)
    rows.append({"config": f"ours (circular s{a.stride}, {dname}, batch {a.frame_batch})", "seconds": ours,
                 "s_per_view": ours / n, "peak_gib": peak_memory(device)})
    reset_peak(device)
    ind = run_ours(nets, n, steps, side, device, dtype, a.frame_batch, a.stride, mode="independent")
    rows.append({"config": f"ours, independent windows (official layout, {dname}, batch {a.frame_batch})",
                 "seconds": ind, "s_per_view": ind / n, "peak_gib": peak_memory(device)})
    del nets
    if not a.skip_official:
        reset_peak(device)
        nets = build(cfg, device, torch.float32)
        off = run_official_equivalent(nets, n, steps, side, device, autocast=True)
        rows.append({"config": "official-equivalent (independent, 8-copy appearance, uncond ControlNet, "
                               + ("fp32 + fp16 autocast)" if device.type == "cuda" else "fp32)"),
                     "seconds": off, "s_per_view": off / n, "peak_gib": peak_memory(device)})
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "models": "full (SD1.5 size, random weights)" if full else "tiny (fixture tiny360 size)",
        "views": n, "steps": steps, "resolution": side, "rows": rows,
        "memory": "peak GPU memory allocated" if device.type == "cuda" else "process peak RSS (monotonic: 2nd row >= 1st)",
    }
    if len(rows) == 3:
        result["speedup"] = rows[2]["seconds"] / rows[0]["seconds"]
        result["memory_ratio"] = rows[2]["peak_gib"] / rows[0]["peak_gib"]
        result["speedup_same_windows"] = rows[2]["seconds"] / rows[1]["seconds"]
    print(f"device: {result['device']}; models: {result['models']}; N={n} views, {steps} steps, {side}^2")
    print(f"| config | s total | s / view | peak GiB ({'GPU' if device.type == 'cuda' else 'RSS'}) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['seconds']:.2f} | {r['s_per_view']:.3f} | {r['peak_gib']:.2f} |")
    if "speedup" in result:
        print(f"official / ours (circular): time x{result['speedup']:.2f}, memory x{result['memory_ratio']:.2f}; "
              f"official / ours (same independent windows): time x{result['speedup_same_windows']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
