"""LODs decimated from the dense surface, the face-weighted UV atlas and normal maps
(recon/export/mesh.py build_lods, uv_atlas.py, normal_map.py).

Analytic cases: an ellipsoid head (+ nose at +Z) coloured by its normal for the
bakes; a flat patch and a bumpy sphere for the normal maps, whose exact answers
are known.
"""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from recon import cameras
from recon.config import ExportConfig
from recon.errors import StageError
from recon.export import mesh as M, normal_map as N, uv_atlas as U

HEAD_R = np.array([0.20, 0.27, 0.22])


def head_surface(subdiv: int = 5) -> trimesh.Trimesh:
    """A dense closed 'head': an ellipsoid with a nose bump at +Z (outward normals)."""
    s = trimesh.creation.icosphere(subdiv)
    u = np.asarray(s.vertices)
    nose = 0.05 * np.exp(-((u[:, 0] / 0.25) ** 2 + ((u[:, 1] + 0.05) / 0.25) ** 2)) * (u[:, 2] > 0)
    v = u * HEAD_R + nose[:, None] * np.array([0, 0, 1.0])
    return trimesh.Trimesh(v, s.faces, process=False)


def ellipsoid_renders(c2w: np.ndarray, size: int) -> dict:
    """Ray-cast the bare ellipsoid, coloured 0.5 + 0.5 n (the baking input contract)."""
    n = len(c2w)
    K = np.repeat(cameras.INTRINSICS_NORM[None], n, axis=0)
    rgba = np.zeros((n, size, size, 4), np.uint8)
    depth = np.zeros((n, size, size), np.float32)
    for k in range(n):
        o, d, z_per_t = cameras.pixel_rays(c2w[k], K[k], size, size)
        o2, d2 = o / HEAD_R, d / HEAD_R
        a, b, c = (d2 * d2).sum(-1), 2 * (d2 @ o2), o2 @ o2 - 1
        disc = b * b - 4 * a * c
        t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
        hit = (disc > 0) & (t > 0)
        nrm = (o + t[..., None] * d) / HEAD_R**2
        nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
        rgba[k, ..., :3] = np.where(hit[..., None], np.clip((0.5 + 0.5 * nrm) * 255 + 0.5, 0, 255), 0).astype(np.uint8)
        rgba[k, ..., 3] = np.where(hit, 255, 0)
        depth[k] = np.where(hit, t * z_per_t, 0)
    return {"rgba": rgba, "depth": depth, "c2w": c2w, "K": K}


@pytest.fixture(scope="module")
def dense():
    return head_surface(5)                          # 20480 faces


@pytest.fixture(scope="module")
def renders():
    return ellipsoid_renders(M.meshing_cameras(6), 64)


# ------------------------------------------------------------------------- LODs
def test_lods_small_budgets_never_stall(dense, renders):
    """0.1 of a 400-face budget (40 faces) stalled the texture-preserving collapse; the
    dense surface decimated per LOD meets every budget exactly, each LOD baked."""
    cfg = ExportConfig(faces=400, lods=(1.0, 0.5, 0.25, 0.1), texture=64, render_resolution=64, normal_map=True)
    lods = M.build_lods(dense, cfg.lods, cfg.faces, cfg=cfg, renders=renders)
    faces = [t.num_faces for t in lods]
    assert all(f <= int(fr * cfg.faces) for f, fr in zip(faces, cfg.lods)), faces
    assert faces[0] > faces[1] > faces[2] > faces[3] >= 4
    for t in lods:
        assert t.texture.shape == (64, 64, 3) and t.texture.dtype == np.uint8
        assert t.normal_map.shape == (64, 64, 3) and t.tangents.shape == (len(t.vertices), 4)
        assert t.coverage > 0.9
        assert t.uvs.min() >= 0 and t.uvs.max() <= 1
    # each LOD has its own atlas and albedo: top of the head is green (n = +Y) in every one
    for t in lods:
        col = M.sample_texture(t.texture, t.uvs) / 255.0
        top = np.argmax(t.vertices[:, 1])
        assert col[top, 1] > 0.85, col[top]


