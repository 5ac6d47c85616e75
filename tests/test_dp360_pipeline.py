"""Portrait360Pipeline / BackViewPipeline behaviour on tiny random-init models (the fixture
tiny config, built in code; latents 8x8 so every test stays small)."""
import numpy as np
import pytest
import torch

from recon.diffusion.pipeline_360 import Portrait360Pipeline
from recon.diffusion.pipeline_backview import BackViewPipeline, PromptContext
from recon.diffusion.scheduling import OfficialDDIMSchedule, make_scheduler
from recon.errors import UsageError
from tests.conftest import FIXTURES

H = 8  # latent side (images 64x64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _nets(kind):
    from recon.diffusion.models import DP360Config

    path = FIXTURES / "dp360" / ("tiny360" if kind == "dp360" else "tinyback") / "config.json"
    assert path.is_file(), f"fixture {path} is missing"
    cfg = DP360Config.from_official(path)
    torch.manual_seed(0)
    nets = {n: cfg.build(n) for n in ("unet", "appearance", "controlnet", "vae")}
    # zero-initialised layers (ControlNet zero convs, motion proj_out) would hide the conditions
    g = torch.Generator().manual_seed(1)
    for net in nets.values():
        for p in net.parameters():
            if p.ndim > 1 and p.abs().max() == 0:
                p.data = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
    ctx = PromptContext.from_tensor(torch.randn(1, 77, cfg.context_dim, generator=g))
    return dict(**nets, scheduler=make_scheduler(), text_context=ctx)


