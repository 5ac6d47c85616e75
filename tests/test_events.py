"""The event stream is an interface: what the code emits must match docs/events.md."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recon.events import EVENT_SCHEMA, Emitter

from .test_batch import config, fake_stages, make_images  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "events.md"
NUM = (int, float)
# The required fields of each event type in docs/events.md (besides schema, event, image, time).
REQUIRED: dict[str, dict] = {
    "run_started": {"run_dir": str, "stages": list},
    "stage_started": {"stage": str, "message": str},
    "stage_progress": {"stage": str, "step": int, "total": int, "message": str},
    "stage_finished": {"stage": str, "seconds": NUM},
    "stage_skipped": {"stage": str, "message": str},
    "stage_failed": {"stage": str, "message": str},
    "run_finished": {"run_dir": str, "seconds": NUM},
    "batch_started": {"total": int, "out": str, "source": str, "scheduler": str, "workers": int},
    "image_finished": {"status": str, "done": int, "total": int, "seconds": NUM, "attempts": int, "worker": str},
    "batch_finished": {"total": int, "succeeded": int, "skipped": int, "failed": int, "seconds": NUM, "summary": str},
    "info": {"message": str},
    "warning": {"message": str},
}
STAGES = {"preprocess", "backview", "views", "fit", "export"}


def validate(ev: dict) -> None:
    json.dumps(ev)  # JSON-able as is
    assert ev["schema"] == EVENT_SCHEMA
    assert ev["event"] in REQUIRED, f"undocumented event {ev['event']!r}"
    assert isinstance(ev["image"], str) and ev["image"]
    assert isinstance(ev["time"], float)
    for key, typ in REQUIRED[ev["event"]].items():
        assert isinstance(ev.get(key), typ) and not isinstance(ev.get(key), bool), (ev["event"], key, ev.get(key))
    if "stage" in ev and ev["event"].startswith(("stage_", "image_")):
        assert ev["stage"] in STAGES
    if ev["event"] == "image_finished":
        assert ev["status"] in ("ok", "skipped", "failed")
        assert ("error" in ev) == (ev["status"] == "failed")
    if ev["event"] == "stage_progress":
        assert 0 <= ev["step"] <= ev["total"]


def test_doc_lists_every_event_and_the_schema():
    text = DOC.read_text()
    assert f"`{EVENT_SCHEMA}`" in text or f'"{EVENT_SCHEMA}"' in text
    types_section = text[text.index("## Event types"):text.index("## Ordering")]
    documented = set(re.findall(r"^\| `([a-z_]+)`", types_section, flags=re.M))
    assert documented == set(REQUIRED)
    for name, fields in REQUIRED.items():
        row = next(line for line in types_section.splitlines() if line.startswith(f"| `{name}`"))
        for key in fields:
            assert f"`{key}`" in row, (name, key)
    # every event name the engine emits is documented
    emitted = set()
    for p in list((ROOT / "recon").rglob("*.py")):
        emitted |= set(re.findall(r"""\.emit\(\s*["']([a-z_]+)["']""", p.read_text()))
    assert emitted and emitted <= set(REQUIRED), emitted - set(REQUIRED)


def test_emitter_fields():
    got = []
    Emitter(got.append, "ada").emit("stage_finished", stage="fit", seconds=1.5)
    validate(got[0])
    assert got[0]["image"] == "ada"
    Emitter(None, "x").info("nobody listens")  # no callback: no error


def test_make_and_batch_events_follow_the_schema(tmp_path, fake_stages):  # noqa: F811
    import recon

    imgs = make_images(tmp_path / "in", 2, bad=True)
    events: list[dict] = []
    recon.make(imgs[0], tmp_path / "one", config=config(), on_event=events.append)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("stage_finished") == 5
    recon.batch(tmp_path / "in", tmp_path / "many", config=config(), on_event=events.append)
    recon.batch(tmp_path / "in", tmp_path / "many", config=config(), on_event=events.append)  # all skipped
    for ev in events:
        validate(ev)
    seen = {e["event"] for e in events}
    assert seen >= set(REQUIRED) - {"warning"}
    failed = [e for e in events if e["event"] == "image_finished" and e["status"] == "failed"]
    assert failed and all(e["stage"] == "preprocess" and e["image"] == "broken" for e in failed)


@pytest.mark.parametrize("line", ["not json", '{"schema": "portrait3d.events/1", "event": "mystery", "image": "a", "time": 1.0}'])
def test_validator_rejects(line):
    with pytest.raises((AssertionError, ValueError)):
        validate(json.loads(line))
