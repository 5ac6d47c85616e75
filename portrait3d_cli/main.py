"""`portrait3d` commands. No logic lives here: every command parses options, calls
recon, and prints the result (stdout) and progress/errors (stderr)."""
from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from .output import EventPrinter, err, event_sink, out, print_json

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="portrait3d: one portrait in, a complete 360° 3D head out (GLB, Gaussian splats, turntable).",
                  context_settings={"help_option_names": ["-h", "--help"]})
presets_app = typer.Typer(no_args_is_help=True, help="List and show configuration presets.")
weights_app = typer.Typer(no_args_is_help=True, help="Download, convert, list and verify model weights.")
app.add_typer(presets_app, name="presets")
app.add_typer(weights_app, name="weights")

STATE = {"json": False, "debug": False}


class Backend(str, Enum):
    auto = "auto"
    proxy = "proxy"
    diffusion = "diffusion"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ProgressMode(str, Enum):
    auto = "auto"
    rich = "rich"
    plain = "plain"
    json = "json"


# ------------------------------------------------------------------ shared options
JsonOpt = typer.Option(False, "--json", help="Print exactly one JSON document on stdout (result or error).")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks of errors.")
PresetOpt = typer.Option("default", "--preset", "-p", help="Configuration preset (see `portrait3d presets list`).")
ExportOpt = typer.Option(None, "--export", "-e", help="Comma list of glb,obj,ply,splat,mp4,gif (default: the preset's).")
BackendOpt = typer.Option(None, "--backend", help="Views back-end: auto (diffusion with weights + CUDA, else proxy), proxy, diffusion.")
ViewsOpt = typer.Option(None, "--views", help="Number of views on the 360° ring (default 36).")
SeedOpt = typer.Option(None, "--seed", help="Random seed for views and fitting.")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu or cuda.")
SetOpt = typer.Option(None, "--set", "-s", help="Override a setting, e.g. --set fit.steps=500 (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Rerun every stage even if it is up to date.")
FromOpt = typer.Option(None, "--from", help="Rerun from this stage on (preprocess, backview, views, fit, export).")
UntilOpt = typer.Option(None, "--until", help="Stop after this stage.")
FaceBoxOpt = typer.Option(None, "--face-box", help="Face box x,y,w,h in source pixels, for faces the detector misses.")
YawOpt = typer.Option(None, "--yaw", help="Override the estimated head yaw (degrees, camera azimuth).")
PitchOpt = typer.Option(None, "--pitch", help="Override the estimated head pitch (degrees, camera elevation).")
CondOpt = typer.Option(None, "--condition-dir", help="Camera-condition ring for the diffusion back-end (e.g. the official 32 PNGs); default: rendered by PanoHead.")
FacesOpt = typer.Option(None, "--faces", metavar="N", help="Triangle budget of the mesh's LOD0 (checked after decimation; LODs are fractions of it).")
TextureOpt = typer.Option(None, "--texture", metavar="SIZE", help="Texture size: 1k, 2k, 4k (or 256..8192 texels per side).")
NormalMapOpt = typer.Option(None, "--normal-map/--no-normal-map", help="Also bake a tangent-space normal map of the dense surface (default: the preset's).")
ProgressOpt = typer.Option(ProgressMode.auto, "--progress", help="Progress on stderr: auto, rich, plain, json (one event per line).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr.")


