"""Single-pass parity of the diffusers-style DiffPortrait360 networks with the official code
(fixtures ../shared/fixtures/dp360, README §3). Missing fixtures are a failure, not a skip.
Tolerance: max|ours - ref| <= 1e-4 * max|ref| (README §0)."""
import pytest
import torch

from recon.diffusion.convert import build_from_official_state_dict, convert_checkpoint, load_models, load_official_state_dict
from recon.diffusion.models import DP360Config
from recon.diffusion.text import empty_prompt_ids, encode_empty_prompt
from tests.conftest import FIXTURES

DP360 = FIXTURES / "dp360"
NAMES = ("tiny360", "tinyback")
TOL = 1e-4


def _need(path):
    assert path.is_file(), f"fixture {path} is missing (set P3D_FIXTURES)"
    return path


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


class _Case:
    """One fixture: official weights, io tensors, our models; results computed once."""

    def __init__(self, name):
        from safetensors.torch import load_file

        d = DP360 / name
        self.name = name
        self.cfg = DP360Config.from_official(_need(d / "config.json"))
        self.sd = load_official_state_dict(_need(d / "model_state.th"))
        self.io = load_file(str(_need(d / "io.safetensors")))
        self.models = build_from_official_state_dict(self.sd, self.cfg)
        io = self.io
        self.x, self.ctx, self.t = io["x_t"], io["context"][:1], io["timesteps"][:1]
        self.ref = io["ref_latent"][:1]
        self.back = io["back_latent"][:1] if "back_latent" in io else None
        self.cam = io["cam_images"]
        self._cache = {}

    def get(self, what):
        if what not in self._cache:
            den = self.models.denoiser()
            if what == "bank":
                self._cache[what] = den.reference_banks(self.ref, self.t, self.ctx, self.back)
            elif what == "controlnet":
                self._cache[what] = den.controlnet_residuals(self.x, self.t, self.ctx, self.cam)
            elif what == "eps":
                self._cache[what] = den.eps_cfg(self.x, self.t, self.ctx, self.ref, self.back, self.cam,
                                                guidance=3.0, bank=self.get("bank"))
        return self._cache[what]


_CASES = {}


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    if request.param not in _CASES:
        torch.manual_seed(0)
        _CASES[request.param] = _Case(request.param)
    return _CASES[request.param]


def test_config_read_from_official_yaml_and_json_agree(case):
    assert DP360Config.from_official(DP360 / case.name / "config.yaml").to_dict() == {
        **case.cfg.to_dict(), "clip": DP360Config.full("dp360").clip}  # the YAML does not carry the tiny CLIP
    assert case.cfg.kind == ("dp360" if case.name == "tiny360" else "backhead")
    assert case.models.unet.has_motion_modules == (case.name == "tiny360")


def test_reference_bank_entries(case):
    bank = case.get("bank")
    assert len(bank) == 16 and bank.num_sources == (2 if case.back is not None else 1)
    for i, entry in enumerate(bank.entries):
        ref = case.io[f"bank_ref_{i:02d}"]
        assert entry.shape[1:] == ref.shape[1:], i
        assert _rel(entry[:1], ref) <= TOL, (i, _rel(entry[:1], ref))
    if case.back is not None:  # the back row comes from the same net on another latent
        assert not torch.allclose(bank.entries[0][0], bank.entries[0][1])


def test_controlnet_residuals(case):
    down, mid = case.get("controlnet")
    res = down + [mid]
    assert len(res) == 13
    for i, r in enumerate(res):
        assert _rel(r, case.io[f"controlnet_res_{i:02d}"]) <= TOL, i


@pytest.mark.parametrize("key", ("eps_guided", "eps_cond", "eps_uncond"))
def test_eps(case, key):
    guided, cond, uncond = case.get("eps")
    ours = {"eps_guided": guided, "eps_cond": cond, "eps_uncond": uncond}[key]
    assert ours.dtype == torch.float32 and ours.shape == case.io[key].shape
    assert _rel(ours, case.io[key]) <= TOL, _rel(ours, case.io[key])