@pytest.fixture(scope="module")
def pipe360():
    p = Portrait360Pipeline(**_nets("dp360"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipeback():
    p = BackViewPipeline(**_nets("backhead"))
    p.set_progress_bar_config(disable=True)
    return p


def _inputs(n, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        condition_images=torch.rand(n, 3, 8 * H, 8 * H, generator=g) * 2 - 1,
        ref_latent=torch.randn(1, 4, H, H, generator=g),
        back_latent=torch.randn(1, 4, H, H, generator=g),
        latents=torch.randn(n, 4, H, H, generator=g),
        step_noise=torch.randn(steps, n, 4, H, H, generator=g),
        num_inference_steps=steps,
    )


def _close(a, b, tol=1e-5):
    """Equal up to float32 reduction-order noise (batch composition changes GEMM blocking)."""
    return (a - b).abs().max().item() <= tol * b.abs().max().item()


def _roll(inp, k):
    out = dict(inp)
    out["condition_images"] = inp["condition_images"].roll(k, 0)
    out["latents"] = inp["latents"].roll(k, 0)
    out["step_noise"] = inp["step_noise"].roll(k, 1)
    return out


def test_pipeline_loop_equals_hand_written_ddim_for_one_window(pipe360):
    """N = 8, circular: one window; the pipeline equals eps_cfg + the official DDIM update."""
    inp = _inputs(8)
    got = pipe360(**inp, official_schedule=True, output_type="latent").latents
    den, ctx = pipe360.denoiser, pipe360.context()
    sched = OfficialDDIMSchedule(2, eta=0.5)
    x = inp["latents"]
    for i, t in enumerate(sched.timesteps.tolist()):
        e, _, _ = den.eps_cfg(x, t, ctx, inp["ref_latent"], inp["back_latent"], inp["condition_images"], 3.0)
        x, _ = sched.step(i, e, x, inp["step_noise"][i])
    assert _close(got, x)


def test_circular_views_follow_the_ring_start(pipe360):
    # 8 views in windows of 4, stride 2: four overlapping windows, the last one wraps
    inp = _inputs(8)
    win = dict(window_mode="circular", window_size=4, window_stride=2, output_type="latent")
    base = pipe360(**inp, **win).latents
    rolled = pipe360(**_roll(inp, 2), **win).latents
    assert _close(rolled, base.roll(2, 0))
    # batching windows together changes nothing
    one = pipe360(**inp, **win, max_frames_per_batch=4).latents
    assert _close(one, base)


def test_independent_windows_equal_separate_runs(pipe360):
    inp = _inputs(8)
    win = dict(window_size=4, window_stride=2, output_type="latent")
    whole = pipe360(**inp, window_mode="independent", **win).latents
    halves = []
    for sl in (slice(0, 4), slice(4, 8)):
        part = dict(inp, condition_images=inp["condition_images"][sl], latents=inp["latents"][sl],
                    step_noise=inp["step_noise"][:, sl])
        halves.append(pipe360(**part, **win).latents)
    assert _close(whole, torch.cat(halves))
    circ = pipe360(**inp, window_mode="circular", **win).latents
    assert not _close(circ, whole, 1e-3)  # the overlap really couples the halves


def test_save_and_load_round_trip(pipe360, tmp_path):
    inp = _inputs(8, steps=1)
    before = pipe360(**inp, output_type="latent").latents
    pipe360.save_pretrained(tmp_path / "p")
    loaded = Portrait360Pipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet).__name__ == "DP360UNet" and loaded.unet.has_motion_modules
    after = loaded(**inp, output_type="latent").latents
    # same weights bit for bit; outputs equal up to float32 noise (fresh tensors, other GEMM paths)
    for name in ("unet", "appearance", "controlnet", "vae", "text_context"):
        a, b = getattr(pipe360, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert _close(after, before, 1e-6)


def test_images_in_images_out_and_seeding(pipe360):
    g = np.random.default_rng(0)
    portrait = g.integers(0, 255, (8 * H, 8 * H, 3), dtype=np.uint8)
    back = g.integers(0, 255, (8 * H, 8 * H, 3), dtype=np.uint8)
    cams = g.integers(0, 255, (4, 8 * H, 8 * H, 3), dtype=np.uint8)
    renders = g.integers(0, 255, (4, 8 * H, 8 * H, 3), dtype=np.uint8)
    events = []
    kw = dict(num_inference_steps=2, progress=lambda i, n, m: events.append((i, n)))
    a = pipe360(portrait, back, cams, renders, generator=torch.Generator().manual_seed(3), **kw)
    b = pipe360(portrait, back, cams, renders, generator=torch.Generator().manual_seed(3), **kw)
    c = pipe360(portrait, back, cams, renders, generator=torch.Generator().manual_seed(4), **kw)
    assert a.images.shape == (4, 8 * H, 8 * H, 3) and a.images.dtype == np.float32
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0
    assert np.array_equal(a.images, b.images) and not np.allclose(a.images, c.images)
    assert events[:2] == [(1, 2), (2, 2)]
    mode = pipe360(portrait, back, cams, renders, generator=torch.Generator().manual_seed(3),
                   reference_latent="mode", **kw)
    assert not np.allclose(mode.images, a.images)
    with pytest.raises(UsageError):
        pipe360(portrait, back, cams[:3], renders, **kw)  # renders and cameras disagree


def test_backview_pipeline_and_callbacks(pipeback):
    # 16x16 latents: at 8x8 the deepest level is 1x1 and GroupNorm(32 groups) of one frame is undefined
    hb = 16
    g = np.random.default_rng(1)
    portrait = g.integers(0, 255, (8 * hb, 8 * hb, 3), dtype=np.uint8)
    cam = g.integers(0, 255, (1, 8 * hb, 8 * hb, 3), dtype=np.uint8)
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, t, tuple(kw["pred_x0"].shape)))
        return {}

    out = pipeback(portrait, cam, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents", "pred_x0"])
    assert out.images.shape == (1, 8 * hb, 8 * hb, 3)
    assert seen == [(0, 501, (1, 4, hb, hb)), (1, 1, (1, 4, hb, hb))]
    # a non-DDIM diffusers scheduler is selectable
    from recon.diffusion.scheduling import make_scheduler as ms

    pipeback.scheduler = ms("EulerAncestralDiscreteScheduler")
    try:
        out2 = pipeback(portrait, cam, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
        assert np.isfinite(out2.images).all()
    finally:
        pipeback.scheduler = ms()
    with pytest.raises(UsageError):
        pipeback(portrait, cam, num_inference_steps=3, official_schedule=True)


def test_low_memory_on_cpu(pipeback):
    msg = pipeback.enable_low_memory("cpu")
    try:
        assert "frame batch 8" in msg and pipeback.max_frames_per_batch == 8
    finally:
        pipeback.max_frames_per_batch = 32
        pipeback._low_memory = False


def test_bf16_weights_keep_fp32_latents():
    p = BackViewPipeline(**_nets("backhead")).to(dtype=torch.bfloat16)
    p.set_progress_bar_config(disable=True)
    assert p.model_dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    out = p(torch.rand(1, 3, 128, 128, generator=g) * 2 - 1, torch.rand(1, 3, 128, 128, generator=g) * 2 - 1,
            num_inference_steps=1, generator=g, output_type="pt")
    assert out.latents.dtype == torch.float32 and out.images.dtype == torch.float32
    assert torch.isfinite(out.images).all()
