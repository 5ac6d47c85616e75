"""Configuration: one frozen dataclass per stage plus RunConfig (DESIGN §3).

Presets are TOML files in presets/ (installed as recon.presets). A preset may
name a `base` preset it extends. `--set section.key=value` overrides; unknown
keys are errors that name the close matches.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import UsageError


@dataclass(frozen=True)
class PreprocessConfig:
    size: int = 512                 # model input side (PanoHead crop 563 -> 512)
    detector: str = "mediapipe"     # face detector / landmarker
    face_box: tuple[float, ...] | None = None   # x, y, w, h in source pixels: skip detection
    yaw: float | None = None        # override estimated pose (degrees, camera azimuth)
    pitch: float | None = None
    matte: str = "mediapipe"        # foreground matting model: mediapipe | none
    max_side: int = 12000           # refuse images larger than this on either side
    min_face: int = 48              # refuse faces smaller than this (pixels, source)


@dataclass(frozen=True)
class ViewsConfig:
    backend: str = "auto"           # auto | proxy | diffusion
    num_views: int = 36
    resolution: int = 512
    elevation: float = 0.0          # ring elevation in degrees (0 = PanoHead pitch pi/2)
    seed: int = 0
    # diffusion back-end
    steps: int = 50
    guidance: float = 3.0
    eta: float = 0.5
    dtype: str = "auto"             # auto | fp16 | bf16 | fp32
    windows: str = "circular"       # circular | independent (official behaviour)
    window_size: int = 8
    window_stride: int = 4
    window_weighting: str = "cosine" # cosine | equal: blend of overlapping windows' predictions
    frame_batch: int = 32           # frames per denoiser call (several windows batched)
    reference_latent: str = "sample"  # sample (official: VAE posterior sample) | mode
    official_schedule: bool = False # fp16-quantised schedule of the official sampler
    low_memory: bool = False
    condition_dir: str | None = None
    weights_dir: str | None = None
    noise: str = "auto"             # auto | panohead | proxy | none: source of 3D-aware noise
    inversion_steps: int = 200      # PanoHead W+ optimisation steps (noise from the inversion)
    inversion_finetune_steps: int = 5  # then generator fine-tune steps on the found w
    # proxy back-end
    proxy_detail: int = 256         # proxy head surface grid resolution
    proxy_texture: int = 1024       # proxy head texture resolution


@dataclass(frozen=True)
class FitConfig:
    method: str = "splat"           # splat (our CPU rasterizer / gsplat on CUDA) | nerfstudio-splatfacto | nerfstudio-nerfacto
    nerfstudio_bin: str | None = None     # folder holding ns-train / ns-export (default: found on PATH)
    nerfstudio_python: str | None = None  # or: the python of nerfstudio's environment (runs its scripts with -m)
    nerfstudio_args: tuple[str, ...] = ()  # extra ns-train options, e.g. ["--pipeline.datamanager.train-num-rays-per-batch", "1024"]
    steps: int = 600
    resolution: int = 128           # training resolution (views are resized)
    num_init: int = 6000            # initial Gaussians from the visual hull
    max_gaussians: int = 20000
    sh_degree: int = 1
    lr_means: float = 1.6e-4
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_sh0: float = 2.5e-3
    lr_shN: float = 1.25e-4
    ssim_weight: float = 0.2
    alpha_weight: float = 0.1
    flatten_weight: float = 0.0     # loss weight on the mean smallest Gaussian axis (flat, surfel-like splats; 0 = off)
    prune_outside: bool = True      # relocate Gaussians whose centres leave the views' visual hull (+2 voxels)
    holdout_every: int = 9          # every k-th view is held out for metrics (0 = none)
    checkpoint_every: int = 100
    batch_views: int = 2
    tile_size: int = 16
    strategy: str = "auto"          # auto (gsplat-mcmc on CUDA, torch-mcmc elsewhere) | gsplat-mcmc | torch-mcmc
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = ("glb", "splat", "mp4")
    faces: int = 40000              # triangle budget of LOD0 (checked after decimation)
    lods: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)
    lods_in_glb: bool = True        # head.glb carries LOD1+ as MSFT_lod nodes (LOD0 stays the scene node)
    texture: int = 1024             # albedo texture side
    head_height_m: float = 0.25     # real-world height the mesh is scaled to (metres)
    mesh_resolution: int = 128      # TSDF / marching-cubes grid
    render_resolution: int = 256    # depth renders used for meshing and baking
    turntable_frames: int = 120
    turntable_fps: int = 30
    turntable_resolution: int = 384
    turntable_elevation: float = 0.0
    turntable_source: str = "splats"  # splats (render_scene) | mesh (the textured LOD0) | both (turntable.mp4 + turntable_mesh.mp4)
    splat_orientation: str = "gltf"   # gltf (+Y up, overlays the GLB) | supersplat (Y down: opens upright in SuperSplat)
    face_texel_scale: float = 2.0     # UV atlas: linear texel density of the face region / the rest (1.0 = uniform)
    normal_map: bool = False          # bake a tangent-space normal map of the dense surface per LOD


@dataclass(frozen=True)
class RunConfig:
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    device: str = "auto"
    seed: int = 0
    preset: str = "default"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def section(self, name: str) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(getattr(self, name))))


SECTIONS = ("preprocess", "views", "fit", "export")
VALID_FORMATS = ("glb", "obj", "ply", "splat", "mp4", "gif")
FIT_METHODS = ("splat", "nerfstudio-splatfacto", "nerfstudio-nerfacto")
TEXTURE_SIZES = (256, 512, 1024, 2048, 4096, 8192)
TURNTABLE_SOURCES = ("splats", "mesh", "both")
SPLAT_ORIENTATIONS = ("gltf", "supersplat")


# --------------------------------------------------------------------------- parsing
def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn a TOML value or a --set string into the field's declared type."""
    origin = get_origin(typ)
    args = get_args(typ)
    if origin is type(None) or typ is type(None):
        return None
    # Optional[X] / X | None
    if args and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        elem = args[0] if args else str
        return tuple(_coerce(v, elem, key) for v in value)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}={value!r} is not a valid {getattr(typ, '__name__', typ)}",
                         hint=f"give {key} a {getattr(typ, '__name__', typ)} value") from None
    return value


