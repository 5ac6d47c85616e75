"""DiffPortrait360 networks in diffusers form, their hyper-parameters and a container.

`DP360Config` holds the official hyper-parameters (built in for the released SD1.5-size
checkpoints, or read from an official config.yaml/config.json such as the tiny fixtures)
and builds the five networks:
- unet:         DP360UNet (main UNet; + motion modules in the 360 model)
- appearance:   DP360UNet without output head (official `control_model`)
- controlnet:   diffusers ControlNetModel (official `pose_control_model`, camera condition)
- vae:          diffusers AutoencoderKL (official `first_stage_model`)
- text_encoder: transformers CLIPTextModel (official `cond_stage_model.transformer`)
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ...errors import WeightsError
from .bank import BankAttnProcessor, BankRecorder, FeatureBank
from .motion import MotionModule, sinusoid_table
from .unet import DP360UNet

__all__ = [
    "DP360Config", "DP360Models", "DP360UNet", "MotionModule", "FeatureBank", "BankRecorder",
    "BankAttnProcessor", "sinusoid_table", "MODEL_KINDS", "SUBMODELS",
]

MODEL_KINDS = ("dp360", "backhead")
SUBMODELS = ("unet", "appearance", "controlnet", "vae", "text_encoder")

# openai/clip-vit-large-patch14 text tower (what FrozenCLIPEmbedder loads).
CLIP_L_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}


@dataclass(frozen=True)
class DP360Config:
    """Official hyper-parameters (names as in the official YAML)."""

    kind: str = "dp360"  # "dp360" (360 model, motion modules) | "backhead" (back-view model)
    image_size: int = 64  # latent side
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    context_dim: int = 768
    motion_num_heads: int = 8
    motion_max_len: int = 24
    video_length: int = 8  # frames per window the 360 model was trained on
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)  # hard-coded in the official ControlNet
    vae_ch: int = 128
    vae_ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2
    z_channels: int = 4
    vae_resolution: int = 256
    scale_factor: float = 0.18215
    clip: dict = field(default_factory=lambda: dict(CLIP_L_TEXT))

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of {MODEL_KINDS}")

    @property
    def has_motion(self) -> bool:
        return self.kind == "dp360"

    @classmethod
    def full(cls, kind: str) -> "DP360Config":
        """The released checkpoints (SD1.5 numbers)."""
        return cls(kind=kind)

    @classmethod
    def from_official(cls, path: str | Path) -> "DP360Config":
        """Read an official config.yaml / config.json (as the fixtures' tiny ones)."""
        path = Path(path)
        try:
            text = path.read_text()
            if path.suffix in (".yaml", ".yml"):
                try:
                    import yaml  # PyYAML comes with transformers / huggingface_hub
                except ImportError:
                    raise WeightsError(f"reading {path.name} needs PyYAML", hint="pass the config.json instead") from None
                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
            p = raw["model"]["params"]
            u = p["unet_config"]["params"]
            dd = p["first_stage_config"]["params"]["ddconfig"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"cannot read the official model config {path}: {e}") from None
        if u.get("use_linear_in_transformer") or u.get("num_head_channels", -1) != -1:
            raise WeightsError(f"{path}: only SD1.5-style configs (conv proj_in, num_heads) are supported")
        mm = u.get("unet_additional_kwargs", {}) or {}
        motion = bool(mm.get("use_motion_module", False))
        mk = mm.get("motion_module_kwargs", {}) or {}
        clip = dict(CLIP_L_TEXT)
        for k, v in raw.items():  # the fixtures record their tiny CLIP next to the model
            if k.startswith("_tiny_clip_text_config"):
                clip = dict(v)
        return cls(
            kind="dp360" if motion else "backhead",
            image_size=int(p.get("image_size", 64)),
            model_channels=int(u["model_channels"]),
            channel_mult=tuple(int(c) for c in u["channel_mult"]),
            num_res_blocks=int(u["num_res_blocks"]),
            attention_resolutions=tuple(int(a) for a in u["attention_resolutions"]),
            num_heads=int(u["num_heads"]),
            context_dim=int(u["context_dim"]),
            motion_num_heads=int(mk.get("num_attention_heads", 8)),
            motion_max_len=int(mk.get("temporal_position_encoding_max_len", 24)),
            video_length=int(mk.get("video_length", 8)),
            vae_ch=int(dd["ch"]),
            vae_ch_mult=tuple(int(c) for c in dd["ch_mult"]),
            vae_num_res_blocks=int(dd["num_res_blocks"]),
            z_channels=int(dd["z_channels"]),
            vae_resolution=int(dd["resolution"]),
            scale_factor=float(p.get("scale_factor", 0.18215)),
            clip=clip,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DP360Config":
        d = dict(d)
        for k in ("channel_mult", "attention_resolutions", "hint_channels", "vae_ch_mult"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    # -- per-network constructor arguments ---------------------------------------------
    @property
    def attention_levels(self) -> tuple[bool, ...]:
        return tuple((2**i) in self.attention_resolutions for i in range(len(self.channel_mult)))

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    def unet_kwargs(self, *, appearance: bool = False) -> dict:
        return dict(
            sample_size=self.image_size,
            block_out_channels=self.block_out_channels,
            attention_levels=self.attention_levels,
            layers_per_block=self.num_res_blocks,
            attention_head_dim=self.num_heads,
            cross_attention_dim=self.context_dim,
            out_head=not appearance,
            motion_modules=self.has_motion and not appearance,
            motion_num_heads=self.motion_num_heads,
            motion_max_frames=self.motion_max_len,
        )

    def controlnet_kwargs(self) -> dict:
        return dict(
            in_channels=4,
            conditioning_channels=3,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels),
            block_out_channels=self.block_out_channels,
            layers_per_block=self.num_res_blocks,
            attention_head_dim=self.num_heads,
            cross_attention_dim=self.context_dim,
            use_linear_projection=False,
            conditioning_embedding_out_channels=self.hint_channels,
            flip_sin_to_cos=True,
            freq_shift=0,
        )

    def vae_kwargs(self) -> dict:
        n = len(self.vae_ch_mult)
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(self.vae_ch * m for m in self.vae_ch_mult),
            layers_per_block=self.vae_num_res_blocks,
            latent_channels=self.z_channels,
            norm_num_groups=32,
            sample_size=self.vae_resolution,
            scaling_factor=self.scale_factor,
        )

    def clip_config(self):
        from transformers import CLIPTextConfig

        return CLIPTextConfig(**self.clip)

    def build(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """Build one network with random init (`device="meta"`: no memory)."""
        from diffusers import AutoencoderKL, ControlNetModel
        from transformers import CLIPTextModel

        with torch.device(device):
            if name == "unet":
                m = DP360UNet(**self.unet_kwargs())
            elif name == "appearance":
                m = DP360UNet(**self.unet_kwargs(appearance=True))
            elif name == "controlnet":
                m = ControlNetModel(**self.controlnet_kwargs())
            elif name == "vae":
                m = AutoencoderKL(**self.vae_kwargs())
            elif name == "text_encoder":
                m = CLIPTextModel(self.clip_config())
            else:
                raise ValueError(f"unknown network {name!r}")
        m.eval().requires_grad_(False)
        return m.to(dtype) if dtype is not None else m


@dataclass
class DP360Models:
    """The five networks of one checkpoint plus the cached empty-prompt context."""

    config: DP360Config
    unet: DP360UNet
    appearance: DP360UNet
    controlnet: object
    vae: object
    text_encoder: object | None = None
    text_context: torch.Tensor | None = None  # [1,77,C] float32

    @property
    def kind(self) -> str:
        return self.config.kind

    def context(self) -> torch.Tensor:
        """Empty-prompt CLIP context [1,77,C] (float32), computed once."""
        if self.text_context is None:
            if self.text_encoder is None:
                raise WeightsError("no cached text context and no text encoder loaded")
            from ..text import encode_empty_prompt

            self.text_context = encode_empty_prompt(self.text_encoder)
        return self.text_context

    def denoiser(self):
        from ..denoiser import Denoiser

        return Denoiser(self.unet, self.appearance, self.controlnet)