def test_lods_budget_is_checked_and_fractions_validated(dense):
    with pytest.raises(StageError, match="strictly decreasing"):
        M.lod_meshes(dense, (1.0, 0.5, 0.5), 1000)
    with pytest.raises(StageError, match=r"\(0, 1\]"):
        M.lod_meshes(dense, (1.5, 0.5), 1000)
    with pytest.raises(StageError, match="nothing to bake"):
        M.build_lods(dense, (1.0,), 500, cfg=ExportConfig(texture=64))
    ms = M.lod_meshes(dense, (1.0, 0.3), 2000)
    assert len(ms[0].faces) <= 2000 and len(ms[1].faces) <= 600


def test_extract_mesh_returns_every_lod_and_the_dense_surface():
    def bound(c2w, K_norm, width, height):
        r = ellipsoid_renders(np.asarray(c2w), int(width))
        return r["rgba"], r["depth"]

    cfg = ExportConfig(faces=600, lods=(1.0, 0.5, 0.1), texture=64, mesh_resolution=32, render_resolution=48)
    out = M.extract_mesh(bound, cfg, n_azimuth=4)
    lods, dense = out.metadata["lods"], out.metadata["dense"]
    assert out.metadata["textured"] is lods[0] and len(out.faces) == lods[0].num_faces
    assert [t.num_faces for t in lods] == out.metadata["export"]["faces_per_lod"]
    assert all(t.num_faces <= int(fr * cfg.faces) for t, fr in zip(lods, cfg.lods))
    assert len(dense.faces) > lods[0].num_faces and set(out.metadata["renders"]) >= {"rgba", "depth", "c2w", "K"}
    assert all(t.normal_map is None and t.tangents is None for t in lods)      # normal_map defaults to off


def test_lod_texture_sizes():
    assert [M.lod_texture_size(1024, i) for i in range(4)] == [1024, 512, 256, 256]
    assert [M.lod_texture_size(2048, i) for i in range(4)] == [2048, 1024, 512, 256]
    assert [M.lod_texture_size(128, i) for i in range(3)] == [128, 128, 128]


# -------------------------------------------------------------------- UV atlas
def _overlapping_texels(uvs, faces, size):
    """Texels whose centre lies strictly inside two or more UV triangles."""
    texel, fid, bary = M.rasterize_uv(uvs, faces, size)
    inner = (bary > 0.02).all(1)
    counts = np.bincount(texel[inner], minlength=size * size)
    return int((counts > 1).sum()), int(inner.sum())


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_face_region_gets_scale_squared_texel_density(scale):
    m = M.decimate(head_surface(4), 3000)
    size = 512
    vm, f, uv, fid = U.unwrap_atlas(m.vertices, m.faces, m.vertex_normals, size, scale)
    region0 = U.face_region(m.vertices, m.faces)
    # the region is the front of the head, a minority of the surface
    cen = np.asarray(m.vertices)[m.faces].mean(1)
    assert 0.08 < region0.mean() < 0.4 and (cen[region0, 2] > 0).all()
    # merge back is exact: every new face is its original face, once
    assert np.array_equal(np.sort(fid), np.arange(len(m.faces)))
    assert np.allclose(np.asarray(m.vertices)[vm][f], np.asarray(m.vertices)[m.faces[fid]])
    assert uv.min() >= 0 and uv.max() <= 1
    area = np.abs(U.uv_area(f, uv)) * size**2
    assert area.min() > 1e-4                          # no degenerate UV triangle
    region = region0[fid]
    p = np.asarray(m.vertices)[vm][f]
    a3 = 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)
    ratio = (area[region].sum() / a3[region].sum()) / (area[~region].sum() / a3[~region].sum())
    if scale == 1.0:
        assert 0.8 < ratio < 1.25, ratio
    else:
        assert ratio >= 3.0, ratio
    over, inner = _overlapping_texels(uv, f, size)
    assert over <= 0.001 * inner, (over, inner)


