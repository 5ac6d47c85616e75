"""DiffPortrait360 denoising UNet and appearance net.

Both are the SD1.5 UNet (diffusers `UNet2DConditionModel`, conv proj_in/proj_out) with:
- attention processors that read or write an explicit feature bank (models/bank.py);
- optional view-consistency modules (models/motion.py) after every down-block layer
  (LDM input blocks 1,2,4,5,7,8,10,11) and after every up-block layer, the last one of a
  level *after* its upsampler (LDM output blocks 2,5,8); none in the mid block;
- optional output head: the appearance net (official `control_model`) has none.

LDM -> diffusers index map (num_res_blocks=2): input block 3b+1+j = down_blocks[b] layer j
(resnet j [+ attention j]); input block 3b+3 = down_blocks[b].downsamplers[0]; output block
3b+j = up_blocks[b] layer j (resnet j [+ attention j], + upsamplers[0] when j == 2).
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from .bank import BankAttnProcessor, BankRecorder, FeatureBank
from .motion import MotionModule


class DP360UNet(UNet2DConditionModel):
    """SD1.5-style UNet with feature-bank attention and optional motion modules.

    forward(sample[B,4,h,w], timestep, encoder_hidden_states[B,77,C], *, bank, num_frames,
    down_block_additional_residuals, mid_block_additional_residual) -> eps[B,4,h,w]
    (or None for the head-less appearance net, which is used through `write_bank`).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 4,
        out_channels: int = 4,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        attention_levels: tuple[bool, ...] = (True, True, True, False),
        layers_per_block: int = 2,
        attention_head_dim: int = 8,  # diffusers' name; it is the number of heads (SD1.5: 8)
        cross_attention_dim: int = 768,
        norm_num_groups: int = 32,
        out_head: bool = True,
        motion_modules: bool = False,
        motion_num_heads: int = 8,
        motion_max_frames: int = 24,
    ):
        own_config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        n = len(block_out_channels)
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels)),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            cross_attention_dim=cross_attention_dim,
            norm_num_groups=norm_num_groups,
            norm_eps=1e-5,
            use_linear_projection=False,
            flip_sin_to_cos=True,
            freq_shift=0,
        )
        # The parent's decorator merged its own (long) config into ours; this class's config
        # is exactly its own signature, so replace it.
        if hasattr(self, "_internal_dict"):
            del self._internal_dict
        self.register_to_config(**own_config)
        if not out_head:
            self.conv_norm_out = None
            self.conv_act = None
            self.conv_out = None
        self.down_motion_modules = None
        self.up_motion_modules = None
        if motion_modules:
            self.down_motion_modules = nn.ModuleList(
                [MotionModule(c, motion_num_heads, motion_max_frames) for c in block_out_channels for _ in range(layers_per_block)]
            )
            up_ch = list(reversed(block_out_channels))
            self.up_motion_modules = nn.ModuleList(
                [MotionModule(c, motion_num_heads, motion_max_frames) for c in up_ch for _ in range(layers_per_block + 1)]
            )
        assert n == len(attention_levels)
        self._install_bank_processors()

    # -- feature bank -------------------------------------------------------------------
    def self_attention_layers(self) -> list:
        """attn1 modules in execution order (down, mid, up): the bank's layer order."""
        blocks = [a for d in self.down_blocks for a in getattr(d, "attentions", [])]
        blocks += list(self.mid_block.attentions)
        blocks += [a for u in self.up_blocks for a in getattr(u, "attentions", [])]
        return [tb.attn1 for t2d in blocks for tb in t2d.transformer_blocks]

    def _install_bank_processors(self) -> None:
        index = {id(a): i for i, a in enumerate(self.self_attention_layers())}
        procs = {}
        for name, module in self.named_modules():
            if hasattr(module, "set_processor") and hasattr(module, "to_q"):
                procs[f"{name}.processor"] = BankAttnProcessor(index.get(id(module)))
        self.set_attn_processor(procs)

    @property
    def num_bank_layers(self) -> int:
        return len(self.self_attention_layers())

    @property
    def has_motion_modules(self) -> bool:
        return self.down_motion_modules is not None

    # -- forward --------------------------------------------------------------------------
    def _time_embedding(self, timestep, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(batch) if t.shape[0] == 1 else t
        return self.time_embedding(self.time_proj(t).to(dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        *,
        bank: FeatureBank | BankRecorder | None = None,
        num_frames: int | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        B = sample.shape[0]
        frames = num_frames or B
        if bank is not None and not all(isinstance(a.processor, BankAttnProcessor) for a in self.self_attention_layers()):
            # diffusers would only warn and drop the bank: the reference would silently vanish
            raise RuntimeError("feature-bank attention processors were replaced; call _install_bank_processors()")
        emb = self._time_embedding(timestep, B, sample.dtype, sample.device)
        ctx = encoder_hidden_states
        xattn = {"bank": bank}

        def attend(attn, h):
            return attn(h, encoder_hidden_states=ctx, cross_attention_kwargs=xattn, return_dict=False)[0]

        h = self.conv_in(sample)
        skips = [h]
        m = 0
        for block in self.down_blocks:
            attns = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                h = resnet(h, emb)
                if attns is not None:
                    h = attend(attns[j], h)
                if self.down_motion_modules is not None:
                    h = self.down_motion_modules[m](h, frames)
                    m += 1
                skips.append(h)
            if block.downsamplers is not None:
                for down in block.downsamplers:
                    h = down(h)
                skips.append(h)

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down residuals, got {len(down_block_additional_residuals)}")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]

        mid = self.mid_block
        h = mid.resnets[0](h, emb)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            h = attend(attn, h)
            h = resnet(h, emb)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual

        m = 0
        for block in self.up_blocks:
            attns = getattr(block, "attentions", None)
            last = len(block.resnets) - 1
            for j, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
                if attns is not None:
                    h = attend(attns[j], h)
                if j == last and block.upsamplers is not None:
                    for up in block.upsamplers:
                        h = up(h)
                if self.up_motion_modules is not None:
                    h = self.up_motion_modules[m](h, frames)
                    m += 1

        if self.conv_out is None:
            return None
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))

    @torch.no_grad()
    def write_bank(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> FeatureBank:
        """Run the net on clean latents [S,4,h,w] (one row per source) and return their
        self-attention inputs. Motion modules, if any, are not used here (no frame axis)."""
        if self.has_motion_modules:
            raise ValueError("the appearance net has no motion modules")
        rec = BankRecorder(self.num_bank_layers)
        self.forward(sample, timestep, encoder_hidden_states, bank=rec)
        return rec.bank()
