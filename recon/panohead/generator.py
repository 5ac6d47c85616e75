"""PanoHead's tri-grid generator (TriPlaneGenerator, CVPR'23) in plain PyTorch.

    ws = G.mapping(z, c_cond, truncation_psi=0.7)            # [B, 14, 512]
    out = G.synthesis(ws, c_render, generator=torch.Generator().manual_seed(0))
    out["image"]        # [B, 3, 512, 512] SR output (roughly [-1, 1] for trained weights)
    out["image_raw"]    # [B, 3, R, R] raw neural render, R = neural_rendering_resolution
    out["image_depth"]  # [B, 1, R, R]   out["image_mask"]  # [B, 1, R, R]

Unlike the official module, nothing here mutates state: the neural rendering
resolution and rendering options are per-call arguments over the config defaults.
Cameras are 25-value labels (recon.cameras.label25): cam2world (16) + normalised K (9).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsError
from .networks import MappingNetwork, StyleGAN2Backbone, SynthesisNetwork, ToRGBLayer
from .renderer import OSGDecoder, RenderDraws, RenderOptions, _Uniform, ray_bundle, render_trigrid
from .superres import SuperresolutionHybrid8XDC

SR_MODULE = "training.superresolution.SuperresolutionHybrid8XDC"


@dataclass(frozen=True)
class PanoHeadConfig:
    """Everything the constructor needs; defaults = the released
    easy-khair-180-gpc0.8-trans10-025000.pkl (see fixtures/panohead/README §1)."""

    z_dim: int = 512
    c_dim: int = 25
    w_dim: int = 512
    img_resolution: int = 512
    img_channels: int = 3
    mapping_layers: int = 2
    channel_base: int = 32768
    channel_max: int = 512
    num_fp16_res: int = 0
    conv_clamp: float | None = None
    sr_num_fp16_res: int = 4
    triplane_size: int = 256
    triplane_depth: int = 3
    neural_rendering_resolution: int = 64
    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    ray_start: float = 2.25
    ray_end: float = 3.3
    box_warp: float = 1.0
    c_scale: float = 1.0
    c_gen_conditioning_zero: bool = False
    decoder_lr_mul: float = 1.0
    decoder_activation: str = "none"
    use_torgb_raw: bool = True
    use_background: bool = True
    sr_antialias: bool = True
    avg_camera_radius: float = 2.7
    avg_camera_pivot: tuple = (0.0, 0.0, 0.2)
    density_noise: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["avg_camera_pivot"] = list(self.avg_camera_pivot)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PanoHeadConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise WeightsError(f"PanoHead config has unknown keys {unknown}", hint="the config.json is from another version")
        d = dict(d)
        if "avg_camera_pivot" in d:
            d["avg_camera_pivot"] = tuple(d["avg_camera_pivot"])
        return cls(**d)

    @classmethod
    def from_init_kwargs(cls, init_kwargs: dict, runtime: dict | None = None) -> "PanoHeadConfig":
        """Official TriPlaneGenerator init_kwargs (+ runtime attributes of the pickled
        object, which win: scripts mutate rendering_kwargs) -> config. Refuses options
        this reimplementation does not have instead of ignoring them."""
        k = dict(init_kwargs)
        runtime = runtime or {}
        rk = dict(k.get("rendering_kwargs", {}))
        rk.update(runtime.get("rendering_kwargs") or {})

        def need(cond, what):
            if not cond:
                raise WeightsError(f"unsupported PanoHead configuration: {what}",
                                   hint="only the tri-grid PanoHead generator with SuperresolutionHybrid8XDC is supported")

        need(k.get("architecture", "skip") == "skip", f"architecture={k.get('architecture')!r}")
        need(rk.get("superresolution_module") == SR_MODULE, f"superresolution_module={rk.get('superresolution_module')!r}")
        need(rk.get("clamp_mode", "softplus") == "softplus", f"clamp_mode={rk.get('clamp_mode')!r}")
        need(not rk.get("disparity_space_sampling", False), "disparity_space_sampling=True")
        need(not isinstance(rk.get("ray_start"), str), "ray_start='auto'")
        need(not rk.get("white_back", False), "white_back=True")
        need(k.get("fused_modconv_default", "inference_only") == "inference_only",
             f"fused_modconv_default={k.get('fused_modconv_default')!r}")
        need(rk.get("superresolution_noise_mode", "none") == "none", "superresolution_noise_mode != 'none'")
        mk = dict(k.get("mapping_kwargs") or {})
        need(set(mk) <= {"num_layers"}, f"mapping_kwargs={mk}")
        return cls(
            z_dim=int(k["z_dim"]), c_dim=int(k["c_dim"]), w_dim=int(k["w_dim"]),
            img_resolution=int(k["img_resolution"]), img_channels=int(k["img_channels"]),
            mapping_layers=int(mk.get("num_layers", 8)), channel_base=int(k.get("channel_base", 32768)),
            channel_max=int(k.get("channel_max", 512)), num_fp16_res=int(k.get("num_fp16_res", 4)),
            conv_clamp=k.get("conv_clamp"), sr_num_fp16_res=int(k.get("sr_num_fp16_res", 0)),
            triplane_size=int(rk["triplane_size"]), triplane_depth=int(rk.get("triplane_depth", 1)),
            neural_rendering_resolution=int(runtime.get("neural_rendering_resolution", 64)),
            depth_resolution=int(rk["depth_resolution"]),
            depth_resolution_importance=int(rk["depth_resolution_importance"]),
            ray_start=float(rk["ray_start"]), ray_end=float(rk["ray_end"]), box_warp=float(rk["box_warp"]),
            c_scale=float(rk.get("c_scale", 0)), c_gen_conditioning_zero=bool(rk.get("c_gen_conditioning_zero", False)),
            decoder_lr_mul=float(rk.get("decoder_lr_mul", 1)), decoder_activation=str(rk["decoder_activation"]),
            use_torgb_raw=bool(rk.get("use_torgb_raw", False)), use_background=bool(rk.get("use_background", False)),
            sr_antialias=bool(rk["sr_antialias"]), avg_camera_radius=float(rk.get("avg_camera_radius", 2.7)),
            avg_camera_pivot=tuple(float(v) for v in rk.get("avg_camera_pivot", (0, 0, 0.2))),
            density_noise=float(rk.get("density_noise", 0) or 0),
        )


class PanoHeadGenerator(nn.Module):
    def __init__(self, config: PanoHeadConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = dataclasses.replace(config or PanoHeadConfig(), **overrides) if overrides else (config or PanoHeadConfig())
        if not cfg.use_torgb_raw:
            raise ValueError("only use_torgb_raw=True (the released PanoHead) is implemented")
        self.config = cfg
        # Registered by training_loop.py on the official G; unused in forward, kept for strict loading.
        self.register_buffer("dataset_label_std", torch.ones([cfg.c_dim]))
        self.backbone = StyleGAN2Backbone(
            cfg.z_dim, cfg.c_dim, cfg.w_dim, img_resolution=cfg.triplane_size,
            img_channels=32 * 3 * cfg.triplane_depth, mapping_layers=cfg.mapping_layers,
            channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=cfg.num_fp16_res,
            conv_clamp=cfg.conv_clamp)
        self.superresolution = SuperresolutionHybrid8XDC(32, cfg.img_resolution, cfg.sr_num_fp16_res, cfg.sr_antialias)
        self.decoder = OSGDecoder(32, lr_multiplier=cfg.decoder_lr_mul, activation=cfg.decoder_activation)
        self.torgb = ToRGBLayer(32, 3, cfg.w_dim)
        self.bcg_synthesis = (SynthesisNetwork(cfg.w_dim, SuperresolutionHybrid8XDC.input_resolution, 32,
                                               channel_base=cfg.channel_base // 2, channel_max=cfg.channel_max,
                                               num_fp16_res=cfg.num_fp16_res, conv_clamp=cfg.conv_clamp)
                              if cfg.use_background else None)
        # "trans10" camera self-adaptation: a 3-output mapping whose output shifts the camera position.
        self.t_mapping = MappingNetwork(cfg.z_dim, cfg.c_dim, 3, num_ws=1, num_layers=cfg.mapping_layers,
                                        last_activation="linear", lr_multiplier=1.0)

    # ------------------------------------------------------------------ properties
    @property
    def num_ws(self) -> int:
        return self.backbone.num_ws

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def img_resolution(self) -> int:
        return self.config.img_resolution

    def render_options(self, **overrides) -> RenderOptions:
        c = self.config
        opt = RenderOptions(c.ray_start, c.ray_end, c.depth_resolution, c.depth_resolution_importance,
                            c.box_warp, c.triplane_depth, c.density_noise)
        return dataclasses.replace(opt, **overrides) if overrides else opt

    # ------------------------------------------------------------------- mappings
    def _cond(self, c: torch.Tensor) -> torch.Tensor:
        if self.config.c_gen_conditioning_zero:
            c = torch.zeros_like(c)
        return c * self.config.c_scale

    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None) -> torch.Tensor:
        """z [B, z_dim], conditioning label c [B, 25] -> ws [B, num_ws, w_dim]."""
        return self.backbone.mapping(z, self._cond(c), truncation_psi, truncation_cutoff)

    def apply_delta_c(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                      truncation_cutoff: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Learned camera-position offset: c_new = c with delta added at label entries 3, 7, 11."""
        if self.config.c_gen_conditioning_zero:
            c = torch.zeros_like(c)
        delta = self.t_mapping(z, c * self.config.c_scale, truncation_psi, truncation_cutoff).squeeze(1)
        offset = torch.zeros_like(c)
        offset[:, [3, 7, 11]] = delta
        return c + offset, delta

    # ------------------------------------------------------------------ synthesis
    def planes(self, ws: torch.Tensor, noise_mode: str = "const", generator: torch.Generator | None = None):
        """Tri-grid [B, 3, 32*depth, S, S] (channel = feature*depth + slice)."""
        p = self.backbone.synthesis(ws, noise_mode=noise_mode, generator=generator)
        return p.view(len(p), 3, 32 * self.config.triplane_depth, p.shape[-2], p.shape[-1])

    def synthesis(self, ws: torch.Tensor, c: torch.Tensor, *, neural_rendering_resolution: int | None = None,
                  noise_mode: str = "const", generator: torch.Generator | None = None,
                  draws: RenderDraws | None = None, planes: torch.Tensor | None = None,
                  return_intermediates: bool = False, chunk: int | None = None, force_fp32: bool = False,
                  superresolution: bool = True, **render_overrides) -> dict:
        """Render ws [B, num_ws, w_dim] from cameras c [B, 25].

        Randomness: `draws` (injected uniforms) > `generator` > global torch RNG.
        `render_overrides` replace RenderOptions fields for this call (e.g. ray_start=2.35).
        `superresolution=False` skips the 512^2 SR network (out["image"] is None): the
        neural-resolution outputs do not depend on it and it dominates CPU time.
        """
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"ws must be [B, {self.num_ws}, {self.config.w_dim}], got {tuple(ws.shape)}")
        res = int(neural_rendering_resolution or self.config.neural_rendering_resolution)
        opt = self.render_options(**render_overrides)
        cam2world = c[:, :16].view(-1, 4, 4)
        intrinsics = c[:, 16:25].view(-1, 3, 3)
        origins, dirs = ray_bundle(cam2world, intrinsics, res)
        n = origins.shape[0]
        if planes is None:
            planes = self.planes(ws, noise_mode=noise_mode, generator=generator)
        rng = _Uniform(generator, draws, record=return_intermediates)
        feats, depth, weights, depths_fine = render_trigrid(planes, self.decoder, origins, dirs, opt, rng, chunk)

        feature_image = feats.permute(0, 2, 1).reshape(n, feats.shape[-1], res, res).contiguous()
        depth_image = depth.permute(0, 2, 1).reshape(n, 1, res, res)
        mask_raw = weights.permute(0, 2, 1).reshape(n, 1, res, res)
        if self.decoder.activation == "sigmoid":
            feature_image = feature_image * 2 - 1
        bcg_image = None
        if self.bcg_synthesis is not None:
            ws_bcg = ws[:, :self.bcg_synthesis.num_ws]
            if ws_bcg.shape[1] < self.bcg_synthesis.num_ws:  # fewer backbone ws: repeat the last (official)
                ws_bcg = torch.cat([ws_bcg, ws_bcg[:, -1:].repeat(1, self.bcg_synthesis.num_ws - ws_bcg.shape[1], 1)], 1)
            bcg_image = self.bcg_synthesis(ws_bcg, noise_mode=noise_mode, generator=generator)
            bcg_small = F.interpolate(bcg_image, size=feature_image.shape[2:], mode="bilinear",
                                      align_corners=False, antialias=self.config.sr_antialias)
            feature_image = feature_image + (1 - mask_raw) * bcg_small
        rgb_image = self.torgb(feature_image, ws[:, -1], fused_modconv=False).to(torch.float32)
        sr_image = self.superresolution(rgb_image, feature_image, ws, force_fp32=force_fp32) if superresolution else None
        out = {"image": sr_image, "image_raw": rgb_image, "image_depth": depth_image,
               "image_mask": mask_raw * (1 + 2 * 0.001) - 0.001}
        if return_intermediates:
            out.update(planes=planes, bcg_image=bcg_image, feature_image=feature_image, depths_fine=depths_fine,
                       draws=rng.recorded)
        return out

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, **synthesis_kwargs) -> dict:
        """Official G.forward: both mappings conditioned on the render camera c, then
        the camera shifted by t_mapping's delta before rendering."""
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff)
        c_new, _ = self.apply_delta_c(z, c, truncation_psi, truncation_cutoff)
        return self.synthesis(ws, c_new, **synthesis_kwargs)

    def sample_density(self, ws: torch.Tensor | None, coords: torch.Tensor, planes: torch.Tensor | None = None,
                       chunk: int = 2 ** 18) -> torch.Tensor:
        """Raw density sigma [B, M, 1] (before softplus(sigma - 1)) at world coords [B, M, 3]."""
        from .renderer import sample_trigrid
        if planes is None:
            planes = self.planes(ws)
        outs = []
        for i in range(0, coords.shape[1], chunk):
            _, sigma = self.decoder(sample_trigrid(planes, coords[:, i:i + chunk], self.config.box_warp,
                                                   self.config.triplane_depth))
            outs.append(sigma)
        return torch.cat(outs, 1)

    # --------------------------------------------------------------------- loading
    def load_official_state_dict(self, sd: dict, strict: bool = True) -> None:
        missing, unexpected = self.load_state_dict(sd, strict=False)
        if strict and (missing or unexpected):
            raise WeightsError(f"PanoHead weights do not fit the generator: missing {list(missing)[:5]}"
                               f"{'...' if len(missing) > 5 else ''}, unexpected {list(unexpected)[:5]}"
                               f"{'...' if len(unexpected) > 5 else ''}",
                               hint="the checkpoint is not the PanoHead tri-grid generator of this configuration")

    @classmethod
    def from_snapshot(cls, path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "PanoHeadGenerator":
        """Build from an official network-snapshot .pkl through the restricted loader (G_ema)."""
        from .safe_pickle import load_network_snapshot
        snap = load_network_snapshot(path, key="G_ema")
        if snap.class_name != "TriPlaneGenerator":
            raise WeightsError(f"{path}: G_ema is a {snap.class_name}, not PanoHead's TriPlaneGenerator")
        G = cls(PanoHeadConfig.from_init_kwargs(snap.init_kwargs, snap.runtime))
        G.load_official_state_dict(snap.state_dict)
        return G.eval().requires_grad_(False).to(device=device, dtype=dtype)

    @classmethod
    def from_state_dict_file(cls, path, config: PanoHeadConfig, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32) -> "PanoHeadGenerator":
        """Build from `torch.save(G_ema.state_dict())` (read with weights_only=True)."""
        from .safe_pickle import load_state_dict_file
        G = cls(config)
        G.load_official_state_dict(load_state_dict_file(path))
        return G.eval().requires_grad_(False).to(device=device, dtype=dtype)