def test_face_texel_scale_must_be_positive():
    m = trimesh.creation.icosphere(2)
    with pytest.raises(StageError, match="face_texel_scale"):
        U.unwrap_atlas(m.vertices, m.faces, m.vertex_normals, 256, 0.0)


# ----------------------------------------------------------------- normal maps
def _grid(n: int, tilt: float = 0.0):
    """A flat n x n patch in the XY plane facing +Z with uv = (x, y) (v up)."""
    x, y = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    v = np.stack([x.ravel(), y.ravel(), tilt * y.ravel()], 1)
    i = np.arange(n * n).reshape(n, n)
    a, b, c, d = i[:-1, :-1].ravel(), i[:-1, 1:].ravel(), i[1:, :-1].ravel(), i[1:, 1:].ravel()
    f = np.concatenate([np.stack([a, b, d], 1), np.stack([a, d, c], 1)])
    return v, f, v[:, :2].copy()


def test_flat_patch_is_flat_blue_and_green_is_plus_v():
    v, f, uv = _grid(6)
    nrm = np.tile([0.0, 0.0, 1.0], (len(v), 1))
    tan = N.vertex_tangents(v, nrm, f, uv)
    assert np.allclose(tan, [1, 0, 0, 1], atol=1e-6)
    dv, df, _ = _grid(20)
    flat = N.bake_normal_map(v, nrm, tan, f, uv, 32, dv, df, np.tile([0.0, 0.0, 1.0], (len(dv), 1)))
    assert np.abs(flat.astype(int) - [128, 128, 255]).max() <= 1
    n = np.array([[0.0, 0.0, 1.0], [0.6, 0.0, 0.8], [0.0, -0.6, 0.8]])
    assert np.allclose(N.decode(N.encode(n)), n, atol=0.01) and (N.encode(n[:1]) == [128, 128, 255]).all()
    # a dense normal leaning toward +y (= +v, up in the image) is green: glTF's +Y up ("OpenGL")
    lean = np.tile([0.0, 0.3, 1.0], (len(dv), 1))
    g = N.bake_normal_map(v, nrm, tan, f, uv, 32, dv, df, lean / np.linalg.norm(lean, axis=1, keepdims=True))
    assert abs(int(np.median(g[..., 0])) - 128) <= 1 and np.median(g[..., 1]) > 160 and np.median(g[..., 2]) > 230
    # a mirrored layout (u flipped) has handedness -1 and the same map still decodes to +y
    uv_m = uv * [-1, 1] + [1, 0]
    f_m = f[:, ::-1]                          # keep the geometric winding facing +Z with flipped u
    tan_m = N.vertex_tangents(v, nrm, f_m, uv_m)
    assert np.allclose(tan_m, [-1, 0, 0, -1], atol=1e-6)


def bumpy_sphere(subdiv: int = 5) -> trimesh.Trimesh:
    s = trimesh.creation.icosphere(subdiv)
    u = np.asarray(s.vertices)
    r = 1.0 + 0.05 * np.sin(7 * u[:, 0]) * np.sin(7 * u[:, 1]) * np.sin(7 * u[:, 2] + 1.0)
    return trimesh.Trimesh(u * r[:, None], s.faces, process=False)


