"""Export options a user sets from the CLI: both turntables, SuperSplat-oriented
splats, --faces/--texture/--normal-map shorthands and their validation."""
import numpy as np
import pytest

from recon import config
from recon.config import ExportConfig
from recon.errors import UsageError
from recon.export import export_assets
from recon.export.splat_files import read_splat_ply
from tests.test_export import make_scene, stand_in_render

SMALL = dict(faces=600, lods=(1.0,), texture=64, mesh_resolution=32, render_resolution=48,
             turntable_frames=6, turntable_resolution=48)


def test_both_turntables_splats_and_mesh(tmp_path):
    import imageio_ffmpeg

    cfg = ExportConfig(formats=("glb", "mp4"), turntable_source="both", **SMALL)
    assets = export_assets(make_scene(), cfg, tmp_path, render_fn=stand_in_render, validate=False)
    tt = assets.info["turntable"]
    assert tt["source"] == "both" and [v["source"] for v in tt["videos"]] == ["splats", "mesh"]
    kinds = {f["path"]: f["kind"] for f in assets.files}
    assert kinds["turntable.mp4"] == "video/mp4" and kinds["turntable_mesh.mp4"] == "video/mp4"
    for name in ("turntable.mp4", "turntable_mesh.mp4"):
        frames = list(imageio_ffmpeg.read_frames(str(tmp_path / name)))[1:]
        f0 = np.frombuffer(frames[0], np.uint8).reshape(48, 48, 3)
        assert len(frames) == 6 and f0[24, 24, 2] > 180     # both see the blue (+Z) face first


def test_supersplat_orientation_turns_splats_upside_down(tmp_path):
    scene = make_scene()
    cfg = dict(formats=("glb", "splat"), **SMALL)
    a = export_assets(scene, ExportConfig(**cfg), tmp_path / "gltf", render_fn=stand_in_render, validate=False)
    b = export_assets(scene, ExportConfig(splat_orientation="supersplat", **cfg), tmp_path / "ss",
                      render_fn=stand_in_render, validate=False)
    pa, pb = read_splat_ply(tmp_path / "gltf" / "splats.ply"), read_splat_ply(tmp_path / "ss" / "splats.ply")
    assert a.info["splat_orientation"] == "gltf" and b.info["splat_orientation"] == "supersplat"
    # a half turn about Z: x and y flip sign, z stays; the head now hangs below the origin
    np.testing.assert_allclose(pb["means"], pa["means"] * np.array([-1.0, -1.0, 1.0]), atol=1e-6)
    assert pa["means"][:, 1].mean() > 0 > pb["means"][:, 1].mean()


@pytest.mark.parametrize("sets, match", [
    (["export.texture=3000"], "export.texture=3000"),
    (["export.turntable_source=video"], "turntable_source"),
    (["export.splat_orientation=zup"], "splat_orientation"),
    (["export.lods=1,0.5,0.5"], "strictly decreasing"),
])
def test_bad_export_settings_are_usage_errors(sets, match):
    with pytest.raises(UsageError, match=match):
        config.build_config("default", sets=sets)


def test_cli_mesh_shorthands():
    from portrait3d_cli.main import _parse_texture, _with_mesh_options

    assert [_parse_texture(t) for t in ("1k", "2K", "4k", "512")] == [1024, 2048, 4096, 512]
    with pytest.raises(UsageError, match="--texture '3k'"):
        _parse_texture("3k")
    sets = _with_mesh_options(["fit.steps=9"], faces=20000, texture="2k", normal_map=True)
    cfg = config.build_config("default", sets=sets)
    assert (cfg.fit.steps, cfg.export.faces, cfg.export.texture, cfg.export.normal_map) == (9, 20000, 2048, True)
    assert _with_mesh_options(None) is None


def test_presets_game_and_film():
    game, film = config.build_config("game"), config.build_config("film")
    assert (game.export.faces, game.export.texture, game.export.normal_map) == (20000, 2048, True)
    assert film.export.texture == 4096 and film.export.normal_map and film.export.faces > game.export.faces * 5
    assert film.export.turntable_source == "both"


def test_normal_map_reaches_glb_obj_and_assets(tmp_path):
    from recon.export import gltf

    cfg = ExportConfig(formats=("glb", "obj"), normal_map=True, **{**SMALL, "lods": (1.0, 0.5)})
    assets = export_assets(make_scene(), cfg, tmp_path, render_fn=stand_in_render, validate=False)
    kinds = {f["path"]: f["kind"] for f in assets.files}
    assert kinds["head_normal.png"] == "texture/normal-png" and kinds["head_albedo.png"] == "texture/png"
    assert "map_Bump" in (tmp_path / "head.mtl").read_text()
    doc, _ = gltf.read_glb(tmp_path / "head.glb")
    assert all("normalTexture" in m for m in doc["materials"])
    assert all("TANGENT" in m["primitives"][0]["attributes"] for m in doc["meshes"])
    assert assets.info["normal_map"] is True and all(d["normal_map"] for d in assets.info["lods"])
