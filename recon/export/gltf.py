"""Mesh files: GLB (our own glTF 2.0 binary writer, PBR material, LODs via MSFT_lod),
OBJ + MTL + PNG, PLY with vertex colours.

Frame and units: our world frame already is glTF's (+Y up, the face looks toward
+Z, right-handed), so nothing is rotated; positions are scaled to metres so the
head's height (the mesh's Y extent) is `head_height_m`.

Pivot (the asset origin): the *bottom centre* of the head's bounding box, i.e.
x and z at the box centre and y at the lowest point (base of the neck). The head
stands on the y = 0 plane, which is what engines and DCC tools expect when the
asset is dropped into a scene. `HeadFrame` records the mapping
    p_asset = (p_world - pivot_world) * scale
and the same mapping is applied to the Gaussian splat files so they overlay.

LODs: `write_glb` with several meshes writes one file whose scene shows LOD0
(node `head_LOD0`) and holds the coarser levels as nodes `head_LOD1..n` outside the
scene, chained by the MSFT_lod extension (`extensionsUsed` only, not required, so
a viewer that ignores it shows LOD0). The `_LODn` suffix is what Unity's and
Unreal's importers group LODs by. With one mesh it writes a one-node file, so each
LOD can also be its own file.

Why our own writer and not trimesh's: the Khronos validator must report 0 errors
and 0 warnings, which needs exact control of accessor bounds, unit normals, index
types, texture sharing between LODs, tangents and the MSFT_lod nodes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from ..errors import InputError, StageError
from .mesh import TexturedMesh, sample_texture

PIVOT = "bottom_centre"
PIVOT_NOTE = "origin at the bottom centre of the head's bounding box (x, z centred, y = lowest point); +Y up, face toward +Z"
ROUGHNESS = 0.8
METALLIC = 0.0
GENERATOR = "portrait3d"

# glTF enums
_FLOAT, _USHORT, _UINT = 5126, 5123, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _REPEAT = 9729, 9987, 10497
_TRIANGLES = 4
_GLB_MAGIC, _CHUNK_JSON, _CHUNK_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942


@dataclass(frozen=True)
class HeadFrame:
    """World (fit) units -> asset metres: p_asset = (p_world - pivot) * scale."""

    pivot: tuple[float, float, float]
    scale: float
    height_world: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, np.float64) - np.asarray(self.pivot)) * self.scale

    def to_dict(self) -> dict:
        return {"pivot_world": list(self.pivot), "scale_m_per_world_unit": self.scale, "height_world": self.height_world}


def head_frame(points: np.ndarray, head_height_m: float) -> HeadFrame:
    """Frame from a point set (the mesh vertices, or robust splat bounds)."""
    p = np.asarray(points, np.float64)
    lo, hi = p.min(0), p.max(0)
    height = float(hi[1] - lo[1])
    if not np.isfinite(height) or height <= 1e-9:
        raise StageError(f"the head has no height (Y extent {height})", hint="the fitted scene is empty or flat", stage="export")
    pivot = (float(0.5 * (lo[0] + hi[0])), float(lo[1]), float(0.5 * (lo[2] + hi[2])))
    return HeadFrame(pivot=pivot, scale=float(head_height_m) / height, height_world=height)


def to_asset_frame(tm: TexturedMesh, frame: HeadFrame) -> TexturedMesh:
    # a positive uniform scale and a translation keep normals, tangents and winding as
    # they are; dataclasses.replace carries every other field (coverage, normal map...)
    return dataclasses.replace(tm, vertices=frame.apply(tm.vertices))


# ------------------------------------------------------------------ vertex data
def unit_normals(normals: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) float32 normals of length 1 (the validator checks |n| = 1 per vertex).

    A zero or non-finite input normal is replaced by the area-weighted normal of the
    faces around the vertex; a vertex on no face (or only degenerate ones) gets +Y.
    """
    n = np.asarray(normals, np.float64).copy()
    ln = np.linalg.norm(n, axis=1)
    bad = ~np.isfinite(ln) | (ln < 1e-12)
    if bad.any():
        v = np.asarray(vertices, np.float64)
        fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])   # area-weighted
        acc = np.zeros_like(v)
        for k in range(3):
            np.add.at(acc, faces[:, k], fn)
        n[bad] = acc[bad]
        ln = np.linalg.norm(n, axis=1)
        still = ~np.isfinite(ln) | (ln < 1e-12)
        n[still] = (0.0, 1.0, 0.0)
        ln[still] = 1.0
    return _renormalise(n / ln[:, None])