def _fail(e: BaseException) -> None:
    """Print an error the documented way and exit with its code."""
    from recon.errors import EXIT_BUG, EXIT_INTERRUPTED, ReconError

    if isinstance(e, KeyboardInterrupt):
        code, doc = EXIT_INTERRUPTED, {"error": "interrupted", "message": "interrupted", "hint": None, "exit_code": EXIT_INTERRUPTED}
    elif isinstance(e, ReconError):
        code, doc = e.exit_code, e.to_dict()
    else:
        code = EXIT_BUG
        doc = {"error": "bug", "message": f"internal error: {type(e).__name__}: {e}",
               "hint": "rerun with --debug and report the traceback", "exit_code": EXIT_BUG}
    if STATE["debug"] and not isinstance(e, KeyboardInterrupt):
        err.print(traceback.format_exc(), markup=False, highlight=False)
    if STATE["json"]:
        print_json({"ok": False, **doc})
    else:
        hint = f" (hint: {doc['hint']})" if doc.get("hint") else ""
        err.print("[bold red]error:[/] ", end="")
        err.print(f"{doc['message']}{hint}", highlight=False, markup=False, soft_wrap=True)
    raise SystemExit(code)


def guarded(fn):
    """Every command leaves through here: expected errors become one line (or one JSON
    document) and their exit code; nothing else prints a traceback without --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        STATE["json"], STATE["debug"] = bool(kwargs.get("json_", False)), bool(kwargs.get("debug", False))
        try:
            return fn(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt too: exit 130
            _fail(e)

    return wrapper


def _parse_face_box(text: Optional[str]):
    if text is None:
        return None
    from recon.errors import UsageError

    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4 or vals[2] <= 0 or vals[3] <= 0:
        raise UsageError(f"--face-box {text!r} is not x,y,w,h with positive w and h", hint="e.g. --face-box 120,80,260,260")
    return vals


TEXTURE_NAMES = {"1k": 1024, "2k": 2048, "4k": 4096, "8k": 8192}


def _parse_texture(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    from recon.config import TEXTURE_SIZES
    from recon.errors import UsageError

    t = text.strip().lower()
    size = TEXTURE_NAMES.get(t) or (int(t) if t.isdigit() else None)
    if size not in TEXTURE_SIZES:
        raise UsageError(f"--texture {text!r} is not a texture size", hint="use 1k, 2k or 4k (or 256, 512, 1024, 2048, 4096, 8192)")
    return size


def _with_mesh_options(sets, faces=None, texture=None, normal_map=None):
    """--faces/--texture/--normal-map are shorthands for --set export.faces=.../texture=.../normal_map=..."""
    extra = []
    if faces is not None:
        extra.append(f"export.faces={faces}")
    size = _parse_texture(texture)
    if size is not None:
        extra.append(f"export.texture={size}")
    if normal_map is not None:
        extra.append(f"export.normal_map={'true' if normal_map else 'false'}")
    return [*(sets or []), *extra] if extra else sets


def _with_condition_dir(sets, condition_dir):
    """--condition-dir DIR is shorthand for --set views.condition_dir=DIR."""
    return [*(sets or []), f"views.condition_dir={condition_dir}"] if condition_dir is not None else sets


def _config(preset, export, backend, views, seed, device, sets, face_box=None, yaw=None, pitch=None):
    from recon.api import make_config

    pre = {}
    fb = _parse_face_box(face_box)
    if fb is not None:
        pre["face_box"] = fb
    if yaw is not None:
        pre["yaw"] = yaw
    if pitch is not None:
        pre["pitch"] = pitch
    return make_config(preset, export=export, backend=backend.value if backend else None, num_views=views, seed=seed,
                       device=device.value if device else None, sets=sets, extra={"preprocess": pre} if pre else None)


def _print_result(result) -> None:
    d = result.to_dict()
    if STATE["json"]:
        print_json(d)
        return
    from rich.table import Table

    if result.preview:
        err.print("[yellow]note: views come from the weight-free proxy head — a preview, not DiffPortrait360[/]")
    m = result.metrics or {}
    if m:
        bits = [f"{k}={m[k]:.2f}" for k in ("train_psnr", "test_psnr", "test_ssim", "test_alpha_iou") if isinstance(m.get(k), (int, float))]
        if bits:
            err.print("fit: " + "  ".join(bits))
    if result.assets and result.assets.files:
        t = Table(title=f"assets in {result.run_dir}", show_edge=False)
        t.add_column("file"); t.add_column("kind"); t.add_column("size", justify="right")
        for f in result.assets.files:
            t.add_row(f["path"], f["kind"], _size(f["bytes"]))
        out.print(t)
    else:
        out.print(f"run folder: {result.run_dir}")
    err.print(f"finished in {result.seconds:.1f}s")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ------------------------------------------------------------------------- make
@app.command()
@guarded
def make(image: Path = typer.Argument(..., help="Portrait image (JPEG, PNG, WebP, TIFF, BMP)."),
         out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/<image name>)."),
         export: Optional[str] = ExportOpt, preset: str = PresetOpt, backend: Optional[Backend] = BackendOpt,
         views: Optional[int] = ViewsOpt, seed: Optional[int] = SeedOpt, device: Optional[Device] = DeviceOpt,
         json_: bool = JsonOpt, force: bool = ForceOpt, from_: Optional[str] = FromOpt, until: Optional[str] = UntilOpt,
         set_: Optional[List[str]] = SetOpt, condition_dir: Optional[Path] = CondOpt, face_box: Optional[str] = FaceBoxOpt, yaw: Optional[float] = YawOpt,
         pitch: Optional[float] = PitchOpt, faces: Optional[int] = FacesOpt, texture: Optional[str] = TextureOpt,
         normal_map: Optional[bool] = NormalMapOpt, progress: ProgressMode = ProgressOpt, quiet: bool = QuietOpt,
         debug: bool = DebugOpt):
    """Portrait in, 3D head out: preprocess → backview → views → fit → export."""
    set_ = _with_mesh_options(_with_condition_dir(set_, condition_dir), faces, texture, normal_map)
    from recon.api import make as _make

    cfg = _config(preset, export, backend, views, seed, device, set_, face_box, yaw, pitch)
    with event_sink(progress.value, quiet) as printer:
        result = _make(image, out_dir, config=cfg, force=force, from_stage=from_, until=until, on_event=printer)
    _print_result(result)


# ------------------------------------------------------------------------ batch
@app.command()
@guarded
def batch(source: Path = typer.Argument(..., metavar="FOLDER|LIST.txt|manifest.csv",
                                        help="A folder of portraits, a LIST.txt (one path per line, # comments) or a "
                                             "manifest.csv (column image; optional id, preset, set)."),
          out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder: one run folder per image + batch.json."),
          recursive: bool = typer.Option(False, "--recursive", "-r", help="Also look in sub-folders (FOLDER only)."),
          workers: int = typer.Option(1, "--workers", "-w", min=1,
                                      help="Local worker processes, each running whole images (torch threads = cores / N)."),
          ray: bool = typer.Option(False, "--ray", help="Run on Ray: start or join a local cluster (the latest `ray start` "
                                                        "on this machine, or $RAY_ADDRESS). Needs pip install 'portrait3d\\[ray]'."),
          ray_address: Optional[str] = typer.Option(None, "--ray-address", metavar="ADDRESS",
                                                    help="Join a running Ray cluster: auto, HOST:PORT or ray://HOST:10001 "
                                                         "(implies --ray)."),
          pipeline: Optional[bool] = typer.Option(None, "--pipeline/--no-pipeline",
                                                  help="Overlap preprocess/export of neighbouring images with the GPU "
                                                       "stages (default: on with CUDA, single worker)."),
          retries: int = typer.Option(2, "--retries", min=0, help="Retries of an image after a transient failure "
                                                                  "(lost worker, CUDA out of memory); bad input is never retried."),
          export: Optional[str] = ExportOpt, preset: str = PresetOpt, backend: Optional[Backend] = BackendOpt,
          views: Optional[int] = ViewsOpt, seed: Optional[int] = SeedOpt, device: Optional[Device] = DeviceOpt,
          json_: bool = JsonOpt, force: bool = ForceOpt, set_: Optional[List[str]] = SetOpt, condition_dir: Optional[Path] = CondOpt,
          faces: Optional[int] = FacesOpt, texture: Optional[str] = TextureOpt, normal_map: Optional[bool] = NormalMapOpt,
          progress: ProgressMode = ProgressOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Every image of a folder, list or manifest; bad images are reported and skipped. Exit 0 if all succeeded, 5 if any failed."""
    set_ = _with_mesh_options(_with_condition_dir(set_, condition_dir), faces, texture, normal_map)
    from recon.batch import batch as _batch, json_event_stream

    cfg = _config(preset, export, backend, views, seed, device, set_)
    # Typer has no options with an optional value: `--ray [ADDRESS]` is --ray / --ray-address ADDRESS.
    kw = dict(config=cfg, recursive=recursive, force=force, workers=workers,
              ray=ray_address or ("local" if ray else None),
              pipeline="auto" if pipeline is None else pipeline, retries=retries)
    if progress == ProgressMode.json:
        # Every stderr line is an event; native libraries' chatter goes to OUT/batch.log.
        with json_event_stream(out_dir / "batch.log") as emit:
            res = _batch(source, out_dir, on_event=emit, **kw)
    else:
        with EventPrinter(progress.value, quiet) as printer:
            res = _batch(source, out_dir, on_event=printer, **kw)
    if STATE["json"]:
        print_json(res.to_dict())
    else:
        from rich.table import Table

        t = Table(title=f"batch: {res.succeeded} ok, {res.failed} failed, {res.skipped} already done", show_edge=False)
        t.add_column("image"); t.add_column("status"); t.add_column("seconds", justify="right"); t.add_column("detail")
        for item in res.items:
            style = {"ok": "green", "skipped": "dim", "failed": "red"}[item["status"]]
            t.add_row(item["image"], f"[{style}]{item['status']}[/]", f"{item.get('seconds', 0):.1f}",
                      item.get("error", {}).get("message", "") if item["status"] == "failed" else item.get("run_dir", ""))
        out.print(t)
        if progress != ProgressMode.json:
            err.print(f"summary written to {res.summary_path}")
    raise SystemExit(res.exit_code)


