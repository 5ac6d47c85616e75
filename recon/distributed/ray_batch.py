"""The Ray scheduler of recon.batch (docs/batch.md, "Batch and clusters").

Two layouts, chosen from the cluster and the run device:

- CPU layout (no GPU in the cluster, or device "cpu"): one Ray task per image runs
  all five stages, `DEFAULT_RESOURCES["image"]` each, so Ray runs one image per CPU.
  Ray reuses its worker processes, so module-level caches survive between images.
- GPU layout: each image is three steps with their own resources, so Ray packs
  CPU work around the GPUs:
    preprocess  -> Ray task, CPU           (DEFAULT_RESOURCES["preprocess"])
    backview, views, fit -> a stage actor, one per GPU (DEFAULT_RESOURCES["gpu"]);
                   the actor lives for the whole batch, so models and caches loaded
                   by the first image are reused by the next ones (Ray tasks with
                   num_gpus run in a fresh process each time: an actor is the way
                   to keep weights resident)
    export      -> Ray task, CPU           (DEFAULT_RESOURCES["export"])
  The driver keeps every actor busy with images preprocessed ahead of time.

Workers read the input images and write OUT/<id>/ themselves: the input paths and
OUT must be the same paths on every node (a shared filesystem); the driver writes
OUT/batch.json. Transient failures (a lost worker or node, CUDA out of memory, I/O
errors of a network filesystem) are retried by the driver, at most `retries` times
per image; bad input and stage failures are recorded at once and never retried.
Events from workers reach the driver's on_event through a small event-sink actor.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from ..batch import (CPU_POST_STAGES, CPU_PRE_STAGES, GPU_STAGES, BatchItem, Recorder, TransientError,
                     failed_record, merge_parts, run_part)
from ..config import RunConfig
from ..errors import MissingError, UsageError
from ..events import Emitter, EventFn
from ..rundir import STAGES

GiB = 1024 ** 3
# Per-step Ray resources. `memory` is host RAM Ray reserves for the step (logical, used
# for packing); measured peaks are well below these on the default preset.
DEFAULT_RESOURCES: dict[str, dict] = {
    "image": {"num_cpus": 1, "memory": 2 * GiB},                    # whole image, CPU layout
    "preprocess": {"num_cpus": 1, "memory": 2 * GiB},
    "gpu": {"num_cpus": 1, "num_gpus": 1, "memory": 8 * GiB},       # backview + views + fit
    "export": {"num_cpus": 1, "memory": 3 * GiB},
}
INSTALL_HINT = "pip install 'portrait3d[ray]'"


def require_ray():
    try:
        import ray
    except ImportError:
        raise MissingError("--ray needs Ray, which is not installed", hint=INSTALL_HINT) from None
    return ray


def connect(address: str = "local") -> bool:
    """Connect this process to a Ray cluster; True if this call started or joined it
    (and so should disconnect at the end), False if Ray was already initialised here.

    "local": join the latest cluster started with `ray start` on this machine (or
    $RAY_ADDRESS), else start a local one. "auto": join the running cluster, error if
    none. Anything else is a cluster address ("ray://head:10001", "head:6379").
    """
    ray = require_ray()
    if ray.is_initialized():
        return False
    # Worker output stays in Ray's session logs: forwarded to the driver it would mix
    # with --json on stdout and with the JSON event stream on stderr.
    kw = {"log_to_driver": False, "logging_level": logging.WARNING}
    check_address(address)
    try:
        if address == "local":
            ray.init(**kw)
        else:
            ray.init(address=address, **kw)
    except ConnectionError as e:
        raise MissingError(f"cannot join the Ray cluster at {address!r}: {e}",
                           hint="start one with `ray start --head`, or use --ray alone for a local cluster") from None
    except (ValueError, RuntimeError) as e:
        raise MissingError(f"cannot start or join a Ray cluster ({address!r}): {e}",
                           hint="check the address; `ray status` shows a running cluster") from None
    return True


def check_address(address: str, timeout: float = 5.0) -> None:
    """Ray retries an unreachable head for ever; say so at once instead."""
    import socket

    if address in ("local", "auto"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"Ray address {address!r} is not HOST:PORT or ray://HOST:PORT",
                         hint="e.g. --ray-address auto, --ray-address head:6379 or ray://head:10001")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise MissingError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}",
                           hint="check the address and that `ray start --head` runs there; `ray status` on the head "
                                "shows it") from None


# ============================================================================ worker side
_INIT_DONE = False


def _worker_setup(worker_init: Callable[[], None] | None) -> None:
    global _INIT_DONE
    if not _INIT_DONE:
        _INIT_DONE = True
        if worker_init is not None:
            worker_init()


class _SinkClient:
    """Buffers a worker's events and ships them to the sink actor a few times a second;
    `close` waits until they are delivered, so they reach the driver before the result."""

    def __init__(self, sink):
        self.sink, self.buf, self.refs, self.last = sink, [], [], time.time()

    def __call__(self, ev: dict) -> None:
        self.buf.append(ev)
        if ev.get("event") != "stage_progress" or time.time() - self.last > 0.5:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.refs.append(self.sink.put.remote(self.buf))
            self.buf, self.last = [], time.time()

    def close(self) -> None:
        import ray

        self.flush()
        if self.refs:
            ray.wait(self.refs, num_returns=len(self.refs), timeout=30)


def _image_task(item: BatchItem, out: Path, config: RunConfig, stages: Sequence[str], force: bool, sink,
                worker_init: Callable[[], None] | None) -> dict:
    _worker_setup(worker_init)
    client = _SinkClient(sink)
    try:
        return run_part(item, out, config, stages, force=force, on_event=client, raise_transient=True)
    finally:
        client.close()


class _StageActor:
    """Runs the GPU stages of one image after another on one GPU, in one process, so
    whatever the stages cache at module level (loaded models, the proxy head, CLIP
    text context) is loaded once per GPU and reused."""

    def __init__(self, sink, worker_init: Callable[[], None] | None):
        self.sink = sink
        _worker_setup(worker_init)

    def run(self, item: BatchItem, out: Path, config: RunConfig, stages: Sequence[str], force: bool) -> dict:
        client = _SinkClient(self.sink)
        try:
            return run_part(item, out, config, stages, force=force, on_event=client, raise_transient=True)
        finally:
            client.close()


class _EventSink:
    def __init__(self):
        self.events: list[dict] = []

    def put(self, events: list[dict]) -> None:
        self.events.extend(events)

    def drain(self) -> list[dict]:
        out, self.events = self.events, []
        return out


# ============================================================================ driver side
def _fits(req: dict, node: dict) -> bool:
    have = node.get("Resources", {})
    need = {"CPU": req.get("num_cpus", 0), "GPU": req.get("num_gpus", 0), "memory": req.get("memory", 0),
            **req.get("resources", {})}
    return all(have.get(k, 0) >= v for k, v in need.items() if v)


def _check_feasible(ray, res: dict[str, dict], steps: Sequence[str]) -> None:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    for step in steps:
        if not any(_fits(res[step], n) for n in nodes):
            raise MissingError(f"no node of the Ray cluster can run the {step} step, which asks for {res[step]}",
                               hint="add such a node, or lower the request with "
                                    f"recon.batch(..., ray_resources={{'{step}': {{...}}}})")


class _Driver:
    def __init__(self, ray, items, out, configs, *, force, retries, res, worker_init, on_event, recorder, device):
        self.ray, self.items, self.out, self.configs = ray, list(items), out, configs
        self.force, self.retries, self.res, self.worker_init = force, retries, res, worker_init
        self.on_event, self.rec = on_event, recorder
        self.em = Emitter(on_event, "batch")
        self.attempts = {it.id: 0 for it in self.items}
        self.parts: dict[str, list[dict]] = {it.id: [] for it in self.items}
        self.inflight: dict = {}   # ObjectRef -> (item, step, actor)
        self._tasks: dict = {}
        cluster = ray.cluster_resources()
        gpus = float(cluster.get("GPU", 0))
        dev = (device or "auto").lower()
        if dev.startswith("cuda") and gpus == 0:
            raise MissingError(f"--device {device} but the Ray cluster has no GPUs",
                               hint="add GPU nodes, or use --device cpu / auto")
        self.staged = gpus > 0 and dev != "cpu"
        self.sink = ray.remote(_EventSink).options(num_cpus=0).remote()
        self.cpus = float(cluster.get("CPU", 1))
        self.gpus = gpus

    # ------------------------------------------------------------------ plumbing
    def _drain(self) -> None:
        for ev in self.ray.get(self.sink.drain.remote()):
            if self.on_event is not None:
                self.on_event(ev)

    def _task(self, key: str):
        if key not in self._tasks:  # one RemoteFunction per step: Ray exports the code once
            self._tasks[key] = self.ray.remote(_image_task).options(max_retries=0, **self.res[key])
        return self._tasks[key]

    def _submit(self, item: BatchItem, step: str, actor=None) -> None:
        cfg = self.configs[item.id]
        if step == "image":
            ref = self._task("image").remote(item, self.out, cfg, STAGES, self.force, self.sink, self.worker_init)
        elif step == "preprocess":
            ref = self._task("preprocess").remote(item, self.out, cfg, CPU_PRE_STAGES, self.force, self.sink,
                                                  self.worker_init)
        elif step == "gpu":
            ref = actor.run.remote(item, self.out, cfg, GPU_STAGES, self.force)
        else:
            ref = self._task("export").remote(item, self.out, cfg, CPU_POST_STAGES, self.force, self.sink,
                                              self.worker_init)
        self.inflight[ref] = (item, step, actor)

    def _outcome(self, ref) -> tuple[dict | None, str | None]:
        """(part, None) when the step returned, (None, why) for a failure worth retrying."""
        ray = self.ray
        try:
            return ray.get(ref), None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, TransientError) or isinstance(e, TransientError):
                return None, str(cause or e).splitlines()[0]
            msg = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
            return {"error": {"error": "bug", "message": msg, "hint": None, "exit_code": 1, "stage": None}}, None
        except ray.exceptions.RayError as e:  # lost worker, actor or node; object lost; Ray's OOM killer
            return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")

    def _give_up_or_retry(self, item: BatchItem, step: str, why: str, actor) -> bool:
        self.attempts[item.id] += 1
        n = self.attempts[item.id]
        if n <= self.retries:
            Emitter(self.on_event, item.id).warning(f"{step} failed ({why}); retrying (attempt {n + 1} of "
                                                    f"{self.retries + 1})", attempt=n + 1, step=step)
            return True
        self.rec.finish(item, failed_record(item, self.out, f"{why} (gave up after {n} attempts)", kind="transient",
                                            attempts=n))
        return False

    def _finish(self, item: BatchItem) -> None:
        self.rec.finish(item, merge_parts(item, self.out, self.parts[item.id], self.attempts[item.id] + 1))

    # ---------------------------------------------------------------------- run
    def run(self) -> None:
        ray = self.ray
        if self.staged:
            _check_feasible(ray, self.res, ("preprocess", "gpu", "export"))
            n = max(1, int(self.gpus // max(self.res["gpu"].get("num_gpus", 1), 1e-6)))
            n = min(n, len(self.items))
            actor_cls = ray.remote(_StageActor).options(max_restarts=-1, max_task_retries=0, **self.res["gpu"])
            actors = [actor_cls.remote(self.sink, self.worker_init) for _ in range(n)]
            self.em.info(f"Ray: {len(ray.nodes())} node(s), {self.gpus:g} GPU(s): preprocess and export as CPU tasks, "
                         f"backview/views/fit on {n} GPU stage actor(s)", layout="stages", actors=n)
            try:
                self._run_staged(actors)
            finally:
                for a in actors:  # give the GPUs back now, not when the handles are collected
                    ray.kill(a)
        else:
            _check_feasible(ray, self.res, ("image",))
            slots = max(1, int(self.cpus // max(self.res["image"].get("num_cpus", 1), 1e-6)))
            self.em.info(f"Ray: {len(ray.nodes())} node(s), {self.cpus:g} CPU(s): one task per image "
                         f"(up to {slots} at a time)", layout="image", slots=slots)
            self._run_tasks(slots)
        self._drain()

    def _wait(self):
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=0.25)
        self._drain()
        return ready

    def _run_tasks(self, slots: int) -> None:
        todo = deque(self.items)
        limit = 2 * slots  # keep Ray's queue short: Ctrl-C and retries stay responsive
        while todo or self.inflight:
            while todo and len(self.inflight) < limit:
                self._submit(todo.popleft(), "image")
            for ref in self._wait():
                item, step, _ = self.inflight.pop(ref)
                part, why = self._outcome(ref)
                if part is None:
                    if self._give_up_or_retry(item, step, why, None):
                        todo.appendleft(item)
                    continue
                self.parts[item.id] = [part]
                self._finish(item)

    def _run_staged(self, actors: list) -> None:
        todo = deque(self.items)
        to_gpu: deque = deque()
        idle = list(actors)
        ahead = 2 * len(actors) + 1  # images preprocessed ahead of the GPUs
        while todo or to_gpu or self.inflight:
            n_pre = sum(1 for _, s, _ in self.inflight.values() if s == "preprocess")
            while todo and n_pre + len(to_gpu) < ahead:
                self._submit(todo.popleft(), "preprocess")
                n_pre += 1
            while to_gpu and idle:
                self._submit(to_gpu.popleft(), "gpu", idle.pop())
            if not self.inflight:
                continue
            for ref in self._wait():
                item, step, actor = self.inflight.pop(ref)
                if actor is not None:
                    idle.append(actor)  # a dead actor is restarted by Ray (max_restarts=-1)
                part, why = self._outcome(ref)
                if part is None:
                    if self._give_up_or_retry(item, step, why, actor):
                        if step == "preprocess":
                            todo.appendleft(item)
                        elif step == "gpu":
                            to_gpu.appendleft(item)
                        else:
                            self._submit(item, "export")
                    continue
                self.parts[item.id].append(part)
                if "error" in part:
                    self._finish(item)
                elif step == "preprocess":
                    to_gpu.append(item)
                elif step == "gpu":
                    self._submit(item, "export")
                else:
                    self._finish(item)

    def cancel(self) -> None:
        for ref in list(self.inflight):
            try:
                self.ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


def run_ray_batch(items: Sequence[BatchItem], out: Path, configs: dict[str, RunConfig], *, address: str = "local",
                  force: bool = False, retries: int = 2, resources: dict[str, dict] | None = None,
                  worker_init: Callable[[], None] | None = None, on_event: EventFn | None = None,
                  recorder: Recorder, batch_config: RunConfig) -> None:
    ray = require_ray()
    res = {k: dict(v) for k, v in DEFAULT_RESOURCES.items()}
    for key, val in (resources or {}).items():
        if key not in res:
            raise UsageError(f"unknown Ray step {key!r} in ray_resources", hint=f"steps: {', '.join(res)}")
        res[key] = dict(val)
    started = connect(address)
    driver = None
    try:
        driver = _Driver(ray, items, out, configs, force=force, retries=retries, res=res, worker_init=worker_init,
                         on_event=on_event, recorder=recorder, device=batch_config.device)
        driver.run()
    except KeyboardInterrupt:
        if driver is not None:
            driver.cancel()
        raise
    finally:
        if started:
            ray.shutdown()
