import json
import os

import pytest

from recon.errors import OutputError
from recon.rundir import RunDir


def test_stage_output_is_atomic_and_recorded(tmp_path):
    rd = RunDir(tmp_path / "run")
    rec = rd.record("fit", {"steps": 5}, ["abc"])
    assert not rd.is_done(rec)
    with rd.stage_output(rec) as out:
        (out / "scene.txt").write_text("x")
        assert not rd.stage_dir("fit").exists()  # nothing final until the stage succeeds
    assert (rd.stage_dir("fit") / "scene.txt").read_text() == "x"
    assert rd.is_done(rec)
    again = RunDir(tmp_path / "run")
    assert again.is_done(again.record("fit", {"steps": 5}, ["abc"]))


def test_failed_stage_leaves_no_folder_and_keeps_previous(tmp_path):
    rd = RunDir(tmp_path / "run")
    rec = rd.record("fit", {"steps": 5}, [])
    with rd.stage_output(rec) as out:
        (out / "v1").write_text("1")
    rec2 = rd.record("fit", {"steps": 6}, [])
    with pytest.raises(RuntimeError):
        with rd.stage_output(rec2) as out:
            (out / "v2").write_text("2")
            raise RuntimeError("boom")
    assert not any(p.name.endswith(".partial") for p in rd.root.iterdir())
    assert not rd.is_done(rec2)
    assert json.loads(rd.manifest_path.read_text())["stages"]["fit"]["status"] == "failed"


def test_why_stale_names_changed_settings_and_upstream(tmp_path):
    rd = RunDir(tmp_path / "run")
    rec = rd.record("export", {"faces": 100, "texture": 512}, ["fit1"])
    with rd.stage_output(rec):
        pass
    assert rd.why_stale(rd.record("export", {"faces": 200, "texture": 512}, ["fit1"])) .startswith("settings changed: faces")
    assert "earlier stage" in rd.why_stale(rd.record("export", {"faces": 100, "texture": 512}, ["fit2"]))
    assert rd.why_stale(rec) == "up to date"


def test_rerunning_a_stage_marks_later_stages_stale(tmp_path):
    rd = RunDir(tmp_path / "run")
    fit = rd.record("fit", {"a": 1}, [])
    exp = rd.record("export", {"b": 1}, [fit.fingerprint])
    with rd.stage_output(fit):
        pass
    with rd.stage_output(exp):
        pass
    with rd.stage_output(rd.record("fit", {"a": 2}, [])):
        pass
    assert not rd.is_done(exp)


def test_unwritable_output_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(OutputError, match="not a folder"):
        RunDir(f)
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(OutputError):
            RunDir(ro / "run")


def test_damaged_manifest_only_costs_a_recompute(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.manifest_path.write_text("{not json")
    rd2 = RunDir(tmp_path / "run")
    assert rd2.manifest["stages"] == {}
