"""nerfstudio back-end, run out of process (DESIGN §2: nerfstudio 1.1.5 pins gsplat 1.4
and its own torch / torchvision, so it lives in its own environment and is never imported here).

    write_nerfstudio_dataset  ViewSet -> nerfstudio dataset folder (transforms.json)
    find_nerfstudio           locate ns-train / ns-export (FitConfig.nerfstudio_bin,
                              FitConfig.nerfstudio_python, or PATH); MissingError otherwise
    fit_nerfstudio            ns-train splatfacto|nerfacto, stream progress, ns-export,
                              read the result back into a Scene in OUR world frame

The dataset. Frames hold OpenGL cam2world poses (recon.cameras.to_opengl_c2w; the
world frame is ours, only the camera axes change), per-frame pixel intrinsics
(fl_x fl_y cx cy w h; pixel centres at +0.5 like ours) and RGBA PNGs. The matte
travels in the PNG's alpha: splatfacto and nerfacto composite RGBA targets over
their (random) background, which teaches them that the background is empty.
nerfstudio's `mask_path` means something else ("leave these pixels out of the
loss"): masking the background with it would leave empty space unconstrained and
grow floaters, so mask files are written (masks/) but referenced from the frames
only when asked (`masks=True`). Our held-out views become nerfstudio's eval split
(train_filenames / val_filenames / test_filenames). A visual-hull point cloud
(`ply_file_path`) seeds splatfacto instead of its random cube.

The dataparser (`nerfstudio-data`) then normalises the poses: orientation, centring
and scale (defaults "up", "poses", auto-scale to the unit box). We pass
`--orientation-method none` (the head needs no re-orientation, and a pure
translation + scale leaves view-dependent SH colour untouched), centring "poses"
and auto-scale on (splatfacto's thresholds assume a unit-size scene). Whatever it
did, it records `dataparser_transforms.json` ({"transform": 3x4 [R|t], "scale": s},
p_ns = s (R p + t)); we read that file and undo it exactly, rotating SH too when a
rotation is present.

Results. splatfacto: `ns-export gaussian-splat` -> splat.ply (INRIA layout) -> Scene
with the fitted Gaussians. nerfacto: `ns-export pointcloud` -> a coloured point
cloud; the Scene then holds one small, opaque, isotropic Gaussian per point (SH
degree 0, radius from the points' spacing) so the usual export (TSDF mesh, splat
files, turntables) runs on it; it is a surface sample of the NeRF, not a fitted
splat model, and scene.meta["representation"] says so.

Running it (checked against nerfstudio 1.1.5 with torch 2.15 on a CPU). When nerfstudio's
interpreter is known (fit.nerfstudio_python, or the `#!` line of ns-train) both tools run
through LAUNCHER, which (1) turns off the LPIPS metric that nerfacto and splatfacto build at
start, whose AlexNet backbone torchvision would download (offline: the run dies), and (2) lets
torch >= 2.6's weights_only loader read nerfstudio's own checkpoints (numpy scalars), without
which resuming and ns-export fail. The trainer gets --machine.device-type from fit.device
(auto: whatever nerfstudio's torch sees), no pose refinement (our cameras are exact; nerfacto
refines them by default), no eval renders, and plain progress rows. splatfacto needs CUDA
(it calls .cuda() while building the model, and gsplat has CUDA kernels only): without a GPU
it is refused up front (MissingError, exit 4). nerfacto runs on a CPU, slowly at nerfstudio's
GPU-sized defaults; fit.nerfstudio_args passes smaller ones (rays per batch, samples, hash grid).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import cameras
from ..export.splat_files import quat_mul
from ..config import FitConfig
from ..errors import InputError, MissingError, ReconError, StageError
from ..imageio_safe import write_png
from ..types import Scene, ViewSet

Progress = Callable[[int, int, str], None]

SH_C0 = 0.28209479177387814
INSTALL_HINT = ("install nerfstudio in its own environment (python -m venv ns && ns/bin/pip install nerfstudio) "
                "and put ns-train on PATH, or set fit.nerfstudio_bin=ns/bin or fit.nerfstudio_python=ns/bin/python")
METHODS = {"nerfstudio-splatfacto": "splatfacto", "nerfstudio-nerfacto": "nerfacto"}
EXPERIMENT, TIMESTAMP = "portrait3d", "run"
MAX_PLY_VERTICES = 50_000_000
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# nerfstudio's local writer prints "<step> (<pct>%)  <iter time>  <eta> ..." rows
_STEP_ROW = re.compile(r"^\s*(\d+)\s+\(\s*(\d+(?:\.\d+)?)%\)")
_CKPT = re.compile(r"step-(\d+)\.ckpt")
# Silence after which a nerfstudio command counts as hung (see _run): training prints a row every
# few steps; the point-cloud export prints nothing until it is done
TRAIN_IDLE_S, EXPORT_IDLE_S = 1800.0, 3600.0
_ORPHAN_GRACE_S = 20.0        # the command exited but something it spawned still holds its output pipe


# ------------------------------------------------------------------------- tools
@dataclass(frozen=True)
class NerfstudioTools:
    """Command prefixes that run nerfstudio's trainer and exporter.

    python: the interpreter of nerfstudio's environment when it is known and imports
    nerfstudio (fit.nerfstudio_python, or the `#!` line of ns-train); fit_nerfstudio then
    runs both tools through its launcher (see LAUNCHER) instead of train / export.
    info: what that interpreter reported (nerfstudio version, whether torch sees CUDA / MPS).
    """

    train: tuple[str, ...]
    export: tuple[str, ...]
    source: str          # how they were found (for logs and metrics)
    python: str | None = None
    info: dict | None = None


def _executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


# Asked of nerfstudio's interpreter, in a subprocess (nerfstudio never enters this process).
_PROBE = """import importlib.util, json, sys
if importlib.util.find_spec('nerfstudio') is None:
    sys.exit(7)
