"""Every bad input gets one line, a hint, the documented exit code, no traceback,
and leaves no output that looks complete (DESIGN §9)."""
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "portrait3d_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=300)


def huge_png(path: Path, w=20000, h=20000):
    """A valid PNG header claiming w x h; decoding it would need 1.2 GB."""
    raw = b"".join(b"\x00" + b"\x00" * (w * 3) for _ in range(1))
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def bad_inputs(tmp: Path) -> dict:
    cases = {}
    (tmp / "text.jpg").write_text("this is not an image\n")
    cases["text renamed .jpg"] = tmp / "text.jpg"
    buf = tmp / "ok.jpg"
    Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)).save(buf, quality=90)
    data = buf.read_bytes()
    (tmp / "trunc.jpg").write_bytes(data[: len(data) // 3])
    cases["truncated jpeg"] = tmp / "trunc.jpg"
    (tmp / "empty.png").write_bytes(b"")
    cases["empty file"] = tmp / "empty.png"
    (tmp / "adir").mkdir()
    cases["directory"] = tmp / "adir"
    cases["missing path"] = tmp / "nope.jpg"
    Image.new("RGB", (1, 1)).save(tmp / "one.png")
    cases["1x1"] = tmp / "one.png"
    huge_png(tmp / "huge.png")
    cases["20000x20000"] = tmp / "huge.png"
    Image.new("RGB", (400, 400), (90, 140, 200)).save(tmp / "noface.png")
    cases["no face"] = tmp / "noface.png"
    return cases


@pytest.mark.parametrize("name", ["text renamed .jpg", "truncated jpeg", "empty file", "directory", "missing path",
                                  "1x1", "20000x20000", "no face"])
def test_bad_input_one_line_exit_3_no_output(tmp_path, name):
    img = bad_inputs(tmp_path)[name]
    out = tmp_path / "run"
    r = cli("make", img, "--out", out, "--preset", "tiny")
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "hint:" in r.stderr
    assert not (out / "assets.json").exists() and not (out / "05_export").exists()
    assert not out.exists() or not any((out / d).exists() for d in ("01_preprocess", "03_views", "04_fit"))


def test_json_error_is_one_document(tmp_path):
    r = cli("make", tmp_path / "missing.jpg", "--json")
    assert r.returncode == 3
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 3 and doc["hint"]


def test_usage_errors_exit_2(tmp_path):
    assert cli("make", "x.jpg", "--bogus").returncode == 2
    r = cli("make", "x.jpg", "--set", "fit.stepz=3")
    assert r.returncode == 2 and "fit.steps" in r.stderr
    r = cli("make", "x.jpg", "--set", "fit.stepz=3", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "usage"
    assert cli("make", "x.jpg", "--export", "glb,fbx").returncode == 2
    assert cli("make", "x.jpg", "--face-box", "1,2,3").returncode == 2


def test_unwritable_output(tmp_path):
    (tmp_path / "afile").write_text("")
    img = ROOT / "examples" / "astronaut.png"
    r = cli("make", img, "--out", tmp_path / "afile", "--preset", "tiny")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not a folder" in r.stderr


def test_presets_and_doctor_commands():
    r = cli("presets", "list")
    assert r.returncode == 0 and "default" in r.stdout and "tiny" in r.stdout
    r = cli("presets", "show", "game", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["export"]["faces"] == 20000
    r = cli("doctor", "--json")
    assert r.returncode == 0
    names = {c["name"] for c in json.loads(r.stdout)["checks"]}
    assert {"python", "torch", "cuda", "gsplat", "face models", "ffmpeg", "weights", "nerfstudio"} <= names


def test_status_of_a_non_run(tmp_path):
    r = cli("status", tmp_path)
    assert r.returncode == 3 and "manifest.json" in r.stderr
