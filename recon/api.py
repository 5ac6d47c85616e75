"""The Python API and the one place where stages are wired together (DESIGN §3-4).

    import recon
    result = recon.make("photo.jpg", out="runs/me", preset="default", export=["glb"])
    print(result.assets.files)

Stage functions (`preprocess`, `backview`, `views`, `fit`, `export`, `render`) work
on the typed contracts of recon.types and never touch a run directory; `make` and
`run` add the run directory: fingerprints, skipping, atomic outputs, resume.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import cameras
from .config import (ExportConfig, FitConfig, PreprocessConfig, RunConfig, ViewsConfig, build_config,
                     from_dict)
from .errors import InputError, MissingError, ReconError, StageError, UsageError
from .events import Emitter, EventFn, ProgressFn
from .rundir import STAGES, RunDir, atomic_write_text, check_stage_name, file_digest, folder_digest
from .types import Assets, BackView, Portrait, Scene, ViewSet

# ============================================================================ stages
def preprocess(image: str | os.PathLike, config: PreprocessConfig | None = None,
               progress: ProgressFn | None = None) -> Portrait:
    """Decode, detect, align (PanoHead crop), estimate the camera and matte one image."""
    from .preprocess import preprocess as _preprocess

    return _preprocess(Path(image), config or PreprocessConfig(), progress=progress)


def resolve_backend(requested: str = "auto", device: str = "auto", weights_dir: str | None = None) -> tuple[str, str]:
    """Pick the views back-end and say why (DESIGN §1: no silent fallback)."""
    from .runtime import resolve_device

    if requested == "proxy":
        return "proxy", "requested"
    if device == "cpu":
        ok, why = False, "--device cpu (the diffusion back-end needs a CUDA GPU to be practical)"
    else:
        try:
            from .weights import backend_available

            ok, why = backend_available(weights_dir)
        except ImportError as e:  # the diffusion engine is not importable in this install
            ok, why = False, f"the diffusion engine is unavailable ({e})"
    if requested == "diffusion":
        # Asked for explicitly: weights are required, a GPU only advised.
        from .weights import diffusion_weights_ready

        ready, wwhy = diffusion_weights_ready(weights_dir)
        if not ready:
            raise MissingError(f"--backend diffusion cannot run: {wwhy}",
                               hint="run `portrait3d weights download` (on a CUDA machine), or use --backend proxy")
        return "diffusion", why if ok else f"requested; {wwhy}; warning: {why.split(';')[0]}, this will be very slow"
    if requested != "auto":
        raise UsageError(f"unknown backend {requested!r}", hint="use auto, proxy or diffusion")
    if ok:
        return "diffusion", why
    return "proxy", f"{why}; using the weight-free proxy (a preview, not DiffPortrait360)"


_PROXY_CACHE: dict = {}


def _proxy_head(portrait: Portrait, cfg: ViewsConfig, progress: ProgressFn | None = None):
    """The proxy head is shared by the backview and views stages of one run."""
    from .proxy import build_proxy

    key = (hash(portrait.image.tobytes()), hash(portrait.alpha.tobytes()), cfg.proxy_detail, cfg.proxy_texture, cfg.seed,
           tuple(np.round(portrait.c2w.ravel(), 6)))
    if key not in _PROXY_CACHE:
        _PROXY_CACHE.clear()  # one head at a time: batches must not grow memory
        _PROXY_CACHE[key] = build_proxy(portrait, cfg, progress=progress)
    return _PROXY_CACHE[key]


def backview(portrait: Portrait, config: ViewsConfig | None = None, *, backend: str = "proxy",
             device: str = "auto", progress: ProgressFn | None = None) -> BackView:
    """The back-of-head image I_back at azimuth 180."""
    cfg = config or ViewsConfig()
    if backend == "diffusion":
        from .diffusion.stage import diffusion_backview
        from .runtime import runtime

        rt = runtime(device, cfg.dtype)
        ring = _panohead_ring(cfg, 2, rt.device, progress)  # [front, back]
        return diffusion_backview(portrait, cfg, rt, progress=progress,
                                  condition_image=None if ring is None else ring[1])
    from .proxy import proxy_backview

    return proxy_backview(portrait, cfg, head=_proxy_head(portrait, cfg, progress))


def _panohead_ring(cfg: ViewsConfig, num_views: int, device, progress: ProgressFn | None):
    """Camera-condition images rendered by PanoHead at the ring, when its weights are
    present and no precomputed ring (views.condition_dir) was asked for; else None."""
    if cfg.condition_dir:
        return None
    from .weights import find_weights, weights_home

    folder = find_weights("panohead", cfg.weights_dir)
    if folder is None:
        return None
    from .panohead.rings import render_condition_ring

    G = _panohead_generator(folder, device)
    return render_condition_ring(G, num_views, cfg.elevation, cache_dir=Path(cfg.weights_dir or weights_home()) / "rings",
                                 device=device,
                                 progress=progress)


_PANOHEAD_CACHE: dict = {}


def _panohead_generator(folder, device):
    """One loaded PanoHead generator per (folder, device): the condition rings of the
    backview and views stages and the inversion share it."""
    from .panohead.convert import load_generator

    key = (str(folder), str(device))
    if key not in _PANOHEAD_CACHE:
        _PANOHEAD_CACHE.clear()
        _PANOHEAD_CACHE[key] = load_generator(folder, device=device)
    return _PANOHEAD_CACHE[key]


def _panohead_noise_folder(cfg: ViewsConfig):
    """The converted PanoHead folder when the 3D-aware noise comes from its inversion
    (noise = panohead, or auto with PanoHead weights present), else None."""
    if cfg.noise not in ("auto", "panohead", "proxy", "none"):
        raise UsageError(f"unknown views.noise {cfg.noise!r}", hint="use auto, panohead, proxy or none")
    if cfg.noise not in ("auto", "panohead"):
        return None
    from .weights import find_weights, weights_home

    folder = find_weights("panohead", cfg.weights_dir)
    if folder is None and cfg.noise == "panohead":
        raise MissingError(f"views.noise=panohead needs converted PanoHead weights (none in "
                           f"{cfg.weights_dir or weights_home()})",
                           hint="run `portrait3d weights download` (or `weights convert --model panohead`), "
                                "or use views.noise=auto / proxy")
    return folder


def _panohead_inversion(portrait: Portrait, cfg: ViewsConfig, folder, device, progress: ProgressFn | None):
    """PanoHead inversion of the portrait (DESIGN §6-7): (N, H, W, 4) RGBA ring renders for
    the 3D-aware noise, the coarse head surface points (or None) and notes for the ViewSet."""
    import torch
    import torch.nn.functional as F

    from .panohead import invert
    from .panohead.perceptual import PerceptualLoss, load_perceptual_weights
    from .weights import perceptual_paths

    G = _panohead_generator(folder, device)  # invert fine-tunes a copy: G itself stays as loaded
    paths = perceptual_paths(cfg.weights_dir)
    net = load_perceptual_weights(PerceptualLoss(), *paths) if paths else None
    icfg = invert.InversionConfig(w_steps=cfg.inversion_steps, finetune_steps=cfg.inversion_finetune_steps,
                                  seed=cfg.seed)
    res = invert.invert_portrait(G, portrait, num_views=cfg.num_views, pitches=cfg.elevation, config=icfg,
                                 perceptual=net, ring_output=icfg.target, progress=progress)
    # masks are at the neural rendering resolution: bring them to the renders' size for alpha
    h, w = res.renders.shape[1:3]
    m = torch.from_numpy(np.ascontiguousarray(res.masks)).float()[:, None]
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[:, 0].round().clamp(0, 255)
    rgba = np.concatenate([res.renders, m.to(torch.uint8).numpy()[..., None]], axis=-1)
    info = {"w_steps": icfg.w_steps, "finetune_steps": icfg.finetune_steps, "target": icfg.target,
            "loss": res.finetune_losses[-1] if res.finetune_losses else (res.w_losses[-1] if res.w_losses else None),
            "perceptual": net is not None, "notes": list(res.notes)}
    try:  # the coarse geometry is a bonus for fitting: its absence is recorded, not fatal
        points = invert.coarse_geometry(res.generator, res.ws)
    except StageError as e:
        points = None
        info["notes"].append(f"no coarse geometry: {e.message}")
    return rgba, points, info


def views(portrait: Portrait, back: BackView, config: ViewsConfig | None = None, *, backend: str = "proxy",
          device: str = "auto", progress: ProgressFn | None = None) -> ViewSet:
    """N view-consistent views on the 360 ring."""
    cfg = config or ViewsConfig()
    if backend == "diffusion":
        from .diffusion.stage import diffusion_views
        from .runtime import runtime

        rt = runtime(device, cfg.dtype)
        noise, points, info = None, None, None
        ph_folder = _panohead_noise_folder(cfg)
        if ph_folder is not None:
            # official: 3D-aware noise from renders of the PanoHead inversion of the input
            noise, points, info = _panohead_inversion(portrait, cfg, ph_folder, rt.device, progress)
        elif cfg.noise in ("auto", "proxy"):
            # no PanoHead weights: 3D-aware noise from the proxy head
            head = _proxy_head(portrait, cfg)
            ring = cameras.ring_cam2world(cfg.num_views, cameras.elevation_to_v(cfg.elevation))
            K = np.repeat(cameras.INTRINSICS_NORM[None], cfg.num_views, 0)
            noise, _ = head.render(ring, K, cfg.resolution, cfg.resolution)
        vs = diffusion_views(portrait, back, cfg, rt, condition_images=_panohead_ring(cfg, cfg.num_views, rt.device, progress),
                             noise_renders=noise, progress=progress)
        vs.meta["noise_source"] = "panohead" if info is not None else ("proxy" if noise is not None else "none")
        if info is not None:
            vs.meta["inversion"] = info
            vs.init_points = np.asarray(points, dtype=np.float32) if points is not None and len(points) else None
        return vs
    from .proxy import proxy_views

    return proxy_views(portrait, back, cfg, head=_proxy_head(portrait, cfg), progress=progress)


def fit(view_set: ViewSet, config: FitConfig | None = None, *, device: str = "auto",
        checkpoint_dir: str | os.PathLike | None = None, progress: ProgressFn | None = None) -> tuple[Scene, dict]:
    """Fit Gaussian splats to the views; returns the scene and its metrics."""
    from .fit.splat import fit_splats
    from .runtime import resolve_device

    cfg = config or FitConfig()
    dev, _ = resolve_device(device if device != "auto" else cfg.device)
    if cfg.method.startswith("nerfstudio"):
        # out of process (DESIGN §2); its dataset, outputs and checkpoints live in checkpoint_dir
        import tempfile

        from .fit.nerfstudio import fit_nerfstudio

        work = Path(checkpoint_dir) if checkpoint_dir else Path(tempfile.mkdtemp(prefix="p3d-nerfstudio-"))
        return fit_nerfstudio(view_set, cfg, work, progress, device=str(dev))
    pts = view_set.init_points
    if pts is not None and len(pts) > min(cfg.num_init, cfg.max_gaussians):
        # the PanoHead surface has more vertices than the fit starts with: a seeded subset
        pick = np.random.default_rng(cfg.seed).choice(len(pts), min(cfg.num_init, cfg.max_gaussians), replace=False)
        pts = pts[np.sort(pick)]
    return fit_splats(view_set, cfg, device=str(dev), checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
                      init_points=pts, progress=progress)


def _render_fn(scene: Scene, device: str = "cpu"):
    from .fit.render import render_scene

    def render(c2w, K, width, height, background=None):
        return render_scene(scene, c2w, K, width, height, background=background, device=device)

    return render


def export(scene: Scene, out_dir: str | os.PathLike, config: ExportConfig | None = None, *,
           views: ViewSet | None = None, preview: bool = False, device: str = "cpu",
           progress: ProgressFn | None = None) -> Assets:
    """Write meshes, splats and turntables of a fitted scene into out_dir."""
    import functools

    from .export import export_assets
    from .fit.render import render_scene

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_assets(scene, config or ExportConfig(), out_dir, views=views,
                         render_fn=functools.partial(render_scene, device=device), preview=preview, progress=progress)


def render(scene: Scene, cameras_json: str | os.PathLike, out_dir: str | os.PathLike, *, size: int = 512,
           background: tuple[float, float, float] | None = None, device: str = "cpu",
           progress: ProgressFn | None = None) -> list[Path]:
    """Render the scene at every camera of a PanoHead `dataset.json`; one RGBA PNG per camera, named as there."""
    from .imageio_safe import write_png

    entries = cameras.read_dataset_json(cameras_json)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fn = _render_fn(scene, device)
    written = []
    for i, (name, c2w, K) in enumerate(entries):
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise InputError(f"camera name {name!r} in {cameras_json} points outside the output folder",
                             hint="names must be relative file names")
        rgba, _ = fn(c2w[None], K[None], size, size, background=background)
        target = out_dir / (name if name.lower().endswith(".png") else f"{name}.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_png(target, rgba[0])
        written.append(target)
        if progress:
            progress(i + 1, len(entries), name)
    return written


# ================================================================= run directory
@dataclass
class RunResult:
    run_dir: Path
    backend: str | None = None
    backend_reason: str | None = None
    preview: bool = False
    stages: list[dict] = field(default_factory=list)   # {stage, action: ran|skipped, seconds}
    metrics: dict = field(default_factory=dict)
    assets: Assets | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"ok": True, "run_dir": str(self.run_dir), "backend": self.backend, "backend_reason": self.backend_reason,
                "preview": self.preview, "stages": self.stages, "metrics": self.metrics,
                "assets": self.assets.to_dict() if self.assets else None, "seconds": round(self.seconds, 3),
                "notes": self.notes}


_BACKVIEW_KEYS = ("resolution", "elevation", "seed", "steps", "guidance", "eta", "dtype", "official_schedule",
                  "proxy_detail", "proxy_texture", "weights_dir")


class Runner:
    """Runs stages against one run directory, skipping those whose fingerprint matches."""

    def __init__(self, run_dir: str | os.PathLike, cfg: RunConfig, *, image: str | os.PathLike | None = None,
                 views_dir: str | os.PathLike | None = None, on_event: EventFn | None = None, run_id: str | None = None):
        self._created = not Path(run_dir).expanduser().exists()
        self.rd = RunDir(run_dir)
        self.cfg = cfg
        self.image = Path(image) if image is not None else None
        self.views_dir = Path(views_dir) if views_dir is not None else None
        self.em = Emitter(on_event, run_id or (self.image.stem if self.image else self.rd.root.name))
        self._cache: dict = {}
        self._fp: dict[str, str] = {}
        self.result = RunResult(self.rd.root)
        self._backend: tuple[str, str] | None = None

    # ----------------------------------------------------------------- helpers
    def backend(self) -> tuple[str, str]:
        if self._backend is None:
            self._backend = resolve_backend(self.cfg.views.backend, self.cfg.device, self.cfg.views.weights_dir)
            self.em.info(f"views back-end: {self._backend[0]} ({self._backend[1]})", backend=self._backend[0])
        return self._backend

    def _load(self, stage: str):
        if stage not in self._cache:
            d = self.rd.stage_dir(stage)
            loader = {"preprocess": Portrait.load, "backview": BackView.load, "views": ViewSet.load,
                      "fit": Scene.load}[stage]
            self._cache[stage] = loader(d)
        return self._cache[stage]

    def _upstream(self, *stages: str) -> list[str]:
        out = []
        for s in stages:
            fp = self._fp.get(s) or self.rd.recorded_fingerprint(s)
            if fp is None:
                raise UsageError(f"stage {s!r} has not been run in {self.rd.root}",
                                 hint="run `portrait3d make IMAGE --out RUN` (or the earlier stage commands) first")
            out.append(fp)
        return out

    def _record(self, stage: str):
        c = self.cfg
        if stage == "preprocess":
            if self.image is None:
                raise UsageError("no input image for the preprocess stage", hint="pass an IMAGE")
            digest = self._input_digest()
            self.rd.manifest["input"] = {"path": str(self.image.resolve()), "sha256": digest}
            return self.rd.record(stage, c.section("preprocess"), [], {"input_sha256": digest})
        if stage == "backview":
            backend, _ = self.backend()
            sec = {k: v for k, v in c.section("views").items() if k in _BACKVIEW_KEYS}
            return self.rd.record(stage, sec, self._upstream("preprocess"), {"backend": backend, **self._weights_rev(backend)})
        if stage == "views":
            if self.views_dir is not None:
                self.rd.manifest["external_views"] = str(self.views_dir.resolve())
                return self.rd.record(stage, {}, [], {"external_views": folder_digest(self.views_dir)})
            backend, _ = self.backend()
            return self.rd.record(stage, c.section("views"), self._upstream("preprocess", "backview"),
                                  {"backend": backend, **self._weights_rev(backend)})
        if stage == "fit":
            return self.rd.record(stage, c.section("fit"), self._upstream("views"))
        if stage == "export":
            return self.rd.record(stage, c.section("export"), self._upstream("fit", "views"))
        raise AssertionError(stage)

    def _input_digest(self) -> str:
        if "input" not in self._cache:
            p = self.image
            if not p.exists():
                raise InputError(f"input image {p} does not exist", hint="check the path")
            if p.is_dir():
                raise InputError(f"input {p} is a directory, not an image", hint="use `portrait3d batch FOLDER` for folders")
            self._cache["input"] = file_digest(p)
        return self._cache["input"]

    def _weights_rev(self, backend: str) -> dict:
        if backend != "diffusion":
            return {}
        from .weights import weights_revision

        return {"weights": weights_revision(self.cfg.views.weights_dir), "condition": self.cfg.views.condition_dir or "panohead"}

    # ------------------------------------------------------------- stage bodies
    def _run_stage(self, stage: str, out: Path, progress: ProgressFn):
        c = self.cfg
        if stage == "preprocess":
            portrait = preprocess(self.image, c.preprocess, progress)
            for n in portrait.notes:
                self.em.info(n, stage=stage)
            portrait.save(out)
            return portrait
        if stage == "backview":
            b = backview(self._load("preprocess"), c.views, backend=self.backend()[0], device=c.device, progress=progress)
            b.save(out)
            return b
        if stage == "views":
            if self.views_dir is not None:
                vs = ViewSet.load(self.views_dir)
            else:
                vs = views(self._load("preprocess"), self._load("backview"), c.views, backend=self.backend()[0],
                           device=c.device, progress=progress)
            vs.save(out)
            try:
                from .contact_sheet import contact_sheet
                from .imageio_safe import write_png

                write_png(out / "contact_sheet.png", contact_sheet(vs))
            except ImportError:
                pass
            return vs
        if stage == "fit":
            ck = self.rd.checkpoint_dir("fit")
            tag = ck / "fingerprint.txt"
            if ck.is_dir() and (not tag.is_file() or tag.read_text().strip() != self._fp["fit"]):
                self.rd.clear_checkpoints("fit")  # checkpoints of other settings must not leak in
            ck.mkdir(parents=True, exist_ok=True)
            tag.write_text(self._fp["fit"])
            if any(ck.glob("*.pt")):
                self.em.info("resuming the fit from its last checkpoint", stage=stage)
            scene, metrics = fit(self._load("views"), c.fit, device=c.device, checkpoint_dir=ck, progress=progress)
            scene.save(out)
            atomic_write_text(out / "fit_metrics.json", json.dumps(metrics, indent=1))
            self.result.metrics = metrics
            return scene
        if stage == "export":
            vs = self._load("views")
            assets = export(self._load("fit"), out, c.export, views=vs, preview=vs.preview, progress=progress)
            return assets
        raise AssertionError(stage)

    # ---------------------------------------------------------------------- run
    def run(self, stages: Sequence[str] = STAGES, *, force: bool = False, from_stage: str | None = None,
            until: str | None = None) -> RunResult:
        from_stage, until = check_stage_name(from_stage), check_stage_name(until)
        t0 = time.time()
        stages = list(stages)
        if until:
            stages = [s for s in stages if STAGES.index(s) <= STAGES.index(until)]
        self.em.emit("run_started", run_dir=str(self.rd.root), stages=stages)
        try:
            self._run_stages(stages, force, from_stage)
        except (ReconError, KeyboardInterrupt):
            self._discard_if_empty()
            raise
        self._finish_result()
        self.result.seconds = time.time() - t0
        self.em.emit("run_finished", seconds=round(self.result.seconds, 3), run_dir=str(self.rd.root))
        return self.result

    def _run_stages(self, stages: list[str], force: bool, from_stage: str | None) -> None:
        self._save_config()
        for stage in stages:
            rec = self._record(stage)
            self._fp[stage] = rec.fingerprint
            forced = force or (from_stage is not None and STAGES.index(stage) >= STAGES.index(from_stage))
            if not forced and self.rd.is_done(rec):
                self.em.emit("stage_skipped", stage=stage, message="up to date")
                self.result.stages.append({"stage": stage, "action": "skipped"})
                continue
            why = "forced" if forced else self.rd.why_stale(rec)
            self.em.emit("stage_started", stage=stage, message=why)
            st = time.time()
            self._cache.pop(stage, None)
            try:
                with self.rd.stage_output(rec) as out:
                    value = self._run_stage(stage, out, self.em.progress_fn(stage))
            except ReconError as e:
                self.em.emit("stage_failed", stage=stage, message=e.one_line())
                if isinstance(e, StageError) and e.stage is None:
                    e.stage = stage
                raise
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:
                self.em.emit("stage_failed", stage=stage, message=f"{type(e).__name__}: {e}")
                raise
            if stage == "export":
                value = self._relocate_assets(value)
            if stage != "export":
                self._cache[stage] = value
            if stage == "fit":
                self.rd.clear_checkpoints("fit")
            secs = time.time() - st
            self.em.emit("stage_finished", stage=stage, seconds=round(secs, 3))
            self.result.stages.append({"stage": stage, "action": "ran", "seconds": round(secs, 3)})

    def _discard_if_empty(self) -> None:
        """A run folder this call created and that holds no finished stage is removed:
        bad input must not leave a folder that looks like a run."""
        import shutil

        if self._created and not any(e.get("status") == "done" for e in self.rd.manifest["stages"].values()):
            shutil.rmtree(self.rd.root, ignore_errors=True)

    def _relocate_assets(self, assets: Assets) -> Assets:
        """export wrote into the .partial folder; rebase paths onto RUN/ and save RUN/assets.json."""
        sub = self.rd.stage_dir("export").name
        files = [dict(f, path=f"{sub}/{f['path']}") for f in assets.files]
        final = Assets(str(self.rd.root), files, assets.info)
        final.save(self.rd.stage_dir("export") / "assets.json")
        final.save(self.rd.root / "assets.json")
        return final

    def _finish_result(self) -> None:
        r = self.result
        if self._backend:
            r.backend, r.backend_reason = self._backend
        views_dir = self.rd.stage_dir("views")
        if (views_dir / "viewset.json").is_file():
            r.preview = bool(json.loads((views_dir / "viewset.json").read_text()).get("preview", False))
        m = self.rd.stage_dir("fit") / "fit_metrics.json"
        if not r.metrics and m.is_file():
            r.metrics = json.loads(m.read_text())
        a = self.rd.root / "assets.json"
        if a.is_file() and self.rd.recorded_fingerprint("export"):
            r.assets = Assets.load(a)
        if r.preview:
            r.notes.append("views come from the weight-free proxy head: a preview, not DiffPortrait360")

    def _save_config(self) -> None:
        atomic_write_text(self.rd.root / "config.json", json.dumps(self.cfg.to_dict(), indent=1))


def load_run_config(run_dir: str | os.PathLike) -> RunConfig | None:
    p = Path(run_dir) / "config.json"
    if p.is_file():
        try:
            return from_dict(json.loads(p.read_text()))
        except (ValueError, ReconError):
            return None
    return None


def make_config(preset: str = "default", *, export: Iterable[str] | None = None, backend: str | None = None,
                num_views: int | None = None, seed: int | None = None, device: str | None = None,
                sets: list[str] | None = None, extra: dict | None = None) -> RunConfig:
    """Preset + the common options as one RunConfig (what the CLI flags map to)."""
    over: dict = {}
    if export is not None:
        fmts = [f.strip().lower() for f in (export.split(",") if isinstance(export, str) else export) if f.strip()]
        over.setdefault("export", {})["formats"] = fmts
    if backend is not None:
        over.setdefault("views", {})["backend"] = backend
    if num_views is not None:
        over.setdefault("views", {})["num_views"] = num_views
    if seed is not None:
        over["seed"] = seed
        over.setdefault("views", {})["seed"] = seed
        over.setdefault("fit", {})["seed"] = seed
    if device is not None:
        over["device"] = device
    for section, values in (extra or {}).items():
        over.setdefault(section, {}).update(values)
    return build_config(preset, over, sets)


def make(image: str | os.PathLike, out: str | os.PathLike | None = None, *, preset: str = "default",
         export: Iterable[str] | None = None, backend: str | None = None, num_views: int | None = None,
         seed: int | None = None, device: str | None = None, sets: list[str] | None = None,
         config: RunConfig | None = None, force: bool = False, from_stage: str | None = None,
         until: str | None = None, on_event: EventFn | None = None) -> RunResult:
    """Portrait in, 3D head out. Reruns skip every stage whose inputs and settings did not change."""
    cfg = config or make_config(preset, export=export, backend=backend, num_views=num_views, seed=seed,
                                device=device, sets=sets)
    image = Path(image)
    out = Path(out) if out is not None else Path("runs") / image.stem
    return Runner(out, cfg, image=image, on_event=on_event).run(force=force, from_stage=from_stage, until=until)


def run(run_dir: str | os.PathLike, stages: Sequence[str], *, config: RunConfig | None = None,
        image: str | os.PathLike | None = None, views_dir: str | os.PathLike | None = None, force: bool = False,
        on_event: EventFn | None = None) -> RunResult:
    """Run some stages on a run directory, reusing its saved configuration unless one is given."""
    cfg = config or load_run_config(run_dir) or build_config("default")
    if image is None and "preprocess" in stages:
        raise UsageError("the preprocess stage needs an image")
    return Runner(run_dir, cfg, image=image, views_dir=views_dir, on_event=on_event).run(stages, force=force)
