"""Stage 5, export (DESIGN §8): a fitted Scene -> files a person or an engine can use.

    export_assets(scene, cfg, out_dir, views=..., render_fn=...) -> Assets

writes, by cfg.formats:
  glb  -> head.glb (LOD0 + the other LODs as MSFT_lod nodes) + head_lod{i}.glb (every LOD, LOD0 included)
  obj  -> head.obj + head.mtl + head_albedo.png (LOD0)
  ply  -> head_mesh.ply (LOD0, vertex colours sampled from the texture)
  splat-> splats.ply (INRIA 3DGS layout) + splats.splat (antimatter15)
  mp4  -> turntable.mp4 (H.264 yuv420p);  gif -> turntable.gif
All in one frame: glTF's (+Y up, face toward +Z), metres, head height =
cfg.head_height_m, origin at the bottom centre of the head (see gltf.py).
Nothing is written outside out_dir.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import SPLAT_ORIENTATIONS, TURNTABLE_SOURCES, VALID_FORMATS, ExportConfig
from ..errors import MissingError, OutputError, StageError, UsageError
from ..types import Assets, Scene, ViewSet
from . import gltf, mesh, splat_files, turntable
from .validate import find_validator, summary, validate_glb

MESH_FORMATS = ("glb", "obj", "ply")
FRAME = "+Y up, face +Z (glTF)"


def default_render_fn():
    try:
        from ..fit.render import render_scene
    except ImportError as e:
        raise MissingError(f"the splat renderer (recon.fit.render) cannot be imported: {e}",
                           hint="pass render_fn= or install the fit extras") from None
    return render_scene


def scene_bounds(scene: Scene, min_opacity: float = 0.05, pad: float = 0.12) -> np.ndarray:
    """(2, 3) world box around the visible Gaussians: robust percentiles of the
    centres of those with opacity > min_opacity, padded by `pad` of the extent
    (a Gaussian's footprint reaches past its centre)."""
    arr = splat_files.scene_arrays(scene)
    alpha = 1.0 / (1.0 + np.exp(-arr["opacities"]))
    pts = arr["means"][alpha > min_opacity]
    if len(pts) < 16:
        raise StageError(f"the scene has {len(pts)} Gaussians with opacity > {min_opacity}: nothing to export",
                         hint="the fit did not converge; check the fit stage's metrics", stage="export")
    lo, hi = np.percentile(pts, 0.2, axis=0), np.percentile(pts, 99.8, axis=0)
    ext = (hi - lo).max()
    return np.stack([lo - pad * ext, hi + pad * ext])


def export_assets(scene: Scene, cfg: ExportConfig, out_dir: Path, *, views: ViewSet | None = None, render_fn=None,
                  preview: bool = False, progress=None, validate: bool = True) -> Assets:
    """Write the requested assets into out_dir and describe them.

    render_fn: `render_scene(scene, c2w, K_norm, width, height, *, background=None, device="cpu")
    -> (rgba uint8 (N,H,W,4), depth float32 (N,H,W))`; defaults to recon.fit.render.render_scene.
    views: the ViewSet the scene was fitted to; its images colour the mesh texture.
    validate: run the Khronos validator on head.glb when it is installed (the result,
    or why it did not run, goes into info["gltf_validation"]).
    """
    out_dir = Path(out_dir).absolute()       # Assets records paths relative to this root
    formats = tuple(dict.fromkeys(cfg.formats))
    bad = [f for f in formats if f not in VALID_FORMATS]
    if bad:
        raise UsageError(f"unknown export format {bad[0]!r}", hint=f"formats: {', '.join(VALID_FORMATS)}")
    if not formats:
        raise UsageError("export.formats is empty", hint=f"choose from {', '.join(VALID_FORMATS)}")
    wants_turntable = "mp4" in formats or "gif" in formats
    if cfg.turntable_source not in TURNTABLE_SOURCES:
        raise UsageError(f"export.turntable_source={cfg.turntable_source!r} is not one of {', '.join(TURNTABLE_SOURCES)}",
                         hint="splats renders the Gaussians, mesh the textured LOD0, both writes one video of each")
    if cfg.splat_orientation not in SPLAT_ORIENTATIONS:
        raise UsageError(f"export.splat_orientation={cfg.splat_orientation!r} is not one of {', '.join(SPLAT_ORIENTATIONS)}",
                         hint="gltf overlays the GLB; supersplat is Y-down so SuperSplat shows it upright")
    if wants_turntable and cfg.turntable_source != "splats" and not any(f in formats for f in MESH_FORMATS):
        raise UsageError(f"export.turntable_source={cfg.turntable_source} needs a mesh format in export.formats",
                         hint="add glb (or obj/ply) to export.formats, or use turntable_source=splats")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a folder", hint="choose another output location")
    out_dir.mkdir(parents=True, exist_ok=True)
    render_fn = render_fn or default_render_fn()
    bound = mesh.bind_renderer(render_fn, scene, background=None)   # straight colour: we composite ourselves
    timings: dict[str, float] = {}
    assets = Assets(root=str(out_dir.resolve()))
    info: dict = {"frame": FRAME, "units": "m", "head_height_m": float(cfg.head_height_m), "pivot": gltf.PIVOT,
                  "pivot_note": gltf.PIVOT_NOTE, "formats": list(formats),
                  "preview": bool(preview or (views is not None and views.preview)),
                  "num_gaussians": scene.num_gaussians, "sh_degree": scene.sh_degree}

    def tick(name, t0):
        timings[name] = round(time.perf_counter() - t0, 3)

    bounds = scene_bounds(scene)
    frame = None
    tm0 = None
    if any(f in formats for f in MESH_FORMATS):
        t0 = time.perf_counter()
        lod0_mesh = mesh.extract_mesh(bound, cfg, views=views, bounds=bounds, progress=progress)
        tm0: mesh.TexturedMesh = lod0_mesh.metadata["textured"]
        tick("mesh", t0)
        lods = lod0_mesh.metadata["lods"]      # extract_mesh builds and bakes every LOD (mesh.build_lods)
        if lods[0].num_faces > cfg.faces:
            raise StageError(f"LOD0 has {lods[0].num_faces} faces > export.faces={cfg.faces}", stage="export")
        frame = gltf.head_frame(tm0.vertices, cfg.head_height_m)
        assets_lods = [gltf.to_asset_frame(t, frame) for t in lods]
        t0 = time.perf_counter()
        lod_info = []
        if "glb" in formats:
            # head.glb: LOD0 in the scene, the other levels inside via MSFT_lod (when lods_in_glb)
            main = gltf.write_glb(out_dir / "head.glb", assets_lods if cfg.lods_in_glb else assets_lods[:1], node_name="head")
            assets.add(main, "mesh/glb")
            for i, t in enumerate(assets_lods):
                p = gltf.write_glb(out_dir / f"head_lod{i}.glb", t, node_name="head", first_lod=i)
                assets.add(p, f"mesh/glb-lod{i}")
                lod_info.append({"lod": i, "file": p.name, "fraction": float(cfg.lods[i]), "faces": t.num_faces,
                                 "texture": int(t.texture.shape[0]), "normal_map": t.normal_map is not None,
                                 "vertices": int(len(t.vertices))})
            info["gltf_validation"] = _validate(main) if validate else {"ran": False, "why": "validate=False"}
        else:
            lod_info = [{"lod": i, "fraction": float(cfg.lods[i]), "faces": t.num_faces, "vertices": int(len(t.vertices)),
                         "texture": int(t.texture.shape[0]), "normal_map": t.normal_map is not None}
                        for i, t in enumerate(assets_lods)]
        if "obj" in formats:
            for p in gltf.write_obj(out_dir / "head.obj", assets_lods[0]):
                kind = {".obj": "mesh/obj", ".mtl": "mesh/mtl"}.get(p.suffix, "texture/png")
                assets.add(p, "texture/normal-png" if p.name.endswith("_normal.png") else kind)
        if "ply" in formats:
            assets.add(gltf.write_mesh_ply(out_dir / "head_mesh.ply", assets_lods[0]), "mesh/ply")
        tick("write_mesh", t0)
        ex = lod0_mesh.metadata["export"]
        timings.update({f"mesh.{k}_cpu": v for k, v in lod0_mesh.metadata["export"]["cpu_s"].items()})
        info.update({"meshing_views": lod0_mesh.metadata["export"]["meshing_views"], "faces_budget": int(cfg.faces), "lods": lod_info, "faces_per_lod": [d["faces"] for d in lod_info],
                     "texture_size": int(cfg.texture), "texel_coverage": ex.get("texel_coverage"),
                     "normal_map": bool(cfg.normal_map), "face_texel_scale": float(cfg.face_texel_scale),
                     "faces_marching_cubes": ex.get("faces_marching_cubes"),
                     "texture_source": "fitted views" if views is not None else "scene renders",
                     "lods_in_glb": bool(cfg.lods_in_glb and len(assets_lods) > 1),
                     "lods_note": ("head.glb: LOD0 is the scene node head_LOD0, LOD1+ ride along as MSFT_lod nodes "
                                   "head_LOD1.. (engines without MSFT_lod show LOD0; Blender imports every level as "
                                   "its own object); every LOD is also its own head_lod{i}.glb"
                                   if cfg.lods_in_glb and len(assets_lods) > 1 else
                                   "head.glb holds LOD0; every LOD is its own head_lod{i}.glb")})
        info["scale_source"] = "mesh bounding box"
    if frame is None:
        # no mesh: the same convention, measured on the splats' robust bounds
        pad_free = scene_bounds(scene, pad=0.0)
        frame = gltf.head_frame(pad_free, cfg.head_height_m)
        info["scale_source"] = "splat centres (0.2-99.8 percentile box)"
    info["head_frame"] = frame.to_dict()

    if "splat" in formats:
        t0 = time.perf_counter()
        supersplat = cfg.splat_orientation == "supersplat"
        arr = splat_files.transform_arrays(splat_files.scene_arrays(scene), frame.pivot, frame.scale, rotate_z180=supersplat)
        assets.add(splat_files.write_splat_ply(out_dir / "splats.ply", arr), "splat/ply")
        assets.add(splat_files.write_dot_splat(out_dir / "splats.splat", arr), "splat/splat")
        info["splat_orientation"] = cfg.splat_orientation
        info["splat_note"] = (
            "Y-down (the GLB's frame turned 180 degrees about Z): SuperSplat and other 3DGS viewers that expect "
            "COLMAP-style Y-down files show it upright; it no longer overlays the GLB" if supersplat else
            "same frame as the GLB (+Y up), so the two overlay; SuperSplat assumes Y-down PLYs and shows this one "
            "upside down: set its rotation z = 180, or export with --set export.splat_orientation=supersplat")
        tick("splats", t0)

    if wants_turntable:
        t0 = time.perf_counter()
        # (source, file stem): the splats' video keeps the historical name turntable.*
        sources = {"splats": [("splats", "turntable")], "mesh": [("mesh", "turntable")],
                   "both": [("splats", "turntable"), ("mesh", "turntable_mesh")]}[cfg.turntable_source]
        videos = []
        for src, stem in sources:
            t0 = time.perf_counter()
            frames = turntable.render_turntable(tm0.render if src == "mesh" else bound, cfg, progress=progress)
            tick(f"turntable_render_{src}", t0)
            t0 = time.perf_counter()
            if "mp4" in formats:
                assets.add(turntable.write_mp4(out_dir / f"{stem}.mp4", frames, cfg.turntable_fps), "video/mp4")
            if "gif" in formats:
                assets.add(turntable.write_gif(out_dir / f"{stem}.gif", frames, cfg.turntable_fps), "video/gif")
            videos.append({"source": src, "files": [f"{stem}.{ext}" for ext in ("mp4", "gif") if ext in formats],
                           "frames": int(len(frames)), "resolution": int(frames.shape[1])})
            tick(f"turntable_write_{src}", t0)
        info["turntable"] = {"frames": videos[0]["frames"], "fps": int(cfg.turntable_fps),
                             "resolution": videos[0]["resolution"], "elevation_deg": float(cfg.turntable_elevation),
                             "source": cfg.turntable_source, "videos": videos}
    info["timings_s"] = timings
    assets.info = info
    return assets


def _validate(path: Path) -> dict:
    """Validator counts, or a record of why it did not run (never silent)."""
    if find_validator() is None:
        return {"ran": False, "why": "gltf-validator not installed (tools/install_validator.sh)"}
    try:
        rep = summary(validate_glb(path))
    except MissingError as e:
        return {"ran": False, "why": e.one_line()}
    rep["ran"] = True
    if rep.get("errors"):
        raise StageError(f"{path.name} fails the Khronos glTF validator with {rep['errors']} errors: "
                         + "; ".join(rep["messages"][:3]), hint="this is a bug in the exporter", stage="export")
    return rep


__all__ = ["export_assets", "scene_bounds", "default_render_fn", "MESH_FORMATS", "FRAME"]
