"""Our glTF 2.0 binary writer (recon.export.gltf): structure read back with a tiny
reader of our own and with trimesh, MSFT_lod LODs, texture sharing, normal maps +
tangents, index types, and the Khronos validator (0 errors, 0 warnings)."""
from __future__ import annotations

import dataclasses
import io
import shutil
import struct

import numpy as np
import pytest
import trimesh
from PIL import Image

from recon.errors import InputError
from recon.export import gltf as G
from recon.export.mesh import TexturedMesh
from recon.export.validate import find_validator, validate_glb

_FIELDS = {f.name for f in dataclasses.fields(TexturedMesh)}
if {"normal_map", "tangents"} <= _FIELDS:
    TM = TexturedMesh
else:       # before mesh.py gains the optional fields: the same shape, for these tests
    @dataclasses.dataclass
    class TM(TexturedMesh):
        normal_map: np.ndarray | None = None
        tangents: np.ndarray | None = None

# infos the validator is allowed to give a multi-LOD file (it does not know MSFT_lod,
# so it cannot see that the LOD nodes are referenced)
LOD_INFOS = {"UNSUPPORTED_EXTENSION", "UNUSED_OBJECT"}


def _texture(size: int, seed: int = 0) -> np.ndarray:
    return (np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8)


def _normal_map(size: int) -> np.ndarray:
    """A tangent-space map with ripples along u (glTF convention: rgb = 0.5 + 0.5 n)."""
    x = np.linspace(0, 4 * np.pi, size)
    n = np.stack(np.broadcast_arrays(0.3 * np.sin(x)[None, :], np.zeros((size, 1)), np.ones((1, 1))), -1)
    n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    return np.clip(127.5 * (n + 1) + 0.5, 0, 255).astype(np.uint8)


def _sphere(count: int, tex: np.ndarray, normal_map=None, tangents: bool = False, scale_normals: float = 1.3) -> TM:
    """A UV sphere with our v-up UVs: u around +Y from +Z, v = 0 at the bottom; input
    normals deliberately not unit length (the writer must renormalise)."""
    m = trimesh.creation.uv_sphere(radius=0.1, count=[count, count])
    v, f = np.asarray(m.vertices), np.asarray(m.faces)
    n = v / np.linalg.norm(v, axis=1, keepdims=True)
    uv = np.stack([0.5 + np.arctan2(n[:, 0], n[:, 2]) / (2 * np.pi), 0.5 + np.arcsin(np.clip(n[:, 1], -1, 1)) / np.pi], 1)
    tan = None
    if tangents:
        t = np.stack([n[:, 2], np.zeros(len(n)), -n[:, 0]], 1)      # d/du of the longitude, unnormalised
        t[np.linalg.norm(t, axis=1) < 1e-9] = (1.0, 0.0, 0.0)
        tan = np.concatenate([2.0 * t, np.full((len(n), 1), 0.7)], 1)  # w not ±1 yet: the writer snaps it
    return TM(v + np.array([0.0, 0.1, 0.0]), f, uv, scale_normals * n, tex, normal_map=normal_map, tangents=tan)


