"""The restricted PanoHead snapshot loader: the tiny official-format .pkl and the .pt
state dict give identical weights and models; anything that would run code is refused
before it runs (WeightsError, exit code 4)."""
from __future__ import annotations

import io as _io
import json
import os
import pickle
import sys
import types

import pytest
import torch

from recon.errors import WeightsError
from tests.conftest import FIXTURES

PH = FIXTURES / "panohead"
TINY = PH / "tiny"


def _need(path):
    assert path.exists(), f"missing PanoHead fixture {path} (see fixtures/panohead/README.md)"
    return path


@pytest.fixture(scope="module")
def snap():
    from recon.panohead.safe_pickle import load_network_snapshot
    return load_network_snapshot(_need(TINY / "G_ema_tiny.pkl"))


@pytest.fixture(scope="module")
def pt_sd():
    from recon.panohead.safe_pickle import load_state_dict_file
    return load_state_dict_file(_need(TINY / "G_ema_tiny_state_dict.pt"))


@pytest.fixture(scope="module")
def meta():
    return json.loads(_need(TINY / "init_kwargs.json").read_text())


def test_pkl_and_pt_state_dicts_identical(snap, pt_sd):
    assert snap.class_name == "TriPlaneGenerator"
    assert list(snap.state_dict) == list(pt_sd) and len(pt_sd) == 296
    for k, v in pt_sd.items():
        got = snap.state_dict[k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k


def test_init_kwargs_and_runtime(snap, meta):
    assert snap.init_args == tuple(meta["init_args"])
    assert snap.init_kwargs == meta["init_kwargs"]
    assert snap.runtime["neural_rendering_resolution"] == meta["runtime_attributes"]["neural_rendering_resolution"]
    assert snap.runtime["rendering_kwargs"] == meta["runtime_attributes"]["rendering_kwargs"]
    # Persistent sub-objects are inert records; the by-reference RaySampler is a stand-in.
    mods = snap.record.state["_modules"]
    assert mods["backbone"].class_name == "Generator" and mods["renderer"].class_name == "ImportanceRenderer"
    assert type(mods["ray_sampler"]).__name__ == "RaySamplerRecord"


def test_reads_G_ema_not_G():
    from recon.panohead.safe_pickle import load_network_snapshot
    g = load_network_snapshot(_need(TINY / "G_ema_tiny.pkl"), key="G")
    ema = load_network_snapshot(_need(TINY / "G_ema_tiny.pkl"))
    differ = {k.split(".")[0] for k in ema.state_dict if not torch.equal(ema.state_dict[k], g.state_dict[k])}
    assert differ == {"decoder", "torgb", "t_mapping"}


def test_models_from_pkl_and_pt_identical(meta):
    from recon.panohead.generator import PanoHeadConfig, PanoHeadGenerator
    g_pkl = PanoHeadGenerator.from_snapshot(_need(TINY / "G_ema_tiny.pkl"))
    cfg = PanoHeadConfig.from_init_kwargs(meta["init_kwargs"], meta["runtime_attributes"])
    g_pt = PanoHeadGenerator.from_state_dict_file(_need(TINY / "G_ema_tiny_state_dict.pt"), cfg)
    assert g_pkl.config == g_pt.config
    a, b = g_pkl.state_dict(), g_pt.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    z = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    c = torch.tensor([[1, 0, 0, 0, 0, -1, 0, 0, 0, 0, -1, 2.7, 0, 0, 0, 1, 4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1.0]] * 2)
    with torch.no_grad():
        assert torch.equal(g_pkl.mapping(z, c, 0.7), g_pt.mapping(z, c, 0.7))
        assert torch.equal(g_pkl.apply_delta_c(z, c, 0.7)[1], g_pt.apply_delta_c(z, c, 0.7)[1])


def test_full_size_structure_matches_official_keys():
    """Default config = the released checkpoint: every state_dict key, shape and order."""
    from recon.panohead.generator import PanoHeadGenerator
    ref = json.loads(_need(PH / "panohead_full_keys.json").read_text())
    with torch.device("meta"):
        G = PanoHeadGenerator()
    sd = G.state_dict()
    assert [e["key"] for e in ref["state_dict"]] == list(sd)
    for e in ref["state_dict"]:
        assert list(sd[e["key"]].shape) == e["shape"], e["key"]
    assert sum(p.numel() for p in G.parameters()) == 53_741_548
    assert G.num_ws == 14 and G.bcg_synthesis.num_ws == 12
    # The default config is the released checkpoint's (init kwargs + runtime attributes).
    from recon.panohead.generator import PanoHeadConfig
    rk = dict(ref["init_kwargs"]["rendering_kwargs"], density_noise=0)
    cfg = PanoHeadConfig.from_init_kwargs(ref["init_kwargs"], {"neural_rendering_resolution": 64, "rendering_kwargs": rk})
    assert cfg == PanoHeadConfig()


# ------------------------------------------------------------------ malicious input
class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _fake_persistence(monkeypatch):
    """A stand-in torch_utils.persistence so pickle writes the official global name."""
    fake_pkg = types.ModuleType("torch_utils")
    fake = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        return meta
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", fake_pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", fake)
    return _reconstruct_persistent_obj


