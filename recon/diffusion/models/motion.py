"""View-consistency ("motion") module of DiffPortrait360: AnimateDiff-v1 temporal
transformer that attends across the frames of one window at every pixel.

Official layout (`*_blocks_motion_module.{k}.0.temporal_transformer.*`): per-frame
GroupNorm -> Linear proj_in -> one block of two `Temporal_Self` attentions (each: LayerNorm,
sinusoidal frame PE added to the *normalised* tokens, q/k/v from those tokens, residual on
the un-normalised tokens) + GEGLU feed-forward -> Linear proj_out -> residual.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn


def sinusoid_table(max_len: int, dim: int) -> torch.Tensor:
    """[1, max_len, dim] table, interleaved sin (even) / cos (odd) as the official PositionalEncoding."""
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


class TemporalSelfAttention(nn.Module):
    """Self-attention over the frame axis; tokens are [(b d), f, c] (d = pixels)."""

    def __init__(self, dim: int, heads: int, max_frames: int):
        super().__init__()
        self.heads = heads
        self.max_frames = max_frames
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        # Recomputed, not loaded: the official `pe` buffers equal this table (checked by the converter).
        self.register_buffer("pe", sinusoid_table(max_frames, dim), persistent=False)

    def _init_nonpersistent_buffers(self, device=None) -> None:
        self.pe = sinusoid_table(self.max_frames, self.to_q.in_features).to(device or self.to_q.weight.device)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        # x: [(b f), d, c] normalised tokens
        bf, d, c = x.shape
        b = bf // num_frames
        h = x.reshape(b, num_frames, d, c).permute(0, 2, 1, 3).reshape(b * d, num_frames, c)
        h = h + self.pe[:, :num_frames].to(h.dtype)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        q, k, v = (t.reshape(b * d, num_frames, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)  # scale = head_dim**-0.5, as the official kernel
        h = h.transpose(1, 2).reshape(b * d, num_frames, c)
        h = self.to_out[1](self.to_out[0](h))
        return h.reshape(b, d, num_frames, c).permute(0, 2, 1, 3).reshape(bf, d, c)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_frames: int, num_attention_blocks: int = 2):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            [TemporalSelfAttention(dim, heads, max_frames) for _ in range(num_attention_blocks)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_attention_blocks)])
        self.ff = FeedForward(dim, dropout=0.0, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x), num_frames) + x
        return self.ff(self.ff_norm(x)) + x


class MotionModule(nn.Module):
    """One view-consistency module: [(b f), C, h, w] -> same shape, frames of a window mix."""

    def __init__(self, channels: int, heads: int = 8, max_frames: int = 24, num_blocks: int = 1, norm_groups: int = 32):
        super().__init__()
        self.max_frames = max_frames
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(channels, heads, max_frames) for _ in range(num_blocks)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, hh, ww = x.shape
        if num_frames > self.max_frames or bf % num_frames:
            raise ValueError(f"motion module got {bf} rows for windows of {num_frames} frames (max {self.max_frames})")
        residual = x
        h = self.norm(x)  # GroupNorm per row = per frame
        h = h.permute(0, 2, 3, 1).reshape(bf, hh * ww, c)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, num_frames)
        h = self.proj_out(h)
        return h.reshape(bf, hh, ww, c).permute(0, 3, 1, 2) + residual
