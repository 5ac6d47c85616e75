"""Batch scheduling: inputs, results, resume, failures, workers, pipeline, CLI.

The stage implementations are replaced by a small deterministic fake (each stage
writes a digest of its upstream output and its config section) so these tests
exercise the batch layer alone; tests/test_batch_e2e.py runs the real stages.
`install_fake_stages` is also the `worker_init` handed to worker processes.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import recon
from recon.batch import BatchItem, BatchResult, batch, collect_inputs
from recon.errors import InputError, UsageError
from recon.events import EVENT_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
_SECTION = {"preprocess": "preprocess", "backview": "views", "views": "views", "fit": "fit", "export": "export"}


# ============================================================================ fakes
def _fake_run_stage(self, stage, out, progress):
    from recon.errors import InputError
    from recon.rundir import STAGES
    from recon.types import Assets

    root = self.rd.root
    flaky = root.parent / f".flaky-{root.name}-{stage}"
    if flaky.exists():  # a transient failure, once
        flaky.unlink()
        raise OSError(errno.EIO, f"simulated I/O error in {stage}")
    stop = root.parent / f".interrupt-{root.name}-{stage}"
    if stop.exists():  # Ctrl-C
        stop.unlink()
        raise KeyboardInterrupt
    crash = root.parent / f".crash-{root.name}-{stage}"
    if crash.exists():  # the worker process dies (as when the OOM killer strikes), once
        crash.unlink()
        os._exit(3)
    if stage == "preprocess":
        data = self.image.read_bytes()
        if not data.startswith((b"\x89PNG", b"\xff\xd8")):
            raise InputError(f"{self.image.name} is not an image", hint="fake stage")
        if os.environ.get("P3D_FAKE_NOISE"):
            os.write(2, b"native library chatter on fd 2\n")  # what mediapipe/TFLite do
        upstream = hashlib.sha256(data).hexdigest()
    else:
        prev = STAGES[STAGES.index(stage) - 1]
        upstream = (self.rd.stage_dir(prev) / f"{prev}.txt").read_text()
    for i in range(3):
        progress(i + 1, 3, f"{stage} {i + 1}/3")
    sec = json.dumps(self.cfg.section(_SECTION[stage]), sort_keys=True)
    digest = hashlib.sha256(f"{upstream}|{stage}|{sec}".encode()).hexdigest()
    (out / f"{stage}.txt").write_text(digest)
    if stage == "export":
        a = Assets(str(out))
        a.add(out / "export.txt", "mesh")
        return a
    return digest


def install_fake_stages() -> None:
    from recon.api import Runner

    Runner._run_stage = _fake_run_stage


@pytest.fixture
def fake_stages():
    from recon.api import Runner

    original = Runner._run_stage
    install_fake_stages()
    yield install_fake_stages
    Runner._run_stage = original


def make_images(folder: Path, n: int = 3, bad: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"face{i}.png"
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    if bad:
        p = folder / "broken.jpg"
        p.write_text("this is not an image")
        paths.append(p)
    return paths


def config(**kw):
    from recon.api import make_config

    kw.setdefault("device", "cpu")
    return make_config("tiny", backend="proxy", export=["glb"], **kw)


def outputs(res: BatchResult) -> dict:
    """What a batch produced: status and every stage's output digest, per image."""
    got = {}
    for item in res.items:
        run = Path(item["run_dir"])
        files = {p.name: p.read_text() for p in sorted(run.glob("0*_*/*.txt"))}
        got[item["id"]] = (item["status"], files)
    return got


def check_event(ev: dict) -> None:
    assert ev["schema"] == EVENT_SCHEMA
    assert isinstance(ev["event"], str) and isinstance(ev["image"], str) and isinstance(ev["time"], float)


