"""The exported GLB imports into Blender headless with the right size, up axis and a
bound base-colour texture (issue 5's import check). Skipped when `blender` is absent
(Debian: `apt-get install blender`, 3.4 imports glTF 2.0)."""
import dataclasses
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import trimesh

from recon.config import ExportConfig
from recon.export import export_assets, gltf as G
from recon.export.mesh import TexturedMesh
from recon.testing.gt_head import gt_head, sample_surface
from recon.types import Scene

BLENDER = shutil.which("blender")
pytestmark = pytest.mark.skipif(BLENDER is None, reason="blender is not on PATH (Debian: apt-get install blender)")

SCRIPT = r"""
import bpy, json, sys
import numpy as np
# Debian 12's blender 3.4.1 glTF importer still uses np.bool, removed in numpy 1.24 (Debian's numpy):
# restore the alias in blender's own python so the importer runs (nothing of ours depends on it)
if not hasattr(np, "bool"):
    np.bool = bool
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.import_scene.gltf(filepath=sys.argv[sys.argv.index("--") + 1])
objects = {}
for ob in bpy.context.scene.objects:
    if ob.type != "MESH":
        continue
    me = ob.data
    pts = [list(ob.matrix_world @ v.co) for v in me.vertices]
    uv = me.uv_layers.active.data if me.uv_layers else None
    loops = [pts[lp.vertex_index] + (list(uv[lp.index].uv) if uv else []) for lp in me.loops]
    mats = []
    for slot in ob.material_slots:
        m = slot.material
        info = {"name": m.name if m else None, "uv_layers": len(me.uv_layers)}
        bsdf = [n for n in m.node_tree.nodes if n.type == "BSDF_PRINCIPLED"] if m and m.use_nodes else []
        if bsdf:
            links = bsdf[0].inputs["Base Color"].links
            src = links[0].from_node if links else None
            info["base_color_node"] = src.type if src else None
            if src is not None and src.type == "TEX_IMAGE" and src.image is not None:
                info["image_size"] = list(src.image.size)
            links = bsdf[0].inputs["Normal"].links
            nm = links[0].from_node if links else None
            info["normal_node"] = nm.type if nm else None
            if nm is not None and nm.type == "NORMAL_MAP":
                info["normal_space"] = nm.space
                links = nm.inputs["Color"].links
                img = links[0].from_node if links else None
                info["normal_src"] = img.type if img else None
                if img is not None and img.type == "TEX_IMAGE" and img.image is not None:
                    info["normal_image_size"] = list(img.image.size)
                    info["normal_colorspace"] = img.image.colorspace_settings.name
        mats.append(info)
    objects[ob.name] = {"points": pts, "loops": loops, "materials": mats, "visible": ob.visible_get()}
print("P3D_RESULT " + json.dumps({"objects": objects}))
"""

def _gt_scene(n: int = 3000) -> Scene:
    """Opaque little Gaussians on the GT head's surface, coloured by its texture."""
    head = gt_head(rows=65, cols=128, tex_rows=64)
    p = sample_surface(head.mesh(), n, seed=0)
    with torch.no_grad():
        rgb = head.shader(torch.as_tensor(p, dtype=torch.float32)).numpy() / 255.0
    s = np.full((n, 3), np.log(0.012), np.float32)
    return Scene({"means": torch.as_tensor(p, dtype=torch.float32), "quats": torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
                  "scales": torch.as_tensor(s), "opacities": torch.full((n,), 4.0),
                  "sh0": torch.as_tensor(((rgb - 0.5) / 0.28209479177387814)[:, None, :], dtype=torch.float32),
                  "shN": torch.zeros(n, 0, 3)}, sh_degree=0)


def _blender_import(glb) -> dict:
    """{object name: {"points", "loops" (xyz + uv per loop), "materials", "visible"}} after Blender's import."""
    r = subprocess.run([BLENDER, "-b", "--factory-startup", "--python-expr", SCRIPT, "--", str(glb)],
                       capture_output=True, text=True, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("P3D_RESULT ")]
    if not line and "No module named 'numpy'" in r.stdout + r.stderr:
        pytest.skip("blender's glTF importer needs numpy in blender's python (Debian: apt-get install python3-numpy)")
    assert r.returncode == 0 and line, f"blender failed: {r.stdout[-2000:]} {r.stderr[-2000:]}"
    return json.loads(line[0][len("P3D_RESULT "):])["objects"]


