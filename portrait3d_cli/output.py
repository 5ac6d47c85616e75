"""Where things are printed: results on stdout (one JSON document with --json),
logs, progress and errors on stderr (DESIGN §9)."""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def print_json(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc, indent=1, default=str) + "\n")
    sys.stdout.flush()


class EventPrinter:
    """Turns recon.events into a Rich progress display (TTY), plain log lines (logs,
    CI) or JSON lines (`--progress json`), always on stderr."""

    def __init__(self, mode: str = "auto", quiet: bool = False):
        self.mode = "rich" if mode == "auto" and err.is_terminal else ("plain" if mode == "auto" else mode)
        self.quiet = quiet
        self.progress: Progress | None = None
        self.tasks: dict = {}
        self._last_plain: dict = {}

    def __enter__(self):
        if self.mode == "rich" and not self.quiet:
            self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[label]}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                     TextColumn("{task.fields[msg]}"), console=err, transient=False)
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, ev: dict) -> None:
        if self.mode == "json":
            sys.stderr.write(json.dumps(ev, default=str) + "\n")
            sys.stderr.flush()
            return
        if self.quiet and ev["event"] not in ("warning", "stage_failed"):
            return
        kind, stage = ev["event"], ev.get("stage", "")
        prefix = f"[{ev['image']}] " if ev.get("image") else ""
        if self.progress is not None:
            key = (ev.get("image"), stage)
            if kind == "stage_started":
                self.tasks[key] = self.progress.add_task("", total=None, label=f"{prefix}{stage}", msg=ev.get("message", ""))
            elif kind == "stage_progress" and key in self.tasks:
                self.progress.update(self.tasks[key], completed=ev["step"], total=ev["total"], msg=ev.get("message", "")[:60])
            elif kind == "stage_finished" and key in self.tasks:
                t = self.progress.tasks[[x.id for x in self.progress.tasks].index(self.tasks[key])]
                self.progress.update(self.tasks[key], completed=t.total or 1, total=t.total or 1, msg=f"done in {ev['seconds']:.1f}s")
            elif kind == "stage_skipped":
                self.progress.console.print(f"{prefix}[dim]{stage}: up to date, skipped[/]")
            elif kind in ("info", "warning"):
                style = "yellow" if kind == "warning" else "cyan"
                self.progress.console.print(f"{prefix}[{style}]{ev['message']}[/]")
            elif kind == "stage_failed" and key in self.tasks:
                self.progress.update(self.tasks[key], msg="[red]failed[/]")
            return
        # plain lines: one per stage event, progress throttled to one line every 5 s
        if kind == "stage_progress":
            key = (ev.get("image"), stage)
            now = time.time()
            if now - self._last_plain.get(key, 0) < 5 and ev["step"] < ev["total"]:
                return
            self._last_plain[key] = now
            err.print(f"{prefix}{stage}: {ev['step']}/{ev['total']} {ev.get('message', '')}")
        elif kind == "stage_started":
            err.print(f"{prefix}{stage}: started ({ev.get('message', '')})")
        elif kind == "stage_finished":
            err.print(f"{prefix}{stage}: done in {ev['seconds']:.1f}s")
        elif kind == "stage_skipped":
            err.print(f"{prefix}{stage}: up to date, skipped")
        elif kind in ("info", "warning"):
            err.print(f"{prefix}{'warning: ' if kind == 'warning' else ''}{ev['message']}")
        elif kind == "stage_failed":
            err.print(f"{prefix}{stage}: failed")


@contextmanager
def event_sink(mode: str = "auto", quiet: bool = False):
    """The on_event callback for a command. With `--progress json` stderr carries only
    events: native libraries' chatter on fd 2 (TFLite, Ray) is silenced meanwhile."""
    if mode == "json":
        from recon.batch import json_event_stream

        with json_event_stream(None) as emit:
            yield emit
    else:
        with EventPrinter(mode, quiet) as printer:
            yield printer
