"""Export stage: mesh extraction, GLB/OBJ/PLY, splat files, turntable, validator.

The renderer is an analytic stand-in (a head ellipsoid plus a nose sphere at +Z,
coloured by its world normal: rgb = 0.5 + 0.5 n), so geometry and texture can be
checked against exact answers: the top of the head must be green (n = +Y), the
nose blue (n = +Z). The real splat renderer gets its own integration test below.
"""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from recon import cameras
from recon.config import ExportConfig
from recon.errors import InputError, StageError
from recon.export import export_assets, gltf, mesh as M, splat_files as S, turntable as T
from recon.export.validate import find_validator, validate_glb
from recon.types import Scene, ViewSet

ROOT = Path(__file__).resolve().parents[1]
HEAD = (np.array([0.0, 0.02, 0.0]), np.array([0.20, 0.27, 0.22]))     # centre, radii
NOSE = (np.array([0.0, 0.0, 0.22]), np.array([0.05, 0.05, 0.05]))


def _normal_colour(n: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * n


def stand_in_render(scene, c2w, K_norm, width, height, *, background=None, device="cpu"):
    """Ray-cast union of ellipsoids; depth = camera z, 0 where empty (render_scene's contract)."""
    c2w = np.asarray(c2w, np.float64)
    n = len(c2w)
    rgba = np.zeros((n, height, width, 4), np.uint8)
    depth = np.zeros((n, height, width), np.float32)
    for k in range(n):
        o, d, z_per_t = cameras.pixel_rays(c2w[k], K_norm[k], width, height)
        best_t = np.full((height, width), np.inf)
        best_n = np.zeros((height, width, 3))
        for c, r in (HEAD, NOSE):
            o2, d2 = (o - c) / r, d / r
            a = (d2 * d2).sum(-1)
            b = 2 * (d2 @ o2)
            cc = o2 @ o2 - 1
            disc = b * b - 4 * a * cc
            t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
            hit = (disc > 0) & (t > 0) & (t < best_t)
            p = o + t[..., None] * d
            nrm = (p - c) / r**2
            nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
            best_t = np.where(hit, t, best_t)
            best_n = np.where(hit[..., None], nrm, best_n)
        hit = np.isfinite(best_t)
        rgba[k, ..., :3] = np.where(hit[..., None], np.clip(_normal_colour(best_n) * 255 + 0.5, 0, 255), 0).astype(np.uint8)
        rgba[k, ..., 3] = np.where(hit, 255, 0)
        depth[k] = np.where(hit, best_t * z_per_t, 0)
    return rgba, depth


def empty_render(scene, c2w, K_norm, width, height, **kw):
    n = len(c2w)
    return np.zeros((n, height, width, 4), np.uint8), np.zeros((n, height, width), np.float32)


def make_scene(n: int = 600, sh_degree: int = 1, seed: int = 0) -> Scene:
    """Gaussians on the stand-in head's surface (bounds and splat files need a Scene)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 3, generator=g)
    u = u / u.norm(dim=1, keepdim=True)
    c, r = (torch.tensor(x, dtype=torch.float32) for x in HEAD)
    means = c + u * r
    k = (sh_degree + 1) ** 2 - 1
    return Scene({"means": means, "quats": torch.randn(n, 4, generator=g),
                  "scales": torch.full((n, 3), math.log(0.02)) + 0.1 * torch.randn(n, 3, generator=g),
                  "opacities": torch.randn(n, generator=g) + 2.0,
                  "sh0": ((_normal_colour(u) - 0.5) / S.SH_C0).reshape(n, 1, 3).float(),
                  "shN": 0.1 * torch.randn(n, k, 3, generator=g)}, sh_degree=sh_degree)


TINY = ExportConfig(formats=("glb", "obj", "ply", "splat", "mp4", "gif"), faces=1500, lods=(1.0, 0.5, 0.25),
                    texture=128, mesh_resolution=40, render_resolution=64, turntable_frames=12, turntable_fps=30,
                    turntable_resolution=63, head_height_m=0.25)


@pytest.fixture(scope="session")
def gltf_validator():
    """The Khronos validator: installed into .tools/ by the project script if missing."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed on this machine")
    if find_validator() is None:
        proc = subprocess.run(["bash", str(ROOT / "tools" / "install_validator.sh")], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert find_validator() is not None
    return validate_glb


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = root / "assets"
    calls = []
    assets = export_assets(make_scene(), TINY, out, render_fn=stand_in_render,
                           progress=lambda i, n, m: calls.append((i, n, m)))
    return root, out, assets, calls


def _glb_mesh(path: Path) -> trimesh.Trimesh:
    """The one mesh in the GLB's scene (LOD1+ may ride along as MSFT_lod nodes outside it)."""
    scene = trimesh.load(path, force="scene")
    placed = scene.graph.nodes_geometry
    assert len(placed) == 1
    return scene.geometry[scene.graph[placed[0]][1]]


def _texture_colours(m: trimesh.Trimesh) -> np.ndarray:
    tex = np.asarray(m.visual.material.baseColorTexture.convert("RGB"))
    return M.sample_texture(tex, np.asarray(m.visual.uv)) / 255.0


# ------------------------------------------------------------------------- export_assets
def test_export_writes_requested_files_only_inside_out_dir(exported):
    root, out, assets, calls = exported
    assert sorted(p.name for p in root.iterdir()) == ["assets"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["head.glb", "head_lod0.glb", "head_lod1.glb", "head_lod2.glb", "head.obj", "head.mtl",
                            "head_albedo.png", "head_mesh.ply", "splats.ply", "splats.splat", "turntable.mp4",
                            "turntable.gif"])
    listed = {f["path"]: f for f in assets.files}
    assert set(listed) == set(names)
    for name, f in listed.items():
        assert f["bytes"] == (out / name).stat().st_size > 0
        assert len(f["sha256"]) == 64
    info = assets.info
    assert info["frame"] == "+Y up, face +Z (glTF)" and info["units"] == "m" and info["pivot"] == "bottom_centre"
    assert info["head_height_m"] == 0.25 and info["texture_size"] == 128 and info["preview"] is False
    assert calls and all(0 < i <= n for i, n, _ in calls)


def test_only_requested_formats(tmp_path, monkeypatch):
    cfg = ExportConfig(formats=("splat",), head_height_m=0.3)
    monkeypatch.chdir(tmp_path.parent)                     # a relative out_dir works too
    assets = export_assets(make_scene(200), cfg, Path(tmp_path.name), render_fn=empty_render)   # no mesh, no render
    assert sorted(p.name for p in tmp_path.iterdir()) == ["splats.ply", "splats.splat"]
    assert sorted(f["path"] for f in assets.files) == ["splats.ply", "splats.splat"]
    assert assets.info["scale_source"].startswith("splat")
    arr = S.read_splat_ply(tmp_path / "splats.ply")
    assert arr["means"][:, 1].min() < 0.02 * 0.3 and arr["means"][:, 1].max() == pytest.approx(0.3, rel=0.05)


def test_glb_passes_khronos_validator(exported, gltf_validator):
    _, out, assets, _ = exported
    for name in ("head.glb", "head_lod1.glb", "head_lod2.glb"):
        rep = gltf_validator(out / name)
        assert rep["issues"]["numErrors"] == 0 and rep["issues"]["numWarnings"] == 0, rep["issues"]["messages"]
    v = assets.info["gltf_validation"]
    assert v["ran"] is True and v["errors"] == 0 and v["warnings"] == 0


def test_glb_reloads_textured_in_metres_y_up_face_plus_z(exported):
    _, out, assets, _ = exported
    m = _glb_mesh(out / "head.glb")
    assert isinstance(m.visual, trimesh.visual.TextureVisuals)
    mat = m.visual.material
    assert mat.baseColorTexture is not None and mat.baseColorTexture.size == (128, 128)
    assert mat.metallicFactor == pytest.approx(0.0) and mat.roughnessFactor == pytest.approx(0.8)
    lo, hi = m.bounds
    assert hi[1] - lo[1] == pytest.approx(0.25, rel=0.01)          # head height in metres
    assert lo[1] == pytest.approx(0.0, abs=1e-6)                     # pivot: bottom centre
    assert abs(lo[0] + hi[0]) < 1e-6 and abs(lo[2] + hi[2]) < 1e-6
    # the nose sticks out at +Z: the box (centred by the pivot) reaches past the bulk of
    # the volume on the +Z side, so the centre of mass sits behind z = 0
    assert m.center_mass[2] < -0.005
    col = _texture_colours(m)
    v = np.asarray(m.vertices)
    top, front = np.argmax(v[:, 1]), np.argmax(v[:, 2])
    assert col[top, 1] > 0.9 and col[top, 1] > col[top, [0, 2]].max() + 0.3     # top is green: +Y up
    assert col[front, 2] > 0.9 and col[front, 2] > col[front, :2].max() + 0.3   # nose is blue: face +Z
    # texture matches the analytic colours almost everywhere (bake + UV convention right)
    fr = assets.info["head_frame"]
    world = v / fr["scale_m_per_world_unit"] + np.array(fr["pivot_world"])
    on_head = np.abs(np.linalg.norm((world - HEAD[0]) / HEAD[1], axis=1) - 1) < 0.05
    nrm = (world - HEAD[0]) / HEAD[1] ** 2
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    err = np.abs(col - _normal_colour(nrm)).max(1)[on_head]
    assert on_head.mean() > 0.5 and np.median(err) < 0.04 and np.mean(err > 0.2) < 0.02


def test_face_budget_and_lods_decrease(exported):
    _, out, assets, _ = exported
    faces = [len(_glb_mesh(out / f"head_lod{i}.glb").faces) for i in range(3)]
    assert faces[0] <= TINY.faces
    assert faces[0] > faces[1] > faces[2]
    for f, frac in zip(faces, TINY.lods):
        assert f <= frac * TINY.faces
    assert assets.info["faces_per_lod"] == faces
    assert len(_glb_mesh(out / "head.glb").faces) == faces[0]
    # head.glb also carries every LOD, as MSFT_lod nodes outside the scene
    doc, _ = gltf.read_glb(out / "head.glb")
    names = [n["name"] for n in doc["nodes"]]
    assert names == ["head_LOD0", "head_LOD1", "head_LOD2"] and doc["scenes"][0]["nodes"] == [0]
    assert doc["nodes"][0]["extensions"]["MSFT_lod"]["ids"] == [1, 2] and assets.info["lods_in_glb"] is True
    # LODs share the frame
    b0, b2 = _glb_mesh(out / "head_lod0.glb").bounds, _glb_mesh(out / "head_lod2.glb").bounds
    assert np.allclose(b0, b2, atol=0.01)


def test_obj_and_mesh_ply(exported):
    _, out, _, _ = exported
    obj = trimesh.load(out / "head.obj", force="mesh")
    assert obj.visual.uv is not None and obj.bounds[1][1] == pytest.approx(0.25, rel=0.01)
    assert "map_Kd head_albedo.png" in (out / "head.mtl").read_text()
    ply = trimesh.load(out / "head_mesh.ply", force="mesh")
    assert ply.visual.kind == "vertex" and ply.bounds[1][1] == pytest.approx(0.25, rel=0.01)
    c = ply.visual.vertex_colors[np.argmax(ply.vertices[:, 1]), :3] / 255.0
    assert c[1] > 0.85   # top is green here too


def test_splats_overlay_the_mesh(exported):
    _, out, assets, _ = exported
    arr = S.read_splat_ply(out / "splats.ply")
    m = _glb_mesh(out / "head.glb")
    # splat centres lie on the same ellipsoid as the mesh: their box matches the mesh box
    # (the nose has no splats: compare x, y and the back)
    box = np.percentile(arr["means"], [0, 100], axis=0)
    assert np.allclose(box[:, :2], m.bounds[:, :2], atol=0.01) and box[0, 2] == pytest.approx(m.bounds[0, 2], abs=0.01)
    fr = assets.info["head_frame"]
    src = S.scene_arrays(make_scene())
    assert np.allclose(arr["scales"], src["scales"] + math.log(fr["scale_m_per_world_unit"]), atol=1e-5)


def test_turntable_files(exported):
    import imageio_ffmpeg
    from PIL import Image

    _, out, assets, _ = exported
    reader = imageio_ffmpeg.read_frames(str(out / "turntable.mp4"))
    meta = reader.__next__()
    frames = list(reader)
    assert len(frames) == TINY.turntable_frames
    assert tuple(meta["size"]) == (64, 64)                 # odd 63 rounded up to even
    assert meta["fps"] == pytest.approx(30)
    with Image.open(out / "turntable.gif") as g:
        assert g.n_frames == TINY.turntable_frames
        assert g.info.get("loop") == 0
    assert assets.info["turntable"]["frames"] == TINY.turntable_frames


# ---------------------------------------------------------------------------- units
def test_turntable_orbits_around_y():
    cfg = ExportConfig(turntable_frames=8, turntable_resolution=32, turntable_elevation=10.0)
    c2w = T.turntable_cameras(8, 10.0)
    az, el = cameras.azimuth_elevation_of(c2w)
    assert np.allclose(el, 10.0, atol=1e-3)
    assert np.allclose(np.mod(az - np.arange(8) * 45.0 + 180, 360) - 180, 0, atol=1e-3)
    frames = T.render_turntable(M.bind_renderer(stand_in_render, None), cfg)
    assert frames.shape == (8, 32, 32, 3)
    bg = np.round(T.BACKGROUND * 255).astype(np.uint8)
    assert (frames[:, 0, 0] == bg).all()                   # neutral background in the corners
    # frame 0 looks at the face (blue nose in the middle), frame 4 at the back (no blue)
    assert frames[0, 16, 16, 2] > 200 and frames[4, 16, 16, 2] < 100


def test_empty_scene_is_a_stage_error():
    cfg = ExportConfig(faces=500, texture=64, mesh_resolution=24, render_resolution=32)
    with pytest.raises(StageError, match="empty"):
        M.extract_mesh(M.bind_renderer(empty_render, None), cfg, n_azimuth=4)


def test_mesh_depth_matches_ray_cast():
    """The baking z-buffer agrees with exact ray casting of the same surface."""
    sphere = trimesh.creation.icosphere(5)
    c, r = HEAD
    verts = sphere.vertices * r + c
    c2w = cameras.orbit_cam2world(np.array([0.0, 120.0]), np.array([0.0, 30.0]))
    K = np.repeat(cameras.INTRINSICS_NORM[None], 2, 0)
    d = M.mesh_depth(verts, sphere.faces, c2w, K, 64, 48)
    _, ref = stand_in_render(None, c2w, K, 64, 48)
    both = (d > 0) & (ref > 0)
    head_only = both & (np.abs(d - ref) < 0.05)             # the nose is not in this mesh
    assert (d > 0).sum() == pytest.approx((ref > 0).sum(), rel=0.1)
    assert head_only.sum() > 0.8 * both.sum()
    assert np.median(np.abs(d - ref)[head_only]) < 2e-3


def test_decimate_checks_budget():
    sphere = trimesh.creation.icosphere(4)    # 5120 faces
    out = M.decimate(sphere, 700)
    assert len(out.faces) <= 700
    with pytest.raises(StageError, match="strictly decreasing"):
        M.build_lods(M.TexturedMesh(sphere.vertices, sphere.faces, np.zeros((len(sphere.vertices), 2)),
                                    sphere.vertex_normals, np.zeros((4, 4, 3), np.uint8)), (1.0, 1.0), 100)


def test_bake_uses_fitted_views(tmp_path):
    """With a ViewSet the texture comes from its images (here: the views tinted red)."""
    c2w = cameras.ring_cam2world(8)
    K = np.repeat(cameras.INTRINSICS_NORM[None], 8, 0)
    rgba, _ = stand_in_render(None, c2w, K, 96, 96)
    rgba[..., 0] = np.where(rgba[..., 3] > 0, 255, 0)
    views = ViewSet(rgba, c2w, K, [f"{i}.png" for i in range(8)])
    cfg = ExportConfig(faces=800, texture=64, mesh_resolution=32, render_resolution=48)
    out = M.extract_mesh(M.bind_renderer(stand_in_render, None), cfg, views=views, n_azimuth=8)
    col = _texture_colours(out)
    v = np.asarray(out.vertices)
    belt = np.abs(v[:, 1] - HEAD[0][1]) < 0.08           # the ring sees the belt of the head well
    assert np.median(col[belt, 0]) > 0.95


def test_splat_ply_roundtrip(tmp_path):
    arr = S.scene_arrays(make_scene(300, sh_degree=2))
    S.write_splat_ply(tmp_path / "s.ply", arr)
    back = S.read_splat_ply(tmp_path / "s.ply")
    for k in arr:
        assert np.array_equal(back[k], arr[k]), k
    # header order is the INRIA one, f_rest channel-major
    head = (tmp_path / "s.ply").read_bytes().split(b"end_header\n")[0].decode()
    props = [ln.split()[-1] for ln in head.splitlines() if ln.startswith("property")]
    assert props == S.ply_property_names(3 * 8)
    data = np.frombuffer((tmp_path / "s.ply").read_bytes()[len(head) + len("end_header\n"):], "<f4").reshape(300, -1)
    assert np.allclose(data[:, 9:9 + 8], arr["shN"][:, :, 0])          # R channel's 8 coefficients first
    scene = S.arrays_to_scene(back)
    assert scene.sh_degree == 2 and scene.num_gaussians == 300


def test_splat_ply_rejects_garbage(tmp_path):
    p = tmp_path / "bad.ply"
    p.write_bytes(b"not a ply")
    with pytest.raises(InputError):
        S.read_splat_ply(p)
    p.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\nend_header\n" + b"\0" * 8)
    with pytest.raises(InputError, match="truncated"):
        S.read_splat_ply(p)
    p.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\nend_header\n")
    with pytest.raises(InputError, match="format"):
        S.read_splat_ply(p)


def test_dot_splat_roundtrip(tmp_path):
    arr = S.scene_arrays(make_scene(300, sh_degree=0))
    S.write_dot_splat(tmp_path / "s.splat", arr)
    assert (tmp_path / "s.splat").stat().st_size == 300 * 32
    back = S.read_dot_splat(tmp_path / "s.splat")
    # records are sorted: match them back by position
    order = np.lexsort(arr["means"].T)
    border = np.lexsort(back["means"].T)
    a = {k: v[order] for k, v in arr.items()}
    b = {k: v[border] for k, v in back.items()}
    assert np.array_equal(a["means"], b["means"])
    assert np.allclose(a["scales"], b["scales"], atol=1e-5)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert np.allclose(sig(a["opacities"]), sig(b["opacities"]), atol=1 / 255)
    rgb = lambda s: np.clip(0.5 + S.SH_C0 * s.reshape(-1, 3), 0, 1)  # noqa: E731
    assert np.allclose(rgb(a["sh0"]), rgb(b["sh0"]), atol=1 / 255)
    qa = a["quats"] / np.linalg.norm(a["quats"], axis=1, keepdims=True)
    qb = b["quats"] / np.linalg.norm(b["quats"], axis=1, keepdims=True)
    assert np.abs((qa * qb).sum(1)).min() > 0.995
    # sorted by -(volume * opacity)
    rec = np.fromfile(tmp_path / "s.splat", dtype=S._SPLAT_DTYPE)
    key = rec["scale"].prod(1) * rec["rgba"][:, 3]
    assert np.all(np.diff(key) <= key.max() * 0.02)


def test_supersplat_rotation_is_a_half_turn_about_z():
    arr = S.scene_arrays(make_scene(50, sh_degree=2))
    once = S.transform_arrays(arr, (0, 0, 0), 1.0, rotate_z180=True)
    assert np.allclose(once["means"], arr["means"] * [-1, -1, 1])
    twice = S.transform_arrays(once, (0, 0, 0), 1.0, rotate_z180=True)
    assert np.allclose(twice["means"], arr["means"]) and np.allclose(twice["shN"], arr["shN"])
    assert np.allclose(np.abs((twice["quats"] * arr["quats"]).sum(1)), (arr["quats"] ** 2).sum(1), atol=1e-5)
    # degree-1 SH (y, z, x order): the y and x terms flip under (x, y) -> (-x, -y), z stays
    assert np.allclose(once["shN"][:, :3], arr["shN"][:, :3] * np.array([-1, 1, -1])[None, :, None])


def test_validator_reports_errors_on_a_broken_glb(tmp_path, gltf_validator):
    p = tmp_path / "broken.glb"
    p.write_bytes(b"glTF" + b"\x02\x00\x00\x00" + b"\x10\x00\x00\x00" + b"\x00" * 4)
    rep = gltf_validator(p)
    assert rep["issues"]["numErrors"] > 0


@pytest.mark.skipif(not (ROOT / "recon" / "fit" / "render.py").is_file(), reason="recon.fit.render not written yet")
def test_export_with_the_splat_renderer(tmp_path, gltf_validator):
    from recon.fit.render import render_scene

    scene = make_scene(800, sh_degree=0)
    # denser, larger, opaque Gaussians so the surface renders closed
    scene.params["scales"] = torch.full((800, 3), math.log(0.03))
    scene.params["opacities"] = torch.full((800,), 4.0)
    cfg = ExportConfig(formats=("glb", "splat", "mp4"), faces=800, lods=(1.0, 0.5), texture=64, mesh_resolution=32,
                       render_resolution=48, turntable_frames=2, turntable_resolution=32)
    assets = export_assets(scene, cfg, tmp_path, render_fn=render_scene)
    assert gltf_validator(tmp_path / "head.glb")["issues"]["numErrors"] == 0
    m = _glb_mesh(tmp_path / "head.glb")
    assert m.bounds[1][1] - m.bounds[0][1] == pytest.approx(0.25, rel=0.01)
    assert len(m.faces) <= 800
    assert {f["path"] for f in assets.files} >= {"head.glb", "splats.ply", "turntable.mp4"}
    assert assets.info["texel_coverage"] > 0.9


def test_validator_missing_is_a_missing_error(tmp_path, monkeypatch):
    from recon.errors import MissingError
    from recon.export import validate as V

    glb = tmp_path / "x.glb"
    glb.write_bytes(b"glTF")
    monkeypatch.delenv("P3D_GLTF_VALIDATOR", raising=False)
    monkeypatch.setattr(V, "REPO", tmp_path)                  # no .tools/ here
    with pytest.raises(MissingError, match="gltf-validator"):
        V.validate_glb(glb)
    monkeypatch.setattr(V.shutil, "which", lambda name: None)
    with pytest.raises(MissingError, match="node"):
        V.validate_glb(glb)


def test_mesh_turntable_source(tmp_path):
    """turntable_source=mesh renders the textured LOD0 (fast path on a CPU)."""
    import imageio_ffmpeg

    cfg = ExportConfig(formats=("glb", "mp4"), faces=600, lods=(1.0,), texture=64, mesh_resolution=32,
                       render_resolution=48, turntable_frames=6, turntable_resolution=48, turntable_source="mesh")
    assets = export_assets(make_scene(), cfg, tmp_path, render_fn=stand_in_render, validate=False)
    assert assets.info["turntable"]["source"] == "mesh"
    frames = list(imageio_ffmpeg.read_frames(str(tmp_path / "turntable.mp4")))[1:]
    assert len(frames) == 6
    f0, f3 = (np.frombuffer(frames[i], np.uint8).reshape(48, 48, 3) for i in (0, 3))
    assert f0[24, 24, 2] > 180 and f3[24, 24, 2] < 100     # frame 0 sees the blue (+Z) face, frame 3 the back
    with pytest.raises(Exception, match="needs a mesh format"):
        export_assets(make_scene(), ExportConfig(formats=("mp4",), turntable_source="mesh"), tmp_path / "x",
                      render_fn=stand_in_render)
    assert not (tmp_path / "x").exists()
