"""Many portraits, one command: each image gets its own run folder under OUT.

    import recon
    res = recon.batch("portraits/", "heads/", preset="tiny", workers=2)
    res = recon.batch("cast.csv", "heads/", ray="auto")        # on a Ray cluster
    print(res.succeeded, res.failed, res.summary_path)

Inputs (`collect_inputs`): a folder of images, a LIST.txt (one path per line), or a
manifest.csv (column `image`, optional `id`, `preset`, `set`). A bad image is
reported and the batch goes on. A rerun skips images whose every stage is up to
date and records them as "skipped". `OUT/batch.json` summarises the batch; it is
rewritten as images finish (after every image; at most once a second for batches of
more than 100), so an interrupted batch still leaves an accurate one.

Schedulers (docs/batch.md says what overlaps):
- sequential (default): one image after the other, in this process;
- pipeline: preprocess of the next images and export of the previous one run in
  threads while this image's backview/views/fit stages hold the GPU;
- processes (`workers=N`): N worker processes, each runs whole images;
- Ray (`ray=...`, recon.distributed): one pipeline per image on a Ray cluster.
All of them run the same `run_part` and write the same batch.json.
"""
from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import os
import re
import socket
import sys
import threading
import time
import traceback
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .config import RunConfig, build_config
from .errors import EXIT_OK, EXIT_STAGE_FAILED, InputError, ReconError, UsageError
from .events import EVENT_SCHEMA, Emitter, EventFn
from .rundir import STAGES, atomic_write_text

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"}
LIST_EXTS = {".txt", ".lst", ".list"}
MANIFEST_EXTS = {".csv"}

# The split used by the pipelined and Ray schedulers: what needs the accelerator,
# and the CPU-bound work around it.
CPU_PRE_STAGES = ("preprocess",)
GPU_STAGES = ("backview", "views", "fit")
CPU_POST_STAGES = ("export",)

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


# ============================================================================ inputs
@dataclass(frozen=True)
class BatchItem:
    """One image of a batch: where it is, the run-folder name, per-image overrides."""

    image: Path
    id: str
    preset: str | None = None          # manifest.csv `preset`: this image starts from another preset
    sets: tuple[str, ...] = ()         # manifest.csv `set`: extra KEY=VALUE overrides for this image
    source: str = ""                   # "list.txt:12" / "manifest.csv:3", for error messages


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


def _unique_ids(paths: list[Path], taken: set[str] | None = None) -> list[str]:
    """Run-folder names for a list: the file stem, suffixed when two files share it."""
    ids, seen = [], set(taken or ())
    for p in paths:
        base = re.sub(r"[^A-Za-z0-9._+-]", "_", p.stem).lstrip("._-") or "image"
        rid, n = base, 2
        while rid in seen:
            rid, n = f"{base}_{n}", n + 1
        seen.add(rid)
        ids.append(rid)
    return ids


def _read_text(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}", hint="check the path and permissions") from None
    if b"\x00" in data[:4096]:
        raise InputError(f"{what} {path} is not a text file", hint="one image path per line (LIST.txt) or a CSV manifest")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not UTF-8 text", hint="save it as UTF-8") from None


def _resolve(base: Path, text: str) -> Path:
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else (base / p)