def _renormalise(n: np.ndarray) -> np.ndarray:
    """float64 unit vectors -> float32 whose float32 length is 1 within ~1e-7."""
    n32 = n.astype(np.float32)
    return (n32 / np.linalg.norm(n32.astype(np.float64), axis=1, keepdims=True).astype(np.float32)).astype(np.float32)


def unit_tangents(tangents: np.ndarray) -> np.ndarray:
    """(V, 4) float32 with unit xyz and w exactly ±1 (what the validator accepts)."""
    t = np.asarray(tangents, np.float64)
    ln = np.linalg.norm(t[:, :3], axis=1)
    if not np.all(np.isfinite(t)) or (ln < 1e-12).any():
        raise InputError(f"{int((~np.isfinite(ln) | (ln < 1e-12)).sum())} tangents have no direction",
                         hint="tangents must be finite and non-zero (recompute them, or pass tangents=None)")
    w = np.where(t[:, 3] < 0.0, -1.0, 1.0).astype(np.float32)
    return np.concatenate([_renormalise(t[:, :3] / ln[:, None]), w[:, None]], 1)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise InputError(f"a texture must be (H, W, 3|4) uint8, got {a.dtype} {a.shape}", hint="bake the texture first")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ------------------------------------------------------------------ GLB builder
class _Builder:
    """Accumulates the BIN chunk and the JSON arrays; every view starts 4-aligned."""

    def __init__(self):
        self.bin = bytearray()
        self.doc: dict = {"asset": {"version": "2.0", "generator": GENERATOR},
                          "buffers": [], "bufferViews": [], "accessors": [], "images": [], "samplers": [],
                          "textures": [], "materials": [], "meshes": [], "nodes": [], "scenes": []}
        self._images: dict = {}      # key -> texture index

    def view(self, data: bytes, target: int | None = None) -> int:
        pad = (-len(self.bin)) % 4
        self.bin += b"\0" * pad
        bv = {"buffer": 0, "byteOffset": len(self.bin), "byteLength": len(data)}
        if target is not None:
            bv["target"] = target
        self.bin += data
        self.doc["bufferViews"].append(bv)
        return len(self.doc["bufferViews"]) - 1

    def accessor(self, arr: np.ndarray, ctype: int, typ: str, target: int, minmax: bool = False) -> int:
        arr = np.ascontiguousarray(arr)
        acc = {"bufferView": self.view(arr.tobytes(), target), "componentType": ctype, "count": int(len(arr)), "type": typ}
        if minmax:
            # exact float32 values (the validator compares declared and actual bounds)
            acc["min"] = [float(x) for x in arr.min(0)]
            acc["max"] = [float(x) for x in arr.max(0)]
        self.doc["accessors"].append(acc)
        return len(self.doc["accessors"]) - 1

    def texture(self, img: np.ndarray, name: str) -> int:
        """Texture index for an image; the same array object or identical pixels are stored once."""
        a = np.ascontiguousarray(img)
        key = (a.shape, a.dtype.str, hashlib.sha1(a.tobytes()).hexdigest())
        if key in self._images:
            return self._images[key]
        # unique names: importers (Unity, Blender) name texture assets after them
        taken = {im["name"] for im in self.doc["images"]}
        name = next(n for n in [name] + [f"{name}_{k}" for k in range(1, len(taken) + 2)] if n not in taken)
        if not self.doc["samplers"]:
            self.doc["samplers"].append({"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR,
                                         "wrapS": _REPEAT, "wrapT": _REPEAT})
        self.doc["images"].append({"bufferView": self.view(_png(a)), "mimeType": "image/png", "name": name})
        self.doc["textures"].append({"sampler": 0, "source": len(self.doc["images"]) - 1, "name": name})
        self._images[key] = len(self.doc["textures"]) - 1
        return self._images[key]

    def finish(self) -> bytes:
        self.bin += b"\0" * ((-len(self.bin)) % 4)
        self.doc["buffers"].append({"byteLength": len(self.bin)})
        doc = {k: v for k, v in self.doc.items() if not (isinstance(v, list) and not v)}
        js = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
        js += b" " * ((-len(js)) % 4)
        total = 12 + 8 + len(js) + 8 + len(self.bin)
        return b"".join([struct.pack("<III", _GLB_MAGIC, 2, total), struct.pack("<II", len(js), _CHUNK_JSON), js,
                         struct.pack("<II", len(self.bin), _CHUNK_BIN), bytes(self.bin)])


