"""End to end on a CPU with the proxy back-end and the `tiny` preset: the paths a
user relies on — make, rerun, export-only change, resume after kill -9, render,
fit of a foreign views folder, status, batch, the README's Python example."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .test_cli_errors import cli

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "astronaut.png"
ALL = "glb,obj,ply,splat,mp4,gif"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "run"
    r = cli("make", PHOTO, "--out", out, "--preset", "tiny", "--backend", "proxy", "--export", ALL, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout), r


def test_make_writes_every_asset(run):
    out, doc, r = run
    assert doc["ok"] and doc["backend"] == "proxy" and doc["preview"] is True
    kinds = {f["kind"] for f in doc["assets"]["files"]}
    paths = [f["path"] for f in doc["assets"]["files"]]
    for ext in (".glb", ".obj", ".mtl", ".splat", ".mp4", ".gif"):
        assert any(p.endswith(ext) for p in paths), (ext, paths)
    assert sum(p.endswith(".ply") for p in paths) >= 2  # mesh PLY + splat PLY
    for f in doc["assets"]["files"]:
        p = out / f["path"]
        assert p.is_file() and p.stat().st_size == f["bytes"] > 0
    assert json.loads((out / "assets.json").read_text())["files"] == doc["assets"]["files"]
    assert (out / "03_views" / "dataset.json").is_file() and (out / "03_views" / "contact_sheet.png").is_file()
    metrics = json.loads((out / "04_fit" / "fit_metrics.json").read_text())
    assert metrics["test_psnr"] > 12 and metrics["train_psnr"] > 12 and metrics["test_alpha_iou"] > 0.7
    assert "proxy" in r.stderr  # says which back-end it chose and why
    assert kinds


def test_stdout_is_exactly_one_json_document(run):
    _, _, r = run
    json.loads(r.stdout)  # raises if anything else was printed to stdout


def test_rerun_skips_everything(run):
    out, _, _ = run
    t = time.time()
    r = cli("make", PHOTO, "--out", out, "--preset", "tiny", "--backend", "proxy", "--export", ALL, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert [s["action"] for s in doc["stages"]] == ["skipped"] * 5
    assert time.time() - t < 60


def test_export_only_change_reruns_only_export(run, tmp_path):
    out, _, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    r = cli("make", PHOTO, "--out", copy, "--preset", "tiny", "--backend", "proxy", "--export", "glb", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert {s["stage"]: s["action"] for s in doc["stages"]} == {
        "preprocess": "skipped", "backview": "skipped", "views": "skipped", "fit": "skipped", "export": "ran"}
    assert [f["path"].rsplit(".", 1)[-1] for f in doc["assets"]["files"] if f["kind"].startswith("mesh")]
    st = json.loads(cli("status", copy, "--json").stdout)
    assert all(row["state"] == "done" for row in st["stages"])
    r = cli("status", copy, "--json")
    # a changed setting shows up as stale with the reason, without running anything
    cfg = json.loads((copy / "config.json").read_text())
    cfg["fit"]["steps"] += 1
    (copy / "config.json").write_text(json.dumps(cfg))
    st = json.loads(cli("status", copy, "--json").stdout)
    fit_row = [row for row in st["stages"] if row["stage"] == "fit"][0]
    assert fit_row["state"] == "stale" and "steps" in fit_row["why"]


def test_render_at_any_cameras(run, tmp_path):
    out, _, _ = run
    from recon import cameras

    cams = cameras.orbit_cam2world([0, 45, 180], [0, 20, -10])
    cameras.write_dataset_json(tmp_path / "cams.json", [(f"cam_{i}.png", cameras.label25(c)) for i, c in enumerate(cams)])
    r = cli("render", out, "--cameras", tmp_path / "cams.json", "--out", tmp_path / "renders", "--size", "64")
    assert r.returncode == 0, r.stderr[-2000:]
    for i in range(3):
        im = np.asarray(Image.open(tmp_path / "renders" / f"cam_{i}.png"))
        assert im.shape == (64, 64, 4) and im[..., 3].max() == 255 and im[..., 3].min() == 0


def test_fit_a_foreign_views_folder(run, tmp_path):
    out, _, _ = run
    views = tmp_path / "views"
    shutil.copytree(out / "03_views", views)
    for extra in ("viewset.json", "depth.npz", "contact_sheet.png"):
        (views / extra).unlink(missing_ok=True)  # as another tool would write it: PNGs + dataset.json only
    r = cli("fit", views, "--out", tmp_path / "fitted", "--preset", "tiny", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "fitted" / "04_fit" / "scene.safetensors").is_file()


def test_kill_during_fit_then_resume(tmp_path):
    out = tmp_path / "run"
    args = ["make", PHOTO, "--out", out, "--preset", "tiny", "--backend", "proxy", "--export", "glb",
            "--set", "fit.steps=400", "--set", "fit.checkpoint_every=10", "--progress", "json"]
    p = subprocess.Popen([sys.executable, "-m", "portrait3d_cli", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    ck = out / "04_fit.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ck.glob("*.pt")):
        time.sleep(0.2)
    assert list(ck.glob("*.pt")), "no fit checkpoint appeared"
    time.sleep(1.0)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "04_fit").exists()
    st = json.loads(cli("status", out, "--json").stdout)
    assert st["fit_checkpoint"]
    r = cli(*args[:-2], "--progress", "json", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    events = [json.loads(l) for l in r.stderr.splitlines() if l.startswith("{")]
    assert any("resuming" in e.get("message", "") for e in events)
    doc = json.loads(r.stdout)
    assert {s["stage"]: s["action"] for s in doc["stages"]}["views"] == "skipped"
    assert doc["metrics"]["steps"] == 400


def test_batch_good_and_bad(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(PHOTO, src / "a.png")
    img = Image.open(PHOTO)
    img.transpose(Image.FLIP_LEFT_RIGHT).save(src / "b.jpg", quality=92)
    (src / "broken.jpg").write_text("not an image")
    args = ["batch", src, "--out", tmp_path / "out", "--preset", "tiny", "--backend", "proxy", "--export", "glb"]
    r = cli(*args, "--json")
    assert r.returncode == 5, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    status = {Path(i["image"]).name: i["status"] for i in doc["items"]}
    assert status == {"a.png": "ok", "b.jpg": "ok", "broken.jpg": "failed"}
    assert json.loads((tmp_path / "out" / "batch.json").read_text())["failed"] == 1
    r = cli(*args, "--json")
    status = {Path(i["image"]).name: i["status"] for i in json.loads(r.stdout)["items"]}
    assert status == {"a.png": "skipped", "b.jpg": "skipped", "broken.jpg": "failed"}


def test_readme_python_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its Python API example"
    code = m.group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        (tmp_path / "examples").mkdir()
        shutil.copy(PHOTO, tmp_path / "examples" / PHOTO.name)
        ns: dict = {}
        exec(compile(code, "README.md", "exec"), ns)
    finally:
        os.chdir(cwd)
    assert list((tmp_path / "runs").rglob("*.glb"))
