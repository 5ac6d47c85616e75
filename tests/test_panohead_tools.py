"""recon.panohead conversion, condition rings, inversion and perceptual net on tiny
generators (the golden-data parity lives in tests/parity/test_panohead_*.py)."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from recon.errors import StageError, UsageError, WeightsError
from tests.conftest import FIXTURES

PH = FIXTURES / "panohead"
TINY_PKL = PH / "tiny" / "G_ema_tiny.pkl"


def _need(path):
    assert path.exists(), f"missing PanoHead fixture {path}"
    return path


@pytest.fixture(scope="module")
def small_G():
    """A generator small enough to optimise on CPU (random weights; SR is never run)."""
    from recon.panohead.generator import PanoHeadConfig, PanoHeadGenerator
    torch.manual_seed(0)
    cfg = PanoHeadConfig(z_dim=16, channel_base=256, channel_max=8, triplane_size=32,
                         neural_rendering_resolution=16, depth_resolution=8, depth_resolution_importance=8)
    return PanoHeadGenerator(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_G():
    from recon.panohead.generator import PanoHeadGenerator
    return PanoHeadGenerator.from_snapshot(_need(TINY_PKL))


# ------------------------------------------------------------------------ convert
def test_convert_and_load(tmp_path, tiny_G):
    from recon.panohead.convert import convert_checkpoint, load_generator, sha256_file, weights_id
    steps = []
    info = convert_checkpoint(_need(TINY_PKL), tmp_path / "ph", progress=lambda i, n, m: steps.append((i, n)))
    assert (tmp_path / "ph" / "generator.safetensors").is_file() and (tmp_path / "ph" / "config.json").is_file()
    assert steps[-1] == (4, 4)
    assert info["source"]["sha256"] == sha256_file(TINY_PKL)
    assert info["weights_sha256"] == sha256_file(tmp_path / "ph" / "generator.safetensors")
    assert json.loads((tmp_path / "ph" / "config.json").read_text())["config"]["neural_rendering_resolution"] == 32
    G = load_generator(tmp_path / "ph")
    assert G.config == tiny_G.config and not G.training
    a, b = G.state_dict(), tiny_G.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert weights_id(G) == info["weights_sha256"]
    assert len(weights_id(tiny_G)) == 64  # in-memory model: hash of the tensors


def test_convert_refuses_malicious_pickle(tmp_path):
    from recon.panohead.convert import convert_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    src = tmp_path / "evil.pkl"
    src.write_bytes(pickle.dumps({"G_ema": Evil()}, protocol=4))
    with pytest.raises(WeightsError, match="it references"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out" / "generator.safetensors").exists()


def test_load_generator_rejects_bad_folder(tmp_path):
    from recon.panohead.convert import load_generator
    with pytest.raises(WeightsError, match="not a converted PanoHead folder"):
        load_generator(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "generator.safetensors").write_bytes(b"junk")
    with pytest.raises(WeightsError):
        load_generator(tmp_path)


# -------------------------------------------------------------------------- rings
def test_ring_labels_match_official_ring36():
    from recon.panohead.rings import frontal_label, ring_labels
    cams = json.loads(_need(PH / "cameras.json").read_text())
    labels = ring_labels(36, 0.0)
    want = np.array([e["label25"] for e in cams["ring36"]], dtype=np.float32)
    assert labels.shape == (36, 25) and np.abs(labels - want).max() < 1e-6
    assert np.abs(frontal_label() - want[0]).max() < 1e-6
    assert labels[18, 11] < -2.6  # view N/2 is the back: camera at z = -2.7
    up = ring_labels(4, [10, 20, 30, 40])
    assert np.all(np.diff(up[:, 7]) > 0)  # camera height grows with elevation
    dp = np.array([e["label25"] for e in cams["dp360_ring32_3p14"]], dtype=np.float32)
    assert np.abs(ring_labels(32, 0.0, pi=3.14) - dp).max() < 1e-6
    with pytest.raises(UsageError):
        ring_labels(4, [0, 10])
    with pytest.raises(UsageError):
        ring_labels(0)


def test_condition_ring_raw_batching_and_cache(small_G, tmp_path, monkeypatch):
    from recon.panohead import rings
    a = rings.render_condition_ring(small_G, 4, 5.0, cache_dir=tmp_path, output="image_raw", batch=1)
    assert a.shape == (4, 16, 16, 3) and a.dtype == np.uint8
    assert len(list(tmp_path.glob("ring_*.npy"))) == 1
    # Views differ, and batching does not change a view (per-view generators).
    assert not np.array_equal(a[0], a[2])
    b = rings.render_ring(small_G, rings.identity_ws(small_G, 0), rings.ring_labels(4, 5.0), output="image_raw", batch=4)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # A second call is served from the cache without rendering.
    monkeypatch.setattr(rings, "render_ring", lambda *a, **k: pytest.fail("rendered despite the cache"))
    c = rings.render_condition_ring(small_G, 4, 5.0, cache_dir=tmp_path, output="image_raw")
    assert np.array_equal(a, c)
    monkeypatch.undo()
    d = rings.render_condition_ring(small_G, 4, 5.0, seed=1, cache_dir=tmp_path, output="image_raw")
    assert not np.array_equal(a, d) and len(list(tmp_path.glob("ring_*.npy"))) == 2


def test_condition_ring_512_tiny(tiny_G):
    """The real output: the SR image at 512^2 (one view of the fixture generator: the SR
    network is full size even in the tiny model)."""
    from recon.panohead import rings
    arr = rings.render_condition_ring(tiny_G, 1, 0.0)
    assert arr.shape == (1, 512, 512, 3) and arr.dtype == np.uint8
    assert arr.std() > 1.0  # not a constant image


def test_config_roundtrip_and_refusals():
    from recon.panohead.generator import PanoHeadConfig
    cfg = PanoHeadConfig(z_dim=16, avg_camera_pivot=(0.0, 0.1, 0.2))
    assert PanoHeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(WeightsError, match="unknown keys"):
        PanoHeadConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    meta = json.loads(_need(PH / "tiny" / "init_kwargs.json").read_text())
    for key, value in (("superresolution_module", "training.superresolution.SuperresolutionHybrid4X"),
                       ("ray_start", "auto"), ("disparity_space_sampling", True), ("white_back", True)):
        kw = json.loads(json.dumps(meta["init_kwargs"]))
        kw["rendering_kwargs"][key] = value
        with pytest.raises(WeightsError, match="unsupported PanoHead configuration"):
            PanoHeadConfig.from_init_kwargs(kw)


def test_invert_portrait_uses_image_and_label(small_G, monkeypatch):
    from recon.panohead import invert
    from recon.types import Portrait
    seen = {}
    monkeypatch.setattr(invert, "invert", lambda G, image, label, **kw: seen.update(image=image, label=label, kw=kw))
    c2w = np.eye(4)
    c2w[2, 3] = 2.7
    K = np.array([[4.2647, 0, 0.5], [0, 4.2647, 0.5], [0, 0, 1]])
    img = np.zeros((512, 512, 3), np.uint8)
    p = Portrait(image=img, alpha=np.full((512, 512), 255, np.uint8), c2w=c2w, K=K, yaw_deg=0.0, pitch_deg=0.0,
                 roll_deg=0.0, landmarks=np.zeros((0, 2)), crop_from_source=np.eye(3))
    invert.invert_portrait(small_G, p, num_views=4)
    assert seen["image"] is img and seen["label"] == p.label and seen["kw"] == {"num_views": 4}


# ---------------------------------------------------------------------- perceptual
def test_perceptual_distance_and_weights(tmp_path):
    from recon.panohead.perceptual import PerceptualLoss, load_perceptual_weights
    torch.manual_seed(0)
    net = PerceptualLoss(widths=(4, 8, 8, 8, 8), resize_to=None)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(net(x, x), torch.zeros(2), atol=1e-7)
    d = net(x, y)
    assert d.shape == (2,) and torch.all(d > 0)
    # torchvision / LPIPS key layout round-trip, read with weights_only.
    vgg = {f"features.{i}.{p}": t.clone() + 0.01 for i, m in enumerate(net.features)
           if isinstance(m, torch.nn.Conv2d) for p, t in (("weight", m.weight), ("bias", m.bias))}
    lin = {f"lin{k}.model.1.weight": torch.rand_like(l.weight) for k, l in enumerate(net.lins)}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    net2 = load_perceptual_weights(PerceptualLoss(widths=(4, 8, 8, 8, 8), resize_to=None),
                                   tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    assert torch.equal(net2.features[0].weight, vgg["features.0.weight"])
    assert torch.equal(net2.lins[3].weight, lin["lin3.model.1.weight"])
    with pytest.raises(WeightsError):
        load_perceptual_weights(net2, tmp_path / "vgg.pth", tmp_path / "vgg.pth")


# ------------------------------------------------------------------------ inversion
def test_inversion_reduces_loss_and_renders_ring(small_G):
    from recon.panohead import invert, rings
    from recon.panohead.perceptual import PerceptualLoss
    lab = rings.frontal_label()
    with torch.no_grad():  # target: another identity seen from the front
        out = small_G.synthesis(rings.identity_ws(small_G, 5), torch.from_numpy(lab)[None],
                                generator=torch.Generator().manual_seed(0), superresolution=False)
    img = rings.to_uint8(out["image_raw"])[0]
    torch.manual_seed(0)
    net = PerceptualLoss(widths=(4, 8, 8, 8, 8), resize_to=None)
    cfg = invert.InversionConfig(w_steps=6, finetune_steps=2, w_avg_samples=500, target="image_raw", ray_start=None)
    before = {k: v.clone() for k, v in small_G.state_dict().items()}
    steps = []
    r = invert.invert(small_G, img, lab, num_views=3, config=cfg, perceptual=net, ring_output="image_raw",
                      progress=lambda i, n, m: steps.append(i))
    assert r.renders.shape == (3, 16, 16, 3) and r.renders.dtype == np.uint8
    assert r.masks.shape == (3, 16, 16) and r.masks.dtype == np.uint8
    assert r.ws.shape == (1, small_G.num_ws, 512) and len(r.w_losses) == 6 and len(r.finetune_losses) == 2
    assert steps[-1] == 9
    # The caller's generator is untouched; the fine-tuned copy moved.
    assert all(torch.equal(before[k], v) for k, v in small_G.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in r.generator.state_dict().items())
    # Deterministic pixel loss (same renderer draws) drops from the start point to the result.
    target = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    w0 = invert._w_stats(small_G, 500, "cpu")[0].repeat(1, small_G.num_ws, 1)
    cam = torch.from_numpy(r.camera)[None]
    with torch.no_grad():
        def mse(w):
            o = small_G.synthesis(w, cam, generator=torch.Generator().manual_seed(1), superresolution=False)
            return float((o["image_raw"] - target).square().mean())
        assert mse(r.ws) < 0.8 * mse(w0)
    assert r.finetune_losses[-1] <= r.finetune_losses[0]


def test_coarse_geometry(small_G):
    from recon.panohead import invert, rings
    ws = rings.identity_ws(small_G, 0)
    pts = invert.coarse_geometry(small_G, ws, resolution=20, level=0.0)
    assert pts.ndim == 2 and pts.shape[1] == 3 and len(pts) > 0 and pts.dtype == np.float32
    assert np.all(np.abs(pts[:, [0, 2]]) <= 0.4 + 1e-3) and np.all(np.abs(pts[:, 1]) <= 0.5 + 1e-6)
    with pytest.raises(StageError):
        invert.coarse_geometry(small_G, ws, resolution=8, level=1e9)
