"""Batch throughput: heads per hour with 1 and with N Ray workers, and the scaling efficiency.

    # this machine: a local Ray cluster of 1, then 2 CPUs (proxy back-end, tiny preset)
    python benchmarks/bench_batch.py --images 6 --workers 1,2

    # a multi-GPU Ray cluster, unchanged: run on the head node (or anywhere that
    # reaches it) with the images and OUT on the shared filesystem
    python benchmarks/bench_batch.py --address auto --images 32 --preset default \
        --backend auto --device auto --out /shared/bench

    # the local process pool instead of Ray
    python benchmarks/bench_batch.py --local --workers 1,2

With `--address` the script joins the existing cluster and runs the whole batch on
it once per --workers value, limiting parallelism by giving each image (CPU layout)
or each GPU stage actor (GPU layout) a share of the cluster so that at most W run at
a time: throughput(W) / (W * throughput(1)) is the scaling efficiency. Without
`--address` it starts a local Ray cluster with W CPUs for each W. Every run uses a
fresh output folder (no skipping), Ray workers are warmed up (the engine imported)
before the clock starts; `--json` prints one JSON document. Numbers from a machine
shared with other jobs are only as good as the idle cores (see `uptime`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def sample_images(folder: Path, n: int) -> list[Path]:
    """n portraits: the two real portraits that ship in wheels, cropped/flipped variants."""
    import matplotlib.cbook
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    bases = [data.astronaut(), hopper]
    out = []
    for i in range(n):
        img = bases[i % 2]
        k = i // 2
        if k % 2:
            img = img[:, ::-1]
        m = 8 * (k // 2)
        img = img[m:img.shape[0] - m, m:img.shape[1] - m] if m else img
        p = folder / f"head{i:03d}.png"
        Image.fromarray(np.ascontiguousarray(img)).save(p)
        out.append(p)
    return out


def run_once(args, src: Path, out: Path, workers: int) -> dict:
    import recon
    from recon.api import make_config

    cfg = make_config(args.preset, backend=args.backend, device=args.device, export=args.export.split(","))
    shutil.rmtree(out, ignore_errors=True)
    if args.local:
        t0 = time.time()
        res = recon.batch(src, out, config=cfg, workers=workers, pipeline=False, worker_init=args.init_fn)
        return _summary(res, time.time() - t0, workers)
    import ray

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
        cluster = ray.cluster_resources()
        gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 1))
        # At most W images (CPU layout) or W GPU stage actors (GPU layout) at a time:
        # each takes 1/W of the cluster (Ray needs whole numbers above 1).
        if gpus and args.device != "cpu":
            if gpus % workers:
                raise SystemExit(f"--workers {workers} must divide the cluster's {gpus} GPUs")
            share = {"gpu": {"num_cpus": 1, "num_gpus": gpus // workers, "memory": 8 * 1024 ** 3}}
        else:
            if cpus % workers:
                raise SystemExit(f"--workers {workers} must divide the cluster's {cpus} CPUs")
            share = {"image": {"num_cpus": cpus // workers, "memory": 2 * 1024 ** 3}}
        kw = {"ray": "local", "ray_resources": share}
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        kw = {"ray": "local"}
    try:
        _warm_up(ray, workers, (kw.get("ray_resources") or {}).get("image", {}).get("num_cpus", 1))
        t0 = time.time()
        res = recon.batch(src, out, config=cfg, worker_init=args.init_fn, **kw)
        return _summary(res, time.time() - t0, workers)
    finally:
        ray.shutdown()


def _import_engine(hold: float) -> int:
    import os

    import recon.api  # noqa: F401 - torch, numpy, the stages' modules

    time.sleep(hold)  # hold the CPU so that the next warm-up task lands in another worker
    return os.getpid()


def _warm_up(ray, workers: int, num_cpus: float) -> None:
    """Import the engine in W Ray workers before the clock starts: start-up is a fixed
    cost per worker (seconds), not throughput. (GPU layout: actors start inside the run.)"""
    fn = ray.remote(_import_engine).options(num_cpus=num_cpus)
    ray.get([fn.remote(2.0) for _ in range(workers)])


def _summary(res, seconds: float, workers: int) -> dict:
    done = res.succeeded
    return {"workers": workers, "images": len(res.items), "succeeded": done, "failed": res.failed,
            "seconds": round(seconds, 2), "heads_per_hour": round(3600 * done / seconds, 2) if done else 0.0,
            "errors": sorted({i["error"]["message"] for i in res.items if i["status"] == "failed"})[:3]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6, help="images per batch")
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts (Ray CPUs, GPU actors, or processes)")
    ap.add_argument("--address", default=None, help="join this Ray cluster (auto, HOST:PORT, ray://HOST:10001)")
    ap.add_argument("--local", action="store_true", help="the local process pool (--workers) instead of Ray")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--backend", default="proxy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--export", default="glb")
    ap.add_argument("--out", default=None, help="work folder (must be shared by all nodes on a cluster)")
    ap.add_argument("--worker-init", default=None, metavar="MODULE:FUNCTION",
                    help="called once in every worker process before its first image (logging, plugins)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    args.init_fn = None
    if args.worker_init:
        import importlib

        mod, _, fn = args.worker_init.partition(":")
        args.init_fn = getattr(importlib.import_module(mod), fn)
        args.init_fn()  # and in this process, for the local schedulers
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="p3d-bench-batch-"))
    src = work / "images"
    sample_images(src, args.images)
    rows = [run_once(args, src, work / f"out_w{w}", w) for w in counts]
    base = rows[0]["heads_per_hour"] / counts[0] if rows[0]["heads_per_hour"] else 0.0
    for r in rows:
        r["scaling_efficiency"] = round(r["heads_per_hour"] / (r["workers"] * base), 3) if base else None
    doc = {"preset": args.preset, "backend": args.backend, "device": args.device,
           "scheduler": "processes" if args.local else "ray", "cluster": args.address or "local", "runs": rows}
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"{'workers':>7} {'images':>6} {'ok':>4} {'seconds':>8} {'heads/h':>8} {'efficiency':>10}")
        for r in rows:
            eff = "-" if r["scaling_efficiency"] is None else f"{r['scaling_efficiency']:.2f}"
            print(f"{r['workers']:>7} {r['images']:>6} {r['succeeded']:>4} {r['seconds']:>8.1f} "
                  f"{r['heads_per_hour']:>8.1f} {eff:>10}")
            for e in r["errors"]:
                print(f"        failed: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