from importlib.metadata import version
import torch
mps = getattr(torch.backends, 'mps', None)
print(json.dumps({'nerfstudio': version('nerfstudio'), 'torch': torch.__version__,
                  'cuda': bool(torch.cuda.is_available()), 'mps': bool(mps is not None and mps.is_available())}))
"""


def probe_python(python: str | os.PathLike, timeout: float = 180.0) -> dict | None:
    """What nerfstudio's interpreter reports ({nerfstudio, torch, cuda, mps}); None when it
    has no nerfstudio. MissingError when it does not run at all."""
    try:
        r = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MissingError(f"{python} did not run ({e.__class__.__name__})", hint=INSTALL_HINT) from None
    if r.returncode == 7:
        return None
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
        if not isinstance(info, dict):
            raise ValueError
        return info
    except (ValueError, IndexError):
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise MissingError(f"{python} has nerfstudio but it does not import ({last[-300:]})",
                           hint="reinstall nerfstudio in that environment (torch and torchvision must match)") from None


def _shebang_python(script: str | os.PathLike) -> str | None:
    """The interpreter of a console script's `#!` line when it is a python (else None)."""
    try:
        with open(script, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode("utf-8", errors="replace").split()
    if not parts or "python" not in Path(parts[0]).name:
        return None
    return parts[0] if _executable(Path(parts[0])) else None


def _with_python(tools: NerfstudioTools) -> NerfstudioTools:
    """ns-train found as a script: use its interpreter (launcher route) when it imports nerfstudio."""
    py = _shebang_python(tools.train[0])
    if py is None:
        return tools
    try:
        info = probe_python(py)
    except MissingError:
        return tools          # its interpreter is odd: run the scripts as they are
    return tools if info is None else NerfstudioTools(tools.train, tools.export, tools.source, py, info)


def find_nerfstudio(cfg: FitConfig | None = None) -> NerfstudioTools:
    """ns-train / ns-export from cfg.nerfstudio_bin (a folder), cfg.nerfstudio_python
    (an interpreter of nerfstudio's environment: its scripts run with -m), or PATH."""
    cfg = cfg or FitConfig()
    if cfg.nerfstudio_bin:
        folder = Path(cfg.nerfstudio_bin).expanduser()
        tr, ex = folder / "ns-train", folder / "ns-export"
        missing = [p.name for p in (tr, ex) if not _executable(p)]
        if missing:
            raise MissingError(f"fit.nerfstudio_bin={cfg.nerfstudio_bin!r} holds no executable {' / '.join(missing)}",
                               hint=INSTALL_HINT)
        return _with_python(NerfstudioTools((str(tr),), (str(ex),), f"fit.nerfstudio_bin={folder}"))
    if cfg.nerfstudio_python:
        py = Path(cfg.nerfstudio_python).expanduser()
        if not _executable(py):
            raise MissingError(f"fit.nerfstudio_python={cfg.nerfstudio_python!r} is not an executable interpreter",
                               hint=INSTALL_HINT)
        info = probe_python(py)
        if info is None:
            raise MissingError(f"{py} has no nerfstudio package", hint=INSTALL_HINT)
        return NerfstudioTools((str(py), "-m", "nerfstudio.scripts.train"),
                               (str(py), "-m", "nerfstudio.scripts.exporter"), f"fit.nerfstudio_python={py}",
                               str(py), info)
    tr, ex = shutil.which("ns-train"), shutil.which("ns-export")
    if not tr or not ex:
        absent = " and ".join(n for n, p in (("ns-train", tr), ("ns-export", ex)) if not p)
        raise MissingError(f"nerfstudio is not installed ({absent} not on PATH)", hint=INSTALL_HINT)
    return _with_python(NerfstudioTools((tr,), (ex,), "PATH"))


# ------------------------------------------------------------------------ dataset
def _write_points_ply(path: Path, points: np.ndarray, rgb: np.ndarray) -> None:
    """Binary PLY of xyz (float32) + rgb (uchar): what the dataparser's open3d reads."""
    n = points.shape[0]
    rec = np.empty(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, k in enumerate("xyz"):
        rec[k] = points[:, i]
    c = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    rec["red"], rec["green"], rec["blue"] = c[:, 0], c[:, 1], c[:, 2]
    header = ("ply\nformat binary_little_endian 1.0\n" f"element vertex {n}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(rec.tobytes())


def write_nerfstudio_dataset(views: ViewSet, folder: str | os.PathLike, *, resolution: int | None = None,
                             holdout_every: int = 0, masks: bool = False, init_points: int = 20000,
                             seed: int = 0) -> Path:
    """Write `views` as a nerfstudio dataset; returns the folder (ns-train's --data).

    resolution: long side the images are resized to (None: as they are).
    holdout_every: recon.fit.splat.split_views' rule; held-out views become the eval split.
    masks: also reference masks/ from the frames (nerfstudio: mask 0 = not in the loss).
    init_points: visual-hull points written as the seed point cloud (0: none).
    """
    from .splat import colours_from_views, init_from_hull, prepare_views, split_views

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    H0, W0 = views.resolution
    data = prepare_views(views, resolution or max(H0, W0))
    H, W = data["height"], data["width"]
    Kpix = cameras.intrinsics_pixels(views.K, W, H)
    gl = cameras.to_opengl_c2w(views.c2w)
    train, test = split_views(len(views), holdout_every)
    frames, names = [], []
    for i in range(len(views)):
        name = f"frame_{i:05d}.png"
        rgba = torch.cat([data["rgb"][i], data["mask"][i]], -1)
        write_png(folder / "images" / name, (rgba.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy())
        write_png(folder / "masks" / name, np.where(data["mask"][i, ..., 0].numpy() > 0.5, 255, 0).astype(np.uint8))
        fr = {"file_path": f"images/{name}", "transform_matrix": gl[i].tolist(),
              "fl_x": float(Kpix[i, 0, 0]), "fl_y": float(Kpix[i, 1, 1]),
              "cx": float(Kpix[i, 0, 2]), "cy": float(Kpix[i, 1, 2]), "w": int(W), "h": int(H),
              "source_name": views.names[i]}
        if masks:
            fr["mask_path"] = f"masks/{name}"
        frames.append(fr)
        names.append(f"images/{name}")
    evals = test or train  # nerfstudio needs a non-empty eval split
    meta = {"camera_model": "OPENCV", "frames": frames,
            "train_filenames": [names[i] for i in train], "val_filenames": [names[i] for i in evals],
            "test_filenames": [names[i] for i in evals],
            "portrait3d": {"frame": "recon.cameras world (+Y up, face toward +Z); OpenGL camera axes",
                           "views_backend": views.backend, "preview": bool(views.preview)}}
    if init_points > 0:
        gen = torch.Generator().manual_seed(seed)
        pts = init_from_hull(data, train, init_points, gen)
        rgb = colours_from_views(torch.from_numpy(pts), data, train).numpy()
        _write_points_ply(folder / "points3D.ply", pts, rgb)
        meta["ply_file_path"] = "points3D.ply"
    (folder / "transforms.json").write_text(json.dumps(meta, indent=1))
    return folder


# ----------------------------------------------------------------------- reading
_PLY_TYPES = {"float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8", "uchar": "u1", "uint8": "u1",
              "char": "i1", "int8": "i1", "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2",
              "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4"}


def read_ply_vertices(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Scalar vertex properties of a PLY (binary little endian or ASCII), defensively.
    Only a leading vertex element is read (splat and point-cloud files have no other)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"nerfstudio wrote no {path.name} at {path}", hint="see ns-export's log", stage="fit")
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"ply\n":
            raise InputError(f"{path} is not a PLY file")
        header, read = [], 4
        while True:
            line = f.readline(1024)
            read += len(line)
            if not line or read > 65536:
                raise InputError(f"{path}: PLY header has no end_header")
            text = line.decode("ascii", errors="replace").strip()
            if text == "end_header":
                break
            header.append(text.split())
        fmt, n, props, element = None, None, [], None
        for parts in header:
            if not parts or parts[0] in ("comment", "obj_info"):
                continue
            if parts[0] == "format" and len(parts) > 1:
                fmt = parts[1]
            elif parts[0] == "element" and len(parts) == 3:
                element = parts[1]
                if element == "vertex":
                    if n is not None or props:
                        raise InputError(f"{path}: two vertex elements")
                    try:
                        n = int(parts[2])
                    except ValueError:
                        raise InputError(f"{path}: bad vertex count {parts[2]!r}") from None
                elif n is None:
                    raise InputError(f"{path}: element {element!r} before the vertices is not supported")
            elif parts[0] == "property" and element == "vertex":
                if len(parts) != 3 or parts[1] not in _PLY_TYPES:
                    raise InputError(f"{path}: unsupported vertex property {' '.join(parts)!r}")
                props.append((parts[2], _PLY_TYPES[parts[1]]))
        if n is None or not 0 <= n <= MAX_PLY_VERTICES or not props:
            raise InputError(f"{path}: vertex count {n} missing or out of range, or no properties")
        dtype = np.dtype(props)
        if fmt == "binary_little_endian":
            if size - read < n * dtype.itemsize:
                raise InputError(f"{path}: truncated ({size - read} bytes for {n} vertices of {dtype.itemsize})")
            rec = np.frombuffer(f.read(n * dtype.itemsize), dtype=dtype, count=n)
            return {name: rec[name].astype(np.float64) for name in dtype.names}
        if fmt == "ascii":
            rows = [f.readline().split() for _ in range(n)]
            try:
                arr = np.array([[float(x) for x in r[:len(props)]] for r in rows], dtype=np.float64).reshape(n, len(props))
            except ValueError:
                raise InputError(f"{path}: ASCII vertex rows are not {len(props)} numbers") from None
            return {name: arr[:, j] for j, (name, _) in enumerate(props)}
        raise InputError(f"{path}: PLY format {fmt!r} is not supported", hint="binary_little_endian or ascii")


# ------------------------------------------------------------------ frame change
def _sh_basis(dirs: np.ndarray, degree: int) -> list[np.ndarray]:
    """Real SH basis (3DGS / gsplat order) of unit directions (M, 3), one (M, 2l+1) block per degree 1..3."""
    x, y, z = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    blocks = []
    if degree >= 1:
        blocks.append(np.stack([-0.4886025119029199 * y, 0.4886025119029199 * z, -0.4886025119029199 * x], 1))
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        blocks.append(np.stack([1.0925484305920792 * x * y, -1.0925484305920792 * y * z,
                                0.31539156525252005 * (2 * zz - xx - yy), -1.0925484305920792 * x * z,
                                0.5462742152960396 * (xx - yy)], 1))
    if degree >= 3:
        xx, yy, zz = x * x, y * y, z * z
        blocks.append(np.stack([-0.5900435899266435 * y * (3 * xx - yy), 2.890611442640554 * x * y * z,
                                -0.4570457994644658 * y * (4 * zz - xx - yy),
                                0.3731763325901154 * z * (2 * zz - 3 * xx - 3 * yy),
                                -0.4570457994644658 * x * (4 * zz - xx - yy), 1.445305721320277 * z * (xx - yy),
                                -0.5900435899266435 * x * (xx - 3 * yy)], 1))
    return blocks


def rotate_sh(shN: np.ndarray, R_ns_from_world: np.ndarray) -> np.ndarray:
    """SH coefficients (N, K, 3) of Gaussians in nerfstudio's frame -> our frame.

    A world direction d is R d in nerfstudio's frame, so the colour must satisfy
    Y(d) c_world = Y(R d) c_ns for every d. Rotations keep each degree's space, so per
    degree c_world = pinv(Y_l(D)) Y_l(R D) c_ns over many directions D (exact for
    real SH, no Wigner matrices needed).
    """
    K = shN.shape[1]
    if K == 0 or np.allclose(R_ns_from_world, np.eye(3), atol=1e-9):
        return shN
    degree = int(round(math.sqrt(K + 1))) - 1
    if (degree + 1) ** 2 - 1 != K or degree > 3:
        raise InputError(f"{K} higher-order SH coefficients is not degree 1..3")
    rng = np.random.default_rng(0)
    D = rng.normal(size=(256, 3))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    out = np.empty_like(shN)
    s = 0
    for Yw, Yn in zip(_sh_basis(D, degree), _sh_basis(D @ R_ns_from_world.T, degree)):
        m = Yw.shape[1]
        M = np.linalg.lstsq(Yw, Yn, rcond=None)[0]      # (m, m): c_world = M @ c_ns
        out[:, s:s + m] = np.einsum("ij,njc->nic", M, shN[:, s:s + m])
        s += m
    return out



def _quat_of_matrix(R: np.ndarray) -> np.ndarray:
    """wxyz unit quaternion of a rotation matrix (Shepperd's method, numerically safe)."""
    m = R
    tr = np.trace(m)
    if tr > 0:
        s = math.sqrt(tr + 1.0) * 2
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.array(q)
    return q / np.linalg.norm(q)


def splats_to_world(arr: dict[str, np.ndarray], transform, scale) -> dict[str, np.ndarray]:
    """Gaussians (gsplat parameterisation, nerfstudio's normalised frame) -> our world frame."""
    A, b, k = cameras.nerfstudio_to_world(transform, scale)
    out = dict(arr)
    out["means"] = (k * arr["means"] @ A.T + b).astype(np.float32)
    # the covariance rotates with A (rotation of a Gaussian: R_world = A R_ns)
    out["quats"] = quat_mul(_quat_of_matrix(A)[None], arr["quats"].astype(np.float64)).astype(np.float32)
    out["scales"] = (arr["scales"] + math.log(k)).astype(np.float32)
    out["shN"] = rotate_sh(arr["shN"].astype(np.float64), A.T).astype(np.float32)
    return out


def splat_arrays_from_ply(v: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """nerfstudio's ns-export gaussian-splat layout (INRIA 3DGS: x y z, f_dc_*, f_rest_* channel-major,
    opacity logit, scale_* log, rot_* wxyz; or red/green/blue when exported with --ply-color-mode rgb)."""
    need = ["x", "y", "z", "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    missing = [p for p in need if p not in v]
    if missing:
        raise InputError(f"{path}: not a Gaussian splat file (missing {', '.join(missing)})")
    n = v["x"].shape[0]
    col = lambda *ps: np.stack([v[p] for p in ps], 1)  # noqa: E731
    if all(f"f_dc_{i}" in v for i in range(3)):
        sh0 = col("f_dc_0", "f_dc_1", "f_dc_2")
    elif all(c in v for c in ("red", "green", "blue")):
        sh0 = (col("red", "green", "blue") / 255.0 - 0.5) / SH_C0
    else:
        raise InputError(f"{path}: splats carry no colour (f_dc_* or red/green/blue)")
    rest = sorted((p for p in v if p.startswith("f_rest_")), key=lambda s: int(s[7:]))
    if len(rest) % 3 or [int(p[7:]) for p in rest] != list(range(len(rest))):
        raise InputError(f"{path}: f_rest_* properties are not 3K consecutive indices")
    K = len(rest) // 3
    shN = col(*rest).reshape(n, 3, K).transpose(0, 2, 1) if K else np.zeros((n, 0, 3))
    arr = {"means": col("x", "y", "z"), "quats": col("rot_0", "rot_1", "rot_2", "rot_3"),
           "scales": col("scale_0", "scale_1", "scale_2"), "opacities": v["opacity"].copy(),
           "sh0": sh0.reshape(n, 1, 3), "shN": np.ascontiguousarray(shN)}
    finite = np.ones(n, dtype=bool)
    for a in arr.values():
        finite &= np.isfinite(a.reshape(n, -1)).all(1)
    return {k: a[finite] for k, a in arr.items()}


def points_to_splats(v: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """A coloured point cloud -> small opaque isotropic Gaussians (SH degree 0)."""
    from scipy.spatial import cKDTree

    if not all(c in v for c in "xyz"):
        raise InputError(f"{path}: point cloud has no x y z")
    pts = np.stack([v["x"], v["y"], v["z"]], 1)
    if all(c in v for c in ("red", "green", "blue")):
        rgb = np.stack([v["red"], v["green"], v["blue"]], 1)
        rgb = rgb / 255.0 if rgb.max(initial=0) > 1.0 else rgb
    else:
        rgb = np.full_like(pts, 0.5)
    keep = np.isfinite(pts).all(1) & np.isfinite(rgb).all(1)
    pts, rgb = pts[keep], rgb[keep]
    n = pts.shape[0]
    if n < 4:
        raise StageError(f"nerfstudio's point cloud {path} holds {n} points", hint="train longer or check the views",
                         stage="fit")
    d = cKDTree(pts).query(pts, k=4)[0][:, 1:].mean(1)
    radius = np.clip(d, 1e-6, None) * 0.7
    return {"means": pts, "quats": np.tile([1.0, 0.0, 0.0, 0.0], (n, 1)),
            "scales": np.log(radius)[:, None].repeat(3, 1), "opacities": np.full(n, math.log(0.98 / 0.02)),
            "sh0": ((rgb - 0.5) / SH_C0).reshape(n, 1, 3), "shN": np.zeros((n, 0, 3))}


def read_dataparser_transforms(path: Path) -> tuple[np.ndarray, float]:
    if not path.is_file():
        raise StageError(f"ns-train wrote no dataparser_transforms.json ({path})",
                         hint="without it the result cannot be brought back into our frame; see ns-train's log",
                         stage="fit")
    try:
        d = json.loads(path.read_text())
        T, s = np.asarray(d["transform"], dtype=np.float64), float(d["scale"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not nerfstudio's {{transform, scale}} JSON ({e.__class__.__name__}: {e})") from None
    return T, s


def scene_from_export(ply: Path, transforms_json: Path, *, kind: str) -> Scene:
    """Read ns-export's output (kind 'splat' or 'points') back into a Scene in our frame."""
    T, s = read_dataparser_transforms(transforms_json)
    v = read_ply_vertices(ply)
    arr = splat_arrays_from_ply(v, ply) if kind == "splat" else points_to_splats(v, ply)
    if arr["means"].shape[0] == 0:
        raise StageError(f"{ply} holds no finite Gaussians", hint="the nerfstudio fit diverged; see its log", stage="fit")
    arr = splats_to_world(arr, T, s)
    K = arr["shN"].shape[1]
    deg = int(round(math.sqrt(K + 1))) - 1
    params = {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in arr.items()}
    params["opacities"] = params["opacities"].reshape(-1)
    rep = "fitted Gaussian splats (splatfacto)" if kind == "splat" else \
        "one opaque isotropic Gaussian per point of nerfacto's exported point cloud (a surface sample)"
    return Scene(params=params, sh_degree=deg,
                 meta={"representation": rep, "dataparser_transform": T.tolist(), "dataparser_scale": s})


# ------------------------------------------------------------------------ running
def latest_checkpoint_step(folder: Path) -> int | None:
    """The step of nerfstudio's newest checkpoint (step-000000029.ckpt) in `folder`, else None."""
    steps = [int(m.group(1)) for p in (folder.glob("step-*.ckpt") if folder.is_dir() else ())
             if (m := _CKPT.fullmatch(p.name))]
    return max(steps) if steps else None


def parse_step(line: str) -> int | None:
    """The training step of one of ns-train's progress rows, else None."""
    m = _STEP_ROW.match(_ANSI.sub("", line))
    return int(m.group(1)) if m else None


# Run by nerfstudio's own interpreter (written into the work folder, then `python launcher
# train|export ARGS`). nerfacto and splatfacto build torchmetrics' LPIPS metric when the model
# is made, and its AlexNet backbone is downloaded then (torchvision weights, no option turns
# it off): offline that start fails, and portrait3d never downloads at run time. The metric
# only feeds nerfstudio's eval images, which fit_nerfstudio turns off (it measures the scene
# read back with its own rasterizer), so the launcher swaps it for a module with no weights
# that reports NaN, in training and export alike (their checkpoints then agree).
LAUNCHER = """# portrait3d's launcher for nerfstudio (recon/fit/nerfstudio.py); run by nerfstudio's python.
import sys

import torch
import torchmetrics.image
import torchmetrics.image.lpip


class NoLPIPS(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, *args, **kwargs):
        return torch.tensor(float("nan"))


def allow_numpy_in_checkpoints():
    # torch >= 2.6 loads with weights_only=True; nerfstudio 1.1's checkpoints hold numpy scalars, so
    # its resume and ns-export fail on its own files. Allow exactly those types (still no pickle code).
    import numpy
    try:
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    dtypes = getattr(numpy, "dtypes", None)
    extra = [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes is not None else []
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([scalar, numpy.dtype, *extra])


def main():
    allow_numpy_in_checkpoints()
    torchmetrics.image.lpip.LearnedPerceptualImagePatchSimilarity = NoLPIPS
    torchmetrics.image.LearnedPerceptualImagePatchSimilarity = NoLPIPS
    print("portrait3d launcher: nerfstudio's LPIPS metric is off (no AlexNet download); it reads nan", flush=True)
    tool, sys.argv = sys.argv[1], ["ns-" + sys.argv[1]] + sys.argv[2:]
    if tool == "train":
        from nerfstudio.scripts.train import entrypoint
    elif tool == "export":
        from nerfstudio.scripts.exporter import entrypoint
    else:
        sys.exit("usage: launcher train|export ARGS")
    entrypoint()


# nerfacto's data workers are spawned processes: they import this file again, as __mp_main__
if __name__ == "__main__":
    main()
"""

# Failures recognised in a failed run's log: (pattern, error class, message, hint).
_KNOWN_FAILURES = (
    (re.compile(r"load_state_dict_from_url|download_url_to_file|Downloading: \"https?://", re.I), MissingError,
     "nerfstudio tried to download model weights (torchvision's AlexNet for its LPIPS metric) and could not",
     "run nerfstudio through its python (fit.nerfstudio_python=ENV/bin/python: portrait3d then turns that "
     "metric off), or run ns-train once where the network is reachable so torch's hub cache holds the weights"),
    # splatfacto calls .cuda() while building the model, whatever --machine.device-type says
    (re.compile(r"Found no NVIDIA driver|No CUDA GPUs are available|Torch not compiled with CUDA enabled"),
     MissingError, "nerfstudio needs a CUDA GPU here (splatfacto, gsplat) and found none",
     "use fit.method=nerfstudio-nerfacto (runs on a CPU) or fit.method=splat (portrait3d's own CPU rasterizer)"),
)


def _kill_group(proc: subprocess.Popen, grace: float = 0.0) -> None:
    """Stop a command started in its own session and everything it spawned."""
    pgid = proc.pid          # start_new_session: the leader's pid names the group, even once it has exited
    if grace > 0:
        try:
            os.killpg(pgid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run(cmd: list[str], log: Path, what: str, on_line: Callable[[str], None] | None = None,
         idle_timeout: float | None = None) -> None:
    """Run one nerfstudio command, its output appended to `log`; typed one-line errors on failure.
    idle_timeout: stop it when it prints nothing for that long (nerfstudio can wait forever:
    on a dead data worker, or exporting points from an empty NeRF)."""
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_DISABLED="true", PYTHONUNBUFFERED="1",
               TERM="dumb", COLUMNS="200", NO_COLOR="1", TQDM_DISABLE="1")
    tail: deque[str] = deque(maxlen=40)
    try:
        # its own session: nerfstudio spawns data workers and a resource tracker that inherit the pipe and
        # outlive a killed trainer (the tracker ignores SIGTERM); only the whole group can be stopped
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, text=True, errors="replace", bufsize=1, start_new_session=True)
    except OSError as e:
        raise MissingError(f"could not start {what} ({cmd[0]}: {e.strerror or e})", hint=INSTALL_HINT) from None
    import threading

    last_line = [time.monotonic()]
    timed_out: list[bool] = []
    stop = threading.Event()

    def _watch() -> None:
        # the read loop below blocks on the pipe, so a thread keeps time: silence past idle_timeout
        # means a hang; a trainer gone for a while whose pipe is still open means orphans hold it
        gone = None
        while not stop.wait(1.0):
            now = time.monotonic()
            if idle_timeout is not None and now - last_line[0] > idle_timeout:
                timed_out.append(True)
                _kill_group(proc)
                return
            if proc.poll() is not None:
                gone = gone or now
                if now - gone > _ORPHAN_GRACE_S:
                    _kill_group(proc)
                    return

    threading.Thread(target=_watch, daemon=True).start()
    try:
        with open(log, "a", buffering=1) as lf:     # line-buffered: the log can be followed live
            lf.write("$ " + " ".join(cmd) + "\n")
            assert proc.stdout is not None
            for line in proc.stdout:
                last_line[0] = time.monotonic()
                lf.write(line)
                tail.append(_ANSI.sub("", line.rstrip()))
                if on_line is not None:
                    on_line(line)
        rc = proc.wait()
    except BaseException:
        _kill_group(proc, grace=10)   # Ctrl-C or a failing callback: never leave a GPU job behind
        raise
    finally:
        stop.set()
    if timed_out:
        raise StageError(f"{what} printed nothing for {idle_timeout:.0f} s and was stopped (it hangs)",
                         hint=f"full log: {log}", stage="fit")
    if rc != 0:
        raise failure_error(what, rc, list(tail), log)


def failure_error(what: str, rc: int, tail: list[str], log: Path | str) -> ReconError:
    """The one-line error for a failed nerfstudio command from the last lines it printed:
    known causes (weights download, no CUDA) are MissingError (exit 4), the rest StageError (5)."""
    text = "\n".join(tail)
    for pattern, cls, message, hint in _KNOWN_FAILURES:
        if pattern.search(text):
            return cls(f"{what}: {message}", hint=f"{hint}; full log: {log}")
    last = " | ".join(t.strip() for t in tail[-6:] if t.strip())
    return StageError(f"{what} exited with status {rc}: {last[-600:]}", hint=f"full log: {log}", stage="fit")


def nerfstudio_device(cfg: FitConfig, tools: NerfstudioTools, fallback: str = "cpu") -> str:
    """nerfstudio's --machine.device-type (cpu | cuda | mps) from fit.device: an explicit
    device is kept; 'auto' asks nerfstudio's own torch (it may see a GPU that ours does not),
    else follows `fallback` (the device portrait3d resolved)."""
    want = str(cfg.device or "auto").split(":")[0].lower()
    if want in ("cpu", "cuda", "mps"):
        return want
    if want != "auto":
        raise InputError(f"fit.device={cfg.device!r} is not a device nerfstudio knows", hint="auto, cpu, cuda or mps")
    if tools.info is not None:
        return "cuda" if tools.info.get("cuda") else "mps" if tools.info.get("mps") else "cpu"
    kind = str(fallback).split(":")[0].lower()
    return kind if kind in ("cpu", "cuda", "mps") else "cpu"


def train_command(tools: NerfstudioTools, method: str, data: Path, out: Path, steps: int, load_dir: Path | None,
                  sh_degree: int = 1, device_type: str = "cuda", launcher: Path | None = None,
                  extra: tuple[str, ...] | list[str] = (), c2w: np.ndarray | None = None) -> list[str]:
    prefix = [tools.python, str(launcher), "train"] if launcher is not None and tools.python else list(tools.train)
    cmd = [*prefix, method, "--output-dir", str(out), "--experiment-name", EXPERIMENT, "--timestamp", TIMESTAMP,
           "--max-num-iterations", str(steps), "--vis", "tensorboard",   # local event files; no viewer, no wandb
           "--viewer.quit-on-train-completion", "True", "--logging.local-writer.enable", "True",
           # one plain row per log step (the default redraws the last 10 with cursor moves)
           "--logging.local-writer.max-log-size", "0", "--logging.steps-per-log", str(_log_every(steps)),
           # nerfstudio's eval renders cost time and need LPIPS; the scene read back is measured instead
           "--steps-per-eval-batch", "0", "--steps-per-eval-image", "0", "--steps-per-eval-all-images", "0",
           "--machine.device-type", device_type,
           "--save-only-latest-checkpoint", "True", "--pipeline.model.background-color", "random",
           # our cameras are exact; nerfacto refines poses by default (SO3xR3), which would move its
           # result off our frame by whatever drift the refinement picks up
           "--pipeline.model.camera-optimizer.mode", "off"]
    if method == "splatfacto":
        # at degree 0 nerfstudio 1.1's exporter writes a packed "colors" property instead of f_dc_*: keep >= 1
        cmd += ["--pipeline.model.sh-degree", str(max(1, sh_degree))]
    if method == "nerfacto" and c2w is not None:
        cmd += nerfacto_bounds_args(c2w)
    if load_dir is not None:
        cmd += ["--load-dir", str(load_dir)]
    cmd += [str(a) for a in extra]      # fit.nerfstudio_args: the user's own trainer options come last, so they win
    cmd += ["nerfstudio-data", "--data", str(data), "--orientation-method", "none", "--center-method", "poses",
            "--auto-scale-poses", "True", "--downscale-factor", "1"]
    return cmd


HEAD_BOUND = 0.87   # world units: half-diagonal of PanoHead's render box [-0.5, 0.5]^3, which holds the head


def nerfacto_bounds_args(c2w: np.ndarray) -> list[str]:
    """nerfacto's defaults are for unbounded scenes (scene contraction, samples out to 1000
    units). On a head seen from an inward ring they paint it onto a far shell (measured, 400
    steps on 16 views at 64 px: 99 % of the exported points lay 4-28 units out; the head is 0.5
    tall; Chamfer to the GT head 2200 % of its height). Near / far planes around the head box
    (in nerfstudio's units: its dataparser centres the camera positions on their mean and
    scales the largest coordinate to 1; camera-to-origin distances only scale) bring the points
    onto the head (200 steps: Chamfer 5 % of the head height). KNOWN DEFECT: in those same CPU
    runs (nerfstudio 1.1.5, torch 2.15) the exported colours came out degenerate with the planes
    set (R = G = 1, B = 0 on every point) and plausible without them; not understood yet.
    fit.nerfstudio_args can override both planes (the last occurrence wins)."""
    pos = np.asarray(c2w, dtype=np.float64)[:, :3, 3]
    span = float(np.abs(pos - pos.mean(0)).max()) if len(pos) else 0.0
    if span < 1e-9:
        return []
    s = 1.0 / span
    d = np.linalg.norm(pos, axis=1)
    near, far = max(0.05, (d.min() - HEAD_BOUND) * s), (d.max() + HEAD_BOUND) * s
    return ["--pipeline.model.near-plane", f"{near:.6g}", "--pipeline.model.far-plane", f"{far:.6g}"]


def _log_every(steps: int) -> int:
    """Progress rows often enough for a bar, rarely enough not to flood the log."""
    return int(min(100, max(1, steps // 50)))


def evaluate_scene(scene: Scene, views: ViewSet, cfg: FitConfig, device="cpu") -> dict:
    """Train / held-out PSNR, SSIM, alpha IoU of a Scene with our rasterizer, split as
    recon.fit.splat does, so nerfstudio results compare with ours number for number."""
    from ..runtime import resolve_device
    from .backend import select_rasterizer
    from .splat import evaluate, prepare_views, split_views

    dev = device if isinstance(device, torch.device) else resolve_device(device)[0]
    rast = select_rasterizer(dev)
    data = prepare_views(views, cfg.resolution)
    train, test = split_views(len(views), cfg.holdout_every)
    params = {k: v.to(dev) for k, v in scene.params.items()}
    tr = evaluate(rast, params, scene.sh_degree, data, train, dev)
    te = evaluate(rast, params, scene.sh_degree, data, test, dev)
    return {"train_psnr": tr["psnr"], "train_ssim": tr["ssim"], "train_alpha_iou": tr["alpha_iou"],
            "test_psnr": te.get("psnr"), "test_ssim": te.get("ssim"), "test_alpha_iou": te.get("alpha_iou"),
            "train_views": train, "test_views": test, "resolution": [data["height"], data["width"]],
            "rasterizer": rast.name}


def fit_nerfstudio(views: ViewSet, cfg: FitConfig, work_dir: str | os.PathLike,
                   progress: Progress | None = None, *, device="cpu") -> tuple[Scene, dict]:
    """Fit with nerfstudio out of process; returns (Scene in our frame, metrics).

    work_dir keeps the dataset, nerfstudio's outputs and logs; a rerun resumes from the
    latest nerfstudio checkpoint found there. The metrics are measured on the Scene
    read back, with our rasterizer on `device` (held-out views as in fit_splats).
    """
    if cfg.method not in METHODS:
        raise InputError(f"fit.method={cfg.method!r} is not a nerfstudio method", hint=f"use one of {', '.join(METHODS)}")
    method = METHODS[cfg.method]
    tools = find_nerfstudio(cfg)
    device_type = nerfstudio_device(cfg, tools, str(device))
    if method == "splatfacto" and device_type != "cuda":
        # gsplat 1.4 (nerfstudio's pin) has CUDA kernels only: fail before writing anything big
        raise MissingError(f"fit.method=nerfstudio-splatfacto needs a CUDA GPU (gsplat's rasterizer); nerfstudio "
                           f"would run on {device_type} here",
                           hint="use fit.method=nerfstudio-nerfacto (runs on a CPU) or fit.method=splat "
                                "(portrait3d's own CPU rasterizer), or set fit.device=cuda on a GPU machine")
    t0 = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = write_nerfstudio_dataset(views, work / "data", resolution=cfg.resolution, holdout_every=cfg.holdout_every,
                                    init_points=min(cfg.num_init, cfg.max_gaussians) if method == "splatfacto" else 0,
                                    seed=cfg.seed)
    launcher = None
    if tools.python:
        launcher = work / "portrait3d_ns_launch.py"
        launcher.write_text(LAUNCHER)
    out = work / "outputs"
    run_dir = out / EXPERIMENT / method / TIMESTAMP
    ckpts = run_dir / "nerfstudio_models"
    steps = int(cfg.steps)
    # nerfstudio resumes at the checkpoint's step + 1 and then runs --max-num-iterations MORE steps
    done = latest_checkpoint_step(ckpts)
    done = -1 if done is None else done
    load_dir = ckpts if done >= 0 else None
    remaining = steps - (done + 1)
    log = work / "nerfstudio.log"

    def on_line(line: str) -> None:
        step = parse_step(line)
        if step is not None and progress is not None:
            progress(min(step + 1, steps), steps, f"ns-train {method}")

    if remaining > 0:
        _run(train_command(tools, method, data, out, remaining, load_dir, cfg.sh_degree, device_type, launcher,
                           cfg.nerfstudio_args, views.c2w),
             log, f"ns-train {method}", on_line, idle_timeout=TRAIN_IDLE_S)
    config_yml = run_dir / "config.yml"
    if not config_yml.is_file():
        raise StageError(f"ns-train finished but wrote no {config_yml}", hint=f"see {log}", stage="fit")
    exp = work / "export"
    exp.mkdir(exist_ok=True)
    export = [tools.python, str(launcher), "export"] if launcher is not None else list(tools.export)
    if method == "splatfacto":
        _run([*export, "gaussian-splat", "--load-config", str(config_yml), "--output-dir", str(exp)],
             log, "ns-export gaussian-splat")
        ply, kind = exp / "splat.ply", "splat"
    else:
        # nerfstudio samples training rays until it has --num-points opaque hits: with an empty NeRF it
        # would never stop (and its progress bar prints nothing off a terminal), hence the limit
        _run([*export, "pointcloud", "--load-config", str(config_yml), "--output-dir", str(exp),
              "--num-points", str(max(cfg.max_gaussians, 1000)), "--remove-outliers", "True",
              "--normal-method", "open3d"], log, "ns-export pointcloud", idle_timeout=EXPORT_IDLE_S)
        ply, kind = exp / "point_cloud.ply", "points"
    scene = scene_from_export(ply, run_dir / "dataparser_transforms.json", kind=kind)
    scene.meta.update({"backend": f"nerfstudio {method}", "steps": steps, "num_gaussians": scene.num_gaussians})
    if progress is not None:
        progress(steps, steps, f"{method}: {scene.num_gaussians} gaussians read back")
    metrics = {"steps": steps, "seconds": time.perf_counter() - t0, "num_gaussians": scene.num_gaussians,
               "method": cfg.method, "nerfstudio": tools.source, "resumed_from_checkpoint": load_dir is not None,
               "nerfstudio_version": (tools.info or {}).get("nerfstudio"), "nerfstudio_device": device_type,
               "log": str(log), "representation": scene.meta["representation"]}
    metrics.update(evaluate_scene(scene, views, cfg, device))
    return scene, metrics
