"""Window planning and windowed CFG eps, against a small deterministic fake denoiser
(frames mix inside a window, and depend on their position in it, like the real
view-consistency module with its frame positional encoding)."""
import pytest
import torch

from recon.diffusion.scheduling import guided_eps
from recon.diffusion.windows import plan_windows, position_weights, windowed_eps
from recon.errors import UsageError


class FakeDenoiser:
    def __init__(self):
        self.calls = []

    def reference_banks(self, ref_latent, t, context, back_latent):
        s = ref_latent.mean() + (0 if back_latent is None else 0.5 * back_latent.mean())
        return {"s": s}

    def eps(self, x_t, t, context, *, bank, cam_images, num_frames=None):
        f = num_frames or x_t.shape[0]
        self.calls.append((x_t.shape[0], bank is not None, cam_images is not None))
        b = x_t.shape[0] // f
        x = x_t.reshape(b, f, *x_t.shape[1:])
        pos = torch.arange(f, dtype=x.dtype).view(1, f, 1, 1, 1) / 10.0
        e = torch.tanh(x * (t / 1000.0) + pos) + 0.3 * x.mean(dim=1, keepdim=True) + 0.1 * x.roll(1, dims=1)
        if bank is not None:
            e = e + bank["s"]
        if cam_images is not None:
            c = cam_images.reshape(b, f, *cam_images.shape[1:]).mean(dim=(2, 3, 4))
            e = e + 0.2 * c.view(b, f, 1, 1, 1)
        return (e + context.mean()).reshape(x_t.shape)


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 4, 4, generator=g)
    cams = torch.randn(n, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 8, generator=g)
    return x, cams, ctx


def _eps(den, x, cams, ctx, plan, **kw):
    bank = den.reference_banks(torch.ones(1, 4, 4, 4), 501, ctx, torch.zeros(1, 4, 4, 4))
    return windowed_eps(den, x, 501, ctx, bank=bank, cam_images=cams, plan=plan, guidance=3.0, **kw)


def test_plan_circular_covers_every_view_twice_and_wraps():
    p = plan_windows(36, 8, 4, "circular")
    assert len(p.windows) == 9 and all(len(w) == 8 for w in p.windows)
    assert p.windows[-1] == (32, 33, 34, 35, 0, 1, 2, 3)           # view 35 is next to view 0
    counts = torch.zeros(36)
    for w in p.windows:
        counts[list(w)] += 1
    assert torch.all(counts == 2)
    # uneven count: starts spread evenly, every view covered
    p = plan_windows(30, 8, 4, "circular")
    assert torch.all(p.coverage() > 0)


def test_plan_single_and_independent_and_errors():
    assert plan_windows(8, 8, 4, "circular").windows == (tuple(range(8)),)
    assert plan_windows(5, 8, 4, "circular").windows == (tuple(range(5)),)
    assert plan_windows(16, 8, 4, "independent").windows == (tuple(range(8)), tuple(range(8, 16)))
    with pytest.raises(UsageError):
        plan_windows(12, 8, 4, "independent")
    with pytest.raises(UsageError):
        plan_windows(16, 8, 9, "circular")
    with pytest.raises(UsageError):
        plan_windows(16, 8, 4, "sliding")
    w = position_weights(8, "cosine")
    assert torch.allclose(w, w.flip(0)) and w.min() > 0 and w[3] > w[0]


def test_circular_equals_single_window_when_n_is_8():
    den = FakeDenoiser()
    x, cams, ctx = _inputs(8)
    got = _eps(den, x, cams, ctx, plan_windows(8, 8, 4, "circular"))
    bank = den.reference_banks(torch.ones(1, 4, 4, 4), 501, ctx, torch.zeros(1, 4, 4, 4))
    ref = guided_eps(den.eps(x, 501, ctx, bank=bank, cam_images=cams), den.eps(x, 501, ctx, bank=None, cam_images=None), 3.0)
    assert torch.allclose(got, ref, atol=1e-6)


def test_uncond_pass_has_no_bank_and_no_controlnet():
    den = FakeDenoiser()
    x, cams, ctx = _inputs(16)
    _eps(den, x, cams, ctx, plan_windows(16, 8, 4, "circular"), max_frames_per_batch=16)
    assert den.calls and all(has_bank == has_cam for _, has_bank, has_cam in den.calls)
    assert sum(1 for _, b, _ in den.calls if not b) == sum(1 for _, b, _ in den.calls if b)
    assert max(n for n, _, _ in den.calls) == 16


@pytest.mark.parametrize("weighting", ["cosine", "equal"])
def test_circular_is_invariant_to_ring_start(weighting):
    den = FakeDenoiser()
    x, cams, ctx = _inputs(16)
    plan = plan_windows(16, 8, 4, "circular", weighting)
    base = _eps(den, x, cams, ctx, plan)
    for k in (4, 8, 12):
        rolled = _eps(den, x.roll(k, 0), cams.roll(k, 0), ctx, plan)
        assert torch.allclose(rolled, base.roll(k, 0), atol=1e-6)


def test_independent_equals_separate_windows_and_batching_is_invisible():
    den = FakeDenoiser()
    x, cams, ctx = _inputs(16)
    plan = plan_windows(16, 8, 4, "independent")
    whole = _eps(den, x, cams, ctx, plan, max_frames_per_batch=16)
    single = plan_windows(8, 8, 4, "circular")
    parts = torch.cat([_eps(den, x[:8], cams[:8], ctx, single), _eps(den, x[8:], cams[8:], ctx, single)])
    assert torch.allclose(whole, parts, atol=1e-6)
    assert torch.allclose(_eps(den, x, cams, ctx, plan, max_frames_per_batch=8), whole, atol=1e-6)
    circ = plan_windows(16, 8, 4, "circular")
    assert torch.allclose(_eps(den, x, cams, ctx, circ, max_frames_per_batch=8),
                          _eps(den, x, cams, ctx, circ, max_frames_per_batch=64), atol=1e-6)
    # overlapping windows really change the prediction (no seams at 7|8 and 15|0)
    assert not torch.allclose(_eps(den, x, cams, ctx, circ), whole, atol=1e-3)


def test_denoiser_without_num_frames_gets_one_window_per_call():
    class OneVideo(FakeDenoiser):
        def eps(self, x_t, t, context, *, bank, cam_images):   # a batch is one video
            return super().eps(x_t, t, context, bank=bank, cam_images=cam_images)

    den, ref = OneVideo(), FakeDenoiser()
    x, cams, ctx = _inputs(16)
    plan = plan_windows(16, 8, 4, "circular")
    got = _eps(den, x, cams, ctx, plan, max_frames_per_batch=64)
    assert max(n for n, _, _ in den.calls) == 8
    assert torch.allclose(got, _eps(ref, x, cams, ctx, plan, max_frames_per_batch=64), atol=1e-6)