def test_eps_inside_first_ddim_step(case):
    """The first DDIM step's two apply_model calls (t = 751 on x_T)."""
    io = case.io
    t = io["ddim_timesteps"][0]
    _, cond, uncond = case.models.denoiser().eps_cfg(io["ddim_x_T"], t, case.ctx, case.ref, case.back, case.cam)
    assert _rel(cond, io["ddim_eps_cond_step0"]) <= TOL
    assert _rel(uncond, io["ddim_eps_uncond_step0"]) <= TOL


def test_vae_posterior_and_decode(case):
    io, vae = case.io, case.models.vae
    with torch.no_grad():
        post = vae.encode(io["vae_image"]).latent_dist
        dec = vae.decode(io["vae_decode_z"] / case.cfg.scale_factor).sample
    assert _rel(post.mean, io["vae_posterior_mean"]) <= TOL
    assert _rel(post.std, io["vae_posterior_std"]) <= TOL
    assert _rel(post.logvar, io["vae_posterior_logvar"]) <= TOL
    assert _rel(dec, io["vae_decode_out"]) <= TOL


def test_clip_empty_prompt_context(case):
    io = case.io
    assert torch.equal(empty_prompt_ids(), io["token_ids"])
    ctx = encode_empty_prompt(case.models.text_encoder)
    assert encode_empty_prompt(case.models.text_encoder) is ctx  # computed once
    assert _rel(ctx, io["clip_hidden_states"]) <= TOL
    assert _rel(case.models.context(), io["context"][:1]) <= TOL


def test_motion_module_mixes_frames_only_within_a_window():
    """num_frames splits the rows into windows: a change in one window leaves the other alone."""
    from recon.diffusion.models.motion import MotionModule

    torch.manual_seed(0)
    mm = MotionModule(32, heads=8, max_frames=24).eval()
    for p in mm.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(8, 32, 4, 4)
    with torch.no_grad():
        y = mm(x, num_frames=4)
        x2 = x.clone()
        x2[7] += 1.0
        y2 = mm(x2, num_frames=4)
        y8 = mm(x2, num_frames=8)
    assert torch.equal(y[:4], y2[:4])  # first window untouched
    assert not torch.allclose(y[4:7], y2[4:7])  # frames of the same window mix
    assert not torch.allclose(y8[:4], y2[:4])
    with pytest.raises(ValueError):
        mm(x, num_frames=3)


def test_converted_folder_reproduces_official(case, tmp_path):
    """convert_checkpoint (fp32) -> load_models -> same tensors and the same numbers."""
    out = tmp_path / "w"
    rep = convert_checkpoint(DP360 / case.name / "model_state.th", out, model=case.cfg.kind, dtype="fp32", config=case.cfg)
    assert rep["model"] == case.cfg.kind and rep["dtype"] == "fp32"
    loaded = load_models(out, dtype=torch.float32, device="cpu", text_encoder=True)
    assert loaded.config.to_dict() == case.cfg.to_dict()
    for name in ("unet", "appearance", "controlnet", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(case.models, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for name in ("unet", "appearance", "controlnet", "vae"):
        a, b = getattr(loaded, name).config, getattr(case.models, name).config
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in a.items() if not k.startswith("_")} == \
            {k: list(v) if isinstance(v, tuple) else v for k, v in b.items() if not k.startswith("_")}, name
    assert _rel(loaded.context(), case.io["clip_hidden_states"]) <= TOL
    io = case.io
    if case.name == "tinyback":  # cheap (1 frame): the whole CFG step from the loaded folder
        g, c, u = loaded.denoiser().eps_cfg(case.x, case.t, loaded.context(), case.ref, None, case.cam)
        for key, ours in (("eps_guided", g), ("eps_cond", c), ("eps_uncond", u)):
            assert _rel(ours, io[key]) <= TOL, key
    with torch.no_grad():
        dec = loaded.vae.decode(io["vae_decode_z"] / case.cfg.scale_factor).sample
    assert _rel(dec, io["vae_decode_out"]) <= TOL


def test_timestep_forms():
    from recon.diffusion.denoiser import _timesteps

    for t in (501, torch.tensor(501), torch.tensor([501]), torch.full((8,), 501)):
        assert torch.equal(_timesteps(t, 2, "cpu"), torch.tensor([501, 501]))
    assert torch.equal(_timesteps(torch.tensor([1, 2]), 2, "cpu"), torch.tensor([1, 2]))
    with pytest.raises(ValueError):
        _timesteps(torch.tensor([1, 2, 3]), 2, "cpu")
