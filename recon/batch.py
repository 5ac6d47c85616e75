"""Many portraits, one command: each image gets its own run folder under OUT.

A bad image is reported and skipped; the batch goes on. A rerun skips images whose
every stage is up to date. `OUT/batch.json` summarises the batch (written after
each image, so an interrupted batch still leaves an accurate summary).
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig, build_config
from .errors import EXIT_OK, EXIT_STAGE_FAILED, InputError, ReconError
from .events import Emitter, EventFn
from .rundir import atomic_write_text

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"}


def find_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"batch folder {folder} does not exist", hint="check the path")
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder", hint="use `portrait3d make IMAGE` for a single image")
    it = folder.rglob("*") if recursive else folder.iterdir()
    images = sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not images:
        raise InputError(f"no images found in {folder}" + ("" if recursive else " (sub-folders not searched)"),
                         hint=f"supported: {', '.join(sorted(IMAGE_EXTS))}" + ("" if recursive else "; add --recursive"))
    return images


def run_ids(images: list[Path], folder: Path) -> list[str]:
    """Stable, unique run-folder names: the relative path without extension."""
    ids, seen = [], set()
    for p in images:
        rel = p.relative_to(folder).with_suffix("")
        rid = "__".join(rel.parts)
        if rid in seen:
            rid = f"{rid}_{p.suffix.lstrip('.').lower()}"
        seen.add(rid)
        ids.append(rid)
    return ids


@dataclass
class BatchResult:
    out: Path
    items: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def succeeded(self) -> int:
        return sum(i["status"] == "ok" for i in self.items)

    @property
    def skipped(self) -> int:
        return sum(i["status"] == "skipped" for i in self.items)

    @property
    def failed(self) -> int:
        return sum(i["status"] == "failed" for i in self.items)

    @property
    def exit_code(self) -> int:
        return EXIT_STAGE_FAILED if self.failed else EXIT_OK

    @property
    def summary_path(self) -> Path:
        return self.out / "batch.json"

    def to_dict(self) -> dict:
        return {"ok": self.failed == 0, "out": str(self.out), "total": len(self.items), "succeeded": self.succeeded,
                "skipped": self.skipped, "failed": self.failed, "seconds": round(self.seconds, 3),
                "exit_code": self.exit_code, "items": self.items}

    def save(self) -> None:
        atomic_write_text(self.summary_path, json.dumps(self.to_dict(), indent=1))


def batch(folder: str | os.PathLike, out: str | os.PathLike, *, config: RunConfig | None = None,
          recursive: bool = False, force: bool = False, on_event: EventFn | None = None) -> BatchResult:
    from .api import Runner
    from .rundir import RunDir

    folder = Path(folder)
    cfg = config or build_config("default")
    images = find_images(folder, recursive)
    RunDir(out)  # validates that OUT is writable before any work
    res = BatchResult(Path(out).resolve())
    em = Emitter(on_event, "batch")
    em.info(f"{len(images)} images in {folder}")
    t0 = time.time()
    for path, rid in zip(images, run_ids(images, folder)):
        st = time.time()
        item = {"image": str(path), "id": rid, "run_dir": str(res.out / rid)}
        try:
            r = Runner(res.out / rid, cfg, image=path, on_event=on_event, run_id=rid).run(force=force)
            item["status"] = "skipped" if all(s["action"] == "skipped" for s in r.stages) else "ok"
            item["backend"] = r.backend
            item["preview"] = r.preview
            if r.assets:
                item["assets"] = [f["path"] for f in r.assets.files]
        except ReconError as e:
            item.update(status="failed", error=e.to_dict())
            em.warning(f"{path.name}: {e.one_line()}")
        except KeyboardInterrupt:
            item.update(status="failed", error={"error": "interrupted", "message": "interrupted", "exit_code": 130})
            res.items.append(item)
            res.seconds = time.time() - t0
            res.save()
            raise
        except Exception as e:  # noqa: BLE001 - one image's bug must not stop a 1000-image batch
            item.update(status="failed", error={"error": "bug", "message": f"{type(e).__name__}: {e}", "exit_code": 1,
                                                "traceback": traceback.format_exc(limit=8)})
            em.warning(f"{path.name}: internal error {type(e).__name__}: {e}")
        item["seconds"] = round(time.time() - st, 3)
        res.items.append(item)
        res.seconds = time.time() - t0
        res.save()
    return res
