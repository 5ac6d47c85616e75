"""Converter key accounting against the full-size official key lists (meta device: no
10 GB allocation), and the converter's refusals (all WeightsError, exit code 4)."""
import json
import os

import pytest
import torch

from recon.diffusion.convert import build_from_official_state_dict, load_official_state_dict, plan_conversion
from recon.diffusion.models import SUBMODELS, DP360Config
from recon.errors import WeightsError
from tests.conftest import FIXTURES

KEYLISTS = {"dp360": FIXTURES / "dp360" / "dp360_full_keys.json", "backhead": FIXTURES / "dp360" / "backhead_full_keys.json"}
_CACHE = {}


def _keylist(kind):
    path = KEYLISTS[kind]
    assert path.is_file(), f"fixture {path} is missing (set P3D_FIXTURES)"
    if kind not in _CACHE:
        _CACHE[kind] = json.loads(path.read_text())
    return _CACHE[kind]


def _meta_sd(kind):
    d = _keylist(kind)
    return {k: torch.empty(s, dtype=getattr(torch, dt), device="meta") for k, s, dt in d["keys"]}


@pytest.mark.parametrize("kind", ("dp360", "backhead"))
def test_full_size_key_lists_map_completely(kind):
    d = _keylist(kind)
    sd = _meta_sd(kind)
    cfg = DP360Config.full(kind)
    plan = plan_conversion(sd, cfg)
    mapped = [ok for n in SUBMODELS for _, ok, _ in plan.items[n]]
    assert len(mapped) == len(set(mapped))
    assert set(mapped) | set(plan.ignored) == set(sd) and not set(mapped) & set(plan.ignored)
    reasons = plan.ignored_by_reason()
    assert sum(reasons.values()) == (13 + 40 + 1 if kind == "dp360" else 13 + 1)
    assert all(k in d["buffer_keys"] for k in plan.ignored)  # only buffers are ever dropped
    # full-size networks on the meta device, loaded strictly: parameter count is the official one
    models = build_from_official_state_dict(sd, cfg, device="meta")
    n = sum(p.numel() for name in SUBMODELS for p in getattr(models, name).parameters())
    assert n == d["num_parameters"] == (2_704_160_827 if kind == "dp360" else 2_287_023_227)
    per = d["parameters_per_submodule"]
    assert sum(p.numel() for p in models.vae.parameters()) == per["first_stage_model"]
    assert sum(p.numel() for p in models.text_encoder.parameters()) == per["cond_stage_model"]
    assert sum(p.numel() for p in models.appearance.parameters()) == per["control_model"]
    assert sum(p.numel() for p in models.controlnet.parameters()) == per["pose_control_model"]
    motion = sum(p.numel() for k, p in models.unet.named_parameters() if "motion_modules" in k)
    assert motion == (per["model.diffusion_model.*_motion_module"] if kind == "dp360" else 0)
    assert models.unet.has_motion_modules == (kind == "dp360")


def test_newer_transformers_checkpoint_without_position_ids_also_maps():
    sd = _meta_sd("backhead")
    del sd["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    plan_conversion(sd, DP360Config.full("backhead"))


@pytest.mark.parametrize("mutate, needle", [
    (lambda sd: sd.pop("pose_control_model.input_hint_block.14.weight"), "missing"),
    (lambda sd: sd.pop("model.diffusion_model.out.2.bias"), "missing"),
    (lambda sd: sd.__setitem__("model.diffusion_model.extra_head.weight", torch.empty(3, device="meta")), "unexpected"),
    (lambda sd: sd.__setitem__("ema_decay", torch.empty((), device="meta")), "unexpected"),
    (lambda sd: sd.__setitem__("control_model.input_blocks.1.1.proj_in.weight",
                               torch.empty(320, 320, 3, 3, device="meta")), "wrong shape"),
    (lambda sd: sd.__setitem__("first_stage_model.encoder.mid.attn_1.q.weight",
                               torch.empty(512, 256, 1, 1, device="meta")), "wrong shape"),
])
def test_key_problems_are_weights_errors(mutate, needle):
    sd = _meta_sd("backhead")
    mutate(sd)
    with pytest.raises(WeightsError) as e:
        plan_conversion(sd, DP360Config.full("backhead"))
    assert needle in str(e.value) and e.value.exit_code == 4


def test_model_kind_mismatch_is_named():
    with pytest.raises(WeightsError, match="motion"):
        plan_conversion(_meta_sd("dp360"), DP360Config.full("backhead"))
    with pytest.raises(WeightsError, match="motion"):
        plan_conversion(_meta_sd("backhead"), DP360Config.full("dp360"))


def test_wrong_motion_position_table_is_refused():
    cfg = DP360Config.full("dp360")
    sd = _meta_sd("dp360")
    key = next(k for k in sd if k.endswith("pos_encoder.pe"))
    sd[key] = torch.zeros(1, 24, 320)
    with pytest.raises(WeightsError, match="sinusoidal"):
        plan_conversion(sd, cfg)


# ----------------------------------------------------------------- unreadable files
def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_official_state_dict(tmp_path / "nope.th")


def test_truncated_file(tmp_path):
    p = tmp_path / "t.th"
    torch.save({"a": torch.zeros(20000), "b": torch.ones(5)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cannot read"):
        load_official_state_dict(p)


def test_garbage_file(tmp_path):
    p = tmp_path / "g.th"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError):
        load_official_state_dict(p)


def test_non_dict_pickle(tmp_path):
    p = tmp_path / "l.th"
    torch.save([torch.zeros(2)], p)
    with pytest.raises(WeightsError, match="not a state dict"):
        load_official_state_dict(p)


def test_dict_with_non_tensor_values(tmp_path):
    p = tmp_path / "d.th"
    torch.save({"a": torch.zeros(2), "step": 5}, p)
    with pytest.raises(WeightsError, match="non-tensor"):
        load_official_state_dict(p)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_global_is_never_executed(tmp_path):
    p = tmp_path / "evil.th"
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, p)
    with pytest.raises(WeightsError, match="refusing"):
        load_official_state_dict(p)
    assert not marker.exists()


def test_lightning_wrapper_is_unwrapped(tmp_path):
    p = tmp_path / "c.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(2)}}, p)
    assert list(load_official_state_dict(p)) == ["a"]
