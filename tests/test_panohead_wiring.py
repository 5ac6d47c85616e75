"""recon.api wiring of the PanoHead inversion (DESIGN §6-7): which 3D-aware noise reaches the
360 model, the inversion's ring renders and coarse geometry, the geometry through ViewSet
save/load into the fit. The diffusion model itself is replaced by a recorder."""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from recon import api, cameras
from recon.config import FitConfig, ViewsConfig
from recon.errors import MissingError
from recon.types import Portrait, ViewSet
from tests.conftest import FIXTURES

TINY_PKL = FIXTURES / "panohead" / "tiny" / "G_ema_tiny.pkl"
WIDTHS = (4, 8, 8, 8, 8)  # narrow perceptual net: same layout as VGG16, tiny files


def _portrait() -> Portrait:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    return Portrait(image=img, alpha=np.full((512, 512), 255, np.uint8),
                    c2w=cameras.lookat_cam2world(math.pi / 2, math.pi / 2), K=cameras.INTRINSICS_NORM.copy(),
                    yaw_deg=0.0, pitch_deg=0.0, roll_deg=0.0, landmarks=np.zeros((0, 2)), crop_from_source=np.eye(3))


@pytest.fixture()
def recorder(monkeypatch):
    """diffusion_views replaced by a recorder that returns a ViewSet of the right shape."""
    import recon.diffusion.stage as stage

    seen = {}

    def fake(portrait, back, cfg, rt, *, condition_images=None, noise_renders=None, progress=None):
        seen.update(cfg=cfg, condition_images=condition_images, noise_renders=noise_renders)
        n, r = cfg.num_views, cfg.resolution
        c2w = cameras.ring_cam2world(n, cameras.elevation_to_v(cfg.elevation))
        return ViewSet(np.zeros((n, r, r, 4), np.uint8), c2w, np.repeat(cameras.INTRINSICS_NORM[None], n, 0),
                       [f"view_{i:03d}.png" for i in range(n)], backend="diffusion", meta={"model": "fake"})

    monkeypatch.setattr(stage, "diffusion_views", fake)
    return seen


@pytest.fixture(scope="module")
def panohead_home(tmp_path_factory):
    """A weights home holding the tiny PanoHead fixture converted as `weights download` would."""
    from recon import weights

    assert TINY_PKL.exists(), f"missing PanoHead fixture {TINY_PKL}"
    home = tmp_path_factory.mktemp("weights")
    weights.convert("panohead", TINY_PKL, home / "panohead")
    assert weights.find_weights("panohead", home) is not None
    return home


def _cfg(home, **kw) -> ViewsConfig:
    # condition_dir set: no PanoHead condition ring (its 512^2 SR render is slow on CPU)
    return ViewsConfig(num_views=3, resolution=32, weights_dir=str(home), condition_dir="unused", **kw)


class _FakeHead:
    def __init__(self):
        self.calls = 0

    def render(self, c2w, K, w, h):
        self.calls += 1
        return np.full((len(c2w), h, w, 4), 7, np.uint8), np.zeros((len(c2w), h, w), np.float32)


def test_auto_without_panohead_uses_the_proxy(tmp_path, recorder, monkeypatch):
    head = _FakeHead()
    monkeypatch.setattr(api, "_proxy_head", lambda portrait, cfg, progress=None: head)
    vs = api.views(_portrait(), None, _cfg(tmp_path), backend="diffusion", device="cpu")
    assert head.calls == 1 and recorder["noise_renders"].shape == (3, 32, 32, 4)
    assert np.all(recorder["noise_renders"] == 7)
    assert vs.meta["noise_source"] == "proxy" and "inversion" not in vs.meta and vs.init_points is None
    # noise=none: no renders at all
    vs = api.views(_portrait(), None, _cfg(tmp_path, noise="none"), backend="diffusion", device="cpu")
    assert recorder["noise_renders"] is None and vs.meta["noise_source"] == "none" and head.calls == 1


def test_panohead_noise_without_weights_is_a_missing_error(tmp_path, recorder, monkeypatch):
    monkeypatch.setattr(api, "_proxy_head", lambda *a, **k: pytest.fail("fell back to the proxy"))
    with pytest.raises(MissingError) as e:
        api.views(_portrait(), None, _cfg(tmp_path, noise="panohead"), backend="diffusion", device="cpu")
    assert e.value.exit_code == 4 and "weights download" in e.value.hint and str(tmp_path) in e.value.message
    assert not recorder
    from recon.errors import UsageError

    with pytest.raises(UsageError, match="views.noise"):
        api.views(_portrait(), None, _cfg(tmp_path, noise="panohed"), backend="diffusion", device="cpu")