def _grid(rows: int, cols: int, tex: np.ndarray) -> TM:
    """A flat grid in the XY plane facing +Z (rows * cols vertices)."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    v = np.stack([x.ravel() / cols, y.ravel() / rows, np.zeros(rows * cols)], 1)
    i = (np.arange(rows - 1)[:, None] * cols + np.arange(cols - 1)[None, :]).ravel()
    f = np.concatenate([np.stack([i, i + 1, i + cols + 1], 1), np.stack([i, i + cols + 1, i + cols], 1)])
    uv = np.stack([x.ravel() / (cols - 1), y.ravel() / (rows - 1)], 1)
    return TM(v, f, uv, np.tile([0.0, 0.0, 1.0], (len(v), 1)), tex)


# ----------------------------------------------------------------- tiny GLB reader
_NP = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_NC = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def _read(path):
    data = path.read_bytes()
    magic, version, total = struct.unpack_from("<III", data)
    assert (magic, version, total) == (0x46546C67, 2, len(data))
    jlen, jtype = struct.unpack_from("<II", data, 12)
    assert jtype == 0x4E4F534A and jlen % 4 == 0
    blen, btype = struct.unpack_from("<II", data, 20 + jlen)
    assert btype == 0x004E4942 and blen % 4 == 0 and 28 + jlen + blen == len(data)
    doc, binary = G.read_glb(path)
    assert binary == data[28 + jlen:] and doc["buffers"] == [{"byteLength": blen}]
    return doc, binary


def _accessor(doc, binary, i) -> np.ndarray:
    a = doc["accessors"][i]
    bv = doc["bufferViews"][a["bufferView"]]
    assert "byteStride" not in bv and bv["byteOffset"] % 4 == 0
    dt = np.dtype(_NP[a["componentType"]])
    nc = _NC[a["type"]]
    assert bv["byteLength"] == a["count"] * nc * dt.itemsize
    arr = np.frombuffer(binary, dt, a["count"] * nc, bv["byteOffset"] + a.get("byteOffset", 0))
    return arr.reshape(a["count"], nc) if nc > 1 else arr


def _prim(doc, mesh=0):
    (p,) = doc["meshes"][mesh]["primitives"]
    return p


def _image(doc, binary, tex_index) -> np.ndarray:
    img = doc["images"][doc["textures"][tex_index]["source"]]
    bv = doc["bufferViews"][img["bufferView"]]
    assert img["mimeType"] == "image/png" and "target" not in bv
    return np.asarray(Image.open(io.BytesIO(binary[bv["byteOffset"]:bv["byteOffset"] + bv["byteLength"]])))


# ------------------------------------------------------------------------- tests
def test_single_lod_round_trips_exactly(tmp_path):
    tm = _sphere(24, _texture(32))
    p = G.write_glb(tmp_path / "one.glb", tm)
    doc, binary = _read(p)
    assert doc["asset"] == {"version": "2.0", "generator": "portrait3d"}
    assert doc["nodes"] == [{"name": "head_LOD0", "mesh": 0}] and doc["meshes"][0]["name"] == "head_LOD0"
    assert doc["scenes"] == [{"name": "head", "nodes": [0]}] and doc["scene"] == 0
    assert "extensionsUsed" not in doc and "extensionsRequired" not in doc
    prim = _prim(doc)
    assert set(prim["attributes"]) == {"POSITION", "NORMAL", "TEXCOORD_0"} and prim["mode"] == 4
    pos = _accessor(doc, binary, prim["attributes"]["POSITION"])
    np.testing.assert_array_equal(pos, tm.vertices.astype(np.float32))
    a = doc["accessors"][prim["attributes"]["POSITION"]]
    assert a["min"] == pos.min(0).tolist() and a["max"] == pos.max(0).tolist()
    nrm = _accessor(doc, binary, prim["attributes"]["NORMAL"])
    np.testing.assert_allclose(np.linalg.norm(nrm.astype(np.float64), axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(nrm, tm.normals / 1.3, atol=1e-6)
    uv = _accessor(doc, binary, prim["attributes"]["TEXCOORD_0"])
    np.testing.assert_allclose(uv, np.stack([tm.uvs[:, 0], 1 - tm.uvs[:, 1]], 1), atol=1e-7)   # v flipped
    ind = _accessor(doc, binary, prim["indices"])
    assert doc["accessors"][prim["indices"]]["componentType"] == 5123          # < 65536 vertices: ushort
    np.testing.assert_array_equal(ind.reshape(-1, 3), tm.faces)
    targets = {doc["bufferViews"][doc["accessors"][i]["bufferView"]].get("target") for i in prim["attributes"].values()}
    assert targets == {34962} and doc["bufferViews"][doc["accessors"][prim["indices"]]["bufferView"]]["target"] == 34963
    (mat,) = doc["materials"]
    pbr = mat["pbrMetallicRoughness"]
    assert prim["material"] == 0 and pbr["metallicFactor"] == 0.0 and pbr["roughnessFactor"] == 0.8
    assert "normalTexture" not in mat
    assert doc["samplers"] == [{"magFilter": 9729, "minFilter": 9987, "wrapS": 10497, "wrapT": 10497}]
    np.testing.assert_array_equal(_image(doc, binary, pbr["baseColorTexture"]["index"]), tm.texture)


def test_trimesh_reads_it_back(tmp_path):
    tm = _sphere(16, _texture(32))
    scene = trimesh.load(G.write_glb(tmp_path / "one.glb", tm), force="scene")
    (m,) = scene.geometry.values()
    np.testing.assert_allclose(m.vertices, tm.vertices, atol=1e-6)
    np.testing.assert_array_equal(m.faces, tm.faces)
    np.testing.assert_allclose(m.visual.uv, tm.uvs, atol=1e-6)          # trimesh flips v back to v-up
    np.testing.assert_allclose(m.vertex_normals, tm.normals / 1.3, atol=1e-5)
    assert m.visual.material.baseColorTexture.size == (32, 32)
    assert m.visual.material.roughnessFactor == pytest.approx(0.8)


def test_lods_in_one_file_with_msft_lod(tmp_path):
    tex = _texture(32)
    lods = [_sphere(c, tex) for c in (40, 24, 12, 6)]
    doc, binary = _read(G.write_glb(tmp_path / "lods.glb", lods))
    assert [n["name"] for n in doc["nodes"]] == ["head_LOD0", "head_LOD1", "head_LOD2", "head_LOD3"]
    assert [m["name"] for m in doc["meshes"]] == [n["name"] for n in doc["nodes"]]
    assert doc["scenes"][0]["nodes"] == [0]                        # the coarser levels are not in the scene
    assert doc["nodes"][0]["extensions"] == {"MSFT_lod": {"ids": [1, 2, 3]}}
    cov = doc["nodes"][0]["extras"]["MSFT_screencoverage"]
    assert len(cov) == 4 and cov == sorted(cov, reverse=True) and cov[-1] == 0.0
    assert doc["extensionsUsed"] == ["MSFT_lod"] and "extensionsRequired" not in doc
    assert all("children" not in n for n in doc["nodes"])
    # one shared texture -> one image, one material
    assert len(doc["images"]) == 1 and len(doc["materials"]) == 1
    assert {_prim(doc, i)["material"] for i in range(4)} == {0}
    for i, tm in enumerate(lods):
        prim = _prim(doc, doc["nodes"][i]["mesh"])
        np.testing.assert_array_equal(_accessor(doc, binary, prim["attributes"]["POSITION"]), tm.vertices.astype(np.float32))
        np.testing.assert_array_equal(_accessor(doc, binary, prim["indices"]).reshape(-1, 3), tm.faces)
    # trimesh shows LOD0 only (it keeps the other meshes as unplaced geometry)
    scene = trimesh.load(tmp_path / "lods.glb", force="scene")
    assert scene.graph.nodes_geometry == ["head_LOD0"]
    np.testing.assert_allclose(scene.to_geometry().vertices, lods[0].vertices, atol=1e-6)


def test_screen_coverage_given_and_checked(tmp_path):
    tex = _texture(16)
    lods = [_sphere(c, tex) for c in (12, 6)]
    doc, _ = _read(G.write_glb(tmp_path / "a.glb", lods, lod_screen_coverage=[0.3, 0.05]))
    assert doc["nodes"][0]["extras"]["MSFT_screencoverage"] == [0.3, 0.05]
    for bad in ([0.3], [0.05, 0.3], [1.5, 0.1]):
        with pytest.raises(InputError, match="lod_screen_coverage"):
            G.write_glb(tmp_path / "b.glb", lods, lod_screen_coverage=bad)


def test_textures_deduplicated_by_content(tmp_path):
    t32, t16 = _texture(32, 1), _texture(16, 2)
    lods = [_sphere(12, t32), _sphere(10, t32.copy()), _sphere(8, t16), _sphere(6, t16)]
    doc, binary = _read(G.write_glb(tmp_path / "a.glb", lods))
    assert len(doc["images"]) == 2 and len(doc["textures"]) == 2 and len(doc["materials"]) == 2
    assert [_prim(doc, i)["material"] for i in range(4)] == [0, 0, 1, 1]
    assert [im["name"] for im in doc["images"]] == ["head_albedo", "head_albedo_1"]
    assert [m["name"] for m in doc["materials"]] == ["head_material", "head_material_1"]
    for i, t in ((0, t32), (2, t16)):
        m = doc["materials"][_prim(doc, i)["material"]]
        np.testing.assert_array_equal(_image(doc, binary, m["pbrMetallicRoughness"]["baseColorTexture"]["index"]), t)


def test_per_lod_file_names_its_level(tmp_path):
    doc, _ = _read(G.write_glb(tmp_path / "l2.glb", _sphere(8, _texture(8)), first_lod=2))
    assert [n["name"] for n in doc["nodes"]] == ["head_LOD2"] and "extensionsUsed" not in doc


def test_normal_map_with_given_tangents(tmp_path):
    nm = _normal_map(16)
    tm = _sphere(16, _texture(32), normal_map=nm, tangents=True)
    doc, binary = _read(G.write_glb(tmp_path / "n.glb", tm))
    prim = _prim(doc)
    assert doc["accessors"][prim["attributes"]["TANGENT"]]["type"] == "VEC4"
    (mat,) = doc["materials"]
    np.testing.assert_array_equal(_image(doc, binary, mat["normalTexture"]["index"]), nm)
    assert mat["normalTexture"]["index"] != mat["pbrMetallicRoughness"]["baseColorTexture"]["index"]
    tan = _accessor(doc, binary, prim["attributes"]["TANGENT"]).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(tan[:, :3], axis=1), 1.0, atol=1e-6)
    assert set(np.unique(tan[:, 3])) == {1.0}
    want = tm.tangents[:, :3] / np.linalg.norm(tm.tangents[:, :3], axis=1, keepdims=True)
    np.testing.assert_allclose(tan[:, :3], want, atol=1e-6)


def test_normal_map_without_tangents_computes_them(tmp_path):
    tm = _sphere(24, _texture(32), normal_map=_normal_map(16))
    doc, binary = _read(G.write_glb(tmp_path / "n.glb", tm))
    prim = _prim(doc)
    tan = _accessor(doc, binary, prim["attributes"]["TANGENT"]).astype(np.float64)
    nrm = _accessor(doc, binary, prim["attributes"]["NORMAL"]).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(tan[:, :3], axis=1), 1.0, atol=1e-6)
    assert np.abs((tan[:, :3] * nrm).sum(1)).max() < 1e-5                       # orthogonal to the normal
    assert np.isin(tan[:, 3], [-1.0, 1.0]).all()
    # away from the poles and the u seam: tangent along +u (eastward around +Y), and the
    # bitangent cross(n, t) * w along +v of our v-up uvs (northward, +Y)
    n = nrm
    ok = (np.abs(n[:, 1]) < 0.8) & (tm.uvs[:, 0] > 0.05) & (tm.uvs[:, 0] < 0.95)
    east = np.stack([n[:, 2], np.zeros(len(n)), -n[:, 0]], 1)
    east /= np.linalg.norm(east, axis=1, keepdims=True).clip(1e-9)
    assert ok.sum() > 100 and ((tan[:, :3] * east).sum(1)[ok] > 0.95).all()
    bit = np.cross(n, tan[:, :3]) * tan[:, 3:]
    assert (bit[ok, 1] > 0.5).all()


def test_large_mesh_uses_uint_indices(tmp_path):
    tex = _texture(8)
    big = _grid(256, 256, tex)                        # 65536 vertices: index 65535 = ushort primitive restart
    doc, binary = _read(G.write_glb(tmp_path / "big.glb", big))
    prim = _prim(doc)
    assert doc["accessors"][prim["indices"]]["componentType"] == 5125
    np.testing.assert_array_equal(_accessor(doc, binary, prim["indices"]).reshape(-1, 3), big.faces)
    edge = _grid(255, 257, tex)                       # 65535 vertices: still fits UNSIGNED_SHORT (max index 65534)
    doc, binary = _read(G.write_glb(tmp_path / "edge.glb", edge))
    assert doc["accessors"][_prim(doc)["indices"]]["componentType"] == 5123
    assert _accessor(doc, binary, _prim(doc)["indices"]).max() == 65534


def test_degenerate_normals_are_repaired_and_bad_input_refused(tmp_path):
    tm = _grid(4, 4, _texture(8))
    tm.normals[3] = 0.0
    doc, binary = _read(G.write_glb(tmp_path / "a.glb", tm))
    nrm = _accessor(doc, binary, _prim(doc)["attributes"]["NORMAL"])
    np.testing.assert_allclose(nrm[3], [0, 0, 1], atol=1e-6)              # from the faces around it
    with pytest.raises(InputError, match="uvs"):
        G.write_glb(tmp_path / "b.glb", dataclasses.replace(tm, uvs=tm.uvs[:-1]))
    with pytest.raises(InputError, match="face indices"):
        G.write_glb(tmp_path / "b.glb", dataclasses.replace(tm, faces=tm.faces + 1))
    with pytest.raises(InputError, match="no mesh"):
        G.write_glb(tmp_path / "b.glb", [])
    with pytest.raises(InputError, match="not a GLB"):
        (tmp_path / "c.glb").write_bytes(b"glTF" + b"\0" * 30)
        G.read_glb(tmp_path / "c.glb")


def test_obj_writes_normal_map(tmp_path):
    nm = _normal_map(16)
    tm = _sphere(8, _texture(16), normal_map=nm)
    files = G.write_obj(tmp_path / "head.obj", tm)
    assert [f.name for f in files] == ["head.obj", "head.mtl", "head_albedo.png", "head_normal.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "head_normal.png")), nm)
    mtl = (tmp_path / "head.mtl").read_text()
    assert "map_Kd head_albedo.png" in mtl and "norm head_normal.png" in mtl and "map_Bump -bm 1.000000 head_normal.png" in mtl
    plain = G.write_obj(tmp_path / "plain.obj", _sphere(8, _texture(16)))
    assert [f.name for f in plain] == ["plain.obj", "plain.mtl", "plain_albedo.png"]
    assert "norm" not in (tmp_path / "plain.mtl").read_text()


# ----------------------------------------------------------------------- validator
@pytest.fixture(scope="module")
def validator():
    if shutil.which("node") is None or find_validator() is None:
        pytest.skip("node or gltf-validator missing (tools/install_validator.sh)")
    return validate_glb


def _cases():
    t64, t32 = _texture(64), _texture(32, 1)
    nm = _normal_map(32)
    yield "single", _sphere(24, t64), set()
    yield "4 lods", [_sphere(c, t) for c, t in ((48, t64), (24, t64), (12, t32), (6, t32))], LOD_INFOS
    yield "4 lods normal maps + tangents", [_sphere(c, t64, normal_map=nm, tangents=c % 2 == 0)
                                            for c in (48, 24, 13, 6)], LOD_INFOS
    yield "65536 vertices", _grid(256, 256, _texture(8)), set()


@pytest.mark.parametrize("case", range(4), ids=["single", "4lods", "4lods-normalmap", "uint32"])
def test_validator_zero_errors_zero_warnings(tmp_path, validator, case):
    name, lods, allowed = list(_cases())[case]
    rep = validator(G.write_glb(tmp_path / "v.glb", lods))
    issues = rep["issues"]
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, (name, issues["messages"])
    assert {m["code"] for m in issues["messages"]} <= allowed, (name, issues["messages"])
    assert rep["info"]["generator"] == "portrait3d"