def _check_upright_metres(pts: np.ndarray, height: float) -> None:
    assert len(pts) > 100
    ext = pts.max(0) - pts.min(0)
    # glTF is +Y up; Blender's importer turns that into +Z up: the height is the Z extent, in metres
    assert ext[2] == pytest.approx(height, rel=0.01)
    assert ext[2] > ext[0] and ext[2] > ext[1]
    # the face looks toward glTF +Z = Blender -Y: the frontmost vertex is the nose tip, centred in x
    nose = pts[np.argmin(pts[:, 1])]
    back = pts[np.argmax(pts[:, 1])]
    assert abs(nose[0] - 0.5 * (pts[:, 0].max() + pts[:, 0].min())) < 0.1 * ext[0]
    centre_y = pts[:, 1].mean()
    assert centre_y - nose[1] > back[1] - centre_y          # the nose sticks out at the front (-Y)
    assert pts[:, 2].min() == pytest.approx(0.0, abs=1e-4)   # documented pivot: bottom centre


def test_glb_imports_into_blender_upright_in_metres_with_texture(tmp_path):
    cfg = ExportConfig(formats=("glb",), faces=3000, lods=(1.0,), texture=256, head_height_m=0.25,
                       mesh_resolution=48, render_resolution=64)
    export_assets(_gt_scene(), cfg, tmp_path, validate=False)
    glb = tmp_path / "head.glb"
    assert glb.is_file()
    objects = _blender_import(glb)
    assert len(objects) == 1, list(objects)
    (res,) = objects.values()
    _check_upright_metres(np.array(res["points"]), 0.25)
    # the base colour is an image texture with pixels, on a mesh with UVs
    assert res["materials"], res
    m = res["materials"][0]
    assert m["uv_layers"] >= 1 and m["base_color_node"] == "TEX_IMAGE" and m["image_size"] == [256, 256], m


# --------------------------------------------------------------- LODs + normal map
_TM_FIELDS = {f.name for f in dataclasses.fields(TexturedMesh)}
if {"normal_map", "tangents"} <= _TM_FIELDS:
    _TM = TexturedMesh
else:       # before mesh.py gains the optional fields
    @dataclasses.dataclass
    class _TM(TexturedMesh):
        normal_map: np.ndarray | None = None
        tangents: np.ndarray | None = None


def _latlong_lod(rows: int, cols: int, texture: np.ndarray, normal_map: np.ndarray) -> TexturedMesh:
    """The GT head's radius grid as a textured mesh with equirectangular UVs (v up; a
    seam column duplicated, pole rows kept per column with their degenerate halves dropped)."""
    head = gt_head(rows=rows, cols=cols, tex_rows=8)
    pts = head.surface.points()                                  # (rows, cols, 3)
    pts = np.concatenate([pts, pts[:, :1]], 1).reshape(-1, 3)    # seam: column cols = column 0 again
    w = cols + 1
    d = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    u = np.tile(np.arange(w) / cols, rows)                       # grid lon = -pi + 2 pi j / cols = texture u
    v = 0.5 + np.arcsin(np.clip(d[:, 1], -1, 1)) / np.pi         # texture rows are linear in latitude
    faces = []
    for i in range(rows - 1):
        for j in range(cols):
            a, b, c, e = i * w + j, i * w + j + 1, (i + 1) * w + j, (i + 1) * w + j + 1
            if i > 0:
                faces.append((a, b, e))
            if i < rows - 2:
                faces.append((a, e, c))
    faces = np.array(faces)
    tri = trimesh.Trimesh(pts, faces, process=False)
    return _TM(pts, faces, np.stack([u, v], 1), np.asarray(tri.vertex_normals), texture, normal_map=normal_map)


