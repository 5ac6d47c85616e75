"""Empty-prompt text context of DiffPortrait360.

The model is only ever conditioned on the empty prompt, so the CLIP-L context is one fixed
[1,77,768] tensor: token ids BOS + EOS*76 (what the openai/clip-vit-large-patch14 tokenizer
gives for ""), last hidden state. No tokenizer is needed; the converter stores the result
(`text_context.safetensors`) and this module computes it at most once per text encoder.
"""
from __future__ import annotations

import weakref

import torch

BOS_ID = 49406
EOS_ID = 49407
MAX_LENGTH = 77

_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()


def empty_prompt_ids(length: int = MAX_LENGTH) -> torch.Tensor:
    """int64 [1, length]: [49406] + [49407] * (length - 1) (padding is <|endoftext|>)."""
    return torch.tensor([[BOS_ID] + [EOS_ID] * (length - 1)], dtype=torch.long)


@torch.no_grad()
def encode_empty_prompt(text_encoder) -> torch.Tensor:
    """CLIP last_hidden_state of the empty prompt, float32 [1, 77, C], on the encoder's device."""
    cached = _CACHE.get(text_encoder)
    if cached is not None:
        return cached
    device = next(text_encoder.parameters()).device
    length = int(text_encoder.config.max_position_embeddings)
    out = text_encoder(input_ids=empty_prompt_ids(length).to(device)).last_hidden_state.float()
    _CACHE[text_encoder] = out
    return out
