"""The run directory: stage folders, manifest, fingerprints, atomic writes, resume.

    RUN/
      manifest.json        fingerprint, status and timing of every stage
      config.json          the resolved configuration of the last run
      01_preprocess/ 02_backview/ 03_views/ 04_fit/ 05_export/
      04_fit.ckpt/         fitting checkpoints (a killed run resumes from here)
      assets.json          the exported files with sizes and sha256

A stage folder is written as `.NN_stage.partial` and renamed into place only when
the stage has finished, so a folder that exists is complete. A stage is *done*
when its folder exists and its recorded fingerprint equals the one computed now
from its config section, its upstream fingerprints and the cache version.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import OutputError, UsageError

STAGES = ("preprocess", "backview", "views", "fit", "export")
STAGE_DIRS = {s: f"{i + 1:02d}_{s}" for i, s in enumerate(STAGES)}
# Bump when a stage's output format or algorithm changes so old runs recompute.
CACHE_VERSION = {"preprocess": 1, "backview": 1, "views": 1, "fit": 1, "export": 1}
MANIFEST_VERSION = 1


def fingerprint(payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: str | os.PathLike) -> str:
    """Content digest of a folder's files (names + bytes), for views folders made elsewhere."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(file_digest(p).encode())
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_stage_name(name: str | None) -> str | None:
    if name is None:
        return None
    if name not in STAGES:
        import difflib

        close = difflib.get_close_matches(name, STAGES, n=1)
        raise UsageError(f"unknown stage {name!r}", hint=(f"did you mean {close[0]}? " if close else "") + f"stages: {', '.join(STAGES)}")
    return name


@dataclass
class StageRecord:
    name: str
    fingerprint: str
    payload: dict


class RunDir:
    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root).expanduser().resolve()
        if create:
            self._ensure_writable()
        self.manifest_path = self.root / "manifest.json"
        self.manifest = self._read_manifest()

    # ----------------------------------------------------------------------- basics
    def _ensure_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"output path {self.root} exists and is not a folder", hint="choose another --out")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write_probe{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise OutputError(f"cannot write to output folder {self.root}: {e.strerror or e}",
                              hint="choose a writable --out folder") from None

    def _read_manifest(self) -> dict:
        if self.manifest_path.is_file():
            try:
                m = json.loads(self.manifest_path.read_text())
                if isinstance(m, dict) and m.get("version") == MANIFEST_VERSION:
                    m.setdefault("stages", {})
                    return m
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # a damaged manifest only costs a recompute
        return {"version": MANIFEST_VERSION, "stages": {}}

    def save_manifest(self) -> None:
        atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True))

    def stage_dir(self, stage: str) -> Path:
        return self.root / STAGE_DIRS[stage]

    def checkpoint_dir(self, stage: str) -> Path:
        return self.root / f"{STAGE_DIRS[stage]}.ckpt"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    # ---------------------------------------------------------------- fingerprints
    def record(self, stage: str, config: dict, upstream: list[str], extra: dict | None = None) -> StageRecord:
        payload = {"stage": stage, "cache_version": CACHE_VERSION[stage], "config": config,
                   "upstream": upstream, "extra": extra or {}}
        return StageRecord(stage, fingerprint(payload), payload)

    def is_done(self, rec: StageRecord) -> bool:
        entry = self.manifest["stages"].get(rec.name)
        return bool(entry and entry.get("status") == "done" and entry.get("fingerprint") == rec.fingerprint
                    and self.stage_dir(rec.name).is_dir())

    def recorded_fingerprint(self, stage: str) -> str | None:
        entry = self.manifest["stages"].get(stage)
        return entry.get("fingerprint") if entry and entry.get("status") == "done" and self.stage_dir(stage).is_dir() else None

    def why_stale(self, rec: StageRecord) -> str:
        """One human sentence on why `rec` would rerun."""
        entry = self.manifest["stages"].get(rec.name)
        if not entry or entry.get("status") != "done":
            return "never finished" if not entry else f"last attempt {entry.get('status', 'unknown')}"
        if not self.stage_dir(rec.name).is_dir():
            return "its output folder is missing"
        if entry.get("fingerprint") == rec.fingerprint:
            return "up to date"
        old = entry.get("payload", {})
        reasons = []
        if old.get("cache_version") != rec.payload["cache_version"]:
            reasons.append("portrait3d's algorithm for this stage changed")
        changed = _diff_keys(old.get("config", {}), rec.payload["config"])
        if changed:
            reasons.append("settings changed: " + ", ".join(changed[:6]) + ("…" if len(changed) > 6 else ""))
        if old.get("upstream") != rec.payload["upstream"]:
            reasons.append("an earlier stage's output changed")
        ex = _diff_keys(old.get("extra", {}), rec.payload["extra"])
        if ex:
            reasons.append("inputs changed: " + ", ".join(ex))
        return "; ".join(reasons) or "fingerprint changed"

    # ------------------------------------------------------------------ atomic write
    @contextmanager
    def stage_output(self, rec: StageRecord) -> Iterator[Path]:
        """Yield a fresh `.partial` folder; on success it replaces the stage folder and
        the manifest records the fingerprint. On failure nothing complete-looking remains."""
        final = self.stage_dir(rec.name)
        partial = self.root / f".{final.name}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        started = time.time()
        self.manifest["stages"][rec.name] = {"status": "running", "fingerprint": rec.fingerprint,
                                             "payload": rec.payload, "started": started}
        self._invalidate_downstream(rec.name)
        self.save_manifest()
        try:
            yield partial
        except BaseException as e:
            self.manifest["stages"][rec.name].update(status="failed" if not isinstance(e, KeyboardInterrupt) else "interrupted",
                                                     error=str(e)[:500])
            self.save_manifest()
            shutil.rmtree(partial, ignore_errors=True)
            raise
        trash = self.root / f".{final.name}.old"
        if trash.exists():
            shutil.rmtree(trash)
        if final.exists():
            os.replace(final, trash)
        os.replace(partial, final)
        shutil.rmtree(trash, ignore_errors=True)
        self.manifest["stages"][rec.name].update(status="done", finished=time.time(), seconds=round(time.time() - started, 3))
        self.save_manifest()

    def _invalidate_downstream(self, stage: str) -> None:
        """Once a stage reruns, later stages' recorded outputs no longer describe this run."""
        for later in STAGES[STAGES.index(stage) + 1:]:
            entry = self.manifest["stages"].get(later)
            if entry and entry.get("status") == "done":
                entry["status"] = "stale"

    def clear_checkpoints(self, stage: str) -> None:
        shutil.rmtree(self.checkpoint_dir(stage), ignore_errors=True)

    def status(self) -> list[dict]:
        rows = []
        for s in STAGES:
            e = self.manifest["stages"].get(s)
            rows.append({"stage": s, "folder": STAGE_DIRS[s], "status": (e or {}).get("status", "missing")
                         if self.stage_dir(s).is_dir() or e else "missing",
                         "seconds": (e or {}).get("seconds"), "fingerprint": (e or {}).get("fingerprint")})
        return rows


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
