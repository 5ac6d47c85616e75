"""Portrait360Pipeline: portrait + back view + N camera images -> N view-consistent views.

Differences from the official sampler (DESIGN §6), none of which changes the maths
of one window: overlapping circular windows over all N views instead of N/8
disjoint ones (`window_mode="independent"` gives the official layout), the
appearance net once per step instead of on 8 copies, no ControlNet in the
unconditional pass, model dtype fp16/bf16 with the DDIM update in fp32.
"""
from __future__ import annotations

from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..errors import UsageError
from .pipeline_backview import DP360PipelineBase, DP360PipelineOutput, Progress, to_model_images
from .scheduling import T_NOISE_3D, q_sample
from .windows import plan_windows


class Portrait360Pipeline(DP360PipelineBase):
    """The 360 model: UNet with view-consistency modules, dual (portrait + back) appearance
    attention, camera ControlNet; optional 3D-aware noise from renders of each view."""

    @torch.no_grad()
    def __call__(
        self,
        portrait=None,
        back_view=None,
        condition_images=None,
        noise_renders=None,
        *,
        ref_latent: torch.Tensor | None = None,
        back_latent: torch.Tensor | None = None,
        noise_latents: torch.Tensor | None = None,
        init_noise: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        step_noise: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.5,
        generator: torch.Generator | None = None,
        window_mode: str = "circular",
        window_size: int = 8,
        window_stride: int = 4,
        window_weighting: str = "cosine",
        max_frames_per_batch: int | None = None,
        official_schedule: bool = False,
        reference_latent: str = "sample",
        vae_batch_size: int = 8,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs=("latents",),
        progress: Progress | None = None,
    ) -> DP360PipelineOutput:
        """
        portrait, back_view: images ((H,W,3) uint8, PIL, or (1,3,H,W) in [-1,1]);
        condition_images: N camera images of the ring, (N,H,W,3) uint8 or (N,3,H,W) in [-1,1];
        noise_renders: optional N renders of the subject at the same cameras: their VAE
          latents noised to t=999 are x_T (3D-aware noise, the official --denoise_from_guidance).
        Overrides for tests: ref_latent / back_latent (1,4,h,w) replace the encodings;
        noise_latents (N,4,h,w) replace the renders' encodings; init_noise (N,4,h,w) is the
        q_sample noise; latents (N,4,h,w) is x_T itself; step_noise (S,N,4,h,w) the DDIM noise.
        Random draws from `generator`, in order: reference, back, render encodings, x_T noise,
        then one (N,4,h,w) draw per step.
        """
        if condition_images is None:
            raise UsageError("Portrait360Pipeline needs the N camera-condition images of the ring",
                             hint="the official ring is the 32 PNGs of inference_data.zip (views.condition_dir)")
        cams = to_model_images(condition_images, name="condition_images")
        n = cams.shape[0]
        lf = self.latent_factor
        h, w = cams.shape[-2] // lf, cams.shape[-1] // lf
        plan = plan_windows(n, window_size, window_stride, window_mode, window_weighting)
        if ref_latent is None:
            if portrait is None:
                raise UsageError("Portrait360Pipeline needs the portrait (or ref_latent)")
            ref_latent = self.encode(to_model_images(portrait, name="portrait")[:1], mode=reference_latent,
                                     generator=generator)
        if back_latent is None:
            if back_view is None:
                raise UsageError("Portrait360Pipeline needs the back view (or back_latent)",
                                 hint="run the back-view stage first")
            back_latent = self.encode(to_model_images(back_view, name="back_view")[:1], mode=reference_latent,
                                      generator=generator)
        sampling = self._sampling(num_inference_steps, eta, official_schedule, generator)
        dev = self.exec_device
        if latents is not None:
            x_T = latents.float()
        else:
            if noise_latents is None and noise_renders is not None:
                renders = to_model_images(noise_renders, name="noise_renders")
                if renders.shape[0] != n:
                    raise UsageError(f"{renders.shape[0]} noise renders for {n} views", hint="give one render per view")
                noise_latents = self.encode(renders, mode=reference_latent, generator=generator, batch_size=vae_batch_size)
            if init_noise is None:
                init_noise = randn_tensor((n, 4, h, w), generator=generator, device=dev, dtype=torch.float32)
            if noise_latents is not None:
                if tuple(noise_latents.shape) != (n, 4, h, w):
                    raise UsageError(f"noise latents must be {(n, 4, h, w)}, got {tuple(noise_latents.shape)}")
                # 3D-aware noise: the official fp16 q_sample at t=999 (README §3.5)
                x_T = q_sample(noise_latents.to(dev).float(), init_noise.to(dev).float(), T_NOISE_3D)
            else:
                x_T = init_noise.to(dev).float()
            x_T = x_T * sampling.init_noise_sigma
        x = self.denoise(x_T, ref_latent=ref_latent[:1], back_latent=back_latent[:1], cam_images=cams, plan=plan,
                         sampling=sampling, guidance_scale=guidance_scale, generator=generator,
                         step_noise=step_noise, max_frames_per_batch=max_frames_per_batch,
                         callback_on_step_end=callback_on_step_end,
                         callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, progress=progress)
        if output_type == "latent":
            return DP360PipelineOutput(images=x, latents=x)
        images = self.decode(x, batch_size=vae_batch_size)
        return DP360PipelineOutput(images=self.postprocess(images, output_type), latents=x)
