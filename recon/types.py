"""Stage contracts: Portrait -> BackView -> ViewSet -> Scene -> Assets (DESIGN §4).

Only these objects cross stage boundaries. Each one saves to and loads from a
folder; stage functions never touch the run directory themselves (rundir.py does).
Images are numpy uint8 HxWxC; cameras follow recon.cameras (cam2world OpenCV,
normalised intrinsics).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import cameras
from .errors import InputError
from .imageio_safe import read_png_rgba, write_png
from .rundir import file_digest as sha256_of


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# --------------------------------------------------------------------------- Portrait
@dataclass
class Portrait:
    """The aligned, matted input: what every later stage conditions on."""

    image: np.ndarray            # (S, S, 3) uint8, the 512^2 PanoHead-aligned crop
    alpha: np.ndarray            # (S, S) uint8 foreground matte
    c2w: np.ndarray              # (4, 4) estimated camera, PanoHead convention
    K: np.ndarray                # (3, 3) normalised intrinsics
    yaw_deg: float               # head pose as camera azimuth (0 = frontal, + = camera toward subject's left)
    pitch_deg: float             # camera elevation (+ = camera above)
    roll_deg: float              # in-plane rotation removed by the crop
    landmarks: np.ndarray        # (L, 2) float, crop pixel coordinates
    crop_from_source: np.ndarray # (3, 3) maps source pixel (x, y, 1) -> crop pixel
    source: str = ""
    source_size: tuple[int, int] = (0, 0)   # (width, height)
    face_box: tuple[float, float, float, float] = (0, 0, 0, 0)  # source pixels x, y, w, h
    notes: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def label(self) -> list[float]:
        return cameras.label25(self.c2w, self.K)

    @property
    def rgba(self) -> np.ndarray:
        return np.dstack([self.image, self.alpha])

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_png(folder / "image.png", self.image)
        write_png(folder / "alpha.png", self.alpha)
        write_png(folder / "rgba.png", self.rgba)
        cameras.write_dataset_json(folder / "dataset.json", [("image.png", self.label)])
        meta = {
            "c2w": self.c2w, "K": self.K, "yaw_deg": self.yaw_deg, "pitch_deg": self.pitch_deg,
            "roll_deg": self.roll_deg, "landmarks": self.landmarks, "crop_from_source": self.crop_from_source,
            "source": self.source, "source_size": list(self.source_size), "face_box": list(self.face_box),
            "notes": self.notes, "meta": self.meta,
        }
        (folder / "portrait.json").write_text(json.dumps(_jsonable(meta), indent=1))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Portrait":
        folder = Path(folder)
        if not (folder / "portrait.json").is_file():
            raise InputError(f"{folder} holds no preprocessed portrait (portrait.json missing)",
                             hint="run `portrait3d preprocess IMAGE --out RUN` first")
        m = json.loads((folder / "portrait.json").read_text())
        rgba = read_png_rgba(folder / "rgba.png")
        return cls(
            image=rgba[..., :3].copy(), alpha=rgba[..., 3].copy(),
            c2w=np.array(m["c2w"]), K=np.array(m["K"]), yaw_deg=m["yaw_deg"], pitch_deg=m["pitch_deg"],
            roll_deg=m["roll_deg"], landmarks=np.array(m["landmarks"], dtype=np.float64).reshape(-1, 2),
            crop_from_source=np.array(m["crop_from_source"]), source=m["source"],
            source_size=tuple(m["source_size"]), face_box=tuple(m["face_box"]), notes=m["notes"], meta=m["meta"],
        )


# --------------------------------------------------------------------------- BackView
@dataclass
class BackView:
    """The back-of-head image I_back (camera at azimuth 180)."""

    image: np.ndarray   # (S, S, 4) uint8 RGBA
    c2w: np.ndarray     # (4, 4)
    K: np.ndarray       # (3, 3) normalised
    backend: str = "proxy"
    meta: dict = field(default_factory=dict)

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_png(folder / "back.png", self.image)
        cameras.write_dataset_json(folder / "dataset.json", [("back.png", cameras.label25(self.c2w, self.K))])
        (folder / "backview.json").write_text(json.dumps(_jsonable({"backend": self.backend, "meta": self.meta}), indent=1))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "BackView":
        folder = Path(folder)
        entries = cameras.read_dataset_json(folder / "dataset.json")
        info = json.loads((folder / "backview.json").read_text())
        _, c2w, K = entries[0]
        return cls(read_png_rgba(folder / "back.png"), c2w, K, info.get("backend", "unknown"), info.get("meta", {}))


# ---------------------------------------------------------------------------- ViewSet
@dataclass
class ViewSet:
    """N posed RGBA views of one head. Any folder of RGBA PNGs + dataset.json is one."""

    images: np.ndarray                 # (N, H, W, 4) uint8 RGBA
    c2w: np.ndarray                    # (N, 4, 4)
    K: np.ndarray                      # (N, 3, 3) normalised intrinsics
    names: list[str]
    depth: np.ndarray | None = None    # (N, H, W) float32 camera-z depth, 0 where empty
    backend: str = "unknown"
    preview: bool = False              # True for the weight-free proxy back-end
    meta: dict = field(default_factory=dict)
    init_points: np.ndarray | None = None  # (P, 3) float32 coarse head surface (PanoHead inversion) to start fitting from

    def __post_init__(self):
        n = len(self.names)
        if self.init_points is not None:
            pts = np.asarray(self.init_points, dtype=np.float32)
            if pts.ndim != 2 or pts.shape[1] != 3 or not len(pts) or not np.isfinite(pts).all():
                raise InputError(f"ViewSet init_points must be a non-empty finite (P, 3) array, got {pts.shape}")
            self.init_points = pts
        if self.images.ndim != 4 or self.images.shape[0] != n or self.images.shape[-1] != 4:
            raise InputError(f"ViewSet images must be (N, H, W, 4) with N = {n}, got {self.images.shape}")
        if self.c2w.shape != (n, 4, 4) or self.K.shape != (n, 3, 3):
            raise InputError(f"ViewSet cameras must be ({n}, 4, 4) and ({n}, 3, 3), got {self.c2w.shape} and {self.K.shape}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def resolution(self) -> tuple[int, int]:
        """(height, width)"""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def K_pixels(self) -> np.ndarray:
        h, w = self.resolution
        return cameras.intrinsics_pixels(self.K, w, h)

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, img in zip(self.names, self.images):
            write_png(folder / name, img)
        cameras.write_dataset_json(folder / "dataset.json",
                                   [(n, cameras.label25(c, k)) for n, c, k in zip(self.names, self.c2w, self.K)])
        if self.depth is not None:
            np.savez_compressed(folder / "depth.npz", depth=self.depth.astype(np.float32))
        if self.init_points is not None:
            np.save(folder / "init_points.npy", self.init_points.astype(np.float32), allow_pickle=False)
        (folder / "viewset.json").write_text(json.dumps(_jsonable(
            {"backend": self.backend, "preview": self.preview, "count": len(self), "resolution": list(self.resolution), "meta": self.meta}), indent=1))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "ViewSet":
        """Load our own views/ folder, or any folder of images + PanoHead dataset.json."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"views folder {folder} does not exist", hint="pass a folder with RGBA PNGs and a dataset.json")
        entries = cameras.read_dataset_json(folder / "dataset.json")
        imgs, opaque = [], []
        for name, _, _ in entries:
            p = folder / name
            if not p.is_file():
                raise InputError(f"{folder}/dataset.json names {name!r} but that file is missing",
                                 hint="every label's name must be an image file next to dataset.json")
            rgba = read_png_rgba(p)
            opaque.append(bool((rgba[..., 3] == 255).all()))
            imgs.append(rgba)
        shapes = {im.shape for im in imgs}
        if len(shapes) != 1:
            raise InputError(f"views in {folder} have different sizes {sorted(shapes)}", hint="all views must share one resolution")
        info = json.loads((folder / "viewset.json").read_text()) if (folder / "viewset.json").is_file() else {}
        depth = None
        if (folder / "depth.npz").is_file():
            with np.load(folder / "depth.npz", allow_pickle=False) as z:
                depth = z["depth"]
        init_points = None
        if (folder / "init_points.npy").is_file():
            try:
                init_points = np.load(folder / "init_points.npy", allow_pickle=False)
            except ValueError as e:
                raise InputError(f"{folder}/init_points.npy is not a plain (P, 3) array ({e})",
                                 hint="delete it, or rerun the views stage") from None
        meta = dict(info.get("meta", {}))
        if all(opaque):
            meta["alpha_missing"] = True  # no matte: fitting treats every pixel as foreground
        return cls(
            images=np.stack(imgs), c2w=np.stack([e[1] for e in entries]), K=np.stack([e[2] for e in entries]),
            names=[e[0] for e in entries], depth=depth, backend=info.get("backend", "external"),
            preview=bool(info.get("preview", False)), meta=meta, init_points=init_points,
        )

    def subset(self, idx) -> "ViewSet":
        idx = list(idx)
        return ViewSet(self.images[idx], self.c2w[idx], self.K[idx], [self.names[i] for i in idx],
                       None if self.depth is None else self.depth[idx], self.backend, self.preview, dict(self.meta),
                       init_points=self.init_points)