# ============================================================================ inputs
def test_collect_folder_list_manifest(tmp_path):
    imgs = make_images(tmp_path / "in", 3)
    sub = tmp_path / "in" / "sub"
    make_images(sub, 1)
    items = collect_inputs(tmp_path / "in")
    assert [i.id for i in items] == ["face0", "face1", "face2"]
    assert [i.id for i in collect_inputs(tmp_path / "in", recursive=True)][-1] == "sub__face0"

    lst = tmp_path / "list.txt"
    lst.write_text(f"# cast\nin/face0.png\n\n  {imgs[1]}  \nin/sub/face0.png\n")
    items = collect_inputs(lst)
    assert [i.image for i in items] == [tmp_path / "in/face0.png", imgs[1], tmp_path / "in/sub/face0.png"]
    assert [i.id for i in items] == ["face0", "face1", "face0_2"]
    assert items[0].source == "list.txt:2"

    man = tmp_path / "cast.csv"
    man.write_text("image,id,preset,set\nin/face0.png,hero,,\nin/face1.png,,fast,fit.steps=7;export.faces=500\n"
                   "in/face2.png,,,\n")
    items = collect_inputs(man)
    assert [i.id for i in items] == ["hero", "face1", "face2"]
    assert items[1] == BatchItem(tmp_path / "in/face1.png", "face1", "fast", ("fit.steps=7", "export.faces=500"),
                                 "cast.csv:3")


@pytest.mark.parametrize("name,text,match", [
    ("empty.txt", "# nothing\n\n", "names no images"),
    ("nohead.csv", "path,id\na.png,x\n", "no `image` column"),
    ("dup.csv", "image,id\na.png,x\nb.png,x\n", "also used at dup.csv:2"),
    ("unsafe.csv", "image,id\na.png,../evil\n", "not a safe folder name"),
    ("extra.csv", "image,id,colour\na.png,x,red\n", "unknown column 'colour'"),
    ("notes.doc", "whatever", "cannot tell what batch input"),
    ("one.png", None, "is a single image"),
])
def test_collect_errors(tmp_path, name, text, match):
    p = tmp_path / name
    if text is None:
        make_images(tmp_path, 1)[0].rename(p)
    else:
        p.write_text(text)
    with pytest.raises(InputError, match=match):
        collect_inputs(p)


def test_collect_missing_and_recursive_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        collect_inputs(tmp_path / "nope")
    (tmp_path / "l.txt").write_text("a.png\n")
    with pytest.raises(UsageError, match="--recursive only applies"):
        collect_inputs(tmp_path / "l.txt", recursive=True)


def test_manifest_row_overrides_keep_batch_options(tmp_path, fake_stages):
    make_images(tmp_path / "in", 2)
    man = tmp_path / "m.csv"
    man.write_text("image,set\nin/face0.png,fit.steps=7\nin/face1.png,\n")
    res = batch(man, tmp_path / "out", config=config(seed=5))
    assert res.failed == 0
    c0 = json.loads((tmp_path / "out/face0/config.json").read_text())
    c1 = json.loads((tmp_path / "out/face1/config.json").read_text())
    assert c0["fit"]["steps"] == 7 and c1["fit"]["steps"] == 40          # tiny preset: 40
    assert c0["export"]["formats"] == c1["export"]["formats"] == ["glb"]  # the batch's --export is kept
    assert c0["seed"] == 5 and c0["views"]["backend"] == "proxy"

    man.write_text("image,preset\nin/face0.png,nosuchpreset\n")
    with pytest.raises(InputError, match="m.csv:2: unknown preset 'nosuchpreset'"):
        batch(man, tmp_path / "out2", config=config())


