"""UV atlas with more texels on the face (DESIGN §8, issue 5).

A head seen by a person is mostly looked at from the front: a uniform texel
density wastes most of the texture on the back of the skull. xatlas packs every
chart at one texels-per-world-unit rate, so we give it the face region *scaled up*:
the faces are split into a face region and the rest, both are added to ONE
xatlas.Atlas as separate meshes, the face region with its vertices multiplied by
`face_texel_scale`. A uniform scale leaves the charts' shapes (and their
distortion) unchanged but makes them scale^2 larger in the pack, so the face gets
scale^2 times the texels per unit area of the rest. The two meshes are merged
back into one vertex / face / uv set; vertices on the region boundary are split,
which is a UV seam anyway.

World frame: +Y up, the face looks toward +Z (recon/cameras.py).
"""
from __future__ import annotations

import numpy as np

from ..errors import StageError

FACE_CONE_DEG = 55.0          # face region: centroid direction within this angle of +Z ...
FACE_BAND = (-0.40, 0.30)     # ... and y - centre_y within this band (fractions of the head's height)


def face_region(vertices: np.ndarray, faces: np.ndarray, cone_deg: float = FACE_CONE_DEG,
                band: tuple[float, float] = FACE_BAND) -> np.ndarray:
    """(F,) bool: triangles that belong to the face (front of the head).

    The head centre is the centre of the vertices' bounding box; a triangle is in
    the face region when the direction from that centre to its centroid is within
    `cone_deg` of +Z and its centroid's height above the centre is within `band`
    (fractions of the box height: chin to forehead, the neck and crown stay out).
    """
    v = np.asarray(vertices, np.float64)
    lo, hi = v.min(0), v.max(0)
    centre = 0.5 * (lo + hi)
    height = max(float(hi[1] - lo[1]), 1e-12)
    c = v[np.asarray(faces)].mean(1) - centre                          # (F, 3)
    d = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    in_cone = d[:, 2] >= np.cos(np.radians(cone_deg))
    rel_y = c[:, 1] / height
    return in_cone & (rel_y >= band[0]) & (rel_y <= band[1])


def _options(texture: int):
    import xatlas

    chart = xatlas.ChartOptions()
    chart.max_iterations = 1          # cheaper chart growing; quality differences are small for heads
    pack = xatlas.PackOptions()
    pack.resolution = int(texture)
    pack.padding = max(2, int(texture) // 256)   # gutter texels: room for dilation / mipmaps
    pack.bilinear = True
    pack.rotate_charts = True
    return chart, pack


def unwrap_atlas(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, texture: int,
                 face_texel_scale: float = 1.0, region: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """xatlas charts packed for a texture x texture image, the face region at
    `face_texel_scale` times the linear texel density of the rest.

    vertices (V, 3), faces (F, 3), normals (V, 3); region: (F,) bool face-region mask
    (default `face_region`). Returns (vmapping (V',) original vertex per new vertex,
    faces (F, 3) into the new vertices, uvs (V', 2) in [0, 1] with v up (OBJ/trimesh
    convention), face_ids (F,) the original face of each new face).
    """
    import xatlas

    if not (np.isfinite(face_texel_scale) and face_texel_scale > 0):
        raise StageError(f"export.face_texel_scale={face_texel_scale} must be a positive number",
                         hint="1.0 = uniform texel density, 2.0 = twice the linear density on the face", stage="export")
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    n = np.asarray(normals, np.float32)
    if face_texel_scale == 1.0:
        parts = [np.arange(len(f))]
    else:
        region = face_region(v, f) if region is None else np.asarray(region, bool)
        parts = [p for p in (np.nonzero(region)[0], np.nonzero(~region)[0]) if len(p)]
    atlas = xatlas.Atlas()
    submaps = []
    for k, sel in enumerate(parts):
        used, local = np.unique(f[sel], return_inverse=True)
        scale = face_texel_scale if (k == 0 and len(parts) == 2) else 1.0
        atlas.add_mesh(((v[used] - v[used].mean(0)) * scale).astype(np.float32), local.reshape(-1, 3).astype(np.uint32),
                       n[used])
        submaps.append((used, sel))
    atlas.generate(*_options(texture))
    if atlas.atlas_count != 1:
        raise StageError(f"xatlas packed the charts into {atlas.atlas_count} atlases, not one",
                         hint="lower export.face_texel_scale or raise export.texture", stage="export")
    vmaps, fcs, uvs, fids = [], [], [], []
    offset = 0
    for k, (used, sel) in enumerate(submaps):
        vm, fc, uv = atlas[k]
        if len(fc) != len(sel):      # xatlas keeps every input triangle, in order; anything else is a bug
            raise StageError(f"xatlas returned {len(fc)} triangles for {len(sel)}", hint="this is a bug", stage="export")
        vmaps.append(used[vm.astype(np.int64)])
        fcs.append(fc.astype(np.int64) + offset)
        uvs.append(uv.astype(np.float64))
        # xatlas keeps the face order of each added mesh
        fids.append(sel)
        offset += len(vm)
    return np.concatenate(vmaps), np.concatenate(fcs), np.concatenate(uvs), np.concatenate(fids)


def texel_density(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, texture: int) -> np.ndarray:
    """(F,) texels per unit surface area of each triangle (0 for degenerate ones)."""
    p = np.asarray(vertices, np.float64)[faces]
    area3 = 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)
    return uv_area(faces, uvs) * texture**2 / np.maximum(area3, 1e-30) * (area3 > 0)


def uv_area(faces: np.ndarray, uvs: np.ndarray) -> np.ndarray:
    """(F,) signed UV area of each triangle (> 0: counter-clockwise in v-up UV space)."""
    t = np.asarray(uvs, np.float64)[faces]
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    return 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
