"""The one place that turns (latents, t, conditions) into eps for DiffPortrait360.

Part of the public interface the samplers (pipeline*.py) build on: keep it stable.
"""
from __future__ import annotations

import torch

from .models.bank import FeatureBank
from .models.unet import DP360UNet


def _timesteps(t, n: int, device) -> torch.Tensor:
    """int | 0-d | [1] | [n] tensor -> int64 [n]. The official code uses one t for the whole
    batch, so any number of identical values is accepted as that one t."""
    tt = torch.as_tensor(t, device=device).long().reshape(-1)
    if tt.numel() == n:
        return tt
    if tt.numel() >= 1 and bool((tt == tt[0]).all()):
        return tt[:1].expand(n)
    raise ValueError(f"got {tt.numel()} different timesteps for {n} rows")


class Denoiser:
    """Holds the main UNet (+ view-consistency modules for the 360 model), the appearance
    net and the camera ControlNet; computes eps exactly as the official `apply_model`.

    Shapes: F = frames of one window (F <= 24 with motion modules; the 360 model was trained
    on 8), h, w = latent size, H, W = 8h, 8w image size, C = text width (768; 8 in tests).
    All inputs may be float32; they are cast to the models' dtype, and eps comes back as
    float32 so that the scheduler arithmetic stays in fp32.

    - `reference_banks(ref_latent[1,4,h,w], t, context[1,77,C], back_latent[1,4,h,w]|None)
      -> FeatureBank`: appearance net once per step on the clean latents (one batched pass
      for reference + back); reuse the bank for every window of that step.
    - `eps(x_t[F,4,h,w], t, context[1,77,C], *, bank=None, cam_images=None) -> [F,4,h,w]`:
      bank -> reference attention; cam_images[F,3,H,W] in [-1,1] -> ControlNet residuals
      added at scale 1; both None -> the official unconditional pass (motion modules ON).
      `num_frames` (default F): rows are consecutive windows of that many frames, so several
      windows can go through one call (the motion modules mix frames within a window only).
    - `eps_cfg(x_t, t, context, ref_latent, back_latent, cam_images, guidance=3.0)
      -> (eps_guided, eps_cond, eps_uncond)` with guided = u + g * (c - u).
    """

    def __init__(self, unet: DP360UNet, appearance: DP360UNet, controlnet):
        if appearance.num_bank_layers != unet.num_bank_layers:
            raise ValueError("appearance net and UNet have different numbers of attention layers")
        self.unet = unet
        self.appearance = appearance
        self.controlnet = controlnet

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def has_motion_modules(self) -> bool:
        return self.unet.has_motion_modules

    @property
    def max_frames(self) -> int:
        return int(self.unet.config.motion_max_frames) if self.has_motion_modules else 1 << 30

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def reference_banks(
        self,
        ref_latent: torch.Tensor,
        t,
        context: torch.Tensor,
        back_latent: torch.Tensor | None = None,
    ) -> FeatureBank:
        if ref_latent.ndim != 4 or ref_latent.shape[0] != 1:
            raise ValueError(f"ref_latent must be [1,4,h,w], got {tuple(ref_latent.shape)}")
        if back_latent is not None and back_latent.shape != ref_latent.shape:
            raise ValueError(f"back_latent {tuple(back_latent.shape)} must be shaped like ref_latent {tuple(ref_latent.shape)}")
        src = [ref_latent] if back_latent is None else [ref_latent, back_latent]
        x = self._cast(torch.cat(src, dim=0))  # [S,4,h,w]: one row per source
        ctx = self._cast(context[:1]).expand(x.shape[0], -1, -1)
        return self.appearance.write_bank(x, _timesteps(t, x.shape[0], self.device), ctx)

    @torch.no_grad()
    def controlnet_residuals(self, x_t: torch.Tensor, t, context: torch.Tensor, cam_images: torch.Tensor):
        """-> (12 down residuals, mid residual), as the official pose ControlNet's 13 outputs."""
        n = x_t.shape[0]
        if cam_images.shape[0] != n:
            raise ValueError(f"{cam_images.shape[0]} camera images for {n} frames")
        down, mid = self.controlnet(
            self._cast(x_t),
            _timesteps(t, n, self.device),
            encoder_hidden_states=self._cast(context[:1]).expand(n, -1, -1),
            controlnet_cond=self._cast(cam_images),
            conditioning_scale=1.0,
            return_dict=False,
        )
        return list(down), mid

    @torch.no_grad()
    def eps(
        self,
        x_t: torch.Tensor,
        t,
        context: torch.Tensor,
        *,
        bank: FeatureBank | None = None,
        cam_images: torch.Tensor | None = None,
        num_frames: int | None = None,
    ) -> torch.Tensor:
        n = x_t.shape[0]
        frames = num_frames or n
        if n % frames:
            raise ValueError(f"{n} rows are not whole windows of {frames} frames")
        if self.has_motion_modules and frames > self.max_frames:
            raise ValueError(f"window of {frames} frames is longer than the motion modules' {self.max_frames}")
        down = mid = None
        if cam_images is not None:
            down, mid = self.controlnet_residuals(x_t, t, context, cam_images)
        out = self.unet(
            self._cast(x_t),
            _timesteps(t, n, self.device),
            self._cast(context[:1]).expand(n, -1, -1),
            bank=bank,
            num_frames=frames,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )
        return out.float()

    @torch.no_grad()
    def eps_cfg(
        self,
        x_t: torch.Tensor,
        t,
        context: torch.Tensor,
        ref_latent: torch.Tensor,
        back_latent: torch.Tensor | None,
        cam_images: torch.Tensor,
        guidance: float = 3.0,
        bank: FeatureBank | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One CFG step for one window; pass `bank` to reuse the step's reference bank."""
        if bank is None:
            bank = self.reference_banks(ref_latent, t, context, back_latent)
        eps_c = self.eps(x_t, t, context, bank=bank, cam_images=cam_images)
        eps_u = self.eps(x_t, t, context)
        return eps_u + guidance * (eps_c - eps_u), eps_c, eps_u
