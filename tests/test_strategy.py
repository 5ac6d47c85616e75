"""The densification strategies: gsplat's MCMCStrategy (the CUDA path) drives our
SplatModel exactly like our torch relocation does. gsplat's two CUDA ops are
replaced here by their pure-torch forms so the wiring is tested on a CPU."""
import pytest
import torch

from recon.errors import UsageError
from recon.fit import splat as S
from recon.fit.strategy import GsplatMCMC, RefineSchedule, TorchMCMC, make_strategy, resolve_strategy


@pytest.fixture
def torch_ops(monkeypatch):
    """gsplat.strategy.ops with its CUDA kernels swapped for torch implementations."""
    import gsplat.strategy.ops as ops
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci

    def compute_relocation(opacities, scales, ratios, binoms):
        return S.relocation_correction(opacities, scales, ratios, n_max=binoms.shape[0])

    def covar(quats, scales, compute_covar=True, compute_preci=True, triu=False):
        return _quat_scale_to_covar_preci(quats, scales, compute_covar, compute_preci, triu)

    monkeypatch.setattr(ops, "compute_relocation", compute_relocation)
    monkeypatch.setattr(ops, "quat_scale_to_covar_preci", covar)


def model(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"means": torch.randn(n, 3, generator=g) * 0.1, "quats": torch.randn(n, 4, generator=g),
              "scales": torch.full((n, 3), -4.0), "opacities": torch.randn(n, generator=g),
              "sh0": torch.rand(n, 1, 3, generator=g), "shN": torch.zeros(n, 3, 3)}
    params["opacities"][:20] = -10.0          # dead
    lrs = {k: 1e-3 for k in S.PARAM_NAMES}
    return S.SplatModel(params, lrs, torch.device("cpu"))


def one_adam_step(m):
    m.zero_grad()
    loss = sum((p ** 2).sum() for p in m.params.values())
    loss.backward()
    m.step(1e-3)


@pytest.mark.parametrize("kind", ["torch", "gsplat"])
def test_strategies_relocate_dead_and_grow_5_percent(kind, torch_ops):
    torch.manual_seed(0)
    m = model()
    one_adam_step(m)
    sched = RefineSchedule(every=10, start=10, stop=100)
    strat = TorchMCMC(1000, sched, torch.Generator().manual_seed(0)) if kind == "torch" else GsplatMCMC(1000, sched)
    oob = torch.zeros(m.n, dtype=torch.bool)
    oob[100] = True                             # a live Gaussian that left the head's bounds
    m.params["means"].data[100] = 5.0
    assert strat.step(m, 9, 1e-4, oob) == (0, 0)        # not due: nothing relocated or added
    relocated, grown = strat.step(m, 10, 1e-4, oob)
    assert relocated == 21 and grown == 10 and m.n == 210
    assert (torch.sigmoid(m.params["opacities"]) > 0.004).all()
    assert m.params["means"].abs().max() < 1.0           # the escaped one was moved onto a live one
    for k in S.PARAM_NAMES:                              # optimiser state follows the resized tensors
        p = m.params[k]
        assert m.opt[k].param_groups[0]["params"][0] is p and m.opt[k].state[p]["exp_avg"].shape == p.shape
    one_adam_step(m)                                     # and the model still trains
    assert all(torch.isfinite(p).all() for p in m.params.values())


def test_growth_respects_the_cap(torch_ops):
    m = model(n=100)
    strat = GsplatMCMC(102, RefineSchedule(every=5, start=5, stop=50))
    strat.step(m, 5, 1e-4)
    assert m.n == 102


def test_resolve_strategy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_strategy("auto", cpu) == "torch-mcmc" and resolve_strategy("auto", cuda) == "gsplat-mcmc"
    with pytest.raises(UsageError, match="needs a CUDA device"):
        resolve_strategy("gsplat-mcmc", cpu)
    with pytest.raises(UsageError, match="unknown fit.strategy"):
        resolve_strategy("default", cpu)
    with pytest.raises(UsageError):
        make_strategy("x", 10, RefineSchedule.for_steps(100), torch.Generator())


def test_schedule_matches_the_fit_loop():
    s = RefineSchedule.for_steps(600)
    assert (s.every, s.start, s.stop) == (50, 60, 480)
    assert [d for d in range(1, 601) if s.due(d)] == list(range(100, 480, 50))


def test_fit_splats_runs_gsplat_mcmc(torch_ops, monkeypatch):
    """The CUDA path's strategy inside the real fit loop (rasterizer and ops on CPU):
    floaters outside the hull are relocated and the count grows, as with torch-mcmc."""
    import numpy as np

    from recon.fit.splat import fit_splats, outside_hull, prepare_views, visual_hull
    from tests.test_fit import RADIUS, sphere_views, tiny_cfg

    monkeypatch.setattr(S, "resolve_strategy", lambda requested, device: "gsplat-mcmc")
    torch.manual_seed(0)
    views = sphere_views(n=6, res=24)
    rng = np.random.default_rng(1)
    d = rng.normal(size=(40, 3))
    pts = np.concatenate([rng.normal(size=(250, 3)) * RADIUS * 0.4,
                          d / np.linalg.norm(d, axis=1, keepdims=True) * RADIUS * 2.2]).astype(np.float32)
    cfg = tiny_cfg(steps=30, holdout_every=0)
    scene, m = fit_splats(views, cfg, init_points=pts)
    assert m["strategy"] == "gsplat-mcmc" and m["grown"] > 0 and m["num_gaussians"] == 290 + m["grown"]
    assert m["pruned_outside"] >= 40 and m["train_psnr"] > m["init_psnr"]
    data = prepare_views(views, cfg.resolution)
    assert not outside_hull(scene.params["means"], *visual_hull(data["mask"], data["viewmats"], data["Ks"])).any()