def _apply(obj: Any, updates: dict, prefix: str) -> Any:
    hints = get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    changes = {}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            candidates = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(full, candidates, n=3, cutoff=0.5)
            raise UsageError(f"unknown config key {full!r}",
                             hint=("did you mean " + ", ".join(close) + "?") if close else
                             f"valid keys: {', '.join(candidates)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UsageError(f"{full} is a section, not a value", hint=f"set {full}.KEY=VALUE")
            changes[key] = _apply(current, value, f"{full}.")
        else:
            changes[key] = _coerce(value, hints[key], full)
    return replace(obj, **changes)


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    out = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        out += _all_keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [f"{prefix}{f.name}"]
    return out


def parse_set(items: list[str] | None) -> dict:
    """['fit.steps=500', 'export.faces=20000'] -> nested dict (values stay strings)."""
    nested: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set {item!r} is not KEY=VALUE", hint="e.g. --set fit.steps=500")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UsageError(f"--set {item!r} has an empty key", hint="e.g. --set fit.steps=500")
        d = nested
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise UsageError(f"--set {item!r} conflicts with another --set", hint="set each key once")
        d[parts[-1]] = value.strip()
    return nested


# --------------------------------------------------------------------------- presets
def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("recon.presets").iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise UsageError(f"unknown preset {name!r}",
                         hint=("did you mean " + ", ".join(close) + "? " if close else "") + f"presets: {', '.join(names)}")
    return resources.files("recon.presets").joinpath(f"{name}.toml").read_text()


def preset_dict(name: str, _seen: tuple = ()) -> dict:
    """The preset's settings with its `base` chain merged in (base first)."""
    if name in _seen:
        raise UsageError(f"preset {name!r} extends itself through {' -> '.join(_seen)}")
    try:
        data = tomllib.loads(preset_text(name))
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"preset {name!r} is not valid TOML: {e}") from None
    base = data.pop("base", None)
    merged = preset_dict(base, _seen + (name,)) if base else {}
    return _deep_merge(merged, data)


