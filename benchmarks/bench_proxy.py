"""Proxy back-end timings: build the head from skimage's astronaut (a real portrait with
hand-placed landmarks and a mediapipe selfie matte) and render the 36-view ring.

    python benchmarks/bench_proxy.py [--views 36] [--res 512] [--threads N] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch


def astronaut_portrait(size: int = 512):
    import skimage.data

    from recon import cameras
    from recon.types import Portrait

    im = skimage.data.astronaut()
    cx, cy, side = 226, 108, 300          # roughly PanoHead framing around her head
    A = np.array([[size / side, 0, -(cx - side / 2) * size / side], [0, size / side, -(cy - side / 2) * size / side]])
    crop = cv2.warpAffine(im, A, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
    import mediapipe as mp

    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg:
        alpha = (np.clip(seg.process(crop).segmentation_mask, 0, 1) * 255).astype(np.uint8)
    pts = np.array([[207, 100], [245, 100], [226, 126], [213, 145], [240, 145]], float)  # eyes, nose, mouth corners
    lm = np.c_[pts, np.ones(len(pts))] @ A.T
    return Portrait(image=crop, alpha=alpha, c2w=cameras.orbit_cam2world(0.0, 0.0), K=cameras.INTRINSICS_NORM.copy(),
                    yaw_deg=0.0, pitch_deg=0.0, roll_deg=0.0, landmarks=lm, crop_from_source=np.vstack([A, [0, 0, 1]]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=36)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=str, default="")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from recon.config import ViewsConfig
    from recon.contact_sheet import contact_sheet
    from recon.proxy import build_proxy, proxy_views

    p = astronaut_portrait()
    cfg = ViewsConfig(num_views=a.views, resolution=a.res)
    # CPU seconds (all threads) next to wall seconds: on a shared, loaded machine the wall
    # time says little; CPU time / cores estimates the wall time of an idle machine
    c0, t0 = time.process_time(), time.perf_counter()
    head = build_proxy(p, cfg)
    c1, t1 = time.process_time(), time.perf_counter()
    views = proxy_views(p, None, cfg, head=head)
    c2, t2 = time.process_time(), time.perf_counter()
    mesh = head.to_mesh()
    t3 = time.perf_counter()
    res = {"threads": torch.get_num_threads(), "build_s": round(t1 - t0, 2), "render_s": round(t2 - t1, 2),
           "build_cpu_s": round(c1 - c0, 2), "render_cpu_s": round(c2 - c1, 2), "load_avg_1min": os.getloadavg()[0],
           "views": a.views, "resolution": a.res, "per_view_s": round((t2 - t1) / a.views, 3),
           "mesh_s": round(t3 - t2, 2), "mesh_faces": len(mesh.faces)}
    print(json.dumps(res))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        views.save(out / "views")
        cv2.imwrite(str(out / "contact_sheet.png"), contact_sheet(views)[..., ::-1])


if __name__ == "__main__":
    main()
