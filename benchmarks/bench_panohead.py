"""PanoHead generator timings: condition-ring rendering (36 views at 512^2) and the
inversion (W+ steps + generator fine-tune steps), with peak memory.

    python benchmarks/bench_panohead.py                 # CUDA: full size, random weights
    python benchmarks/bench_panohead.py --tiny          # the fixture-shaped tiny model (CPU default)
    python benchmarks/bench_panohead.py --tiny --views 4 --w-steps 4 --ft-steps 1   # quick CPU run

Random weights: timings do not depend on the values. On CUDA the SR blocks run in fp16
like the official model (sr_num_fp16_res 4). Step counts below the defaults are
extrapolated linearly and the extrapolation is printed as such.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.panohead.generator import PanoHeadConfig, PanoHeadGenerator  # noqa: E402
from recon.panohead.invert import InversionConfig, invert  # noqa: E402
from recon.panohead.perceptual import PerceptualLoss  # noqa: E402
from recon.panohead.rings import frontal_label, render_condition_ring  # noqa: E402

TINY = dict(z_dim=32, channel_base=512, channel_max=16, neural_rendering_resolution=32,
            depth_resolution=12, depth_resolution_importance=12)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", default=None, help="tiny model (default on CPU)")
    ap.add_argument("--full", dest="tiny", action="store_false", help="full-size model (default on CUDA)")
    ap.add_argument("--views", type=int, default=36)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--w-steps", type=int, default=200)
    ap.add_argument("--ft-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    tiny = (dev.type == "cpu") if args.tiny is None else args.tiny
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PanoHeadConfig(**TINY) if tiny else PanoHeadConfig()
    G = PanoHeadGenerator(cfg).eval().requires_grad_(False).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res: dict = {"device": str(dev), "model": "tiny" if tiny else "full", "threads": torch.get_num_threads(),
                 "params": sum(p.numel() for p in G.parameters())}

    # Warm-up (allocator, cuDNN autotune) outside the timings.
    render_condition_ring(G, 1, 0.0, batch=1)
    _sync(dev)

    t = time.perf_counter()
    ring = render_condition_ring(G, args.views, 0.0, batch=args.batch)
    _sync(dev)
    res["ring_s"] = time.perf_counter() - t
    res["ring_views"] = args.views
    res["ring_s_per_view"] = res["ring_s"] / args.views
    res["ring_shape"] = list(ring.shape)
    if args.views != 36:
        res["ring36_s_extrapolated"] = res["ring_s_per_view"] * 36

    target = ring[0]
    label = frontal_label()
    perc = PerceptualLoss()  # full LPIPS-VGG widths, random weights
    icfg = InversionConfig(w_steps=args.w_steps, finetune_steps=args.ft_steps,
                           w_avg_samples=10000 if dev.type == "cuda" else 2000)
    marks = {}

    def prog(i, n, msg):
        marks.setdefault("first", time.perf_counter())  # end of W step 1 (after the w statistics)
        if i == args.w_steps:
            marks["w_done"] = time.perf_counter()
        if i == args.w_steps + args.ft_steps:
            marks["ft_done"] = time.perf_counter()

    t = time.perf_counter()
    out = invert(G, target, label, num_views=args.views, config=icfg, perceptual=perc, ring_batch=args.batch,
                 progress=prog)
    _sync(dev)
    total = time.perf_counter() - t
    w_s = marks["w_done"] - t  # includes the w statistics (w_avg_samples mappings) and step 1
    ft_s = marks["ft_done"] - marks["w_done"]
    per_w = (marks["w_done"] - marks["first"]) / (args.w_steps - 1) if args.w_steps > 1 else w_s
    res.update(invert_total_s=total, w_steps=args.w_steps, w_s=w_s, w_s_per_step=per_w,
               ft_steps=args.ft_steps, ft_s=ft_s, ft_s_per_step=ft_s / max(1, args.ft_steps),
               invert_ring_s=total - (marks["ft_done"] - t))
    if args.w_steps != 200 or args.ft_steps != 5:
        res["invert_200_5_s_extrapolated"] = ((marks["first"] - t) + per_w * 199 + res["ft_s_per_step"] * 5
                                              + res["invert_ring_s"] * 36 / args.views)
    res["final_w_loss"] = out.w_losses[-1] if out.w_losses else None
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        res["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
