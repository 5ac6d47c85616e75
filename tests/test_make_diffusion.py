"""`make --backend diffusion` through the run directory, on the fixtures' tiny
DiffPortrait360 checkpoints converted into a temporary weights folder."""
import json
from pathlib import Path

import pytest

import recon
from recon.api import resolve_backend
from recon.errors import MissingError

from .test_dp360_pipeline_stage import home, ring  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "astronaut.png"


def _sets(home, ring):
    return [f"views.weights_dir={home}", f"views.condition_dir={ring.parent}", "views.num_views=8",
            "views.resolution=128", "views.steps=2", "views.dtype=fp32"]


def test_diffusion_backend_runs_through_make(home, ring, tmp_path):
    events = []
    res = recon.make(PHOTO, out=tmp_path / "run", preset="tiny", backend="diffusion", device="cpu",
                     sets=_sets(home, ring), until="views", on_event=events.append)
    assert res.backend == "diffusion" and "very slow" in res.backend_reason  # no CUDA here, said so
    vs = json.loads((tmp_path / "run" / "03_views" / "viewset.json").read_text())
    assert vs["backend"] == "diffusion" and vs["preview"] is False and vs["count"] == 8
    assert (tmp_path / "run" / "02_backview" / "back.png").is_file()
    again = recon.make(PHOTO, out=tmp_path / "run", preset="tiny", backend="diffusion", device="cpu",
                       sets=_sets(home, ring), until="views")
    assert [s["action"] for s in again.stages] == ["skipped"] * 3
    # a different guidance reruns backview and views, not preprocess
    third = recon.make(PHOTO, out=tmp_path / "run", preset="tiny", backend="diffusion", device="cpu",
                       sets=_sets(home, ring) + ["views.guidance=2.0"], until="views")
    assert [s["action"] for s in third.stages] == ["skipped", "ran", "ran"]


def test_auto_never_picks_diffusion_without_cuda(home):
    backend, why = resolve_backend("auto", "auto", str(home))
    assert backend == "proxy" and "CUDA" in why


def test_explicit_diffusion_without_weights_is_exit_4(tmp_path):
    with pytest.raises(MissingError) as e:
        resolve_backend("diffusion", "cpu", str(tmp_path))
    assert e.value.exit_code == 4 and "weights download" in e.value.hint


def test_condition_dir_flag_reaches_the_config(tmp_path):
    from .test_cli_errors import cli

    r = cli("make", PHOTO, "--out", tmp_path / "run", "--backend", "proxy", "--until", "preprocess",
            "--condition-dir", tmp_path / "ring", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["views"]["condition_dir"] == str(tmp_path / "ring")
