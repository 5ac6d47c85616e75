"""DDIM sampling for DiffPortrait360 (DESIGN §6, fixture README §3.5).

Two ways to get the per-step coefficients, behind one `Sampling` interface:
- `DiffusersSampling`: any diffusers scheduler; the default is `DDIMScheduler` with
  the official hyper-parameters (same timesteps as the official sampler, fp32 maths).
- `OfficialDDIMSchedule`: the official sampler's exact float16-quantised
  coefficients, for bit-close parity with the released code.

Both take `eps` already guided (CFG is done by the caller) and the per-step noise
drawn by the caller, so windowed sampling over many frames stays deterministic.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UsageError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
LATENT_SCALE = 0.18215
T_NOISE_3D = 999  # 3D-aware noise: the render's latent is noised to the last training step

# DDIMScheduler settings equal to the official DDIMSampler_ReferenceOnly (README §3.5).
DP360_SCHEDULER_CONFIG = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    beta_start=BETA_START,
    beta_end=BETA_END,
    beta_schedule="scaled_linear",
    timestep_spacing="leading",
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    prediction_type="epsilon",
)


def make_scheduler(name: str = "DDIMScheduler", **overrides):
    """A diffusers scheduler with the DiffPortrait360 training schedule.

    `name` is any diffusers scheduler class name (DDIMScheduler, DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler...); keys it does not know are dropped by from_config.
    """
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
        raise UsageError(f"unknown diffusers scheduler {name!r}",
                         hint="use a diffusers scheduler class name, e.g. DDIMScheduler or DPMSolverMultistepScheduler")
    return cls.from_config({**DP360_SCHEDULER_CONFIG, **overrides})


# ------------------------------------------------------------ fp16 official buffers
def _official_alphas_cumprod_f64() -> np.ndarray:
    # ldm make_beta_schedule("linear"): linspace of sqrt(beta) in float64, squared.
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return np.cumprod(1.0 - betas.numpy(), axis=0)


def official_buffers() -> dict[str, torch.Tensor]:
    """The fp16 schedule buffers the official DDPM registers (each float64 value rounded once)."""
    ac = _official_alphas_cumprod_f64()
    return {
        "alphas_cumprod": torch.tensor(ac, dtype=torch.float16),
        "sqrt_alphas_cumprod": torch.tensor(np.sqrt(ac), dtype=torch.float16),
        "sqrt_one_minus_alphas_cumprod": torch.tensor(np.sqrt(1.0 - ac), dtype=torch.float16),
    }


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: int = T_NOISE_3D) -> torch.Tensor:
    """Official DDPM.q_sample: fp16 buffer coefficients, fp32 arithmetic.

    At t = 999 this is x_T = 0.0682373046875 * x0 + 0.99755859375 * noise, bit-exact.
    """
    if not 0 <= int(t) < NUM_TRAIN_TIMESTEPS:
        raise UsageError(f"q_sample timestep {t} is outside 0..{NUM_TRAIN_TIMESTEPS - 1}")
    buf = official_buffers()
    c0 = float(buf["sqrt_alphas_cumprod"][int(t)])
    c1 = float(buf["sqrt_one_minus_alphas_cumprod"][int(t)])
    dt = torch.promote_types(x0.dtype, torch.float32)
    return torch.tensor(c0, dtype=dt) * x0.to(dt) + torch.tensor(c1, dtype=dt) * noise.to(dt)


def official_ddim_timesteps(num_steps: int) -> np.ndarray:
    """ldm make_ddim_timesteps('uniform'): ascending, range(0, 1000, 1000 // n) + 1."""
    if num_steps < 1:
        raise UsageError(f"num_inference_steps={num_steps} must be >= 1")
    c = NUM_TRAIN_TIMESTEPS // num_steps
    ts = np.asarray(list(range(0, NUM_TRAIN_TIMESTEPS, c))) + 1
    if len(ts) != num_steps or ts.max() >= NUM_TRAIN_TIMESTEPS:
        # e.g. 3 steps -> [1, 334, 667, 1000]: the official sampler indexes alphas_cumprod[1000] and crashes.
        raise UsageError(f"the official DDIM sampler cannot run {num_steps} steps (its timesteps would be {ts.tolist()})",
                         hint="use another step count (50, 25, 20, 10, 4...) or views.official_schedule=false")
    return ts


# ------------------------------------------------------------------- the interface
class Sampling:
    """One sampling run: `timesteps` in execution order and a DDIM-like `step`."""

    timesteps: torch.Tensor          # (S,) int64, execution order (high t first)
    init_noise_sigma: float = 1.0
    stochastic: bool = True          # whether `step` uses the noise argument

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def step(self, i: int, eps: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None):
        """-> (x_prev, pred_x0); eps and x are (F,4,h,w), noise like x (or None if eta == 0)."""
        raise NotImplementedError


@dataclass
class OfficialDDIMSchedule(Sampling):
    """The official DDIMSampler_ReferenceOnly coefficients, float16 quantisation included.

    Per step (fp32):  pred_x0 = (x - s1m * e) / sqrt(a_t)
                      x_prev  = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - sigma^2) * e + sigma * noise
    """

    num_inference_steps: int = 50
    eta: float = 0.5

    def __post_init__(self):
        ts = official_ddim_timesteps(self.num_inference_steps)        # ascending
        A = official_buffers()["alphas_cumprod"]                      # fp16 (1000,)
        alphas = A[torch.as_tensor(ts)]                               # fp16, as make_schedule
        alphas_prev = np.asarray([A[0].item()] + A[torch.as_tensor(ts[:-1])].tolist(), dtype=np.float64)
        sqrt_one_minus = torch.sqrt(1.0 - alphas)                     # computed in fp16
        # (1 - a_prev) / (1 - a_t): ndarray / fp16 tensor -> Tensor.__rtruediv__ = fp16 reciprocal * ndarray
        recip = (1.0 - alphas).reciprocal()                          # fp16
        a64 = alphas.to(torch.float64)
        ap64 = torch.from_numpy(alphas_prev)
        sigmas = self.eta * torch.sqrt((1.0 - ap64) * recip.to(torch.float64) * (1.0 - a64 / ap64))
        order = slice(None, None, -1)                                 # execution order: high t first
        self.timesteps = torch.as_tensor(ts[order].copy(), dtype=torch.int64)
        self.a_t = alphas.to(torch.float32).flip(0)
        self.a_prev = torch.as_tensor(alphas_prev, dtype=torch.float32).flip(0)
        self.sigma_t = sigmas.to(torch.float32).flip(0)
        self.sqrt_one_minus_at = sqrt_one_minus.to(torch.float32).flip(0)
        self.stochastic = self.eta > 0

    def coefficients(self, i: int) -> dict[str, torch.Tensor]:
        return {"a_t": self.a_t[i], "a_prev": self.a_prev[i], "sigma_t": self.sigma_t[i],
                "sqrt_one_minus_at": self.sqrt_one_minus_at[i]}

    def step(self, i, eps, x, noise):
        dev = x.device
        # (F,1,1,1) float32 coefficient tensors, like p_sample_ddim's torch.full
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        a_t, a_prev, sigma_t, s1m = (torch.full(shape, float(v), dtype=torch.float32, device=dev)
                                     for v in (self.a_t[i], self.a_prev[i], self.sigma_t[i], self.sqrt_one_minus_at[i]))
        x = x.float()
        e = eps.float()
        pred_x0 = (x - s1m * e) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt
        if self.stochastic:
            if noise is None:
                raise ValueError("OfficialDDIMSchedule.step needs noise when eta > 0")
            x_prev = x_prev + sigma_t * noise.float() * 1.0   # temperature 1, as the official sampler
        return x_prev, pred_x0


class DiffusersSampling(Sampling):
    """Adapter over a diffusers scheduler (DDIM by default); eta and the noise go to `step`
    only when the scheduler accepts them (DDIM: `eta`, `variance_noise`)."""

    def __init__(self, scheduler, num_inference_steps: int = 50, eta: float = 0.5, device=None,
                 generator: torch.Generator | None = None):
        self.scheduler = scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        self.timesteps = scheduler.timesteps.to(torch.int64).cpu()
        self.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
        params = inspect.signature(scheduler.step).parameters
        self._kw = {}
        if "eta" in params:
            self._kw["eta"] = eta
        self._takes_noise = "variance_noise" in params
        self._takes_generator = "generator" in params
        self.generator = generator
        self.stochastic = (self._takes_noise and eta > 0)
        self.eta = eta

    def scale_model_input(self, x, i):
        return self.scheduler.scale_model_input(x, self.scheduler.timesteps[i])

    def step(self, i, eps, x, noise):
        kw = dict(self._kw)
        if self._takes_noise and self.stochastic:
            if noise is None:
                raise ValueError("this scheduler step needs noise when eta > 0")
            kw["variance_noise"] = noise.to(x.dtype)
        elif self._takes_generator and self.generator is not None:
            kw["generator"] = self.generator
        out = self.scheduler.step(eps.float(), self.scheduler.timesteps[i], x.float(), return_dict=True, **kw)
        pred_x0 = getattr(out, "pred_original_sample", None)
        return out.prev_sample, pred_x0


def make_sampling(scheduler=None, num_inference_steps: int = 50, eta: float = 0.5, *, official: bool = False,
                  device=None, generator: torch.Generator | None = None) -> Sampling:
    """The sampling run a pipeline uses: the official fp16 schedule, or `scheduler` (default DDIM)."""
    if official:
        return OfficialDDIMSchedule(num_inference_steps=num_inference_steps, eta=eta)
    if scheduler is None:
        scheduler = make_scheduler()
    return DiffusersSampling(scheduler, num_inference_steps, eta, device=device, generator=generator)


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance exactly as the official sampler: u + s * (c - u)."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)