def _check_mesh(tm: TexturedMesh, i: int) -> None:
    v, f = np.asarray(tm.vertices), np.asarray(tm.faces)
    nv = len(v)
    bad = None
    if v.ndim != 2 or v.shape[1] != 3 or nv == 0:
        bad = f"vertices have shape {v.shape}"
    elif f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        bad = f"faces have shape {f.shape}"
    elif np.asarray(tm.uvs).shape != (nv, 2) or np.asarray(tm.normals).shape != (nv, 3):
        bad = f"uvs {np.asarray(tm.uvs).shape} / normals {np.asarray(tm.normals).shape} do not match {nv} vertices"
    elif f.min() < 0 or f.max() >= nv:
        bad = f"face indices span [{f.min()}, {f.max()}] outside [0, {nv - 1}]"
    elif not (np.isfinite(v).all() and np.isfinite(tm.uvs).all()):
        bad = "positions or uvs are not finite"
    elif getattr(tm, "tangents", None) is not None and np.asarray(tm.tangents).shape != (nv, 4):
        bad = f"tangents have shape {np.asarray(tm.tangents).shape}, not ({nv}, 4)"
    if bad:
        raise InputError(f"LOD{i} cannot be written as glTF: {bad}", hint="this is a bug in the mesh stage")


def _add_mesh(b: _Builder, tm: TexturedMesh, name: str, materials: dict) -> int:
    v = np.asarray(tm.vertices, np.float64)
    f = np.asarray(tm.faces, np.int64)
    normals = unit_normals(tm.normals, v, f)
    uv = np.asarray(tm.uvs, np.float64)
    attrs = {"POSITION": b.accessor(v.astype(np.float32), _FLOAT, "VEC3", _ARRAY_BUFFER, minmax=True),
             "NORMAL": b.accessor(normals, _FLOAT, "VEC3", _ARRAY_BUFFER),
             # our uvs are v up (OBJ); glTF's TEXCOORD_0 has v down (origin at the image's top left)
             "TEXCOORD_0": b.accessor(np.stack([uv[:, 0], 1.0 - uv[:, 1]], 1).astype(np.float32), _FLOAT, "VEC2",
                                      _ARRAY_BUFFER)}
    nmap = getattr(tm, "normal_map", None)
    if nmap is not None:
        tan = getattr(tm, "tangents", None)
        if tan is None:      # the normal-map baker's tangent frame (glTF convention, our v-up uvs)
            from .normal_map import vertex_tangents

            tan = vertex_tangents(v, normals, f, uv)
        tan = unit_tangents(tan)
        attrs["TANGENT"] = b.accessor(tan, _FLOAT, "VEC4", _ARRAY_BUFFER)
    # 65535 is the primitive-restart value of UNSIGNED_SHORT: usable only below it
    itype, idt = (_USHORT, np.uint16) if len(v) <= 65535 else (_UINT, np.uint32)
    ind = b.accessor(f.reshape(-1).astype(idt), itype, "SCALAR", _ELEMENT_ARRAY_BUFFER)
    tex = b.texture(tm.texture, "head_albedo")
    ntex = b.texture(nmap, "head_normal") if nmap is not None else None
    if (tex, ntex) not in materials:
        mat = {"name": "head_material" if not materials else f"head_material_{len(materials)}",
               "pbrMetallicRoughness": {"baseColorTexture": {"index": tex}, "metallicFactor": METALLIC,
                                        "roughnessFactor": ROUGHNESS}}
        if ntex is not None:
            mat["normalTexture"] = {"index": ntex}
        b.doc["materials"].append(mat)
        materials[(tex, ntex)] = len(b.doc["materials"]) - 1
    b.doc["meshes"].append({"name": name, "primitives": [{"attributes": attrs, "indices": ind,
                                                           "material": materials[(tex, ntex)], "mode": _TRIANGLES}]})
    return len(b.doc["meshes"]) - 1


