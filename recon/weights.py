"""Locate, verify, download and convert the model weights (DESIGN §1, §6, §7).

Layout of the weights home ($P3D_WEIGHTS or ~/.cache/portrait3d/weights):

    raw/             the released files as downloaded (pickles: never loaded here)
      model_state-340000.th  back_head-230000.th  easy-khair-...-025000.pkl  inference_data.zip
    dp360/           converted 360 model (recon.diffusion.convert: config + safetensors)
    backhead/        converted back-view model
    panohead/        converted PanoHead generator (recon.panohead.convert)
    inference_data/  inference_data.zip unpacked (the 32 camera-condition PNGs of the ring)
    perceptual/      the PanoHead inversion's perceptual loss (recon.panohead.perceptual), as fetched:
      vgg16-397923af.pth    torchvision's ImageNet VGG16 state dict (download.pytorch.org)
      lpips_vgg_v0.1.pth    LPIPS v0.1 vgg linear layers (lpips/weights/v0.1/vgg.pth of the lpips
                            package, from an installed `lpips` if there is one, else its GitHub repo)
    Both are pickles: only ever read with torch.load(weights_only=True).

Nothing here runs at import time and nothing downloads unless `download()` is called.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable

from .errors import MissingError, UsageError, WeightsError
from .rundir import file_digest

HF_REPO = "gym890/diffportrait360"
RAW_FILES = {
    "dp360": "model_state-340000.th",
    "backhead": "back_head-230000.th",
    "panohead": "easy-khair-180-gpc0.8-trans10-025000.pkl",
    "conditions": "inference_data.zip",
}
CONVERTED = ("dp360", "backhead", "panohead")
# The inversion's perceptual network: public files fetched by URL (not from HF_REPO) and used
# as they are. name -> (url, sha256 or its prefix). torchvision names its files by the first
# 8 hex digits of their sha256; the LPIPS file's full hash is the one in lpips 0.1.4's wheel RECORD.
PERCEPTUAL_FILES = {
    "vgg16-397923af.pth": ("https://download.pytorch.org/models/vgg16-397923af.pth", "397923af"),
    "lpips_vgg_v0.1.pth": ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
                           "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"),
}
KINDS = CONVERTED + ("conditions", "perceptual") + tuple(f"{k}_raw" for k in RAW_FILES)
Progress = Callable[[int, int, str], None]


def weights_home() -> Path:
    env = os.environ.get("P3D_WEIGHTS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "portrait3d" / "weights"


def _home(home) -> Path:
    return Path(home).expanduser() if home is not None else weights_home()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UsageError(f"unknown weights kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")


# ------------------------------------------------------------------------- locate
def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def _config_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.json") if p.name in ("config.json", "model_index.json"))


def _looks_converted(folder: Path) -> bool:
    return folder.is_dir() and bool(_safetensors_files(folder)) and bool(_config_files(folder))


def condition_ring_dir(root: Path) -> Path | None:
    """The folder of camera-condition PNGs inside an unpacked inference_data (or any folder):
    a `sphere32` folder if there is one, else the folder holding the most PNGs (>= 4)."""
    if not root.is_dir():
        return None
    named = sorted(p for p in root.rglob("sphere32") if p.is_dir())
    if named:
        return named[0]
    best, count = None, 3
    for d in [root] + sorted(p for p in root.rglob("*") if p.is_dir()):
        n = sum(1 for p in d.iterdir() if p.suffix.lower() == ".png")
        if n > count:
            best, count = d, n
    return best


def find_weights(kind: str, home: str | os.PathLike | None = None) -> Path | None:
    """Path of `kind` (dp360 | backhead | panohead | conditions | perceptual | <kind>_raw) or None.
    perceptual: the folder holding both PERCEPTUAL_FILES (see perceptual_paths)."""
    _check_kind(kind)
    h = _home(home)
    if kind == "perceptual":
        p = h / "perceptual"
        return p if all((p / n).is_file() for n in PERCEPTUAL_FILES) else None
    if kind.endswith("_raw"):
        p = h / "raw" / RAW_FILES[kind[:-4]]
        return p if p.is_file() else None
    if kind == "conditions":
        return condition_ring_dir(h / "inference_data")
    p = h / kind
    return p if _looks_converted(p) else None


def perceptual_paths(home: str | os.PathLike | None = None) -> tuple[Path, Path] | None:
    """(vgg16 weights, LPIPS lin weights) for load_perceptual_weights, or None when absent."""
    folder = find_weights("perceptual", home)
    if folder is None:
        return None
    vgg, lin = PERCEPTUAL_FILES
    return folder / vgg, folder / lin


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_weights(home: str | os.PathLike | None = None) -> list[dict]:
    """One row per kind: present / converted / usable, path, bytes, and why not usable."""
    h = _home(home)
    rows = []
    for kind in CONVERTED + ("conditions",):
        raw = find_weights(f"{kind}_raw", h)
        path = find_weights(kind, h)
        row = {"kind": kind, "path": str(path) if path else None, "raw": str(raw) if raw else None,
               "present": bool(path or raw), "converted": bool(path) if kind != "conditions" else None,
               "bytes": _size(path) if path else (raw.stat().st_size if raw else 0)}
        if path is None:
            row["usable"] = False
            row["reason"] = ("not downloaded: run `portrait3d weights download`" if raw is None else
                             ("downloaded, not unpacked: run `portrait3d weights download` again" if kind == "conditions"
                              else "downloaded, not converted: run `portrait3d weights convert`"))
        elif kind == "conditions":
            row["usable"], row["reason"] = True, f"{sum(1 for p in path.glob('*.png'))} PNGs"
        else:
            rep = verify(path, sample_tensors=0)
            row["usable"], row["reason"] = rep["ok"], "; ".join(rep["problems"]) or "ok"
        rows.append(row)
    path = find_weights("perceptual", h)
    have = [n for n in PERCEPTUAL_FILES if (h / "perceptual" / n).is_file()]
    rows.append({"kind": "perceptual", "path": str(path) if path else None, "raw": None, "present": bool(have),
                 "converted": None, "bytes": sum((h / "perceptual" / n).stat().st_size for n in have),
                 "usable": path is not None,
                 "reason": ("VGG16 + LPIPS lin weights (PanoHead inversion loss)" if path else
                            f"missing {', '.join(n for n in PERCEPTUAL_FILES if n not in have)}: run "
                            "`portrait3d weights download` (without them the inversion uses a pixel loss only)")})
    return rows


# ------------------------------------------------------------------------- verify
def _resolve_class(name: str | None):
    """A model class named in a config.json: diffusers / transformers, or ours."""
    if not name:
        return None
    import importlib

    for mod in ("recon.diffusion.models.unet", "recon.diffusion.models", "recon.diffusion.convert",
                "recon.panohead.convert", "diffusers", "transformers"):
        try:
            m = importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - optional modules (the other helpers' code) may be absent
            continue
        cls = getattr(m, name, None)
        if cls is not None:
            return cls
    return None


def _expected_shapes(config_path: Path) -> tuple[dict | None, str | None]:
    """state-dict shapes of the model a config.json describes, built on the meta device."""
    import torch

    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return None, f"{config_path} is not valid JSON ({e})"
    name = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
    cls = _resolve_class(name)
    if cls is None and not cfg.get("model_type"):
        return None, None  # not a model we know: header checks only
    try:
        with torch.device("meta"):
            if cls is not None and hasattr(cls, "from_config") and "_class_name" in cfg:   # diffusers / ours
                model = cls.from_config(cfg)
            else:  # transformers: by architecture, else by model_type
                import transformers

                conf = transformers.AutoConfig.for_model(**cfg)
                model = cls(conf) if cls is not None else transformers.AutoModel.from_config(conf)
    except Exception as e:  # noqa: BLE001 - report, do not crash verification
        return None, f"cannot build {name} from {config_path}: {e.__class__.__name__}: {e}"
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, None


def verify(what: str | os.PathLike, home: str | os.PathLike | None = None, *, sample_tensors: int = 3) -> dict:
    """Check a converted weights folder (kind name or path).

    Config(s) and safetensors headers present and readable; header shapes equal the
    shapes of the model built from its config (on the meta device); the first/last
    `sample_tensors` tensors of each file are finite. Returns
    {ok, path, problems: [...], files, tensors, parameters, checked_shapes}.
    """
    if what == "perceptual":
        return _verify_perceptual(_home(home))
    if what == "conditions":
        ring = find_weights("conditions", home)
        count = sum(1 for _ in ring.glob("*.png")) if ring else 0
        return {"ok": count >= 4, "path": str(ring) if ring else None, "files": count, "tensors": 0, "parameters": 0,
                "checked_shapes": 0, "problems": [] if count >= 4 else [f"no camera-condition ring in {_home(home)}"]}
    if isinstance(what, str) and what in KINDS:
        path = find_weights(what, home)
        if path is None:
            return {"ok": False, "path": None, "problems": [f"{what} weights not found in {_home(home)}"],
                    "files": 0, "tensors": 0, "parameters": 0, "checked_shapes": 0}
    else:
        path = Path(what)
    problems: list[str] = []
    rep = {"ok": False, "path": str(path), "problems": problems, "files": 0, "tensors": 0, "parameters": 0,
           "checked_shapes": 0}
    if path.is_file():
        return _verify_raw(path, rep)
    if not path.is_dir():
        problems.append(f"{path} does not exist")
        return rep
    if (path / "portrait3d_weights.json").is_file():
        try:
            from .diffusion.convert import read_manifest

            rep["manifest"] = read_manifest(path)
        except ImportError:
            pass
        except WeightsError as e:
            problems.append(e.message)
    files = _safetensors_files(path)
    if not files:
        problems.append(f"no .safetensors files under {path}")
    if not _config_files(path):
        problems.append(f"no config.json / model_index.json under {path}")
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - a hard dependency
        raise MissingError("safetensors is not installed", hint="pip install safetensors") from None
    import torch

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                shapes = {k: tuple(st.get_slice(k).get_shape()) for k in keys}
                picks = keys[:sample_tensors] + keys[-sample_tensors:] if sample_tensors else []
                for k in dict.fromkeys(picks):
                    t = st.get_tensor(k)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        problems.append(f"{f.relative_to(path)}: tensor {k} has NaN/inf values")
        except Exception as e:  # noqa: BLE001 - truncated or not a safetensors file
            problems.append(f"{f.relative_to(path)} is unreadable ({e.__class__.__name__}: {e}); re-convert it")
            continue
        rep["files"] += 1
        rep["tensors"] += len(keys)
        rep["parameters"] += sum(int(_prod(s)) for s in shapes.values())
        cfg = f.parent / "config.json"
        if cfg.is_file():
            expected, err = _expected_shapes(cfg)
            if err:
                problems.append(err)
            elif expected is not None:
                rep["checked_shapes"] += 1
                missing = sorted(set(expected) - set(shapes))
                extra = sorted(set(shapes) - set(expected))
                wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
                for label, ks in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
                    if ks:
                        problems.append(f"{f.relative_to(path)}: {len(ks)} {label} tensors (e.g. {ks[0]})")
    rep["ok"] = not problems
    return rep


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n




def _verify_perceptual(home: Path) -> dict:
    """Both files present, their sha256 as published, readable with weights_only=True."""
    import torch

    folder = home / "perceptual"
    problems: list[str] = []
    rep = {"ok": False, "path": str(folder), "problems": problems, "files": 0, "tensors": 0, "parameters": 0,
           "checked_shapes": 0}
    for name, (_, digest) in PERCEPTUAL_FILES.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{p} is missing")
            continue
        if not file_digest(p).startswith(digest):
            problems.append(f"{p} does not have the published sha256 ({digest}...)")
            continue
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unsafe or corrupt pickle
            problems.append(f"{p} is unreadable with weights_only=True ({e.__class__.__name__})")
            continue
        rep["files"] += 1
        rep["tensors"] += len(sd)
        rep["parameters"] += sum(int(t.numel()) for t in sd.values() if hasattr(t, "numel"))
    rep["ok"] = not problems
    return rep


def _verify_raw(path: Path, rep: dict) -> dict:
    """Cheap checks of a released file without unpickling it."""
    problems = rep["problems"]
    size = path.stat().st_size
    rep["files"] = 1
    if size == 0:
        problems.append(f"{path} is empty")
    elif path.suffix in (".th", ".zip", ".pt") and not zipfile.is_zipfile(path):
        # torch.save files and the inference data are zip archives: a missing central
        # directory means the download was cut short.
        problems.append(f"{path} is not a complete zip archive (truncated download?)")
    rep["ok"] = not problems
    return rep


# ---------------------------------------------------------------------- download
def _safe_extract(zip_path: Path, dest: Path) -> int:
    """Unpack a zip refusing absolute paths and '..' (zip-slip)."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    n = 0
    with zipfile.ZipFile(zip_path) as z:
        for info in z.infolist():
            target = (dest / info.filename).resolve()
            if info.filename.startswith(("/", "\\")) or (target != root and root not in target.parents):
                raise WeightsError(f"{zip_path} contains an unsafe path {info.filename!r}", hint="the archive is not the official one")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            n += 1
    return n