def load_toml_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {p} does not exist", hint="pass a TOML file of preset settings")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {p} is not valid TOML: {e}") from None


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(preset: str = "default", overrides: dict | None = None, sets: list[str] | None = None) -> RunConfig:
    """Preset (+ its bases), then `overrides` (already typed, e.g. from CLI flags), then --set strings."""
    cfg = _apply(RunConfig(), preset_dict(preset), "")
    cfg = replace(cfg, preset=preset)
    if overrides:
        cfg = _apply(cfg, overrides, "")
    if sets:
        cfg = _apply(cfg, parse_set(sets), "")
    validate(cfg)
    return cfg


def from_dict(d: dict) -> RunConfig:
    return _apply(RunConfig(), d, "")


def all_keys() -> list[str]:
    return _all_keys(RunConfig())


def validate(cfg: RunConfig) -> None:
    bad = [f for f in cfg.export.formats if f not in VALID_FORMATS]
    if bad:
        close = difflib.get_close_matches(bad[0], VALID_FORMATS, n=2)
        raise UsageError(f"unknown export format {bad[0]!r}",
                         hint=("did you mean " + ", ".join(close) + "? " if close else "") + f"formats: {', '.join(VALID_FORMATS)}")
    if cfg.views.backend not in ("auto", "proxy", "diffusion"):
        raise UsageError(f"unknown views backend {cfg.views.backend!r}", hint="use auto, proxy or diffusion")
    if not 4 <= cfg.views.num_views <= 360:
        raise UsageError(f"views.num_views={cfg.views.num_views} is out of range", hint="use 4..360 (default 36)")
    if cfg.views.resolution not in (128, 256, 384, 512, 768, 1024):
        raise UsageError(f"views.resolution={cfg.views.resolution} is not supported", hint="use 128, 256, 384, 512, 768 or 1024")
    if cfg.fit.method not in FIT_METHODS:
        close = difflib.get_close_matches(cfg.fit.method, FIT_METHODS, n=2)
        raise UsageError(f"unknown fit method {cfg.fit.method!r}",
                         hint=("did you mean " + ", ".join(close) + "? " if close else "") + f"methods: {', '.join(FIT_METHODS)}")
    if cfg.fit.strategy not in ("auto", "gsplat-mcmc", "torch-mcmc"):
        raise UsageError(f"unknown fit.strategy {cfg.fit.strategy!r}", hint="use auto, gsplat-mcmc (CUDA) or torch-mcmc")
    if cfg.fit.steps < 1 or cfg.fit.resolution < 16:
        raise UsageError("fit.steps must be >= 1 and fit.resolution >= 16")
    if cfg.export.faces < 100:
        raise UsageError(f"export.faces={cfg.export.faces} is too small", hint="use at least 100 triangles")
    if not all(0 < x <= 1 for x in cfg.export.lods):
        raise UsageError(f"export.lods={cfg.export.lods} must be fractions in (0, 1]", hint="e.g. 1,0.5,0.25,0.1")
    if any(b >= a for a, b in zip(cfg.export.lods, cfg.export.lods[1:])):
        raise UsageError(f"export.lods={cfg.export.lods} must be strictly decreasing", hint="e.g. 1,0.5,0.25,0.1")
    tex = cfg.export.texture
    if tex not in TEXTURE_SIZES:
        raise UsageError(f"export.texture={tex} is not a supported texture size",
                         hint="use 1k, 2k, 4k (or 256, 512, 1024, 2048, 4096, 8192)")
    if cfg.export.turntable_source not in TURNTABLE_SOURCES:
        raise UsageError(f"export.turntable_source={cfg.export.turntable_source!r} is not one of {', '.join(TURNTABLE_SOURCES)}",
                         hint="splats renders the Gaussians, mesh the textured LOD0, both writes one video of each")
    if cfg.export.splat_orientation not in SPLAT_ORIENTATIONS:
        raise UsageError(f"export.splat_orientation={cfg.export.splat_orientation!r} is not one of {', '.join(SPLAT_ORIENTATIONS)}",
                         hint="gltf overlays the GLB; supersplat is Y-down so SuperSplat shows it upright")
    if cfg.export.head_height_m <= 0:
        raise UsageError("export.head_height_m must be positive")
    if not 0.25 <= cfg.export.face_texel_scale <= 8:
        raise UsageError(f"export.face_texel_scale={cfg.export.face_texel_scale} is outside [0.25, 8]",
                         hint="1.0 = uniform texel density, 2.0 = twice the linear density on the face")