def default_screen_coverage(n: int) -> list[float]:
    """MSFT_screencoverage for n LODs: LOD i shows while the object covers more than
    0.5^(i+1) of the screen; the last value is 0 so the coarsest level is never culled."""
    return [0.5 ** (i + 1) for i in range(n - 1)] + [0.0]


def glb_bytes(lods: list[TexturedMesh] | TexturedMesh, node_name: str = "head", *,
              lod_screen_coverage: list[float] | None = None, first_lod: int = 0) -> bytes:
    """The GLB file's bytes (see write_glb)."""
    if isinstance(lods, TexturedMesh) or not isinstance(lods, (list, tuple)):
        lods = [lods]
    if not lods:
        raise InputError("write_glb got no mesh", hint="pass at least LOD0")
    for i, tm in enumerate(lods):
        _check_mesh(tm, first_lod + i)
    b = _Builder()
    materials: dict = {}
    for i, tm in enumerate(lods):
        name = f"{node_name}_LOD{first_lod + i}"
        b.doc["nodes"].append({"name": name, "mesh": _add_mesh(b, tm, name, materials)})
    # only LOD0 is in the scene; the other levels are reached through MSFT_lod
    b.doc["scenes"].append({"name": node_name, "nodes": [0]})
    b.doc["scene"] = 0
    if len(lods) > 1:
        cov = default_screen_coverage(len(lods)) if lod_screen_coverage is None else [float(c) for c in lod_screen_coverage]
        if len(cov) != len(lods) or any(not (0.0 <= c <= 1.0) for c in cov) or any(a <= c for a, c in zip(cov, cov[1:])):
            raise InputError(f"lod_screen_coverage={lod_screen_coverage} must be {len(lods)} decreasing values in [0, 1]",
                             hint="one value per LOD, e.g. [0.5, 0.25, 0.0]")
        b.doc["nodes"][0]["extensions"] = {"MSFT_lod": {"ids": list(range(1, len(lods)))}}
        b.doc["nodes"][0]["extras"] = {"MSFT_screencoverage": cov}
        # not extensionsRequired: a viewer that ignores MSFT_lod shows LOD0
        b.doc["extensionsUsed"] = ["MSFT_lod"]
    return b.finish()


def write_glb(path: str | Path, lods: list[TexturedMesh] | TexturedMesh, node_name: str = "head", *,
              lod_screen_coverage: list[float] | None = None, first_lod: int = 0) -> Path:
    """Meshes already in the asset frame -> one binary glTF.

    One mesh: a one-node file, node and mesh named f"{node_name}_LOD{first_lod}".
    Several: node `{node_name}_LOD0` is the scene; `{node_name}_LOD1..` are nodes outside
    the scene listed in LOD0's extensions.MSFT_lod.ids, with extras.MSFT_screencoverage
    (one decreasing value per LOD, default `default_screen_coverage`). Identical
    textures (the same array or equal pixels) are stored once and share a material.
    A mesh with `normal_map` gets normalTexture and a TANGENT attribute (its own
    `tangents` when given, else normal_map.vertex_tangents).
    """
    path = Path(path)
    path.write_bytes(glb_bytes(lods, node_name, lod_screen_coverage=lod_screen_coverage, first_lod=first_lod))
    return path