def _read_list(path: Path) -> list[BatchItem]:
    paths, where = [], []
    for n, raw in enumerate(_read_text(path, "image list").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        paths.append(_resolve(path.parent, line))
        where.append(f"{path.name}:{n}")
    if not paths:
        raise InputError(f"image list {path} names no images", hint="one image path per line; lines starting with # are comments")
    return [BatchItem(p, rid, source=w) for p, rid, w in zip(paths, _unique_ids(paths), where)]


def _read_manifest(path: Path) -> list[BatchItem]:
    text = _read_text(path, "manifest")
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise InputError(f"manifest {path} is not valid CSV: {e}", hint="a header row with an `image` column") from None
    rows = [(n, r) for n, r in enumerate(rows, 1) if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise InputError(f"manifest {path} is empty", hint="a header row with an `image` column, then one row per image")
    head_n, header = rows[0]
    cols = [c.strip().lower() for c in header]
    if "image" not in cols:
        raise InputError(f"manifest {path} has no `image` column (header: {', '.join(cols) or 'empty'})",
                         hint="the first row names the columns: image[,id][,preset][,set]")
    unknown = [c for c in cols if c not in ("image", "id", "preset", "set")]
    if unknown:
        raise InputError(f"manifest {path} has unknown column {unknown[0]!r}", hint="columns: image, id, preset, set")
    items, seen = [], {}
    for n, row in rows[1:]:
        where = f"{path.name}:{n}"
        if len(row) > len(cols):
            raise InputError(f"{where} has {len(row)} fields, the header has {len(cols)}",
                             hint="quote fields that contain commas")
        rec = {c: (row[i].strip() if i < len(row) else "") for i, c in enumerate(cols)}
        if not rec["image"]:
            raise InputError(f"{where} has an empty `image`", hint="give the image path (relative to the manifest)")
        rid = rec.get("id") or ""
        if rid and (not _SAFE_ID.match(rid) or rid in (".", "..")):
            raise InputError(f"{where}: id {rid!r} is not a safe folder name",
                             hint="use letters, digits, '.', '_', '+', '-' (at most 128), no path separators")
        sets = tuple(s.strip() for s in re.split(r"[;\n]", rec.get("set") or "") if s.strip())
        items.append((where, _resolve(path.parent, rec["image"]), rid, rec.get("preset") or None, sets))
    if not items:
        raise InputError(f"manifest {path} has a header but no rows", hint="one row per image")
    explicit = {rid for _, _, rid, _, _ in items if rid}
    auto = iter(_unique_ids([p for _, p, rid, _, _ in items if not rid], explicit))
    out = []
    for where, p, rid, preset, sets in items:
        rid = rid or next(auto)
        if rid in seen:
            raise InputError(f"{where}: id {rid!r} is also used at {seen[rid]}", hint="ids name run folders: make them unique")
        seen[rid] = where
        out.append(BatchItem(p, rid, preset, sets, where))
    return out


def collect_inputs(source: str | os.PathLike, recursive: bool = False) -> list[BatchItem]:
    """The images of a batch from a folder, a LIST.txt or a manifest.csv.

    Relative paths in a list or manifest are relative to that file's folder. A path
    that does not exist is not an error here: that image fails alone in the batch.
    """
    src = Path(source)
    if not src.exists():
        raise InputError(f"batch input {src} does not exist", hint="give a folder, a LIST.txt or a manifest.csv")
    if src.is_dir():
        images = find_images(src, recursive)
        return [BatchItem(p, rid) for p, rid in zip(images, run_ids(images, src))]
    if recursive:
        raise UsageError("--recursive only applies to a folder", hint=f"{src} is a file")
    ext = src.suffix.lower()
    if ext in MANIFEST_EXTS:
        return _read_manifest(src)
    if ext in LIST_EXTS:
        return _read_list(src)
    if ext in IMAGE_EXTS:
        raise InputError(f"{src} is a single image", hint="use `portrait3d make IMAGE`, or list it in a LIST.txt")
    raise InputError(f"cannot tell what batch input {src} is (extension {ext or 'none'})",
                     hint="give a folder of images, a LIST.txt (one path per line) or a manifest.csv (column `image`)")


# ============================================================================ configs
def _leaf_delta(a: dict, b: dict) -> dict:
    """The keys of a that differ from b (nested)."""
    out = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            d = _leaf_delta(v, b[k])
            if d:
                out[k] = d
        elif b.get(k) != v:
            out[k] = v
    return out


def item_configs(items: Sequence[BatchItem], config: RunConfig) -> dict[str, RunConfig]:
    """One RunConfig per image. A manifest row's `preset` replaces the batch preset and
    keeps every option the batch changed on top of its own preset (--export, --backend,
    --set...); the row's `set` entries come last. Errors name the manifest row."""
    out: dict[str, RunConfig] = {}
    delta: dict | None = None
    for it in items:
        if it.preset is None and not it.sets:
            out[it.id] = config
            continue
        if delta is None:
            delta = _leaf_delta(config.to_dict(), build_config(config.preset).to_dict())
            delta.pop("preset", None)
        try:
            out[it.id] = build_config(it.preset or config.preset, delta, list(it.sets))
        except UsageError as e:
            raise InputError(f"{it.source or it.id}: {e.message}", hint=e.hint) from None
    return out


# ============================================================================ results
@dataclass
class BatchResult:
    out: Path
    items: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    scheduler: str = "sequential"

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
                "exit_code": self.exit_code, "scheduler": self.scheduler, "items": self.items}

    def save(self) -> None:
        atomic_write_text(self.summary_path, json.dumps(self.to_dict(), indent=1))


class Recorder:
    """Collects finished images (from any thread), keeps batch.json current, emits
    `image_finished`; items stay in input order whatever order they finish in."""

    SAVE_EVERY = 1.0  # seconds: a 10,000-image batch.json is not rewritten 10,000 times a minute

    def __init__(self, res: BatchResult, items: Sequence[BatchItem], em: Emitter, t0: float):
        self.res, self.items, self.em, self.t0 = res, list(items), em, t0
        self.index = {it.id: i for i, it in enumerate(items)}
        self.done: dict[int, dict] = {}
        self.lock = threading.Lock()
        self.saved = 0.0

    def save(self) -> None:
        with self.lock:
            self.res.items = [self.done[i] for i in sorted(self.done)]
            self.res.seconds = time.time() - self.t0
            self.res.save()
            self.saved = time.time()

    def finish(self, item: BatchItem, record: dict) -> None:
        with self.lock:
            self.done[self.index[item.id]] = record
            self.res.items = [self.done[i] for i in sorted(self.done)]
            self.res.seconds = time.time() - self.t0
            if len(self.items) <= 100 or time.time() - self.saved >= self.SAVE_EVERY or len(self.done) == len(self.items):
                self.res.save()
                self.saved = time.time()
            ev = {k: record[k] for k in ("status", "seconds", "attempts", "worker") if k in record}
            if record["status"] == "failed":
                ev["error"] = record["error"].get("message", "")
                if record["error"].get("stage"):
                    ev["stage"] = record["error"]["stage"]
            Emitter(self.em.on_event, item.id).emit("image_finished", done=len(self.done), total=len(self.items), **ev)

    def pending(self) -> list[BatchItem]:
        with self.lock:
            return [it for i, it in enumerate(self.items) if i not in self.done]


# ============================================================================ one image
class TransientError(Exception):
    """A failure worth retrying on another attempt (a lost worker, CUDA out of memory,
    a flaky network filesystem). Raised out of `run_part` only when the caller asks."""


_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.EBUSY, errno.ESTALE, errno.ECONNRESET}


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ReconError):
        return False  # bad input, missing weights, a diverged fit: the same again next time
    if isinstance(exc, (TransientError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.startswith("torch")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_part(item: BatchItem, out: str | os.PathLike, config: RunConfig, stages: Sequence[str] = STAGES, *,
             force: bool = False, on_event: EventFn | None = None, raise_transient: bool = False) -> dict:
    """Run some stages of one image into OUT/<id> and describe what happened.

    Never raises for an expected failure: the result has `error` (ReconError.to_dict()
    plus the stage that failed). With raise_transient, transient failures raise
    TransientError instead so a scheduler can retry them.
    """
    from .api import Runner

    current: dict = {}

    def track(ev: dict) -> None:
        if ev.get("event") == "stage_started":
            current["stage"] = ev.get("stage")
        if on_event is not None:
            on_event(ev)

    st = time.time()
    part: dict = {"stages": [], "worker": worker_name()}
    try:
        r = Runner(Path(out) / item.id, config, image=item.image, on_event=track, run_id=item.id).run(stages, force=force)
        part["stages"] = r.stages
        part.update(backend=r.backend, preview=r.preview, metrics=r.metrics)
        if r.assets is not None:
            part["assets"] = [f["path"] for f in r.assets.files]
    except ReconError as e:
        err = e.to_dict()
        err.setdefault("stage", current.get("stage"))
        err["stage"] = err["stage"] or current.get("stage")
        part["error"] = err
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - one image's bug must not stop a 1000-image batch
        if raise_transient and is_transient(e):
            raise TransientError(f"{type(e).__name__}: {e}") from e
        part["error"] = {"error": "bug", "message": f"{type(e).__name__}: {e}", "hint": None, "exit_code": 1,
                         "stage": current.get("stage"), "traceback": traceback.format_exc(limit=8)}
    part["seconds"] = round(time.time() - st, 3)
    return part


def merge_parts(item: BatchItem, out: Path, parts: Sequence[dict], attempts: int = 1) -> dict:
    """The batch.json record of one image from the parts that ran (in stage order)."""
    rec: dict = {"image": str(item.image), "id": item.id, "run_dir": str(out / item.id)}
    stages: list[dict] = []
    for p in parts:
        stages += p.get("stages", [])
        for k in ("backend", "preview", "assets", "metrics"):
            if p.get(k) not in (None, {}, []):
                rec[k] = p[k]
        if "error" in p:
            rec["error"] = p["error"]
            break
    if "error" in rec:
        rec["status"] = "failed"
    else:
        rec["status"] = "skipped" if stages and all(s["action"] == "skipped" for s in stages) else "ok"
    rec["stages"] = stages
    rec["seconds"] = round(sum(p.get("seconds", 0.0) for p in parts), 3)
    rec["worker"] = ",".join(p["worker"] for p in parts if p.get("worker"))  # in stage order
    rec["attempts"] = attempts
    return rec


def failed_record(item: BatchItem, out: Path, message: str, *, kind: str = "bug", exit_code: int = 1,
                  attempts: int = 1, stage: str | None = None) -> dict:
    return merge_parts(item, out, [{"error": {"error": kind, "message": message, "hint": None, "exit_code": exit_code,
                                              "stage": stage}}], attempts)


# ============================================================================ events
def locked(on_event: EventFn | None) -> EventFn | None:
    """Events arrive from several threads; front ends (Rich) draw one at a time."""
    if on_event is None:
        return None
    lock = threading.Lock()

    def emit(ev: dict) -> None:
        with lock:
            on_event(ev)

    return emit


@contextmanager
def json_event_stream(log_path: str | os.PathLike | None = None) -> Iterator[EventFn]:
    """`--progress json`: every line on stderr must be one event.

    Native libraries (TFLite/absl in mediapipe, Ray's raylet) write to file
    descriptor 2 directly. While the batch runs, fd 2 goes to `log_path` (or
    /dev/null) and events are written to a private duplicate of the original stderr.
    Where sys.stderr is not fd 2 (tests capturing it), events go to sys.stderr as is.
    """
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        real = False
    if not real:
        def emit_py(ev: dict) -> None:
            sys.stderr.write(json.dumps(ev, default=str) + "\n")
            sys.stderr.flush()
        yield emit_py
        return
    sys.stderr.flush()
    events_fd = os.dup(2)
    try:
        if log_path is None:
            raise OSError
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        target = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:  # an unusable OUT is reported by the batch itself
        target = os.open(os.devnull, os.O_WRONLY)
    os.dup2(target, 2)
    os.close(target)

    def emit_fd(ev: dict) -> None:
        data = (json.dumps(ev, default=str) + "\n").encode()
        while data:
            data = data[os.write(events_fd, data):]

    try:
        yield emit_fd
    finally:
        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os.dup2(events_fd, 2)
        os.close(events_fd)


# ============================================================================ batch
def _sequential(items, out, configs, force, em_event, rec: Recorder, stop: threading.Event) -> None:
    for it in items:
        if stop.is_set():
            break
        part = run_part(it, out, configs[it.id], STAGES, force=force, on_event=em_event)
        rec.finish(it, merge_parts(it, out, [part]))


def resolve_pipeline(pipeline: bool | str, config: RunConfig) -> bool:
    if pipeline in (True, False):
        return bool(pipeline)
    if pipeline != "auto":
        raise UsageError(f"pipeline={pipeline!r} is not auto, True or False")
    try:
        from .runtime import resolve_device

        return resolve_device(config.device)[0].type == "cuda"
    except ReconError:
        return False


def batch(source: str | os.PathLike, out: str | os.PathLike, *, config: RunConfig | None = None,
          preset: str | None = None, sets: list[str] | None = None, recursive: bool = False, force: bool = False,
          workers: int = 1, pipeline: bool | str = "auto", ray: str | bool | None = None, retries: int = 2,
          ray_resources: dict[str, dict] | None = None, worker_init: Callable[[], None] | None = None,
          on_event: EventFn | None = None) -> BatchResult:
    """Turn every image of a folder, LIST.txt or manifest.csv into a run folder OUT/<id>.

    config / preset / sets: the settings of every image (config wins; else the preset
        plus `--set` strings); manifest rows may override preset and sets per image.
    workers: N > 1 runs N worker processes on this machine, each running whole images
        (torch threads per worker = cores // N).
    pipeline: "auto" (on when the device is CUDA), True or False: overlap CPU stages of
        neighbouring images with this image's GPU stages (workers=1 only).
    ray: None (no Ray), "local" / True (start or join a local cluster), "auto" (join the
        running cluster) or an address ("ray://head:10001", "head:6379"). Needs
        `pip install 'portrait3d[ray]'`; the output folder must be shared by all nodes.
    retries: how many times an image is retried after a transient failure (lost
        worker, CUDA out of memory); bad input and stage failures are never retried.
    ray_resources: override the Ray resources of "image", "preprocess", "gpu", "export"
        (see recon.distributed.ray_batch.DEFAULT_RESOURCES).
    worker_init: called once in each worker process (local processes and Ray workers)
        before its first image, e.g. to set up logging; must be picklable.
    on_event: receives every event dict (schema "portrait3d.events/1", docs/events.md),
        from this process and from every worker, with the image id.

    Returns a BatchResult; OUT/batch.json holds the same summary. Raises for problems
    with the batch as a whole (bad list, unwritable OUT, Ray missing); problems with
    one image are recorded in its item and the batch goes on.
    """
    from .rundir import RunDir

    if workers < 1:
        raise UsageError(f"workers={workers} must be at least 1")
    if retries < 0:
        raise UsageError(f"retries={retries} must be >= 0")
    if ray not in (None, False) and workers != 1:
        raise UsageError("--workers applies to local batches; with --ray the cluster decides parallelism",
                         hint="drop --workers (Ray runs one image per CPU, or per GPU for the GPU stages)")
    use_ray = ray is not None and ray is not False
    address = ("local" if ray is True else str(ray)) if use_ray else None
    if address is not None:
        from .distributed.ray_batch import check_address, require_ray

        require_ray()  # say how to install it, or that the cluster is unreachable, before touching anything
        check_address(address)
    cfg = config or build_config(preset or "default", None, sets)
    items = collect_inputs(source, recursive)
    if use_ray:  # workers on other nodes have another working directory
        items = [dataclasses.replace(it, image=it.image.absolute()) for it in items]
    configs = item_configs(items, cfg)
    RunDir(out)  # validates that OUT is writable before any work
    out_p = Path(out).expanduser().resolve()
    on_event = locked(on_event)
    use_pipeline = workers == 1 and not use_ray and resolve_pipeline(pipeline, cfg)
    scheduler = "ray" if use_ray else "processes" if workers > 1 else "pipeline" if use_pipeline else "sequential"
    res = BatchResult(out_p, scheduler=scheduler)
    em = Emitter(on_event, "batch")
    t0 = time.time()
    rec = Recorder(res, items, em, t0)
    em.emit("batch_started", total=len(items), out=str(out_p), scheduler=scheduler, workers=workers,
            source=str(source))
    stop = threading.Event()
    if worker_init is not None and scheduler in ("sequential", "pipeline"):
        worker_init()  # this process is the worker
    try:
        if scheduler == "ray":
            from .distributed.ray_batch import run_ray_batch

            run_ray_batch(items, out_p, configs, address=address, force=force,
                          retries=retries, resources=ray_resources, worker_init=worker_init, on_event=on_event,
                          recorder=rec, batch_config=cfg)
        elif scheduler == "processes":
            from .scheduling_local import run_process_pool

            run_process_pool(items, out_p, configs, workers, force=force, retries=retries, worker_init=worker_init,
                             on_event=on_event, recorder=rec)
        elif scheduler == "pipeline":
            from .scheduling_local import run_pipelined

            run_pipelined(items, out_p, configs, force=force, on_event=on_event, recorder=rec, stop=stop)
        else:
            _sequential(items, out_p, configs, force, on_event, rec, stop)
    except KeyboardInterrupt:
        stop.set()
        for it in rec.pending():
            rec.finish(it, failed_record(it, out_p, "interrupted", kind="interrupted", exit_code=130))
        rec.save()
        raise
    rec.save()
    em.emit("batch_finished", total=len(items), succeeded=res.succeeded, skipped=res.skipped, failed=res.failed,
            seconds=round(res.seconds, 3), summary=str(res.summary_path))
    return res


class _CallableModule(types.ModuleType):
    """`recon.batch` is both this module and the function: `import recon.batch` makes
    the submodule an attribute of the package, so the module itself must be callable
    for `recon.batch(...)` to keep working. Typed code imports `from recon.batch import batch`."""

    def __call__(self, source: str | os.PathLike, out: str | os.PathLike, **kwargs) -> BatchResult:
        return batch(source, out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["BatchItem", "BatchResult", "EVENT_SCHEMA", "TransientError", "batch", "collect_inputs", "find_images",
           "item_configs", "json_event_stream", "merge_parts", "run_part", "run_ids"]