# ============================================================================ API
def test_batch_api_bad_image_rerun_skips(tmp_path, fake_stages):
    make_images(tmp_path / "in", 3, bad=True)
    events = []
    res = recon.batch(tmp_path / "in", tmp_path / "out", config=config(), on_event=events.append)
    assert isinstance(res, BatchResult) and res.scheduler == "sequential"
    by = {i["id"]: i for i in res.items}
    assert [i["id"] for i in res.items] == ["broken", "face0", "face1", "face2"]
    assert by["broken"]["status"] == "failed" and by["broken"]["error"]["error"] == "bad_input"
    assert by["broken"]["error"]["stage"] == "preprocess"
    assert not (tmp_path / "out/broken").exists()  # bad input leaves no run folder
    assert all(by[f"face{i}"]["status"] == "ok" for i in range(3))
    assert by["face0"]["assets"] == ["05_export/export.txt"]
    assert [s["stage"] for s in by["face0"]["stages"]] == ["preprocess", "backview", "views", "fit", "export"]
    assert res.exit_code == 5
    summary = json.loads((tmp_path / "out/batch.json").read_text())
    assert summary == json.loads(json.dumps(res.to_dict()))
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (4, 3, 1)

    for ev in events:
        check_event(ev)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "batch_started" and kinds[-1] == "batch_finished"
    fin = [e for e in events if e["event"] == "image_finished"]
    assert [(e["image"], e["status"]) for e in fin] == [("broken", "failed"), ("face0", "ok"), ("face1", "ok"),
                                                            ("face2", "ok")]
    prog = [e for e in events if e["event"] == "stage_progress"]
    assert prog and all(e["image"].startswith("face") and e["total"] == 3 for e in prog)

    # a rerun finds every finished image up to date
    os.remove(tmp_path / "in/broken.jpg")
    res2 = recon.batch(tmp_path / "in", tmp_path / "out", config=config())
    assert [i["status"] for i in res2.items] == ["skipped"] * 3 and res2.exit_code == 0
    assert res2.skipped == 3 and outputs(res2) == {k: ("skipped", v[1]) for k, v in outputs(res).items() if k != "broken"}


def test_workers_2_same_as_1(tmp_path, fake_stages):
    make_images(tmp_path / "in", 3, bad=True)
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2/.flaky-face1-fit").write_text("")  # a transient error: retried in the same pool
    (tmp_path / "out2/.crash-face2-views").write_text("")  # a dead worker: retried in a fresh pool
    one = batch(tmp_path / "in", tmp_path / "out1", config=config())
    events = []
    two = batch(tmp_path / "in", tmp_path / "out2", config=config(), workers=2, worker_init=install_fake_stages,
                on_event=events.append)
    assert two.scheduler == "processes"
    assert outputs(two) == outputs(one)
    assert [i["status"] for i in two.items] == ["failed", "ok", "ok", "ok"]
    attempts = {i["id"]: i["attempts"] for i in two.items}
    assert attempts["face1"] >= 2 and attempts["face2"] >= 2  # (others may share the dead pool's fate)
    assert all(a <= 3 for a in attempts.values())
    assert two.items[0]["error"]["error"] == "bad_input"
    assert len({i["worker"] for i in two.items}) >= 2  # ran in more than one process
    # worker events reach the parent's callback, with their image id
    worker_ev = [e for e in events if e["event"] == "stage_finished"]
    assert {e["image"] for e in worker_ev} == {"face0", "face1", "face2"}
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert any("simulated I/O error" in w for w in warnings) and any("worker process died" in w for w in warnings)
    for ev in events:
        check_event(ev)


def test_pipeline_same_as_sequential(tmp_path, fake_stages):
    make_images(tmp_path / "in", 3, bad=True)
    seq = batch(tmp_path / "in", tmp_path / "seq", config=config(), pipeline=False)
    events = []
    pip = batch(tmp_path / "in", tmp_path / "pip", config=config(), pipeline=True, on_event=events.append)
    assert (seq.scheduler, pip.scheduler) == ("sequential", "pipeline")
    assert outputs(pip) == outputs(seq)
    assert [i["status"] for i in pip.items] == ["failed", "ok", "ok", "ok"]
    # the three parts of one image ran in the preprocess, GPU and export threads
    started = [(e["image"], e["stage"]) for e in events if e["event"] == "stage_started"]
    assert len(started) == 1 + 3 * 5
    rerun = batch(tmp_path / "in", tmp_path / "pip", config=config(), pipeline=True)
    assert [i["status"] for i in rerun.items] == ["failed", "skipped", "skipped", "skipped"]