def _touch_cmd(path):
    return f"{sys.executable} -c \"open(r'{path}', 'w').write('x')\""


def test_crafted_pickle_is_live_with_plain_pickle(tmp_path):
    """Guard for the tests below: the payload really runs when unpickled normally."""
    target = tmp_path / "pwned_plain"
    payload = pickle.dumps({"G_ema": _Evil(os.system, _touch_cmd(target))}, protocol=4)
    pickle.loads(payload)
    assert target.exists()


@pytest.mark.parametrize("func,name", [(os.system, "os.system"), (eval, "builtins.eval"),
                                       (__import__("subprocess").call, "subprocess.call")])
def test_refuses_code_execution(tmp_path, func, name):
    from recon.panohead.safe_pickle import load_network_snapshot
    target = tmp_path / "pwned"
    arg = _touch_cmd(target) if func is not eval else f"open(r'{target}', 'w').write('x')"
    if func is __import__("subprocess").call:
        arg = [sys.executable, "-c", f"open(r'{target}', 'w').write('x')"]
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"G_ema": _Evil(func, arg)}, protocol=4))
    with pytest.raises(WeightsError) as ei:
        load_network_snapshot(p)
    assert f"it references {name}" in str(ei.value) or (name == "os.system" and "it references posix.system" in str(ei.value))
    assert ei.value.exit_code == 4
    assert not target.exists()


def test_refuses_payload_nested_in_persistent_record(tmp_path, monkeypatch):
    """A snapshot-shaped pickle (persistence records, EasyDict...) with os.system deep
    inside a module's state is refused, and nothing runs."""
    from recon.panohead.safe_pickle import load_network_snapshot
    target = tmp_path / "pwned_nested"
    _reconstruct_persistent_obj = _fake_persistence(monkeypatch)
    meta = {"type": "class", "version": 6, "module_src": "import os\nos.system('rm -rf /')\n",
            "class_name": "TriPlaneGenerator",
            "state": {"_parameters": {}, "_buffers": {}, "_modules": {}, "evil": _Evil(os.system, _touch_cmd(target))}}
    p = tmp_path / "nested.pkl"
    p.write_bytes(pickle.dumps({"G_ema": _Evil(_reconstruct_persistent_obj, meta)}, protocol=4))
    with pytest.raises(WeightsError, match="system"):
        load_network_snapshot(p)
    assert not target.exists()


def test_module_src_is_never_executed(tmp_path, monkeypatch):
    """A persistence record whose module_src would write a file loads as an inert record."""
    from recon.panohead.safe_pickle import PersistentRecord, restricted_load
    target = tmp_path / "src_ran"
    _reconstruct_persistent_obj = _fake_persistence(monkeypatch)
    meta = {"type": "class", "version": 6, "module_src": f"open(r'{target}', 'w').write('x')\n",
            "class_name": "OSGDecoder", "state": {"_parameters": {"w": torch.ones(2)}}}
    rec = restricted_load(pickle.dumps(_Evil(_reconstruct_persistent_obj, meta), protocol=4))
    assert isinstance(rec, PersistentRecord) and rec.class_name == "OSGDecoder"
    assert not target.exists()


def test_refuses_payload_inside_storage_blob(tmp_path, monkeypatch):
    """The legacy torch.save stream inside _load_from_bytes gets the same allow-list."""
    from recon.panohead.safe_pickle import read_legacy_storage
    target = tmp_path / "pwned_blob"
    blob = _io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(obj, blob, protocol=2)
    pickle.dump(_Evil(os.system, _touch_cmd(target)), blob, protocol=2)
    with pytest.raises(WeightsError, match="system"):
        read_legacy_storage(blob.getvalue())
    assert not target.exists()


def test_refuses_object_dtype_numpy_scalar(tmp_path):
    import numpy as np
    from recon.panohead.safe_pickle import restricted_load
    with pytest.raises(WeightsError):
        restricted_load(pickle.dumps({"x": np.array([object()], dtype=object)[0:1]}, protocol=4))
    # A plain float64 scalar (like weight_gain in real snapshots) is fine.
    assert restricted_load(pickle.dumps({"g": np.float64(0.25)}, protocol=4))["g"] == 0.25


def test_truncated_and_wrong_files(tmp_path):
    from recon.panohead.safe_pickle import load_network_snapshot, load_state_dict_file
    data = _need(TINY / "G_ema_tiny.pkl").read_bytes()
    p = tmp_path / "trunc.pkl"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError):
        load_network_snapshot(p)
    with pytest.raises(WeightsError, match="no PanoHead snapshot"):
        load_network_snapshot(tmp_path / "absent.pkl")
    with pytest.raises(WeightsError, match="zip-format"):
        load_network_snapshot(_need(TINY / "G_ema_tiny_state_dict.pt"))
    q = tmp_path / "nokey.pkl"
    q.write_bytes(pickle.dumps({"G": 1}, protocol=4))
    with pytest.raises(WeightsError, match="G_ema"):
        load_network_snapshot(q)
    # A .pt that holds code is refused by weights_only loading.
    evil_pt = tmp_path / "evil.pt"
    torch.save({"w": _Evil(os.system, "true")}, evil_pt)
    with pytest.raises(WeightsError):
        load_state_dict_file(evil_pt)
