"""Forward+backward time of the CPU tile rasterizer on head-like scenes.

    python benchmarks/bench_rasterize.py [--n 5000 20000] [--res 128 256] [--repeat 5]
    python benchmarks/bench_rasterize.py --fit [--steps 600] [--views 36]   # whole fit stage

Scene: N Gaussians on and just inside a sphere of radius 0.25 (a head's size in
our world; the PanoHead frame spans +-0.32 at the origin) seen by one PanoHead ring camera (radius 2.7, fx = 4.2647 * W), the
geometry the fit stage renders. Prints ms per frame (1 camera) for
forward and forward+backward (wall, and the process CPU time of the
latter, which is steadier on a shared machine), intersections, and the process's peak RSS so far (torch tensors bypass
tracemalloc, so resource.ru_maxrss is the honest number).
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from recon import cameras
from recon.fit.rasterize import rasterization


def head_scene(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g)
    d = d / d.norm(dim=1, keepdim=True)
    r = 0.25 * (1 - 0.15 * torch.rand(n, 1, generator=g))
    means = d * r
    spacing = (4 * np.pi * 0.25**2 / n) ** 0.5
    scales = torch.full((n, 3), spacing * 0.8) * torch.exp(0.3 * torch.randn(n, 3, generator=g))
    quats = torch.randn(n, 4, generator=g)
    opac = 0.3 + 0.65 * torch.rand(n, generator=g)
    colors = torch.rand(n, 3, generator=g)
    return means, quats, scales, opac, colors


def bench(n: int, res: int, repeat: int, chunk: int, tile: int = 16) -> dict:
    means, quats, scales, opac, colors = head_scene(n)
    c2w = cameras.orbit_cam2world(30.0, 10.0)
    vm = torch.tensor(cameras.world_to_camera(c2w), dtype=torch.float32)[None]
    K = torch.tensor(cameras.intrinsics_pixels(cameras.INTRINSICS_NORM, res, res), dtype=torch.float32)[None]
    params = [t.clone().requires_grad_() for t in (means, quats, scales, opac, colors)]
    bg = torch.ones(1, 3)

    def fwd():
        return rasterization(params[0], params[1], params[2], params[3], params[4], vm, K, res, res,
                             backgrounds=bg, chunk=chunk, tile_size=tile)

    fwd()[0].sum().backward()  # warm-up
    t_f, t_fb, c_fb = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with torch.no_grad():
            fwd()
        t_f.append(time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.process_time()
        img, alpha, meta = fwd()
        (img.sum() + alpha.sum()).backward()
        t_fb.append(time.perf_counter() - t0)
        c_fb.append(time.process_time() - c0)
    # torch's tensors live outside Python's allocator (tracemalloc misses them): report
    # the process's peak RSS, which after the first config is the max over configs so far.
    img, alpha, meta = fwd()
    (img.sum() + alpha.sum()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"n": n, "res": res, "fwd_ms": 1e3 * float(np.median(t_f)), "fwd_bwd_ms": 1e3 * float(np.median(t_fb)), "fwd_bwd_cpu_ms": 1e3 * float(np.median(c_fb)),
            "isects": meta["n_isects"], "coverage": float(alpha.detach().mean()), "peak_rss_mb": peak / 2**20}


def sphere_viewset(n: int, res: int, radius: float = 0.22):
    """A ring of n ray-cast views of a sphere coloured by its normal (RGBA)."""
    from recon.types import ViewSet

    c2w = cameras.ring_cam2world(n)
    K = np.broadcast_to(cameras.INTRINSICS_NORM, (n, 3, 3)).copy()
    imgs = np.zeros((n, res, res, 4), np.uint8)
    for i in range(n):
        o, d, _ = cameras.pixel_rays(c2w[i], K[i], res, res)
        b = d @ o
        disc = b * b - (o @ o - radius ** 2)
        hit = disc > 0
        p = o + (-b - np.sqrt(np.maximum(disc, 0)))[..., None] * d
        stripes = 0.5 + 0.5 * np.sign(np.sin(12 * np.arctan2(p[..., 0], p[..., 2])))  # texture to fit
        rgb = np.clip(0.5 + 0.4 * p / radius, 0, 1) * (0.6 + 0.4 * stripes[..., None])
        imgs[i, ..., :3] = np.where(hit[..., None], rgb * 255 + 0.5, 0).astype(np.uint8)
        imgs[i, ..., 3] = np.where(hit, 255, 0)
    return ViewSet(imgs, c2w, K, [f"v{i:02d}.png" for i in range(n)], backend="bench")


def bench_fit(steps: int, n_views: int, res: int) -> None:
    from recon.config import FitConfig
    from recon.fit.splat import fit_splats

    views = sphere_viewset(n_views, res)
    cfg = FitConfig(steps=steps, resolution=res)
    t0 = time.perf_counter()
    c0 = time.process_time()
    scene, m = fit_splats(views, cfg, progress=lambda s, t, msg: print(f"  {s}/{t} {msg}", flush=True) if s % 100 == 0 else None)
    print(f"fit: {steps} steps x {cfg.batch_views} views at {res}^2, {n_views} views: "
          f"{time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU, {m['num_gaussians']} gaussians")
    print(f"  PSNR init {m['init_psnr']:.2f} -> train {m['train_psnr']:.2f} / held-out {m['test_psnr']:.2f} dB, "
          f"SSIM {m['train_ssim']:.3f} / {m['test_ssim']:.3f}, alpha IoU {m['train_alpha_iou']:.3f} / {m['test_alpha_iou']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--res", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--tile", type=int, default=8)
    ap.add_argument("--fit", action="store_true", help="time the whole fit stage instead")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--views", type=int, default=36)
    args = ap.parse_args()
    if args.fit:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        bench_fit(args.steps, args.views, args.res[0])
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, chunk {args.chunk}, tile {args.tile}")
    print(f"{'N':>7} {'res':>5} {'fwd ms':>9} {'fwd+bwd ms':>11} {'(cpu ms)':>9} {'isects':>9} {'alpha':>6} {'peak RSS MB':>12}")
    for n in args.n:
        for res in args.res:
            r = bench(n, res, args.repeat, args.chunk, args.tile)
            print(f"{r['n']:>7} {r['res']:>5} {r['fwd_ms']:>9.1f} {r['fwd_bwd_ms']:>11.1f} {r['fwd_bwd_cpu_ms']:>9.1f} {r['isects']:>9} "
                  f"{r['coverage']:>6.2f} {r['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
