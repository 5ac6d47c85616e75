"""Reference ("appearance") attention through diffusers attention processors.

The appearance net writes the input of each of its self-attention layers (`norm1(x)`,
exactly what attn1 receives) into a `BankRecorder`; the main UNet's attn1 layers then read
the matching `FeatureBank` entry and attend over `cat([norm1(x), ref, back], tokens)` with
their own to_k/to_v. Entries hold one row per source (reference, back) and are broadcast
over the frames of a window, never copied per frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class FeatureBank:
    """entries[i]: [S, N_i, C_i] self-attention inputs of layer i (execution order), one row
    per source: row 0 = reference, row 1 = back view when given."""

    entries: list[torch.Tensor]
    # Projected K/V of the bank per (layer, id(attn)): the bank is reused by every window of a
    # step, so the projection is done once.
    _kv: dict = field(default_factory=dict, repr=False)

    @property
    def num_sources(self) -> int:
        return int(self.entries[0].shape[0]) if self.entries else 0

    def __len__(self) -> int:
        return len(self.entries)

    def tokens(self, index: int) -> torch.Tensor:
        """[1, S*N, C]: the sources' tokens concatenated in order (ref, then back)."""
        e = self.entries[index]
        return e.reshape(1, e.shape[0] * e.shape[1], e.shape[2])

    def projected_kv(self, index: int, attn) -> tuple[torch.Tensor, torch.Tensor]:
        key = (index, id(attn))
        kv = self._kv.get(key)
        if kv is None:
            tok = self.tokens(index).to(attn.to_k.weight.dtype)
            kv = (attn.to_k(tok), attn.to_v(tok))
            self._kv[key] = kv
        return kv


class BankRecorder:
    """Collects the self-attention inputs of the appearance net (write mode)."""

    mode = "write"

    def __init__(self, num_layers: int):
        self.entries: list[torch.Tensor | None] = [None] * num_layers

    def record(self, index: int, hidden_states: torch.Tensor) -> None:
        if self.entries[index] is not None:
            raise RuntimeError(f"feature-bank layer {index} written twice in one pass")
        self.entries[index] = hidden_states

    def bank(self) -> FeatureBank:
        missing = [i for i, e in enumerate(self.entries) if e is None]
        if missing:
            raise RuntimeError(f"feature-bank layers {missing} were not written")
        return FeatureBank(list(self.entries))


def _attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, n, _ = q.shape
    hd = q.shape[-1] // attn.heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], attn.heads, hd).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    return out.transpose(1, 2).reshape(b, n, attn.heads * hd)


class BankAttnProcessor:
    """Processor for every attention of a DP360 UNet.

    `layer_index` is the position of this attn1 in execution order (None for cross-attention).
    `bank` (passed through `cross_attention_kwargs`) is None (plain attention), a
    `BankRecorder` (record norm1(x), then plain self-attention) or a `FeatureBank` (read).
    """

    def __init__(self, layer_index: int | None = None):
        self.layer_index = layer_index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, bank=None):
        if attention_mask is not None:
            raise ValueError("DP360 attention takes no attention mask")
        # hidden_states: [B, N, C]; for attn1 it is norm1(x)
        q = attn.to_q(hidden_states)
        if encoder_hidden_states is not None:  # cross-attention on the text context
            k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        else:
            k, v = attn.to_k(hidden_states), attn.to_v(hidden_states)
            if bank is not None and self.layer_index is not None:
                if isinstance(bank, BankRecorder):
                    bank.record(self.layer_index, hidden_states)
                else:
                    kb, vb = bank.projected_kv(self.layer_index, attn)  # [1, S*N, C]
                    b = hidden_states.shape[0]
                    k = torch.cat([k, kb.to(k.dtype).expand(b, -1, -1)], dim=1)
                    v = torch.cat([v, vb.to(v.dtype).expand(b, -1, -1)], dim=1)
        out = _attention(attn, q, k, v)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
