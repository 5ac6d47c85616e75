"""End-to-end time of `portrait3d make` on the bundled portrait (goal: <= 300 s on
2 CPU cores with the default preset and every export format).

    python benchmarks/bench_make.py [--preset default] [--image examples/astronaut.png]

Prints per-stage seconds, the total, the ratio to the 300 s goal and the peak
resident memory of the run.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 300.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--image", default=str(ROOT / "examples" / "astronaut.png"))
    ap.add_argument("--export", default="glb,obj,ply,splat,mp4,gif")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "portrait3d_cli", "make", args.image, "--out", f"{tmp}/run", "--preset",
               args.preset, "--backend", "proxy", "--export", args.export, "--json", "--progress", "plain"]
        for s in args.set:
            cmd += ["--set", s]
        t = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        total = time.time() - t
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            return r.returncode
        doc = json.loads(r.stdout)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"portrait3d make, preset {args.preset}, exports {args.export}")
        print(f"{'stage':<12}{'seconds':>10}")
        for s in doc["stages"]:
            print(f"{s['stage']:<12}{s.get('seconds', 0.0):>10.1f}")
        print(f"{'total':<12}{total:>10.1f}   ({total / GOAL_S:.2f} x the {GOAL_S:.0f} s goal)")
        print(f"peak RSS {peak_mb:.0f} MB")
        m = doc.get("metrics", {})
        print("fit: " + ", ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
