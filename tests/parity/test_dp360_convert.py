"""convert_checkpoint / load_models on the tiny official checkpoints of the fixtures."""
import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from recon.diffusion.convert import (MANIFEST, build_from_official_state_dict, convert_checkpoint, load_models,
                                     load_official_state_dict, plan_conversion)
from recon.diffusion.models import SUBMODELS, DP360Config
from recon.errors import UsageError, WeightsError
from tests.conftest import FIXTURES

DP360 = FIXTURES / "dp360"


def _need(path):
    assert path.is_file(), f"fixture {path} is missing (set P3D_FIXTURES)"
    return path


def _cfg(name):
    return DP360Config.from_official(_need(DP360 / name / "config.json"))


@pytest.fixture(scope="module")
def back_fp16(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "backhead"
    calls = []
    rep = convert_checkpoint(_need(DP360 / "tinyback" / "model_state.th"), out, model="backhead", dtype="fp16",
                             config=_cfg("tinyback"), sha256=True, progress=lambda s, n, m: calls.append((s, n, m)))
    return out, rep, calls


def test_layout_manifest_and_progress(back_fp16):
    out, rep, calls = back_fp16
    src = DP360 / "tinyback" / "model_state.th"
    for name in ("unet", "appearance", "controlnet", "vae"):
        assert (out / name / "config.json").is_file() and (out / name / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "text_encoder" / "model.safetensors").is_file() and (out / "text_context.safetensors").is_file()
    assert json.loads((out / "unet" / "config.json").read_text())["_class_name"] == "DP360UNet"
    man = json.loads((out / MANIFEST).read_text())
    assert man == rep
    assert man["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert man["source_file"] == "model_state.th" and man["model"] == "backhead" and man["dtype"] == "fp16"
    assert man["converter_version"] and man["official_keys"] == len(load_official_state_dict(src))
    assert sum(man["ignored_keys"].values()) == 14
    steps = [c[0] for c in calls]
    assert steps == list(range(1, len(calls) + 1)) and calls[-1][0] == calls[-1][1]
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_slice("conv_in.weight").get_dtype() == "F16"
    assert not out.with_name(out.name + ".partial").exists()


def test_fp16_folder_holds_rounded_official_weights(back_fp16):
    out, _, _ = back_fp16
    sd = load_official_state_dict(DP360 / "tinyback" / "model_state.th")
    m = load_models(out, dtype="fp32", device="cpu")
    assert m.text_encoder is None and m.kind == "backhead"
    off = sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"]
    ours = m.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.weight
    assert torch.equal(ours, off.half().float())
    q = sd["first_stage_model.encoder.mid.attn_1.q.weight"]  # 1x1 conv -> linear
    assert torch.equal(m.vae.encoder.mid_block.attentions[0].to_q.weight, q[:, :, 0, 0].half().float())
    # the context was computed from the fp32 weights
    from safetensors.torch import load_file

    ref = load_file(str(DP360 / "tinyback" / "io.safetensors"))["clip_hidden_states"]
    assert m.context().dtype == torch.float32
    assert (m.context() - ref).abs().max() <= 1e-4 * ref.abs().max()
    m16 = load_models(out, dtype=torch.bfloat16, device="cpu")
    assert m16.unet.conv_in.weight.dtype == torch.bfloat16


def test_refuses_to_overwrite(back_fp16, tmp_path):
    out, _, _ = back_fp16
    src = DP360 / "tinyback" / "model_state.th"
    with pytest.raises(UsageError):
        convert_checkpoint(src, out, model="backhead", config=_cfg("tinyback"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError):
        convert_checkpoint(src, foreign, model="backhead", config=_cfg("tinyback"), overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_wrong_kind_and_bad_arguments(tmp_path):
    with pytest.raises(WeightsError, match="motion"):
        convert_checkpoint(DP360 / "tiny360" / "model_state.th", tmp_path / "a", model="backhead", config=_cfg("tinyback"))
    with pytest.raises(WeightsError, match="motion"):
        convert_checkpoint(DP360 / "tinyback" / "model_state.th", tmp_path / "b", model="dp360", config=_cfg("tiny360"))
    with pytest.raises(UsageError):
        convert_checkpoint(DP360 / "tinyback" / "model_state.th", tmp_path / "c", model="bogus")
    with pytest.raises(UsageError):
        convert_checkpoint(DP360 / "tinyback" / "model_state.th", tmp_path / "d", model="backhead", dtype="int8")
    # the tiny file is not the full-size model: named as a shape/missing-key problem
    with pytest.raises(WeightsError):
        convert_checkpoint(DP360 / "tinyback" / "model_state.th", tmp_path / "e", model="backhead")
    assert not (tmp_path / "e").exists()


def test_tiny_state_dict_accounting():
    for name, n_ignored in (("tiny360", 13 + 40 + 1), ("tinyback", 13 + 1)):
        sd = load_official_state_dict(DP360 / name / "model_state.th")
        plan = plan_conversion(sd, _cfg(name))
        assert sum(plan.ignored_by_reason().values()) == n_ignored
        assert sum(len(plan.items[n]) for n in SUBMODELS) + n_ignored == len(sd)


def test_broken_folders_are_weights_errors(back_fp16, tmp_path):
    import shutil

    with pytest.raises(WeightsError, match="not a converted"):
        load_models(tmp_path, dtype="fp32")
    out, _, _ = back_fp16
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "controlnet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="incomplete"):
        load_models(broken, dtype="fp32")
    shutil.copy(out / "controlnet" / "diffusion_pytorch_model.safetensors", broken / "vae" / "diffusion_pytorch_model.safetensors")
    shutil.copy(out / "controlnet" / "diffusion_pytorch_model.safetensors", broken / "controlnet")
    with pytest.raises(WeightsError, match="do not fit"):
        load_models(broken, dtype="fp32")
    man = json.loads((out / MANIFEST).read_text())
    man["converter_version"] = "0"
    (broken / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(WeightsError, match="convert the checkpoint again|expected"):
        load_models(broken, dtype="fp32")


def test_in_memory_build_matches_folder_dtype_contract():
    sd = load_official_state_dict(DP360 / "tinyback" / "model_state.th")
    m = build_from_official_state_dict(sd, _cfg("tinyback"), dtype=torch.bfloat16)
    assert m.unet.conv_in.weight.dtype == torch.bfloat16
    pos = dict(m.text_encoder.named_buffers())
    pos = next(v for k, v in pos.items() if k.endswith("position_ids"))
    assert pos.dtype == torch.long and torch.equal(pos[0], torch.arange(77))
    mm = dict(build_from_official_state_dict(load_official_state_dict(DP360 / "tiny360" / "model_state.th"),
                                             _cfg("tiny360")).unet.named_buffers())
    pe = [v for k, v in mm.items() if k.endswith(".pe")]
    assert len(pe) == 40 and not any(v.is_meta for v in pe)


def test_interrupted_conversion_leaves_nothing(tmp_path):
    def stop(step, total, msg):
        if step == 50:
            raise KeyboardInterrupt

    out = tmp_path / "w"
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(DP360 / "tinyback" / "model_state.th", out, model="backhead", config=_cfg("tinyback"), progress=stop)
    assert not out.exists() and not (tmp_path / "w.partial").exists()