def read_glb(path_or_bytes: str | Path | bytes) -> tuple[dict, bytes]:
    """(json document, BIN chunk) of a GLB; InputError when it is not one."""
    data = path_or_bytes if isinstance(path_or_bytes, (bytes, bytearray)) else Path(path_or_bytes).read_bytes()
    if len(data) < 20:
        raise InputError(f"not a GLB: {len(data)} bytes", hint="expected a binary glTF file")
    magic, version, total = struct.unpack_from("<III", data, 0)
    if magic != _GLB_MAGIC or version != 2 or total != len(data):
        raise InputError(f"not a GLB 2.0 file (magic {magic:#x}, version {version}, length {total}/{len(data)})",
                         hint="expected a binary glTF file")
    jlen, jtype = struct.unpack_from("<II", data, 12)
    if jtype != _CHUNK_JSON or 20 + jlen > len(data):
        raise InputError("GLB has no JSON chunk first", hint="the file is damaged")
    doc = json.loads(bytes(data[20:20 + jlen]).decode("utf-8"))
    binary = b""
    off = 20 + jlen
    if off + 8 <= len(data):
        blen, btype = struct.unpack_from("<II", data, off)
        if btype != _CHUNK_BIN or off + 8 + blen > len(data):
            raise InputError("GLB's second chunk is not BIN", hint="the file is damaged")
        binary = bytes(data[off + 8:off + 8 + blen])
    return doc, binary


# ------------------------------------------------------------------ OBJ + PLY
def write_obj(path: str | Path, tm: TexturedMesh) -> list[Path]:
    """`head.obj` + `head.mtl` + `head_albedo.png` next to each other (relative references),
    plus `head_normal.png` when the mesh has a normal map (MTL `norm` and `map_Bump -bm 1`:
    Blender's OBJ importers read either as a tangent-space Normal Map node)."""
    from PIL import Image

    path = Path(path)
    stem = path.with_suffix("")
    mtl, png = stem.with_suffix(".mtl"), Path(f"{stem}_albedo.png")
    Image.fromarray(tm.texture).save(png, format="PNG", compress_level=6)
    out = [path, mtl, png]
    lines = ("# portrait3d head material (PBR extension keys Pr/Pm for tools that read them)\n"
             "newmtl head_albedo\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nNs 10\nillum 1\n"
             f"Pr {ROUGHNESS}\nPm {METALLIC}\nmap_Kd {png.name}\n")
    nmap = getattr(tm, "normal_map", None)
    if nmap is not None:
        npng = Path(f"{stem}_normal.png")
        npng.write_bytes(_png(np.asarray(nmap)))
        lines += f"norm {npng.name}\nmap_Bump -bm 1.000000 {npng.name}\n"
        out.append(npng)
    mtl.write_text(lines)
    buf = io.StringIO()
    buf.write(f"# portrait3d head: metres, +Y up, face toward +Z; {PIVOT_NOTE}\n")
    buf.write(f"mtllib {mtl.name}\nusemtl head_albedo\n")
    np.savetxt(buf, tm.vertices, fmt="v %.6f %.6f %.6f")
    np.savetxt(buf, tm.uvs, fmt="vt %.6f %.6f")
    np.savetxt(buf, tm.normals, fmt="vn %.5f %.5f %.5f")
    f = tm.faces + 1
    np.savetxt(buf, np.repeat(f, 3, axis=1), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    path.write_text(buf.getvalue())
    return out


def write_mesh_ply(path: str | Path, tm: TexturedMesh) -> Path:
    """Binary PLY with per-vertex RGB sampled from the texture; seam copies merged
    (their colours averaged) so the surface is one connected mesh."""
    path = Path(path)
    rgb = sample_texture(tm.texture, tm.uvs)
    uniq, inv = np.unique(np.round(tm.vertices, 7), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    cnt = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    col = np.stack([np.bincount(inv, rgb[:, c], len(uniq)) for c in range(3)], 1) / cnt[:, None]
    rgba = np.concatenate([np.clip(col + 0.5, 0, 255), np.full((len(uniq), 1), 255.0)], 1).astype(np.uint8)
    mesh = trimesh.Trimesh(uniq, inv[tm.faces], vertex_colors=rgba, process=False)
    path.write_bytes(mesh.export(file_type="ply", encoding="binary"))
    return path
