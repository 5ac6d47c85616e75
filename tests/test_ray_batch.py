"""recon.batch on a local 2-CPU Ray cluster (stage fakes from tests/test_batch.py).

The cluster also declares one logical GPU, so both layouts run here: with device
"cpu" one task per image; with device "auto" preprocess/export as CPU tasks and
backview/views/fit on a GPU stage actor (torch sees no CUDA, the stages run on CPU).
"""
from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'portrait3d[ray]')")

from recon.batch import batch  # noqa: E402

from .test_batch import check_event, config, install_fake_stages, make_images, outputs  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def fake_local():
    from recon.api import Runner

    original = Runner._run_stage
    install_fake_stages()
    yield
    Runner._run_stage = original


def test_ray_batch_matches_local(tmp_path, cluster, fake_local):
    make_images(tmp_path / "in", 2, bad=True)
    local = batch(tmp_path / "in", tmp_path / "local", config=config())

    # CPU layout: one task per image; a transient failure is retried, bad input is not
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu/.flaky-face1-views").write_text("")
    events = []
    res = batch(tmp_path / "in", tmp_path / "cpu", config=config(), ray="local", worker_init=install_fake_stages,
                on_event=events.append)
    assert res.scheduler == "ray"
    assert outputs(res) == outputs(local)
    assert {i["id"]: (i["status"], i["attempts"]) for i in res.items} == {
        "broken": ("failed", 1), "face0": ("ok", 1), "face1": ("ok", 2)}
    assert res.items[0]["error"]["error"] == "bad_input"
    assert ray.is_initialized()  # a cluster this process started itself is left running
    for ev in events:
        check_event(ev)
    assert any(e["event"] == "info" and e.get("layout") == "image" for e in events)
    # worker events reach the driver with their image id, before that image's result
    order = [(e["event"], e["image"], e.get("stage")) for e in events]
    for img in ("face0", "face1"):
        assert order.index(("stage_finished", img, "export")) < order.index(("image_finished", img, None))
    assert len([e for e in events if e["event"] == "stage_progress"]) >= 10

    # resumable: a rerun skips every finished image
    again = batch(tmp_path / "in", tmp_path / "cpu", config=config(), ray="local", worker_init=install_fake_stages)
    assert [i["status"] for i in again.items] == ["failed", "skipped", "skipped"]

    # GPU layout: preprocess -> GPU stage actor -> export, on the one (logical) GPU
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu/.flaky-face0-fit").write_text("")
    events = []
    staged = batch(tmp_path / "in", tmp_path / "gpu", config=config(device="auto"), ray="local",
                   worker_init=install_fake_stages, on_event=events.append)
    assert any(e["event"] == "info" and e.get("layout") == "stages" for e in events)
    assert outputs(staged) == outputs(local)  # the run device is not part of any stage's settings
    assert {i["id"]: (i["status"], i["attempts"]) for i in staged.items} == {
        "broken": ("failed", 1), "face0": ("ok", 2), "face1": ("ok", 1)}
    # workers in stage order: preprocess task, GPU stage actor, export task; the GPU
    # stages of every image ran in the one long-lived actor (models stay loaded)
    ok = [i["worker"].split(",") for i in staged.items if i["status"] == "ok"]
    assert all(len(w) == 3 for w in ok)
    assert len({w[1] for w in ok}) == 1
