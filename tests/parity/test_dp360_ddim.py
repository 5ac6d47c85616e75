"""DDIM parity with the official DiffPortrait360 sampler (fixtures: ../shared/fixtures/dp360,
README §3.3-3.5). Missing fixtures are a failure, not a skip."""
import pytest
import torch

from recon.diffusion.scheduling import (OfficialDDIMSchedule, guided_eps, make_sampling, official_buffers,
                                        official_ddim_timesteps, q_sample)
from recon.errors import UsageError
from tests.conftest import FIXTURES

DP360 = FIXTURES / "dp360"
NAMES = ("tiny360", "tinyback")
COEFS = ("a_t", "a_prev", "sigma_t", "sqrt_one_minus_at")


pytestmark = pytest.mark.usefixtures("one_thread")


def _io(name):
    from safetensors.torch import load_file

    path = DP360 / name / "io.safetensors"
    assert path.is_file(), f"fixture {path} is missing (set P3D_FIXTURES)"
    return load_file(str(path))


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("name", NAMES)
def test_official_schedule_equals_recorded_coefficients(name):
    io = _io(name)
    buf = official_buffers()
    for k in ("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        assert torch.equal(buf[k], io[f"schedule_{k}_fp16_buffer"]), k
    for steps, prefix, tkey in ((4, "ddim_coef_", "ddim_timesteps"), (50, "schedule50_coef_", "schedule50_timesteps_step_order")):
        s = OfficialDDIMSchedule(steps, eta=0.5)
        assert torch.equal(s.timesteps, io[tkey])
        for c in COEFS:
            assert torch.equal(getattr(s, c), io[prefix + c]), (steps, c)
    # diffusers' DDIMScheduler with the official settings has the same timesteps
    for steps, tkey in ((4, "ddim_timesteps"), (50, "schedule50_timesteps_step_order")):
        assert torch.equal(make_sampling(None, steps, 0.5).timesteps, io[tkey])


def test_official_step_counts_that_crash_upstream_are_refused():
    with pytest.raises(UsageError):
        official_ddim_timesteps(3)
    assert official_ddim_timesteps(50)[-1] == 981


def test_q_sample_constants_and_fixture():
    x0, n = torch.ones(1), torch.zeros(1)
    assert q_sample(x0, n).item() == 0.0682373046875
    assert q_sample(n, x0).item() == 0.99755859375
    io = _io("tiny360")
    assert torch.equal(q_sample(io["ddim_fea_latent"], io["ddim_init_noise"], 999), io["ddim_x_T"])


@pytest.mark.parametrize("name", NAMES)
def test_ddim_algebra_reproduces_recorded_steps(name):
    """Stored eps + official coefficients + stored noise -> stored pred_x0 / x_after.
    (float32 ulp-level differences remain: at most 2e-6 absolute on values of ~20.)"""
    io = _io(name)
    s = OfficialDDIMSchedule(4, eta=0.5)
    diffusers_ddim = make_sampling(None, 4, 0.5)
    x = io["ddim_x_T"]
    worst_diffusers = 0.0
    for i in range(4):
        e = guided_eps(io[f"ddim_eps_cond_step{i}"], io[f"ddim_eps_uncond_step{i}"], 3.0)
        x_prev, pred_x0 = s.step(i, e, x, io["ddim_step_noise"][i])
        assert _rel(pred_x0, io[f"ddim_pred_x0_step{i}"]) < 1e-6
        assert _rel(x_prev, io[f"ddim_x_after_step{i}"]) < 1e-6
        xd, _ = diffusers_ddim.step(i, e, x, io["ddim_step_noise"][i])
        worst_diffusers = max(worst_diffusers, _rel(xd, io[f"ddim_x_after_step{i}"]))
        x = io[f"ddim_x_after_step{i}"]
    assert _rel(x, io["ddim_final_latent"]) == 0.0
    # fp32 diffusers coefficients are close to, but measurably not, the official fp16 ones
    assert 1e-5 < worst_diffusers < 5e-3


# ------------------------------------------------------------------ real tiny models
@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    """The fixtures' tiny official checkpoints, converted once (recon.weights.convert) and loaded."""
    from recon.diffusion.stage import load_pipeline
    from recon.weights import convert

    pipes = {}
    for name, kind in (("tiny360", "dp360"), ("tinyback", "backhead")):
        src = DP360 / name / "model_state.th"
        assert src.is_file(), f"fixture {src} is missing"
        out = tmp_path_factory.mktemp("w") / kind
        convert(kind, src, out, dtype="fp32", config=DP360 / name / "config.json")
        pipes[name] = load_pipeline(out, kind, torch.device("cpu"), torch.float32)
    return pipes


@pytest.mark.parametrize("name", NAMES)
def test_ddim_run_with_tiny_models_matches_official(name, tiny_pipelines):
    io = _io(name)
    pipe = tiny_pipelines[name]
    ctx = pipe.context()
    assert _rel(ctx, io["context"][:1]) < 1e-5
    recorded = []

    def on_step(p, i, t, kw):
        recorded.append((kw["pred_x0"].clone(), kw["latents"].clone()))
        return {}

    common = dict(num_inference_steps=4, guidance_scale=3.0, eta=0.5, official_schedule=True,
                  step_noise=io["ddim_step_noise"], output_type="latent", callback_on_step_end=on_step,
                  callback_on_step_end_tensor_inputs=["latents", "pred_x0"])
    if name == "tiny360":
        out = pipe(condition_images=io["cam_images"], ref_latent=io["ref_latent"][:1], back_latent=io["back_latent"][:1],
                   noise_latents=io["ddim_fea_latent"], init_noise=io["ddim_init_noise"], window_mode="independent", **common)
    else:
        out = pipe(condition_image=io["cam_images"], ref_latent=io["ref_latent"][:1], latents=io["ddim_x_T"], **common)
    errors = {}
    for i, (p0, x) in enumerate(recorded):
        errors[f"pred_x0_step{i}"] = _rel(p0, io[f"ddim_pred_x0_step{i}"])
        errors[f"x_after_step{i}"] = _rel(x, io[f"ddim_x_after_step{i}"])
    errors["final"] = _rel(out.latents, io["ddim_final_latent"])
    print(name, {k: f"{v:.2e}" for k, v in errors.items()})
    assert len(recorded) == 4
    assert max(errors.values()) < 1e-4, errors
