"""Local parallelism without Ray (recon.batch picks these; docs/batch.md).

- `run_process_pool`: N spawned worker processes, each runs whole images one after
  another with cores // N torch threads. Events travel to the parent through a
  multiprocessing queue and reach its `on_event` with their image id. A transient
  failure is retried in the same pool; a worker that dies (killed, out of memory)
  breaks the pool, and the images it held are retried in a fresh one; at most
  `retries` times per image.
- `run_pipelined`: one process, three threads, so the accelerator never waits for
  CPU work:  [preprocess image k+1, k+2]  ->  [backview, views, fit of image k]  ->
  [export of image k-1]. Queues between them are bounded (two images preprocessed
  ahead, one waiting for export), so memory stays that of ~4 images.
"""
from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Callable, Sequence

from .batch import (CPU_POST_STAGES, CPU_PRE_STAGES, GPU_STAGES, BatchItem, Recorder, TransientError, failed_record,
                    merge_parts, run_part)
from .config import RunConfig
from .events import Emitter, EventFn
from .rundir import STAGES

# ============================================================================ processes
_EVENTS = None  # the worker's end of the event queue


def _init_worker(events, threads: int, worker_init: Callable[[], None] | None) -> None:
    global _EVENTS
    _EVENTS = events
    # Before torch is imported: OpenMP sizes its pool from these at first use.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass
    if worker_init is not None:
        worker_init()


def _send(ev: dict) -> None:
    if _EVENTS is not None:
        _EVENTS.put(ev)


def _run_whole(item: BatchItem, out: Path, config: RunConfig, force: bool) -> dict:
    return run_part(item, out, config, STAGES, force=force, on_event=_send, raise_transient=True)


def _drain(events, on_event: EventFn | None) -> None:
    while True:
        ev = events.get()
        if ev is None:
            return
        if on_event is not None:
            try:
                on_event(ev)
            except Exception:  # noqa: BLE001 - a broken display must not hang the batch
                pass


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def run_process_pool(items: Sequence[BatchItem], out: Path, configs: dict[str, RunConfig], workers: int, *,
                     force: bool, retries: int, worker_init: Callable[[], None] | None, on_event: EventFn | None,
                     recorder: Recorder) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: forking a process that has started torch/OpenMP or mediapipe
    # threads can deadlock the child.
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    drain = threading.Thread(target=_drain, args=(events, on_event), daemon=True, name="p3d-events")
    drain.start()
    em = Emitter(on_event, "batch")
    threads = threads_per_worker(workers)
    em.info(f"{workers} worker processes, {threads} torch thread{'s' if threads > 1 else ''} each")
    attempts = {it.id: 0 for it in items}
    died = "a worker process died (killed, or out of memory)"

    def new_pool(n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=max(1, min(workers, n)), mp_context=ctx, initializer=_init_worker,
                                   initargs=(events, threads, worker_init))

    pool = new_pool(len(items))
    try:
        futs = {pool.submit(_run_whole, it, out, configs[it.id], force): it for it in items}
        while futs:
            done, _ = wait(futs, return_when=FIRST_COMPLETED)
            again: list[tuple[BatchItem, str]] = []
            broken = False
            for f in done:
                it = futs.pop(f)
                attempts[it.id] += 1
                try:
                    part = f.result()
                except BrokenProcessPool:
                    broken = True
                    again.append((it, died))
                except TransientError as e:  # the worker is fine: retry in the same pool
                    again.append((it, str(e)))
                else:
                    recorder.finish(it, merge_parts(it, out, [part], attempts[it.id]))
            if broken:  # every image still in the pool is lost with it: a fresh pool takes them
                for f, it in list(futs.items()):
                    attempts[it.id] += 1
                    again.append((it, died))
                futs.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool(len(again))
            for it, why in again:
                if attempts[it.id] <= retries:
                    Emitter(on_event, it.id).warning(f"{why}; retrying (attempt {attempts[it.id] + 1} of {retries + 1})",
                                                     attempt=attempts[it.id] + 1)
                    futs[pool.submit(_run_whole, it, out, configs[it.id], force)] = it
                else:
                    recorder.finish(it, failed_record(it, out, f"{why} (gave up after {attempts[it.id]} attempts)",
                                                      kind="transient", attempts=attempts[it.id]))
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        events.put(None)
        drain.join(timeout=10)


# ============================================================================ pipeline
class _Failed(Exception):
    pass


def run_pipelined(items: Sequence[BatchItem], out: Path, configs: dict[str, RunConfig], *, force: bool,
                  on_event: EventFn | None, recorder: Recorder, stop: threading.Event, ahead: int = 2) -> None:
    to_gpu: queue.Queue = queue.Queue(maxsize=ahead)
    to_export: queue.Queue = queue.Queue(maxsize=1)
    errors: list[BaseException] = []

    def put(q: queue.Queue, x) -> None:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.2)
                return
            except queue.Full:
                continue
        raise _Failed

    def get(q: queue.Queue):
        while True:
            if errors:
                raise errors[0]
            try:
                return q.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    raise _Failed from None

    def guarded(fn):
        def body():
            try:
                fn()
            except _Failed:
                pass
            except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
                errors.append(e)
                stop.set()
        return body

    def preprocessor():
        for it in items:
            if stop.is_set():
                return
            part = run_part(it, out, configs[it.id], CPU_PRE_STAGES, force=force, on_event=on_event)
            put(to_gpu, (it, [part]))
        put(to_gpu, None)

    def exporter():
        while True:
            x = get(to_export)
            if x is None:
                return
            it, parts = x
            parts.append(run_part(it, out, configs[it.id], CPU_POST_STAGES, force=force, on_event=on_event))
            recorder.finish(it, merge_parts(it, out, parts))

    workers = [threading.Thread(target=guarded(f), daemon=True, name=f"p3d-{f.__name__}")
               for f in (preprocessor, exporter)]
    for t in workers:
        t.start()
    try:
        while True:  # this thread owns the accelerator
            x = get(to_gpu)
            if x is None:
                break
            it, parts = x
            if "error" not in parts[-1]:
                parts.append(run_part(it, out, configs[it.id], GPU_STAGES, force=force, on_event=on_event))
            if "error" in parts[-1]:
                recorder.finish(it, merge_parts(it, out, parts))
            else:
                put(to_export, (it, parts))
        put(to_export, None)
    except _Failed:
        pass
    for t in workers:
        while t.is_alive():
            t.join(timeout=0.2)
            if errors:
                break
    if errors:
        raise errors[0]