def _fetch(name: str, raw: Path, from_dir: Path | None) -> Path:
    dst = raw / name
    if from_dir is not None:
        src = Path(from_dir) / name
        if not src.is_file():
            raise WeightsError(f"{src} does not exist", hint=f"put {name} in {from_dir}, or download without --from-dir")
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            return dst
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)        # same filesystem: no copy of a 10 GB file
        except OSError:
            shutil.copy2(src, dst)
        return dst
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise MissingError("downloading weights needs huggingface_hub", hint="pip install portrait3d[download]") from None
    try:
        # resumes partial downloads and skips files already complete in local_dir
        return Path(hf_hub_download(repo_id=HF_REPO, filename=name, local_dir=str(raw)))
    except Exception as e:  # noqa: BLE001 - network / hub errors become one typed error
        raise WeightsError(f"could not download {name} from huggingface.co/{HF_REPO} ({e.__class__.__name__}: {e})",
                           hint="check the network, or fetch the files elsewhere and use --from-dir") from None


def _fetch_url(url: str, dst: Path, digest: str) -> Path:
    """Stream `url` into dst (via dst.part, renamed once the sha256 matches)."""
    import hashlib
    import urllib.request

    part = dst.with_name(dst.name + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as out:  # noqa: S310 - fixed https URLs
            for block in iter(lambda: r.read(1 << 20), b""):
                h.update(block)
                out.write(block)
    except Exception as e:  # noqa: BLE001 - network errors become one typed error
        part.unlink(missing_ok=True)
        raise WeightsError(f"could not download {url} ({e.__class__.__name__}: {e})",
                           hint="check the network, or fetch the file elsewhere and use --from-dir") from None
    if not h.hexdigest().startswith(digest):
        part.unlink(missing_ok=True)
        raise WeightsError(f"{url} does not have the published sha256 ({digest}...)", hint="download it again")
    part.replace(dst)
    return dst


def _installed_lpips_vgg() -> Path | None:
    """lpips/weights/v0.1/vgg.pth of an installed lpips package (not a dependency; used if present)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    return p if p.is_file() else None


def fetch_perceptual(home: Path, from_dir: Path | None) -> Path:
    """Put PERCEPTUAL_FILES into HOME/perceptual: from `from_dir` (same names), else the LPIPS
    file from an installed lpips package or by URL, VGG16 by URL. Files already there and
    matching their hash are kept."""
    folder = home / "perceptual"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (url, digest) in PERCEPTUAL_FILES.items():
        dst = folder / name
        if dst.is_file() and file_digest(dst).startswith(digest):
            continue
        src = (Path(from_dir) / name) if from_dir is not None else None
        if src is None and name.startswith("lpips_"):
            src = _installed_lpips_vgg()
        if from_dir is not None and not src.is_file():
            raise WeightsError(f"{src} does not exist", hint=f"put {name} in {from_dir}, or download without --from-dir")
        if src is not None:
            if not file_digest(src).startswith(digest):
                raise WeightsError(f"{src} does not have the published sha256 ({digest}...)",
                                   hint=f"use the original file from {url}")
            dst.unlink(missing_ok=True)
            shutil.copy2(src, dst)
        else:
            _fetch_url(url, dst, digest)
    return folder


def convert(model: str, src: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp16",
            progress: Progress | None = None, config: str | os.PathLike | None = None) -> dict:
    """Convert a released checkpoint into our format: model = dp360 | backhead | panohead.

    `config`: an official config.yaml/json for checkpoints of another size than the
    released ones (the tiny test fixtures); default: the released model's hyper-parameters."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise WeightsError(f"checkpoint {src} does not exist", hint="run `portrait3d weights download` first")
    if model in ("dp360", "backhead"):
        try:
            from .diffusion.convert import convert_checkpoint
        except ImportError as e:
            raise MissingError(f"the DiffPortrait360 converter is not available ({e})") from None
        kw = {}
        if config is not None:
            from .diffusion.models import DP360Config

            kw["config"] = DP360Config.from_official(config)
        return convert_checkpoint(src, out, model=model, dtype=dtype, progress=progress, **kw)
    if model == "panohead":
        try:
            from .panohead.convert import convert_checkpoint as convert_panohead
        except ImportError as e:
            raise MissingError(f"the PanoHead converter is not available ({e})",
                               hint="PanoHead support is not installed in this version") from None
        return convert_panohead(src, out, progress)
    raise UsageError(f"unknown model {model!r} to convert", hint="use dp360, backhead or panohead")


def download(to: str | os.PathLike | None = None, from_dir: str | os.PathLike | None = None, *,
             kinds: tuple[str, ...] = ("dp360", "backhead", "panohead", "conditions", "perceptual"),
             convert_after: bool = True,
             dtype: str = "fp16", configs: dict | None = None, progress: Progress | None = None) -> dict:
    """Fetch the released files into TO/raw (from the hub, or linked/copied from `from_dir`),
    unpack the condition images and convert the models. Already-done steps are skipped.
    `configs` {kind: official config path} is for checkpoints of another size (tests).
    "perceptual" (the inversion's VGG16 + LPIPS weights, PERCEPTUAL_FILES) is fetched by URL
    (or from `from_dir`) straight into HOME/perceptual; it needs no conversion.
    Returns {kind: {"raw": path, "converted": path | None, "note": str}}."""
    home = _home(to)
    raw = home / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    bad = [k for k in kinds if k not in RAW_FILES and k != "perceptual"]
    if bad:
        raise UsageError(f"unknown weights kind {bad[0]!r}", hint=f"use {', '.join(RAW_FILES)}, perceptual")
    report: dict = {}
    if "perceptual" in kinds:
        if progress:
            progress(0, 1, "fetching the perceptual network (VGG16 + LPIPS)")
        folder = fetch_perceptual(home, Path(from_dir) if from_dir is not None else None)
        report["perceptual"] = {"raw": str(folder), "converted": str(folder), "note": "downloaded"}
        kinds = tuple(k for k in kinds if k != "perceptual")
    total = len(kinds) * (2 if convert_after else 1)
    done = 0
    for kind in kinds:
        name = RAW_FILES[kind]
        if progress:
            progress(done, total, f"fetching {name}")
        path = _fetch(name, raw, Path(from_dir) if from_dir is not None else None)
        check = _verify_raw(path, {"problems": [], "files": 0})
        if not check["ok"]:
            raise WeightsError("; ".join(check["problems"]), hint="delete the file and download again")
        report[kind] = {"raw": str(path), "converted": None, "note": "downloaded"}
        done += 1
    if not convert_after:
        return report
    for kind in kinds:
        if progress:
            progress(done, total, f"preparing {kind}")
        src = Path(report[kind]["raw"])
        if kind == "conditions":
            dest = home / "inference_data"
            if condition_ring_dir(dest) is None:
                _safe_extract(src, dest)
            ring = condition_ring_dir(dest)
            report[kind]["converted"] = str(ring) if ring else None
            report[kind]["note"] = "unpacked" if ring else f"{src.name} holds no PNG ring"
        elif find_weights(kind, home) is not None and verify(home / kind, sample_tensors=0)["ok"]:
            report[kind]["converted"] = str(home / kind)
            report[kind]["note"] = "already converted"
        else:
            try:
                convert(kind, src, home / kind, dtype=dtype, progress=None, config=(configs or {}).get(kind))
                report[kind]["converted"] = str(home / kind)
                report[kind]["note"] = "converted"
            except MissingError as e:
                if kind != "panohead":
                    raise
                report[kind]["note"] = f"not converted: {e.message}"
        done += 1
    if progress:
        progress(total, total, "weights ready")
    return report


# ------------------------------------------------------------------------ backend
def diffusion_weights_ready(home: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether converted DiffPortrait360 weights (360 + back view) are present and usable."""
    h = _home(home)
    missing = [k for k in ("dp360", "backhead") if find_weights(k, h) is None]
    if missing:
        return False, f"converted {' and '.join(missing)} weights not found in {h} (portrait3d weights download)"
    for k in ("dp360", "backhead"):
        rep = verify(find_weights(k, h), sample_tensors=0)
        if not rep["ok"]:
            return False, f"{k} weights in {h / k} are unusable: {rep['problems'][0]}"
    return True, f"converted weights in {h}"


def backend_available(home: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Whether `--backend auto` may pick the diffusion back-end, and why (not)."""
    h = _home(home)
    ok, why = diffusion_weights_ready(h)
    if not ok:
        return ok, why
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device (the diffusion back-end needs a GPU to be practical)"
    return True, f"converted weights in {h} and CUDA device {torch.cuda.get_device_name(0)}"


def weights_revision(home: str | os.PathLike | None = None) -> dict:
    """Identity of the converted weights in use, for run fingerprints: a change of
    weights makes the views stages stale."""
    h = _home(home)
    rev = {}
    for kind in CONVERTED:
        folder = find_weights(kind, h)
        if folder is None:
            continue
        man = folder / "portrait3d_weights.json"
        if man.is_file():
            try:
                m = json.loads(man.read_text())
                rev[kind] = {k: m.get(k) for k in ("source", "source_sha256", "sha256", "dtype", "converter_version") if k in m}
                continue
            except (OSError, ValueError):
                pass
        rev[kind] = {"files": sorted((p.name, p.stat().st_size) for p in _safetensors_files(folder))}
    if find_weights("perceptual", h) is not None:  # the inversion's loss: changes its noise renders
        rev["perceptual"] = {"files": sorted((n, (h / "perceptual" / n).stat().st_size) for n in PERCEPTUAL_FILES)}
    return rev
