"""SuperresolutionHybrid8XDC: neural render (32 ch + raw RGB, upsampled to 128) ->
two StyleGAN2 blocks (128 -> 256 -> 512). Channel counts, w_dim 512 and the 512
output are fixed by the official class; noise is never used ('none')."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .networks import SynthesisBlock


class SuperresolutionHybrid8XDC(nn.Module):
    input_resolution = 128

    def __init__(self, channels: int = 32, img_resolution: int = 512, sr_num_fp16_res: int = 4,
                 sr_antialias: bool = True):
        super().__init__()
        if img_resolution != 512:
            raise ValueError("SuperresolutionHybrid8XDC produces 512x512 images only")
        use_fp16 = sr_num_fp16_res > 0
        clamp = 256 if use_fp16 else None
        self.sr_antialias = sr_antialias
        self.block0 = SynthesisBlock(channels, 256, w_dim=512, resolution=256, img_channels=3, is_last=False,
                                     use_fp16=use_fp16, conv_clamp=clamp)
        self.block1 = SynthesisBlock(256, 128, w_dim=512, resolution=512, img_channels=3, is_last=True,
                                     use_fp16=use_fp16, conv_clamp=clamp)

    def forward(self, rgb: torch.Tensor, x: torch.Tensor, ws: torch.Tensor, force_fp32: bool = False,
                fused_modconv: bool | None = None) -> torch.Tensor:
        ws = ws[:, -1:, :].repeat(1, 3, 1)  # the last w drives every SR layer
        if x.shape[-1] != self.input_resolution:
            size = (self.input_resolution, self.input_resolution)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
        x, rgb = self.block0(x, rgb, ws, noise_mode="none", force_fp32=force_fp32, fused_modconv=fused_modconv)
        x, rgb = self.block1(x, rgb, ws, noise_mode="none", force_fp32=force_fp32, fused_modconv=fused_modconv)
        return rgb
