"""Mesh files: GLB (PBR material), OBJ + MTL + PNG, PLY with vertex colours.

Frame and units: our world frame already is glTF's (+Y up, the face looks toward
+Z, right-handed), so nothing is rotated; positions are scaled to metres so the
head's height (the mesh's Y extent) is `head_height_m`.

Pivot (the asset origin): the *bottom centre* of the head's bounding box, i.e.
x and z at the box centre and y at the lowest point (base of the neck). The head
stands on the y = 0 plane, which is what engines and DCC tools expect when the
asset is dropped into a scene. `HeadFrame` records the mapping
    p_asset = (p_world - pivot_world) * scale
and the same mapping is applied to the Gaussian splat files so they overlay.

LODs: glTF core cannot hide nodes, and MSFT_lod is a vendor extension most
viewers ignore, so the main `head.glb` holds LOD0 only and every LOD is its own
file `head_lod{i}.glb` (LOD0 included, identical to head.glb's mesh).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from ..errors import StageError
from .mesh import TexturedMesh, sample_texture

PIVOT = "bottom_centre"
PIVOT_NOTE = "origin at the bottom centre of the head's bounding box (x, z centred, y = lowest point); +Y up, face toward +Z"
ROUGHNESS = 0.8
METALLIC = 0.0


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
    # a positive uniform scale and a translation keep normals and winding as they are
    return TexturedMesh(frame.apply(tm.vertices), tm.faces, tm.uvs, tm.normals, tm.texture)


def pbr_material(texture: np.ndarray):
    from PIL import Image

    return trimesh.visual.material.PBRMaterial(
        name="head_albedo", baseColorTexture=Image.fromarray(texture), metallicFactor=METALLIC,
        roughnessFactor=ROUGHNESS, doubleSided=False)


def write_glb(path: str | Path, tm: TexturedMesh, node_name: str = "head") -> Path:
    """One textured mesh (already in the asset frame) as a binary glTF."""
    path = Path(path)
    mesh = tm.to_trimesh(material=pbr_material(tm.texture))
    scene = trimesh.Scene()
    scene.add_geometry(mesh, node_name=node_name, geom_name=node_name)
    data = scene.export(file_type="glb")
    path.write_bytes(data)
    return path


def write_obj(path: str | Path, tm: TexturedMesh) -> list[Path]:
    """`head.obj` + `head.mtl` + `head_albedo.png` next to each other (relative references)."""
    from PIL import Image

    path = Path(path)
    stem = path.with_suffix("")
    mtl, png = stem.with_suffix(".mtl"), Path(f"{stem}_albedo.png")
    Image.fromarray(tm.texture).save(png, format="PNG", compress_level=6)
    mtl.write_text(
        "# portrait3d head material (PBR extension keys Pr/Pm for tools that read them)\n"
        "newmtl head_albedo\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nNs 10\nillum 1\n"
        f"Pr {ROUGHNESS}\nPm {METALLIC}\nmap_Kd {png.name}\n")
    buf = io.StringIO()
    buf.write(f"# portrait3d head: metres, +Y up, face toward +Z; {PIVOT_NOTE}\n")
    buf.write(f"mtllib {mtl.name}\nusemtl head_albedo\n")
    np.savetxt(buf, tm.vertices, fmt="v %.6f %.6f %.6f")
    np.savetxt(buf, tm.uvs, fmt="vt %.6f %.6f")
    np.savetxt(buf, tm.normals, fmt="vn %.5f %.5f %.5f")
    f = tm.faces + 1
    np.savetxt(buf, np.repeat(f, 3, axis=1), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    path.write_text(buf.getvalue())
    return [path, mtl, png]


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
