"""Progress and status events: the one channel from the engine to any front end.

Every event is a flat JSON-able dict with `schema` = EVENT_SCHEMA and `event` one of
run_started, stage_started, stage_progress, stage_finished, stage_skipped,
stage_failed, info, warning, run_finished, and for batches batch_started,
image_finished, batch_finished (full schema: docs/events.md). Common keys: image (run id), stage,
step, total, message, seconds. The CLI renders them with Rich, or prints them as
JSON lines (`--progress json`); Python callers pass `on_event=`.
"""
from __future__ import annotations

import time
from typing import Callable

EVENT_SCHEMA = "portrait3d.events/1"

EventFn = Callable[[dict], None]
ProgressFn = Callable[[int, int, str], None]


class Emitter:
    """Binds an image id (and optionally a stage) to an event callback."""

    def __init__(self, on_event: EventFn | None = None, image: str = ""):
        self.on_event = on_event
        self.image = image

    def emit(self, event: str, **fields) -> None:
        if self.on_event is None:
            return
        self.on_event({"schema": EVENT_SCHEMA, "event": event, "image": self.image, "time": round(time.time(), 3), **fields})

    def info(self, message: str, **fields) -> None:
        self.emit("info", message=message, **fields)

    def warning(self, message: str, **fields) -> None:
        self.emit("warning", message=message, **fields)

    def progress_fn(self, stage: str) -> ProgressFn:
        """The (step, total, message) callback stage functions accept."""
        last = [0.0]

        def progress(step: int, total: int, message: str = "") -> None:
            now = time.time()
            # Stage loops may call this thousands of times; 10 Hz is plenty for humans and logs.
            if step < total and now - last[0] < 0.1:
                return
            last[0] = now
            self.emit("stage_progress", stage=stage, step=int(step), total=int(total), message=message)

        return progress