def test_multi_lod_glb_with_normal_map_imports_into_blender(tmp_path):
    """head.glb with 3 LODs (MSFT_lod) and a normal map: Blender shows LOD0 upright in
    metres with its albedo and a Normal Map node; it also imports the coarser LOD
    nodes, as separate objects named head_LOD1.. at the same place (its importer
    does not know MSFT_lod and brings in nodes that are in no scene)."""
    tex = gt_head(rows=9, cols=16, tex_rows=128).texture.astype(np.uint8)      # (128, 256, 3)
    x = np.linspace(0, 8 * np.pi, 64)
    nrm = np.stack(np.broadcast_arrays(0.4 * np.sin(x)[None, :], np.zeros((64, 1)), np.ones((1, 1))), -1)
    nmap = np.clip(127.5 * (nrm / np.linalg.norm(nrm, axis=-1, keepdims=True) + 1) + 0.5, 0, 255).astype(np.uint8)
    lods = [_latlong_lod(65, 128, tex, nmap), _latlong_lod(33, 64, tex, nmap), _latlong_lod(17, 32, tex[::2, ::2].copy(), nmap)]
    frame = G.head_frame(lods[0].vertices, 0.25)
    lods = [G.to_asset_frame(t, frame) for t in lods]
    glb = G.write_glb(tmp_path / "head.glb", lods)
    objects = _blender_import(glb)
    assert "head_LOD0" in objects and set(objects) <= {"head_LOD0", "head_LOD1", "head_LOD2"}, list(objects)
    print("blender objects:", {k: (len(o["points"]), o["visible"]) for k, o in objects.items()})
    res = objects["head_LOD0"]
    pts = np.array(res["points"])
    assert len(pts) == len(np.unique(lods[0].faces))           # Blender drops the 2 unused pole-seam vertices
    _check_upright_metres(pts, 0.25)
    (m,) = res["materials"]
    assert m["uv_layers"] >= 1 and m["base_color_node"] == "TEX_IMAGE" and m["image_size"] == [256, 128], m
    assert m["normal_node"] == "NORMAL_MAP" and m["normal_space"] == "TANGENT", m
    assert m["normal_src"] == "TEX_IMAGE" and m["normal_image_size"] == [64, 64] and m["normal_colorspace"] == "Non-Color", m
    # every Blender loop carries one of our (position, uv) pairs: Blender +Z up = glTF +Y,
    # Blender -Y = glTF +Z, and Blender's v-up UVs equal ours (the writer's 1 - v undone)
    from scipy.spatial import cKDTree

    loops = np.array(res["loops"])
    ours = np.concatenate([lods[0].vertices, lods[0].uvs], 1)
    theirs = np.concatenate([loops[:, 0:1], loops[:, 2:3], -loops[:, 1:2], loops[:, 3:5]], 1)
    dist = cKDTree(ours).query(theirs)[0]
    assert len(loops) == 3 * lods[0].num_faces and dist.max() < 1e-4, dist.max()


OBJ_SCRIPT = r"""
import bpy, json, sys
path, op = sys.argv[-2:]
bpy.ops.wm.read_factory_settings(use_empty=True)
if op == "new":
    bpy.ops.wm.obj_import(filepath=path)          # the C++ importer (3.3+)
else:
    bpy.ops.import_scene.obj(filepath=path)       # the legacy Python add-on
out = []
for m in bpy.data.materials:
    bsdf = [n for n in m.node_tree.nodes if n.type == "BSDF_PRINCIPLED"]
    links = bsdf[0].inputs["Normal"].links if bsdf else []
    nm = links[0].from_node if links else None
    src = nm.inputs["Color"].links[0].from_node if nm is not None and nm.type == "NORMAL_MAP" and nm.inputs["Color"].links else None
    out.append({"normal_node": nm.type if nm else None, "space": getattr(nm, "space", None),
                "image": src.image.name if src is not None and src.image else None})
print("P3D_RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("importer", ["new", "legacy"])
def test_obj_normal_map_reaches_blenders_normal_map_node(tmp_path, importer):
    """write_obj's `map_Bump -bm 1 head_normal.png` (Blender reads map_Bump, not `norm`)."""
    head = _latlong_lod(17, 32, gt_head(rows=9, cols=16, tex_rows=32).texture.astype(np.uint8),
                        np.full((16, 16, 3), (128, 128, 255), np.uint8))
    obj = G.write_obj(tmp_path / "head.obj", head)[0]
    r = subprocess.run([BLENDER, "-b", "--factory-startup", "--python-expr", OBJ_SCRIPT, "--", str(obj), importer],
                       capture_output=True, text=True, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("P3D_RESULT ")]
    assert r.returncode == 0 and line, f"blender failed: {r.stdout[-2000:]} {r.stderr[-2000:]}"
    (m,) = json.loads(line[0][len("P3D_RESULT "):])
    assert m == {"normal_node": "NORMAL_MAP", "space": "TANGENT", "image": "head_normal.png"}, m
