"""The diffusion `backview` / `views` stages on the fixtures' tiny checkpoints, converted
with recon.weights into a temporary weights home."""
import numpy as np
import pytest
import torch

from recon import cameras
from recon.config import ViewsConfig
from recon.diffusion import stage
from recon.errors import InputError, MissingError, UsageError, WeightsError
from recon.imageio_safe import write_png
from recon.runtime import Runtime
from recon.types import BackView, Portrait, ViewSet
from tests.conftest import FIXTURES

S = 128  # model image side of the tiny fixtures (latent 16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from recon.weights import convert

    h = tmp_path_factory.mktemp("weights")
    for name, kind in (("tiny360", "dp360"), ("tinyback", "backhead")):
        src = FIXTURES / "dp360" / name / "model_state.th"
        assert src.is_file(), f"fixture {src} is missing"
        convert(kind, src, h / kind, dtype="fp32", config=FIXTURES / "dp360" / name / "config.json")
    yield h
    stage.clear_cache()


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    d = tmp_path_factory.mktemp("cond") / "sphere32"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        write_png(d / f"{i}.png", rng.integers(0, 255, (S, S, 3), dtype=np.uint8))
    return d


def _portrait():
    img = np.full((256, 256, 3), 255, np.uint8)
    img[64:192, 64:192] = (120, 90, 70)
    alpha = np.zeros((256, 256), np.uint8)
    alpha[48:208, 48:208] = 255
    return Portrait(image=img, alpha=alpha, c2w=cameras.orbit_cam2world(0.0), K=cameras.INTRINSICS_NORM,
                    yaw_deg=0.0, pitch_deg=0.0, roll_deg=0.0, landmarks=np.zeros((0, 2)),
                    crop_from_source=np.eye(3))


def _cfg(home, ring, **kw):
    base = dict(backend="diffusion", num_views=4, resolution=128, steps=1, weights_dir=str(home),
                condition_dir=str(ring.parent), dtype="fp32")
    return ViewsConfig(**{**base, **kw})


RT = Runtime(torch.device("cpu"), torch.float32, "test")


def test_backview_and_views_stages(home, ring):
    cfg = _cfg(home, ring)
    events = []
    back = stage.diffusion_backview(_portrait(), cfg, RT, progress=lambda i, n, m: events.append((i, n)))
    assert isinstance(back, BackView) and back.image.shape == (128, 128, 4) and back.image.dtype == np.uint8
    az, _ = cameras.azimuth_elevation_of(back.c2w)
    assert abs(abs(float(az)) - 180.0) < 1e-3                     # view 4 of the 8-view ring
    assert back.backend == "diffusion" and back.meta["alpha_source"] == "background_key"
    assert events == [(1, 1)]

    views = stage.diffusion_views(_portrait(), back, cfg, RT, condition_images=None, noise_renders=None)
    assert isinstance(views, ViewSet) and len(views) == 4 and views.images.shape == (4, 128, 128, 4)
    assert np.allclose(views.c2w, cameras.ring_cam2world(8)[::2])
    assert views.meta["noise"] == "gaussian" and views.meta["alpha_source"] == "background_key"
    assert not views.preview and views.backend == "diffusion"

    # 3D-aware noise from RGBA renders: they also give the alpha
    renders = np.zeros((4, S, S, 4), np.uint8)
    renders[:, 32:96, 32:96] = (200, 150, 120, 255)
    v3 = stage.diffusion_views(_portrait(), back, cfg, RT, condition_images=None, noise_renders=renders)
    assert v3.meta["noise"] == "3d" and v3.meta["alpha_source"] == "noise_renders"
    assert np.array_equal(v3.images[..., 3], renders[..., 3])
    assert not np.array_equal(v3.images[..., :3], views.images[..., :3])
    # same seed, same views
    again = stage.diffusion_views(_portrait(), back, cfg, RT, condition_images=None, noise_renders=None)
    assert np.array_equal(again.images, views.images)


def test_stage_errors(home, ring, tmp_path):
    p = _portrait()
    with pytest.raises(MissingError, match="condition"):
        stage.diffusion_backview(p, _cfg(home, ring, condition_dir=None), RT)
    with pytest.raises(WeightsError):
        stage.diffusion_backview(p, _cfg(tmp_path, ring), RT)
    back = BackView(np.zeros((S, S, 4), np.uint8), cameras.orbit_cam2world(180.0), cameras.INTRINSICS_NORM)
    with pytest.raises(UsageError, match="8 views"):
        stage.diffusion_views(p, back, _cfg(home, ring, num_views=3), RT)
    with pytest.raises(InputError):
        stage.diffusion_views(p, back, _cfg(home, ring), RT, condition_images=np.zeros((2, S, S, 3), np.uint8))
    with pytest.raises(InputError):
        stage.load_condition_ring(tmp_path / "nope")


def test_condition_ring_with_dataset_json(tmp_path):
    d = tmp_path / "ring"
    d.mkdir()
    c2w = cameras.orbit_cam2world(np.array([10.0, 100.0, 190.0, 280.0]), 5.0)
    entries = []
    for i in range(4):
        write_png(d / f"cam_{i}.png", np.full((16, 16, 3), 40 * i, np.uint8))
        entries.append((f"cam_{i}.png", cameras.label25(c2w[i])))
    cameras.write_dataset_json(d / "dataset.json", entries)
    imgs, got, K, source = stage.load_condition_ring(d)
    assert source == "dataset.json" and imgs.shape == (4, 16, 16, 3) and np.allclose(got, c2w)
    assert stage._back_index(got) == 2
    # no dataset.json: natural name order (2 before 10)
    e = tmp_path / "plain"
    e.mkdir()
    for i in (10, 2, 1, 0):
        write_png(e / f"v{i}.png", np.full((8, 8, 3), i, np.uint8))
    imgs, got, _, source = stage.load_condition_ring(e)
    assert [int(im[0, 0, 0]) for im in imgs] == [0, 1, 2, 10] and "assumed" in source


def test_background_key_alpha_keeps_white_inside_the_head():
    img = np.full((64, 64, 3), 250, np.uint8)
    yy, xx = np.mgrid[:64, :64]
    head = (yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2
    img[head] = (90, 70, 60)
    img[30:34, 30:34] = 252                                          # a white highlight inside
    a = stage.background_key_alpha(img)
    assert a[0, 0] == 0 and a[63, 63] == 0 and a[32, 32] == 255 and a[32, 20] == 255
