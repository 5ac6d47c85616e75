"""recon.weights: locate / verify / download (from a local folder: tests never use the network)."""
import io
import json
import sys
import zipfile

import numpy as np
import pytest
import torch

from recon import weights
from recon.errors import MissingError, UsageError, WeightsError
from tests.conftest import FIXTURES


pytestmark = pytest.mark.usefixtures("one_thread")


def _png_bytes(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _fake_inference_zip(path, n=8, unsafe=False):
    with zipfile.ZipFile(path, "w") as z:
        for i in range(n):
            z.writestr(f"inference_data/cam_condition/sphere32/{i}.png", _png_bytes(10 * i))
        z.writestr("inference_data/input_image/readme.txt", "x")
        if unsafe:
            z.writestr("../evil.txt", "x")


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32,), layers_per_block=1, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)


def test_home_from_env_and_empty_listing(tmp_path, monkeypatch):
    monkeypatch.setenv("P3D_WEIGHTS", str(tmp_path / "w"))
    assert weights.weights_home() == tmp_path / "w"
    assert weights.find_weights("dp360") is None
    rows = {r["kind"]: r for r in weights.list_weights()}
    assert set(rows) == {"dp360", "backhead", "panohead", "conditions", "perceptual"}
    assert not any(r["usable"] or r["present"] for r in rows.values())
    assert "download" in rows["dp360"]["reason"]
    with pytest.raises(UsageError):
        weights.find_weights("sd15")
    ok, why = weights.backend_available()
    assert not ok and "not found" in why


def test_download_from_dir_unpacks_conditions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _fake_inference_zip(src / "inference_data.zip")
    rep = weights.download(tmp_path / "home", from_dir=src, kinds=("conditions",))
    ring = weights.find_weights("conditions", tmp_path / "home")
    assert ring is not None and ring.name == "sphere32" and len(list(ring.glob("*.png"))) == 8
    assert rep["conditions"]["converted"] == str(ring)
    assert weights.verify("conditions", tmp_path / "home")["ok"]
    assert not weights.verify("conditions", tmp_path / "elsewhere")["ok"]
    assert weights.find_weights("conditions_raw", tmp_path / "home").is_file()
    # second run: nothing to do, same answer
    assert weights.download(tmp_path / "home", from_dir=src, kinds=("conditions",))["conditions"]["converted"] == str(ring)


def test_download_refuses_unsafe_zip_and_missing_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _fake_inference_zip(src / "inference_data.zip", unsafe=True)
    with pytest.raises(WeightsError, match="unsafe path"):
        weights.download(tmp_path / "home", from_dir=src, kinds=("conditions",))
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "home" / "evil.txt").exists()
    with pytest.raises(WeightsError, match="does not exist"):
        weights.download(tmp_path / "home2", from_dir=src, kinds=("dp360",))
    with pytest.raises(UsageError):
        weights.download(tmp_path / "home3", from_dir=src, kinds=("sd15",))


def test_download_without_huggingface_hub_is_a_missing_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(MissingError, match="huggingface_hub") as e:
        weights.download(tmp_path / "home", kinds=("conditions",))
    assert "portrait3d[download]" in e.value.hint