def test_inversion_noise_geometry_and_fit(panohead_home, tmp_path, recorder, monkeypatch):
    """noise=auto with PanoHead weights: the inversion's RGBA ring reaches diffusion_views,
    its coarse geometry rides on the ViewSet through save/load into fit_splats."""
    from recon.panohead import invert, perceptual

    monkeypatch.setattr(api, "_proxy_head", lambda *a, **k: pytest.fail("proxy used despite PanoHead weights"))
    # CPU-cheap inversion: neural-resolution target (no 512^2 SR), few w samples; the step
    # counts must still come from the ViewsConfig.
    made = []
    real_cfg = invert.InversionConfig

    def cheap_cfg(**kw):
        made.append(kw)
        return real_cfg(**{**kw, "target": "image_raw", "w_avg_samples": 64})

    monkeypatch.setattr(invert, "InversionConfig", cheap_cfg)
    # Perceptual weights present in the home (narrow net with the torchvision / LPIPS key layout).
    from recon import weights

    monkeypatch.setattr(perceptual, "PerceptualLoss", functools.partial(perceptual.PerceptualLoss, widths=WIDTHS,
                                                                         resize_to=None))
    _write_perceptual(panohead_home / "perceptual", WIDTHS)
    assert weights.perceptual_paths(panohead_home) is not None
    loaded = []
    real_load = perceptual.load_perceptual_weights
    monkeypatch.setattr(perceptual, "load_perceptual_weights", lambda *a: loaded.append(a[1:]) or real_load(*a))

    vs = api.views(_portrait(), None, _cfg(panohead_home, inversion_steps=2, inversion_finetune_steps=1),
                   backend="diffusion", device="cpu")
    assert made == [{"w_steps": 2, "finetune_steps": 1, "seed": 0}]
    assert loaded and loaded[0] == weights.perceptual_paths(panohead_home)
    noise = recorder["noise_renders"]
    assert noise.shape == (3, 32, 32, 4) and noise.dtype == np.uint8  # tiny PanoHead neural res 32, ring N = 3
    assert noise[..., :3].std() > 0 and len(np.unique(noise[..., 3])) > 1
    assert vs.meta["noise_source"] == "panohead"
    inv = vs.meta["inversion"]
    assert inv["w_steps"] == 2 and inv["finetune_steps"] == 1 and inv["perceptual"] and math.isfinite(inv["loss"])
    assert not any("pixel (MSE) loss only" in n for n in inv["notes"])
    assert vs.init_points is not None, inv["notes"]
    pts = vs.init_points
    assert pts.ndim == 2 and pts.shape[1] == 3 and len(pts) > 0 and pts.dtype == np.float32
    assert np.all(np.abs(pts) <= 0.5 + 1e-5)  # inside PanoHead's tri-grid box (box_warp 1)

    # ViewSet round trip
    vs.save(tmp_path / "views")
    assert (tmp_path / "views" / "init_points.npy").is_file()
    back = ViewSet.load(tmp_path / "views")
    assert np.array_equal(back.init_points, pts) and back.meta["noise_source"] == "panohead"
    assert np.array_equal(back.subset([0, 1]).init_points, pts)

    # fit receives them (subsampled, seeded, to fit.num_init when there are more)
    import recon.fit.splat as splat

    got = {}
    monkeypatch.setattr(splat, "fit_splats", lambda views, cfg, **kw: got.update(kw) or ("scene", {}))
    api.fit(back, FitConfig(steps=1), device="cpu")
    assert np.array_equal(got["init_points"], pts)
    n = max(1, len(pts) // 2)
    api.fit(back, FitConfig(steps=1, num_init=n), device="cpu")
    sub = got["init_points"]
    assert sub.shape == (n, 3) and all(any(np.array_equal(p, q) for q in pts) for p in sub[:5])
    api.fit(dataclasses.replace(back, init_points=None), FitConfig(steps=1), device="cpu")
    assert got["init_points"] is None


def _write_perceptual(folder, widths):
    from recon import weights
    from recon.panohead.perceptual import PerceptualLoss

    folder.mkdir(parents=True, exist_ok=True)
    net = PerceptualLoss(widths=widths, resize_to=None)
    torch.manual_seed(0)
    vgg = {f"features.{i}.{p}": torch.randn_like(t) * 0.1 for i, m in enumerate(net.features)
           if isinstance(m, torch.nn.Conv2d) for p, t in (("weight", m.weight), ("bias", m.bias))}
    lin = {f"lin{k}.model.1.weight": torch.rand_like(l.weight) for k, l in enumerate(net.lins)}
    vgg_name, lin_name = weights.PERCEPTUAL_FILES
    torch.save(vgg, folder / vgg_name)
    torch.save(lin, folder / lin_name)


def test_viewset_init_points_validation():
    n = 2
    kw = dict(images=np.zeros((n, 4, 4, 4), np.uint8), c2w=np.repeat(np.eye(4)[None], n, 0),
              K=np.repeat(np.eye(3)[None], n, 0), names=["a.png", "b.png"])
    from recon.errors import InputError

    with pytest.raises(InputError):
        ViewSet(**kw, init_points=np.zeros((5, 2)))
    with pytest.raises(InputError):
        ViewSet(**kw, init_points=np.full((5, 3), np.nan))
    assert ViewSet(**kw, init_points=np.zeros((5, 3), np.float64)).init_points.dtype == np.float32