# ------------------------------------------------------------------------------ Scene
SPLAT_KEYS = ("means", "quats", "scales", "opacities", "sh0", "shN")


@dataclass
class Scene:
    """Gaussian splats in gsplat's parameterisation, in our world frame.

    means (N,3); quats (N,4) wxyz, unnormalised; scales (N,3) log; opacities (N,) logit;
    sh0 (N,1,3) DC coefficients; shN (N,K,3) higher orders (K = (deg+1)^2 - 1).
    """

    params: dict            # name -> torch.Tensor (CPU, float32)
    sh_degree: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def num_gaussians(self) -> int:
        return int(self.params["means"].shape[0])

    def save(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: self.params[k].detach().cpu().contiguous().float() for k in SPLAT_KEYS if k in self.params},
                  str(folder / "scene.safetensors"))
        (folder / "scene.json").write_text(json.dumps(_jsonable(
            {"sh_degree": self.sh_degree, "num_gaussians": self.num_gaussians, "meta": self.meta}), indent=1))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Scene":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "scene.safetensors").is_file():
            raise InputError(f"{folder} holds no fitted scene (scene.safetensors missing)", hint="run `portrait3d fit RUN` first")
        info = json.loads((folder / "scene.json").read_text())
        return cls(load_file(str(folder / "scene.safetensors")), info["sh_degree"], info.get("meta", {}))


# ----------------------------------------------------------------------------- Assets
@dataclass
class Assets:
    """What export wrote: every file with size and sha256 (the `assets.json` object)."""

    root: str
    files: list[dict] = field(default_factory=list)   # {path (relative), kind, bytes, sha256}
    info: dict = field(default_factory=dict)           # frame, units, head height, faces, lods, preview...

    def add(self, path: str | os.PathLike, kind: str) -> None:
        p = Path(path)
        self.files.append({"path": str(p.relative_to(self.root)) if p.is_absolute() else str(p), "kind": kind,
                           "bytes": (Path(self.root) / p).stat().st_size if not p.is_absolute() else p.stat().st_size,
                           "sha256": sha256_of(p if p.is_absolute() else Path(self.root) / p)})

    def to_dict(self) -> dict:
        return _jsonable({"root": self.root, "files": self.files, "info": self.info})

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Assets":
        d = json.loads(Path(path).read_text())
        return cls(d["root"], d["files"], d.get("info", {}))