# ---------------------------------------------------------------- stage commands
def _run_stages(run_dir: Path, stages, cfg=None, image=None, views_dir=None, force=False, progress="auto", quiet=False):
    from recon.api import run as _run

    with event_sink(progress, quiet) as printer:
        return _run(run_dir, stages, config=cfg, image=image, views_dir=views_dir, force=force, on_event=printer)


def _run_config(run_dir: Path, preset, export=None, backend=None, views=None, seed=None, device=None, sets=None, **pre):
    """A stage command on an existing run keeps its saved settings unless options are given."""
    from recon.api import load_run_config

    saved = load_run_config(run_dir)
    if saved is not None and preset is None and not any([export, backend, views, seed is not None, device, sets, *pre.values()]):
        return saved
    base = _config(preset or (saved.preset if saved else "default"), export, backend, views, seed, device, sets, **pre)
    return base


@app.command("preprocess")
@guarded
def preprocess_cmd(image: Path = typer.Argument(..., help="Portrait image."),
                   out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder."),
                   preset: Optional[str] = typer.Option(None, "--preset", "-p"), set_: Optional[List[str]] = SetOpt,
                   face_box: Optional[str] = FaceBoxOpt, yaw: Optional[float] = YawOpt, pitch: Optional[float] = PitchOpt,
                   force: bool = ForceOpt, json_: bool = JsonOpt, progress: ProgressMode = ProgressOpt,
                   quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Decode, detect the face, align (PanoHead crop), estimate the camera, matte."""
    cfg = _config(preset or "default", None, None, None, None, None, set_, face_box, yaw, pitch)
    _print_result(_run_stages(out_dir, ["preprocess"], cfg, image=image, force=force, progress=progress.value, quiet=quiet))


@app.command("views")
@guarded
def views_cmd(run_dir: Path = typer.Argument(..., help="Run folder with a finished preprocess stage."),
              backend: Optional[Backend] = BackendOpt, views: Optional[int] = ViewsOpt, seed: Optional[int] = SeedOpt,
              device: Optional[Device] = DeviceOpt, preset: Optional[str] = typer.Option(None, "--preset", "-p"),
              set_: Optional[List[str]] = SetOpt, condition_dir: Optional[Path] = CondOpt, force: bool = ForceOpt, json_: bool = JsonOpt,
              progress: ProgressMode = ProgressOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Generate the back view and the 360° ring of views."""
    set_ = _with_condition_dir(set_, condition_dir)
    cfg = _run_config(run_dir, preset, None, backend, views, seed, device, set_)
    _print_result(_run_stages(run_dir, ["backview", "views"], cfg, force=force, progress=progress.value, quiet=quiet))


@app.command("fit")
@guarded
def fit_cmd(source: Path = typer.Argument(..., help="A run folder with views, or any folder of RGBA views + dataset.json."),
            out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: the source run)."),
            preset: Optional[str] = typer.Option(None, "--preset", "-p"), seed: Optional[int] = SeedOpt,
            device: Optional[Device] = DeviceOpt, set_: Optional[List[str]] = SetOpt, force: bool = ForceOpt,
            json_: bool = JsonOpt, progress: ProgressMode = ProgressOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Fit Gaussian splats to the views (checkpointed: a killed fit resumes)."""
    from recon.errors import InputError

    if not source.exists():
        raise InputError(f"{source} does not exist", hint="pass a run folder or a folder of views with a dataset.json")
    external = (source / "dataset.json").is_file() and not (source / "manifest.json").is_file()
    target = out_dir or source
    if external:
        if out_dir is None:
            raise InputError("fitting a views folder needs --out RUN", hint="e.g. portrait3d fit my_views --out runs/fitted")
        cfg = _config(preset or "default", None, None, None, seed, device, set_)
        res = _run_stages(target, ["views", "fit"], cfg, views_dir=source, force=force, progress=progress.value, quiet=quiet)
    else:
        cfg = _run_config(source, preset, None, None, None, seed, device, set_)
        if out_dir is not None and out_dir.resolve() != source.resolve():
            raise InputError("--out must be the source run folder when fitting a run", hint="omit --out")
        res = _run_stages(target, ["fit"], cfg, force=force, progress=progress.value, quiet=quiet)
    _print_result(res)


@app.command("export")
@guarded
def export_cmd(run_dir: Path = typer.Argument(..., help="Run folder with a fitted scene."),
               export: Optional[str] = ExportOpt, preset: Optional[str] = typer.Option(None, "--preset", "-p"),
               set_: Optional[List[str]] = SetOpt, faces: Optional[int] = FacesOpt, texture: Optional[str] = TextureOpt,
               normal_map: Optional[bool] = NormalMapOpt, force: bool = ForceOpt, json_: bool = JsonOpt,
               progress: ProgressMode = ProgressOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Export meshes (GLB/OBJ/PLY), splats (.ply/.splat) and turntables (mp4/gif)."""
    set_ = _with_mesh_options(set_, faces, texture, normal_map)
    cfg = _run_config(run_dir, preset, export, None, None, None, None, set_)
    _print_result(_run_stages(run_dir, ["export"], cfg, force=force, progress=progress.value, quiet=quiet))


@app.command("status")
@guarded
def status_cmd(run_dir: Path = typer.Argument(..., help="Run folder."), json_: bool = JsonOpt, debug: bool = DebugOpt):
    """Which stages are done, stale and why."""
    from recon.status import run_status

    st = run_status(run_dir)
    if STATE["json"]:
        print_json(st)
        return
    from rich.table import Table

    t = Table(title=f"{st['run_dir']}", show_edge=False)
    t.add_column("stage"); t.add_column("state"); t.add_column("seconds", justify="right"); t.add_column("why")
    colors = {"done": "green", "stale": "yellow", "missing": "dim", "failed": "red", "interrupted": "red", "running": "yellow"}
    for row in st["stages"]:
        secs = f"{row['seconds']:.1f}" if row.get("seconds") else ""
        t.add_row(row["stage"], f"[{colors.get(row['state'], 'white')}]{row['state']}[/]", secs, row.get("why", ""))
    out.print(t)


@app.command("render")
@guarded
def render_cmd(run_dir: Path = typer.Argument(..., help="Run folder with a fitted scene."),
               cameras_json: Path = typer.Option(..., "--cameras", help="PanoHead-format dataset.json of cameras."),
               out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the RGBA PNGs."),
               size: int = typer.Option(512, "--size", help="Image side in pixels."),
               device: Optional[Device] = DeviceOpt, json_: bool = JsonOpt, progress: ProgressMode = ProgressOpt,
               quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Render the fitted scene at any cameras (one RGBA PNG per camera, named as in dataset.json)."""
    from recon.api import render as _render
    from recon.errors import UsageError
    from recon.events import Emitter
    from recon.runtime import resolve_device
    from recon.types import Scene

    if not 16 <= size <= 4096:
        raise UsageError(f"--size {size} is out of range", hint="use 16..4096")
    scene = Scene.load(Path(run_dir) / "04_fit")
    dev, _ = resolve_device(device.value if device else "auto")
    with event_sink(progress.value, quiet) as printer:
        em = Emitter(printer, Path(run_dir).name)
        t0 = time.time()
        em.emit("stage_started", stage="render", message=str(cameras_json))
        files = _render(scene, cameras_json, out_dir, size=size, device=str(dev), progress=em.progress_fn("render"))
        em.emit("stage_finished", stage="render", seconds=round(time.time() - t0, 3))
    if STATE["json"]:
        print_json({"ok": True, "files": [str(f) for f in files]})
    else:
        out.print(f"rendered {len(files)} views into {out_dir}")


# ----------------------------------------------------------------------- presets
@presets_app.command("list")
@guarded
def presets_list(json_: bool = JsonOpt):
    """List the presets."""
    from recon.config import preset_dict, preset_names

    names = preset_names()
    if STATE["json"]:
        print_json({"presets": {n: preset_dict(n) for n in names}})
    else:
        for n in names:
            out.print(n)


@presets_app.command("show")
@guarded
def presets_show(name: str = typer.Argument(...), json_: bool = JsonOpt):
    """Show the fully resolved settings of a preset."""
    from recon.config import build_config, preset_text

    cfg = build_config(name)
    if STATE["json"]:
        print_json(cfg.to_dict())
    else:
        out.print(preset_text(name), markup=False)
        out.print("# resolved:", markup=False)
        import json as _j

        out.print(_j.dumps(cfg.to_dict(), indent=1), markup=False)


# ------------------------------------------------------------------------ doctor
@app.command()
@guarded
def doctor(json_: bool = JsonOpt):
    """Check the installation: python, torch, CUDA, gsplat, face models, ffmpeg, weights, nerfstudio."""
    from recon.doctor import run_checks

    checks = run_checks()
    if STATE["json"]:
        print_json({"ok": all(c["ok"] or not c["required"] for c in checks), "checks": checks})
        return
    from rich.table import Table

    t = Table(show_edge=False)
    t.add_column("check"); t.add_column(""); t.add_column("detail")
    for c in checks:
        mark = "[green]ok[/]" if c["ok"] else ("[red]missing[/]" if c["required"] else "[yellow]absent[/]")
        t.add_row(c["name"], mark, c["detail"] + (f"  [dim]({c['hint']})[/]" if c.get("hint") and not c["ok"] else ""))
    out.print(t)


# ----------------------------------------------------------------------- weights
class WeightsModel(str, Enum):
    dp360 = "dp360"
    backhead = "backhead"
    panohead = "panohead"


class DType(str, Enum):
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


@weights_app.command("convert")
@guarded
def weights_convert(model: WeightsModel = typer.Option(..., "--model", help="dp360, backhead or panohead."),
                    src: Path = typer.Option(..., "--src", help="Official checkpoint (.th or .pkl)."),
                    out_dir: Path = typer.Option(..., "--out", "-o", help="Output folder (diffusers format / safetensors)."),
                    dtype: DType = typer.Option(DType.fp16, "--dtype"), json_: bool = JsonOpt,
                    progress: ProgressMode = ProgressOpt, debug: bool = DebugOpt):
    """Convert an official checkpoint (safely: no code in it ever runs)."""
    from recon.events import Emitter
    from recon.weights import convert

    with EventPrinter(progress.value) as printer:
        em = Emitter(printer, model.value)
        t0 = time.time()
        em.emit("stage_started", stage="convert", message=str(src))
        report = convert(model.value, src, out_dir, dtype=dtype.value, progress=em.progress_fn("convert"))
        em.emit("stage_finished", stage="convert", seconds=round(time.time() - t0, 3))
    if STATE["json"]:
        print_json({"ok": True, **report})
    else:
        out.print(f"converted {src} → {out_dir}")


@weights_app.command("download")
@guarded
def weights_download(to: Optional[Path] = typer.Option(None, "--to", help="Weights folder (default $P3D_WEIGHTS or ~/.cache/portrait3d/weights)."),
                     from_dir: Optional[Path] = typer.Option(None, "--from", help="Use already downloaded files from this folder."),
                     json_: bool = JsonOpt, progress: ProgressMode = ProgressOpt, debug: bool = DebugOpt):
    """Fetch the official DiffPortrait360 + PanoHead weights (Hugging Face) and convert them."""
    from recon.events import Emitter
    from recon.weights import download

    with EventPrinter(progress.value) as printer:
        em = Emitter(printer, "weights")
        report = download(to, from_dir=from_dir, progress=em.progress_fn("download"))
    print_json({"ok": True, **report}) if STATE["json"] else out.print(f"weights ready in {report.get('root', to)}")


@weights_app.command("list")
@guarded
def weights_list(json_: bool = JsonOpt, debug: bool = DebugOpt):
    """What weights are present, converted and usable."""
    from recon.weights import list_weights

    rows = list_weights()
    if STATE["json"]:
        print_json({"ok": True, "weights": rows})
    else:
        from rich.table import Table

        t = Table(show_edge=False)
        cols = sorted({k for r in rows for k in r})
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[str(r.get(c, "")) for c in cols])
        out.print(t)


@weights_app.command("verify")
@guarded
def weights_verify(target: str = typer.Argument("all", help="dp360, backhead, panohead, all, or a converted folder."),
                   json_: bool = JsonOpt, debug: bool = DebugOpt):
    """Check converted weights: configs, tensor headers, shapes."""
    from recon.weights import verify

    report = verify(target)
    print_json({"ok": True, **report}) if STATE["json"] else out.print(report)


# -------------------------------------------------------------------------- entry
def entry() -> None:
    """Console-script entry: click usage errors also obey --json and exit 2."""
    json_mode = "--json" in sys.argv[1:]
    try:
        rv = app(standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # noqa: BLE001
        # Typer vendors its own click: match its exceptions by class, not by import.
        names = {c.__name__ for c in type(e).__mro__}
        if "Abort" in names:
            err.print("[red]interrupted[/]")
            code = 130
        elif "ClickException" in names:
            msg = e.format_message()
            if json_mode:
                print_json({"ok": False, "error": "usage", "message": msg, "hint": "see --help", "exit_code": 2})
            elif msg:
                err.print("[bold red]error:[/] ", end="")
                err.print(f"{msg} (hint: see --help)", highlight=False, markup=False)
            code = 2
        else:
            raise
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    entry()