def test_normal_map_reproduces_dense_normals():
    """Decoded normal map + our tangents on a 600-face LOD give the dense (20k-face)
    surface's normals back, far better than the LOD's own normals."""
    dense = bumpy_sphere(5)
    low = M.decimate(dense, 600)
    vm, f, uv, _ = U.unwrap_atlas(low.vertices, low.faces, low.vertex_normals, 256, 1.0)
    v, nrm = np.asarray(low.vertices)[vm], np.asarray(low.vertex_normals)[vm]
    tan = N.vertex_tangents(v, nrm, f, uv)
    nrm_u = nrm / np.linalg.norm(nrm, axis=1, keepdims=True)
    assert np.allclose(np.linalg.norm(tan[:, :3], axis=1), 1, atol=1e-5)
    assert np.abs((tan[:, :3] * nrm_u).sum(1)).max() < 1e-5
    assert set(np.unique(tan[:, 3])) <= {-1.0, 1.0}
    nmap = N.bake_normal_map(v, nrm, tan, f, uv, 256, dense.vertices, dense.faces, dense.vertex_normals)
    # random points inside the LOD's triangles (away from chart borders' gutters)
    rng = np.random.default_rng(0)
    fid = rng.integers(0, len(f), 4000)
    b = rng.dirichlet([4, 4, 4], len(fid))
    p = np.einsum("pk,pkd->pd", b, v[f[fid]])
    puv = np.einsum("pk,pkd->pd", b, uv[f[fid]])
    n_ts = N.decode(M.sample_texture(nmap, puv))
    basis = N.tangent_frames(nrm, tan, f, fid, b)                # what a glTF viewer builds
    shaded = np.einsum("pij,pj->pi", basis, n_ts)
    shaded /= np.linalg.norm(shaded, axis=1, keepdims=True)
    ref = N.dense_normals_at(p, dense.vertices, dense.faces, dense.vertex_normals)
    err = np.degrees(np.arccos(np.clip((shaded * ref).sum(1), -1, 1)))
    base = np.degrees(np.arccos(np.clip((basis[:, :, 2] * ref).sum(1), -1, 1)))
    assert np.mean(err) < 3.0 and np.mean(err) < 0.35 * np.mean(base), (np.mean(err), np.mean(base))


def test_closest_on_surface_is_exact_and_respects_facing():
    s = bumpy_sphere(3)
    rng = np.random.default_rng(1)
    fid = rng.integers(0, len(s.faces), 300)
    p = np.asarray(s.triangles_center)[fid] + 0.01 * rng.normal(size=(300, 3))
    d, tri, bary = N.closest_on_surface(p, s.vertices, s.faces)
    # brute force over every triangle: the one-ring search finds the true closest point
    t = np.asarray(s.vertices)[s.faces][None]                           # (1, F, 3, 3)
    d2_all, _ = N._closest_on_triangles(p[:, None], t[:, :, 0], t[:, :, 1], t[:, :, 2])
    assert np.allclose(d, np.sqrt(d2_all.min(1)), atol=1e-6)
    foot = np.einsum("pk,pkd->pd", bary, np.asarray(s.vertices)[tri])
    assert np.allclose(np.linalg.norm(foot - p, axis=1), d, atol=1e-6)
    # a thin plate (two sheets 2 mm apart): a point just outside the top sheet but
    # nearer the bottom one's vertices still lands on the sheet facing its normal
    v, f, _ = _grid(5)
    top = v + [0, 0, 0.002]
    sheets_v = np.concatenate([v, top])
    sheets_f = np.concatenate([f[:, ::-1], f + len(v)])      # bottom faces -Z, top faces +Z
    q = np.array([[0.5, 0.5, 0.0009]])                        # nearer the bottom sheet
    d_any, _, _ = N.closest_on_surface(q, sheets_v, sheets_f)
    d_up, tri_up, _ = N.closest_on_surface(q, sheets_v, sheets_f, query_normals=np.array([[0, 0, 1.0]]))
    assert d_any[0] == pytest.approx(0.0009) and d_up[0] == pytest.approx(0.0011) and (tri_up >= len(v)).all()


def test_config_fields_parse_and_validate():
    from recon.config import build_config, validate
    from recon.errors import UsageError

    cfg = build_config("default", sets=["export.face_texel_scale=1.5", "export.normal_map=true"])
    assert cfg.export.face_texel_scale == 1.5 and cfg.export.normal_map is True
    assert build_config("default").export.face_texel_scale == 2.0 and build_config("default").export.normal_map is False
    with pytest.raises(UsageError, match="face_texel_scale"):
        validate(build_config("default", sets=["export.face_texel_scale=0"]))