def test_interrupted_batch_leaves_an_accurate_summary(tmp_path, fake_stages):
    make_images(tmp_path / "in", 3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out/.interrupt-face1-fit").write_text("")
    with pytest.raises(KeyboardInterrupt):
        batch(tmp_path / "in", tmp_path / "out", config=config())
    summary = json.loads((tmp_path / "out/batch.json").read_text())
    assert [(i["id"], i["status"]) for i in summary["items"]] == [("face0", "ok"), ("face1", "failed"),
                                                                  ("face2", "failed")]
    assert summary["items"][1]["error"]["exit_code"] == 130
    res = batch(tmp_path / "in", tmp_path / "out", config=config())  # resumes where it stopped
    assert [i["status"] for i in res.items] == ["skipped", "ok", "ok"]
    assert [s["action"] for s in res.items[1]["stages"]] == ["skipped"] * 3 + ["ran"] * 2


def test_force_reruns_and_usage_errors(tmp_path, fake_stages):
    make_images(tmp_path / "in", 1)
    batch(tmp_path / "in", tmp_path / "out", config=config())
    res = batch(tmp_path / "in", tmp_path / "out", config=config(), force=True)
    assert res.items[0]["status"] == "ok"
    with pytest.raises(UsageError, match="workers=0"):
        batch(tmp_path / "in", tmp_path / "out", workers=0)
    with pytest.raises(UsageError, match="--workers applies to local batches"):
        batch(tmp_path / "in", tmp_path / "out", workers=2, ray="local")


def test_ray_missing_is_exit_4(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from portrait3d_cli.main import app

    make_images(tmp_path / "in", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = CliRunner().invoke(app, ["batch", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--ray"])
    assert r.exit_code == 4
    assert "pip install 'portrait3d[ray]'" in r.stderr
    assert not (tmp_path / "out").exists()


# ============================================================================ CLI
def test_cli_batch_progress_json(tmp_path, fake_stages):
    from typer.testing import CliRunner

    from portrait3d_cli.main import app

    make_images(tmp_path / "in", 2, bad=True)
    lst = tmp_path / "cast.txt"
    lst.write_text("in/face0.png\nin/broken.jpg\nin/face1.png\n")
    r = CliRunner().invoke(app, ["batch", str(lst), "--out", str(tmp_path / "out"), "--preset", "tiny", "--backend",
                                 "proxy", "--device", "cpu", "--export", "glb", "--progress", "json", "--json"])
    assert r.exit_code == 5, r.output
    doc = json.loads(r.stdout)
    assert [(i["id"], i["status"]) for i in doc["items"]] == [("face0", "ok"), ("broken", "failed"), ("face1", "ok")]
    lines = r.stderr.splitlines()
    assert lines
    events = [json.loads(line) for line in lines]  # every stderr line is one event
    for ev in events:
        check_event(ev)
    assert {"batch_started", "stage_started", "stage_progress", "stage_finished", "stage_failed", "image_finished",
            "batch_finished"} <= {e["event"] for e in events}


def test_cli_subprocess_stderr_is_only_events(tmp_path):
    """Through a real process: native writes to fd 2 go to OUT/batch.log, not into the stream."""
    make_images(tmp_path / "in", 2)
    code = ("import sys, tests.test_batch as t; t.install_fake_stages(); from portrait3d_cli.main import entry; "
            "sys.argv = ['portrait3d'] + sys.argv[1:]; entry()")
    env = dict(os.environ, P3D_FAKE_NOISE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", code, "batch", str(tmp_path / "in"), "--out", str(out), "--preset", "tiny",
                        "--backend", "proxy", "--device", "cpu", "--progress", "json"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stderr.splitlines()]
    assert events[-1]["event"] == "batch_finished" and events[-1]["succeeded"] == 2
    for ev in events:
        check_event(ev)
    assert "native library chatter" in (out / "batch.log").read_text()
    assert "batch: 2 ok, 0 failed" in p.stdout  # the human table stays on stdout
