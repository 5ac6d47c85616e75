"""`portrait3d status RUN`: which stages are done, which are stale and why."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError, ReconError
from .rundir import STAGES, RunDir


def run_status(run_dir: str | os.PathLike) -> dict:
    from .api import Runner, load_run_config
    from .config import build_config

    root = Path(run_dir)
    if not (root / "manifest.json").is_file():
        raise InputError(f"{root} is not a portrait3d run folder (no manifest.json)",
                         hint="pass the --out folder of `portrait3d make`")
    rd = RunDir(root, create=False)
    cfg = load_run_config(root) or build_config("default")
    inp = rd.manifest.get("input", {}).get("path")
    views_dir = rd.manifest.get("external_views")
    runner = Runner(root, cfg, image=inp, views_dir=views_dir)
    rows = []
    for stage in STAGES:
        entry = rd.manifest["stages"].get(stage)
        row = {"stage": stage, "folder": rd.stage_dir(stage).name, "seconds": (entry or {}).get("seconds")}
        if not entry and not rd.stage_dir(stage).is_dir():
            row.update(state="missing", why="not run yet")
        elif entry and entry.get("status") in ("failed", "interrupted", "running"):
            st = entry["status"]
            row.update(state=st if st != "running" else "interrupted",
                       why=entry.get("error", "") if st == "failed" else "the run stopped while this stage was running")
        else:
            try:
                rec = runner._record(stage)
                runner._fp[stage] = rec.fingerprint
                done = rd.is_done(rec)
                row.update(state="done" if done else "stale", why="up to date" if done else rd.why_stale(rec))
            except InputError as e:
                row.update(state="stale", why=f"cannot check: {e.message}")
            except ReconError as e:
                row.update(state="missing", why=e.message)
        rows.append(row)
    ckpt = rd.checkpoint_dir("fit")
    return {"run_dir": str(rd.root), "input": rd.manifest.get("input"), "stages": rows,
            "fit_checkpoint": str(ckpt) if ckpt.is_dir() and any(ckpt.glob("*.pt")) else None}
