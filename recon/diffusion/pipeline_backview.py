"""DiffPortrait360 pipelines: the shared sampling machinery, and the back-view pipeline.

`DP360PipelineBase` holds what both pipelines do: VAE encode/decode in chunks, the
reference latent (a posterior *sample* as the official code, or its mode), the
denoising loop over (possibly overlapping) frame windows with CFG, the DDIM update
(diffusers scheduler or the official fp16 schedule), progress and step callbacks,
and the low-memory mode.

`BackViewPipeline`: portrait -> back-of-head image (one frame, 180 degree camera image).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..errors import UsageError
from .models.unet import DP360UNet  # noqa: F401 - model_index.json resolves DP360UNet through this module
from .scheduling import LATENT_SCALE, Sampling, make_sampling
from .windows import WindowPlan, plan_windows, windowed_eps

Progress = Callable[[int, int, str], None]


class PromptContext(ModelMixin, ConfigMixin):
    """The cached empty-prompt CLIP context [1, 77, C] as a savable pipeline component
    (DiffPortrait360 only ever uses the empty prompt, so CLIP itself is not needed to sample)."""

    @register_to_config
    def __init__(self, tokens: int = 77, dim: int = 768):
        super().__init__()
        self.context = torch.nn.Parameter(torch.zeros(1, tokens, dim), requires_grad=False)

    @classmethod
    def from_tensor(cls, context: torch.Tensor) -> "PromptContext":
        context = torch.as_tensor(context)
        if context.ndim == 2:
            context = context[None]
        if context.ndim != 3 or context.shape[0] != 1:
            raise ValueError(f"prompt context must be [1, tokens, dim], got {tuple(context.shape)}")
        m = cls(tokens=int(context.shape[1]), dim=int(context.shape[2]))
        with torch.no_grad():
            m.context.copy_(context.float())
        return m

    def forward(self) -> torch.Tensor:
        return self.context


@dataclass
class DP360PipelineOutput(BaseOutput):
    images: Any                   # np (F,H,W,3) float in [0,1] | torch (F,3,H,W) in [-1,1] | latents | PIL list
    latents: torch.Tensor | None = None   # final latents (F,4,h,w), float32


def to_model_images(images, *, name: str) -> torch.Tensor:
    """uint8 (H,W,3)/(F,H,W,3) arrays, float [0,1] arrays or torch (F,3,H,W) in [-1,1]
    (passed through) -> float32 (F,3,H,W) in [-1,1]."""
    if isinstance(images, torch.Tensor):
        t = images.float()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] != 3:
            raise UsageError(f"{name} tensor must be (F,3,H,W) in [-1,1], got {tuple(t.shape)}")
        return t
    if hasattr(images, "convert"):  # PIL
        images = np.asarray(images.convert("RGB"))
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(i.convert("RGB")) if hasattr(i, "convert") else np.asarray(i) for i in images])
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] not in (3, 4):
        raise UsageError(f"{name} must be (H,W,3) or (F,H,W,3) images, got shape {a.shape}")
    a = a[..., :3]
    x = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


class DP360PipelineBase(DiffusionPipeline):
    model_cpu_offload_seq = "appearance->controlnet->unet->vae"
    _callback_tensor_inputs = ["latents", "pred_x0", "eps"]
    _optional_components: list[str] = []

    def __init__(self, vae, unet, appearance, controlnet, scheduler, text_context):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, appearance=appearance, controlnet=controlnet,
                              scheduler=scheduler, text_context=text_context)
        self.max_frames_per_batch = 32
        self._low_memory = False
        self._swap_device: torch.device | None = None
        self._denoiser = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save, then model_index.json points our own component classes at this
        module: diffusers can only load a custom class from a module that also exposes
        `ModelMixin`, which this one does (and it imports every class we register)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text())
        here = importlib.import_module(__name__)
        for name, spec in index.items():
            if (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and spec[0].startswith("recon.")
                    and isinstance(getattr(here, str(spec[1]), None), type)):
                index[name] = [__name__, spec[1]]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ components
    @property
    def denoiser(self):
        from .denoiser import Denoiser

        d = self._denoiser
        if d is None or d.unet is not self.unet or d.appearance is not self.appearance or d.controlnet is not self.controlnet:
            d = self._denoiser = Denoiser(self.unet, self.appearance, self.controlnet)
        return d

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def exec_device(self) -> torch.device:
        if self._swap_device is not None:
            return self._swap_device
        return self._execution_device

    @property
    def vae_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", LATENT_SCALE) or LATENT_SCALE)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def context(self) -> torch.Tensor:
        """[1, 77, C] empty-prompt context in the model dtype."""
        return self.text_context().to(self.exec_device, self.model_dtype)

    # ------------------------------------------------------------------ memory
    def enable_low_memory(self, device: str | torch.device | None = None) -> str:
        """Smaller frame batches, and the models off the accelerator while unused.

        With accelerate: diffusers model CPU offload. Without it: explicit .to() swapping
        between the VAE and the denoising nets. On CPU only the smaller batch applies.
        Returns a sentence saying what was enabled.
        """
        self._low_memory = True
        self.max_frames_per_batch = 8
        dev = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        if dev.type == "cpu":
            return "low memory: frame batch 8 (CPU: nothing to offload)"
        try:
            import accelerate  # noqa: F401
        except ImportError:
            self._swap_device = dev
            self.to("cpu")
            return "low memory: frame batch 8, explicit VAE/denoiser swapping to CPU (accelerate not installed)"
        self.enable_model_cpu_offload(device=dev)
        return "low memory: frame batch 8, diffusers model CPU offload"

    def _use(self, *names: str) -> None:
        """Explicit swapping: only the named modules on the accelerator (no-op otherwise)."""
        if self._swap_device is None:
            return
        for name in ("vae", "unet", "appearance", "controlnet", "text_context"):
            m = getattr(self, name)
            m.to(self._swap_device if name in names or name == "text_context" else "cpu")
        if self._swap_device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, mode: str = "sample", generator: torch.Generator | None = None,
               batch_size: int = 8) -> torch.Tensor:
        """(F,3,H,W) in [-1,1] -> scaled latents (F,4,h,w) float32.

        mode "sample": 0.18215 * (mean + std * randn), as the official get_first_stage_encoding;
        "mode": 0.18215 * mean. Noise for all frames is drawn at once from `generator`.
        """
        if mode not in ("sample", "mode"):
            raise UsageError(f"reference_latent={mode!r} is not 'sample' or 'mode'")
        self._use("vae")
        dev, dt = self.exec_device, next(self.vae.parameters()).dtype
        means, stds = [], []
        for i in range(0, images.shape[0], batch_size):
            dist = self.vae.encode(images[i:i + batch_size].to(dev, dt)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        mean, std = torch.cat(means), torch.cat(stds)
        if mode == "mode":
            return self.vae_scale * mean
        eps = randn_tensor(mean.shape, generator=generator, device=dev, dtype=torch.float32)
        return self.vae_scale * (mean + std * eps)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """scaled latents (F,4,h,w) -> images (F,3,H,W) float32 in [-1,1] (chunked)."""
        self._use("vae")
        dev, dt = self.exec_device, next(self.vae.parameters()).dtype
        out = [self.vae.decode((latents[i:i + batch_size] / self.vae_scale).to(dev, dt)).sample.float()
               for i in range(0, latents.shape[0], batch_size)]
        return torch.cat(out)

    def postprocess(self, images: torch.Tensor, output_type: str):
        if output_type == "pt":
            return images
        arr = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return arr
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
        raise UsageError(f"unknown output_type {output_type!r}", hint="use np, pt, pil or latent")

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def denoise(self, x_T: torch.Tensor, *, ref_latent: torch.Tensor, back_latent: torch.Tensor | None,
                cam_images: torch.Tensor, plan: WindowPlan, sampling: Sampling, guidance_scale: float,
                generator: torch.Generator | None = None, step_noise: torch.Tensor | None = None,
                max_frames_per_batch: int | None = None,
                callback_on_step_end: Callable | None = None, callback_on_step_end_tensor_inputs=("latents",),
                progress: Progress | None = None) -> torch.Tensor:
        """The denoising loop. x_T (N,4,h,w); ref/back (1,4,h,w); cam_images (N,3,H,W) in [-1,1].

        Each step: appearance banks once, then every window's CFG eps blended (windows.py),
        then one sampler step over all N frames with per-frame noise (drawn here for all
        frames, or `step_noise[i]`), kept in float32.
        """
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise UsageError(f"callback tensor inputs {bad} are not available", hint=f"use {self._callback_tensor_inputs}")
        self._use("unet", "appearance", "controlnet")
        dev, dt = self.exec_device, self.model_dtype
        den = self.denoiser
        ctx = self.context()
        ref = ref_latent.to(dev, dt)
        back = back_latent.to(dev, dt) if back_latent is not None else None
        cams = cam_images.to(dev, dt)
        x = x_T.to(dev, torch.float32)
        steps = len(sampling.timesteps)
        fpb = max_frames_per_batch or self.max_frames_per_batch
        if step_noise is not None and tuple(step_noise.shape) != (steps,) + tuple(x.shape):
            raise UsageError(f"step_noise must be {(steps,) + tuple(x.shape)}, got {tuple(step_noise.shape)}")
        with self.progress_bar(total=steps) as bar:
            for i, t in enumerate(sampling.timesteps.tolist()):
                bank = den.reference_banks(ref, t, ctx, back)
                x_in = sampling.scale_model_input(x, i).to(dt)
                eps = windowed_eps(den, x_in, t, ctx, bank=bank, cam_images=cams, plan=plan,
                                   guidance=guidance_scale, max_frames_per_batch=fpb)
                noise = None
                if sampling.stochastic:
                    noise = (step_noise[i].to(dev, torch.float32) if step_noise is not None else
                             randn_tensor(x.shape, generator=generator, device=dev, dtype=torch.float32))
                x, pred_x0 = sampling.step(i, eps, x, noise)
                x = x.float()
                if callback_on_step_end is not None:
                    local = {"latents": x, "pred_x0": pred_x0, "eps": eps}
                    out = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}) or {}
                    x = out.get("latents", x)
                bar.update()
                if progress is not None:
                    progress(i + 1, steps, f"denoising step {i + 1}/{steps} (t={t})")
        return x

    def _sampling(self, num_inference_steps: int, eta: float, official_schedule: bool, generator) -> Sampling:
        if num_inference_steps < 1:
            raise UsageError(f"num_inference_steps={num_inference_steps} must be >= 1")
        if eta < 0:
            raise UsageError(f"eta={eta} must be >= 0")
        return make_sampling(self.scheduler, num_inference_steps, eta, official=official_schedule,
                             device=self.exec_device, generator=generator)


class BackViewPipeline(DP360PipelineBase):
    """Portrait -> back-of-head image with the back-view model (one frame, no view module).

    The unconditional CFG pass drops the reference and the camera ControlNet.
    """

    @torch.no_grad()
    def __call__(
        self,
        portrait=None,
        condition_image=None,
        *,
        ref_latent: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.5,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        step_noise: torch.Tensor | None = None,
        official_schedule: bool = False,
        reference_latent: str = "sample",
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs=("latents",),
        progress: Progress | None = None,
    ) -> DP360PipelineOutput:
        """portrait: image (H,W,3) uint8 / PIL / (1,3,H,W) in [-1,1], on the background the
        model was trained with (white); condition_image: the 180 degree camera image.
        `ref_latent` (1,4,h,w) replaces the portrait's encoding; `latents` (1,4,h,w) replaces x_T;
        `step_noise` (S,1,4,h,w) replaces the per-step DDIM noise (parity tests)."""
        if condition_image is None:
            raise UsageError("BackViewPipeline needs the 180 degree camera-condition image")
        cams = to_model_images(condition_image, name="condition_image")[:1]
        lf = self.latent_factor
        h, w = cams.shape[-2] // lf, cams.shape[-1] // lf
        if ref_latent is None:
            if portrait is None:
                raise UsageError("BackViewPipeline needs a portrait image (or ref_latent)")
            ref_latent = self.encode(to_model_images(portrait, name="portrait")[:1], mode=reference_latent,
                                     generator=generator)
        sampling = self._sampling(num_inference_steps, eta, official_schedule, generator)
        if latents is None:
            latents = randn_tensor((1, 4, h, w), generator=generator, device=self.exec_device, dtype=torch.float32)
        x_T = latents.float() * sampling.init_noise_sigma
        x = self.denoise(x_T, ref_latent=ref_latent[:1], back_latent=None, cam_images=cams,
                         plan=plan_windows(1, 1, 1), sampling=sampling, guidance_scale=guidance_scale,
                         generator=generator, step_noise=step_noise, max_frames_per_batch=1,
                         callback_on_step_end=callback_on_step_end,
                         callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, progress=progress)
        if output_type == "latent":
            return DP360PipelineOutput(images=x, latents=x)
        return DP360PipelineOutput(images=self.postprocess(self.decode(x), output_type), latents=x)