def test_truncated_raw_checkpoint_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"w": torch.zeros(1000)}, src / "model_state-340000.th")
    data = (src / "model_state-340000.th").read_bytes()
    (src / "model_state-340000.th").write_bytes(data[: len(data) // 2])
    rep = weights.verify(src / "model_state-340000.th")
    assert not rep["ok"] and "truncated" in rep["problems"][0]
    with pytest.raises(WeightsError, match="truncated"):
        weights.download(tmp_path / "home", from_dir=src, kinds=("dp360",), convert_after=False)


def test_verify_converted_folder(tmp_path):
    vae = _tiny_vae()
    good = tmp_path / "good" / "vae"
    vae.save_pretrained(good)
    rep = weights.verify(tmp_path / "good")
    assert rep["ok"], rep["problems"]
    assert rep["checked_shapes"] == 1 and rep["tensors"] == len(vae.state_dict())

    # weights of another shape under the same config
    from safetensors.torch import save_file

    bad = tmp_path / "bad" / "vae"
    vae.save_pretrained(bad)
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    k0 = next(k for k in sd if k.endswith("conv_in.weight"))
    sd[k0] = torch.zeros(sd[k0].shape[0] + 1, *sd[k0].shape[1:])
    save_file(sd, str(bad / "diffusion_pytorch_model.safetensors"))
    rep = weights.verify(tmp_path / "bad")
    assert not rep["ok"] and any("wrong shape" in p for p in rep["problems"])

    # NaN in a sampled tensor
    nan = tmp_path / "nan" / "vae"
    vae.save_pretrained(nan)
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    first = next(iter(sorted(sd)))
    sd[first] = torch.full_like(sd[first], float("nan"))
    save_file(sd, str(nan / "diffusion_pytorch_model.safetensors"))
    rep = weights.verify(tmp_path / "nan")
    assert not rep["ok"] and any("NaN" in p for p in rep["problems"])

    # truncated safetensors file
    cut = tmp_path / "cut" / "vae"
    vae.save_pretrained(cut)
    f = cut / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    rep = weights.verify(tmp_path / "cut")
    assert not rep["ok"] and "unreadable" in rep["problems"][0]

    assert not weights.verify(tmp_path / "nothing")["ok"]


def test_backend_available_needs_weights_and_cuda(tmp_path, monkeypatch):
    vae = _tiny_vae()
    for kind in ("dp360", "backhead"):
        vae.save_pretrained(tmp_path / kind / "vae")
    ok, why = weights.backend_available(tmp_path)
    assert not ok and "CUDA" in why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "fake GPU")
    ok, why = weights.backend_available(tmp_path)
    assert ok and "fake GPU" in why
    rows = {r["kind"]: r for r in weights.list_weights(tmp_path)}
    assert rows["dp360"]["usable"] and rows["dp360"]["converted"] and not rows["panohead"]["usable"]


def test_download_and_convert_tiny_checkpoints(tmp_path):
    """The full download() path on the tiny fixtures renamed as the released files."""
    src = tmp_path / "src"
    src.mkdir()
    for name, fx in (("model_state-340000.th", "tiny360"), ("back_head-230000.th", "tinyback")):
        f = FIXTURES / "dp360" / fx / "model_state.th"
        assert f.is_file(), f"fixture {f} is missing"
        (src / name).symlink_to(f)
    configs = {"dp360": FIXTURES / "dp360" / "tiny360" / "config.json",
               "backhead": FIXTURES / "dp360" / "tinyback" / "config.json"}
    rep = weights.download(tmp_path / "home", from_dir=src, kinds=("dp360", "backhead"), dtype="fp32", configs=configs)
    for kind in ("dp360", "backhead"):
        assert rep[kind]["note"] == "converted", rep
        v = weights.verify(kind, tmp_path / "home")
        assert v["ok"], v["problems"]
        assert v["checked_shapes"] == 5 and v["manifest"]["model"] == kind
    again = weights.download(tmp_path / "home", from_dir=src, kinds=("dp360",), dtype="fp32", configs=configs)
    assert again["dp360"]["note"] == "already converted"
    assert json.dumps(weights.list_weights(tmp_path / "home"))


# ------------------------------------------------------------------ perceptual net
def _fake_perceptual(src, monkeypatch):
    """Tiny state dicts with the torchvision / LPIPS key layouts under the released names;
    the published hashes are replaced by theirs (the real files are 528 MB / 7 kB)."""
    import hashlib

    src.mkdir(parents=True, exist_ok=True)
    vgg_name, lin_name = weights.PERCEPTUAL_FILES
    torch.save({"features.0.weight": torch.randn(4, 3, 3, 3), "features.0.bias": torch.zeros(4)}, src / vgg_name)
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, 4, 1, 1) for k in range(5)}, src / lin_name)
    table = {n: ("https://invalid.example/" + n, hashlib.sha256((src / n).read_bytes()).hexdigest())
             for n in (vgg_name, lin_name)}
    monkeypatch.setattr(weights, "PERCEPTUAL_FILES", table)
    return vgg_name, lin_name


def test_perceptual_download_from_dir_find_list_verify(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_fetch_url", lambda *a: pytest.fail("used the network"))
    home = tmp_path / "home"
    assert weights.find_weights("perceptual", home) is None and weights.perceptual_paths(home) is None
    row = {r["kind"]: r for r in weights.list_weights(home)}["perceptual"]
    assert not row["usable"] and not row["present"] and "download" in row["reason"]
    vgg_name, lin_name = _fake_perceptual(tmp_path / "src", monkeypatch)
    rep = weights.download(home, from_dir=tmp_path / "src", kinds=("perceptual",))
    assert rep["perceptual"]["converted"] == str(home / "perceptual")
    assert weights.find_weights("perceptual", home) == home / "perceptual"
    assert weights.perceptual_paths(home) == (home / "perceptual" / vgg_name, home / "perceptual" / lin_name)
    row = {r["kind"]: r for r in weights.list_weights(home)}["perceptual"]
    assert row["usable"] and row["bytes"] > 0
    v = weights.verify("perceptual", home)
    assert v["ok"] and v["files"] == 2 and v["tensors"] == 7
    assert "perceptual" in weights.weights_revision(home)
    # again: already there, nothing fetched (from_dir may be gone)
    weights.download(home, from_dir=None, kinds=("perceptual",))
    # a changed file fails verification
    (home / "perceptual" / lin_name).write_bytes(b"junk")
    assert not weights.verify("perceptual", home)["ok"]


def test_perceptual_refuses_wrong_hash_and_missing_file(tmp_path, monkeypatch):
    vgg_name, lin_name = _fake_perceptual(tmp_path / "src", monkeypatch)
    torch.save({"x": torch.zeros(1)}, tmp_path / "src" / lin_name)   # not the published file
    with pytest.raises(WeightsError, match="sha256"):
        weights.download(tmp_path / "home", from_dir=tmp_path / "src", kinds=("perceptual",))
    (tmp_path / "src" / lin_name).unlink()
    with pytest.raises(WeightsError, match="does not exist"):
        weights.download(tmp_path / "home", from_dir=tmp_path / "src", kinds=("perceptual",))
    assert weights.find_weights("perceptual", tmp_path / "home") is None


def test_perceptual_uses_installed_lpips_then_urls(tmp_path, monkeypatch):
    vgg_name, lin_name = _fake_perceptual(tmp_path / "src", monkeypatch)
    monkeypatch.setattr(weights, "_installed_lpips_vgg", lambda: tmp_path / "src" / lin_name)
    fetched = []

    def fake_fetch(url, dst, digest):
        fetched.append(url)
        dst.write_bytes((tmp_path / "src" / dst.name).read_bytes())
        return dst

    monkeypatch.setattr(weights, "_fetch_url", fake_fetch)
    weights.download(tmp_path / "home", kinds=("perceptual",))
    assert fetched == [weights.PERCEPTUAL_FILES[vgg_name][0]]   # LPIPS came from the installed package
    assert weights.find_weights("perceptual", tmp_path / "home") is not None
