"""Textured mesh from a fitted scene (DESIGN §8): RGB-D-alpha renders from a ring
plus extra elevations -> mask-aware TSDF fusion -> marching cubes -> pymeshlab
clean-up -> quadric decimation to the face budget -> LODs -> xatlas UVs -> albedo
baked from posed views.

Everything here works in our world frame (+Y up, face toward +Z, world units);
scaling to metres and the pivot are gltf.py's business.

`render_fn` in this module is *bound to a scene*:
    render_fn(c2w (N,4,4), K_norm (N,3,3), width, height) -> (rgba uint8 (N,H,W,4), depth float32 (N,H,W))
with depth the camera-space z, 0 where empty (see `bind_renderer`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import trimesh

from .. import cameras
from ..config import ExportConfig
from ..errors import StageError
from ..types import ViewSet
from .mesh_render import mesh_depth, render_textured

BoundRenderFn = Callable[[np.ndarray, np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]
Progress = Callable[[int, int, str], None] | None

ALPHA_THRESHOLD = 0.5          # a pixel belongs to the head when its alpha is above this


def bind_renderer(render_fn, scene, **kwargs) -> BoundRenderFn:
    """`recon.fit.render.render_scene`-like function + a scene -> a bound renderer."""
    def bound(c2w, K_norm, width, height):
        return render_fn(scene, np.asarray(c2w), np.asarray(K_norm), int(width), int(height), **kwargs)
    return bound


# ----------------------------------------------------------------------- cameras
def meshing_cameras(n_azimuth: int = 8, elevations=(-30.0, 0.0, 30.0, 60.0), poles: bool = True) -> np.ndarray:
    """Cameras (M, 4, 4) on rings at several elevations plus top and bottom views.

    The ring alone never sees the crown or under the chin; the poles (±89°, the
    look-at is singular at exactly ±90) close those regions for the carving.
    """
    az, el = [], []
    for e in elevations:
        for i in range(n_azimuth):
            # stagger rings by half a step so elevations do not share silhouettes
            az.append(360.0 * (i + 0.5 * (len(az) // n_azimuth % 2)) / n_azimuth)
            el.append(e)
    if poles:
        az += [0.0, 0.0]
        el += [89.0, -89.0]
    return cameras.orbit_cam2world(np.array(az), np.array(el))


def render_views(render_fn: BoundRenderFn, c2w: np.ndarray, size: int, batch: int = 8,
                 progress: Progress = None, label: str = "render") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render (rgba, depth, K_norm) at size x size in batches (bounded memory)."""
    n = len(c2w)
    K = np.repeat(cameras.INTRINSICS_NORM[None], n, axis=0)
    rgba = np.zeros((n, size, size, 4), np.uint8)
    depth = np.zeros((n, size, size), np.float32)
    for s in range(0, n, batch):
        e = min(n, s + batch)
        r, d = render_fn(c2w[s:e], K[s:e], size, size)
        rgba[s:e], depth[s:e] = r, d
        if progress:
            progress(e, n, label)
    return rgba, depth, K


# -------------------------------------------------------------------------- TSDF
@dataclass
class Grid:
    origin: np.ndarray   # (3,) world position of voxel (0, 0, 0)'s centre
    voxel: float         # voxel edge length (world units)
    res: int

    def centres(self) -> torch.Tensor:
        ax = torch.arange(self.res, dtype=torch.float32) * self.voxel
        x, y, z = torch.meshgrid(ax + float(self.origin[0]), ax + float(self.origin[1]), ax + float(self.origin[2]), indexing="ij")
        return torch.stack([x, y, z], -1).reshape(-1, 3)


def grid_for_bounds(bounds: np.ndarray, res: int) -> Grid:
    """A cubic grid of res^3 voxels covering the (2, 3) box `bounds` (cubic voxels)."""
    lo, hi = np.asarray(bounds[0], np.float64), np.asarray(bounds[1], np.float64)
    side = float((hi - lo).max())
    centre = 0.5 * (lo + hi)
    voxel = side / (res - 1)
    return Grid(origin=centre - 0.5 * side, voxel=voxel, res=res)


def tsdf_at(points: torch.Tensor, rgba: np.ndarray, depth: np.ndarray, c2w: np.ndarray, K_norm: np.ndarray,
            trunc: float) -> torch.Tensor:
    """Mask-aware truncated signed distance at (P, 3) world points: (P,) in [-1, 1],
    > 0 outside, < 0 inside.

    A point that projects onto a background pixel (alpha < threshold) of any view is
    carved (outside); a point in front of the observed depth gets +; a point just
    behind it gets the truncated signed distance; points that every view sees as
    hidden behind the surface are inside; points no view ever saw are outside.
    """
    n, h, w = depth.shape
    v = points.shape[0]
    acc = torch.zeros(v)
    wsum = torch.zeros(v)
    carved = torch.zeros(v, dtype=torch.bool)
    seen = torch.zeros(v, dtype=torch.bool)
    active = torch.arange(v)              # carving is final: carved points leave the work list
    Kp = cameras.intrinsics_pixels(K_norm, w, h)
    alpha = torch.as_tensor(rgba[..., 3].reshape(n, -1))
    dflat = torch.as_tensor(depth.reshape(n, -1))
    # a fixed shuffle so early views come from all around and carve most points first
    for i in np.random.RandomState(0).permutation(n):
        w2c = torch.as_tensor(np.linalg.inv(c2w[i]), dtype=torch.float32)
        pc = points[active] @ w2c[:3, :3].T + w2c[:3, 3]        # (A, 3) camera coords
        z = pc[:, 2]
        zs = z.clamp_min(1e-6)
        ix = torch.floor(pc[:, 0] / zs * float(Kp[i, 0, 0]) + float(Kp[i, 0, 2])).long()
        iy = torch.floor(pc[:, 1] / zs * float(Kp[i, 1, 1]) + float(Kp[i, 1, 2])).long()
        inside = (z > 1e-4) & (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        loc = torch.nonzero(inside).squeeze(1)                  # positions within `active`
        idx = active[loc]
        pix = iy[loc] * w + ix[loc]
        a = alpha[i][pix]
        d = dflat[i][pix]
        seen[idx] = True
        bg = (a < int(ALPHA_THRESHOLD * 255)) | (d <= 0)
        carved[idx[bg]] = True
        fg = ~bg
        sdf = d[fg] - z[loc[fg]]                                 # > 0: point in front of the surface
        near = sdf > -trunc
        sel = idx[fg][near]
        acc[sel] += (sdf[near] / trunc).clamp(-1.0, 1.0)
        wsum[sel] += 1.0
        active = active[~carved[active]]
    tsdf = torch.where(wsum > 0, acc / wsum.clamp_min(1e-6), torch.full_like(acc, -1.0))
    tsdf[carved | ~seen] = 1.0
    return tsdf


TSDF_TRUNC_SIDE = 0.04         # default TSDF truncation: 4 % of the grid's side (5 voxels at 128^3) ...
TSDF_TRUNC_MIN_VOXELS = 3.0    # ... but never under 3 voxels (see fuse_tsdf)


def fuse_tsdf(rgba: np.ndarray, depth: np.ndarray, c2w: np.ndarray, K_norm: np.ndarray, grid: Grid,
              trunc: float | None = None, coarse: bool = True) -> np.ndarray:
    """(R, R, R) float32 TSDF over `grid` (see tsdf_at).

    Two levels: the TSDF on every other voxel first, then full resolution only in a
    band around the coarse surface (two coarse voxels wide); elsewhere the coarse
    sign is exact enough (far voxels are ±1 anyway). About 4x less work at 128^3.

    `trunc` defaults to max(TSDF_TRUNC_SIDE x the grid's side, TSDF_TRUNC_MIN_VOXELS
    voxels): a world-space width (depth noise does not shrink with the voxels), with a
    floor so coarse grids still have a band to interpolate. tsdf_at drops a view's vote for a
    point more than `trunc` behind that view's depth (occlusion), but keeps the +1 of
    points in front: with noisy depth (splat renders) that asymmetry pulls the surface
    inward unless `trunc` is several times the noise. Measured (benchmarks/bench_fit.py
    default preset, mesh_resolution 128): 3 -> 5 voxels took Chamfer 0.93 -> 0.80 % of
    head height on a fitted scene, 0.33 -> 0.35 % on exact GT renders. On coarse grids
    (40^3) 5 voxels are 12 % of the side and round off a nose; hence the side fraction.
    """
    if trunc is None:
        trunc = max(TSDF_TRUNC_SIDE * grid.voxel * (grid.res - 1), TSDF_TRUNC_MIN_VOXELS * grid.voxel)
    r = grid.res
    if not coarse or r < 24:
        return tsdf_at(grid.centres(), rgba, depth, c2w, K_norm, trunc).reshape(r, r, r).numpy()
    rc = r // 2 + 1                                      # 2 rc - 1 >= r fine voxels
    cgrid = Grid(origin=grid.origin, voxel=2 * grid.voxel, res=rc)          # coarse centre i = fine centre 2i
    vc = tsdf_at(cgrid.centres(), rgba, depth, c2w, K_norm, trunc).reshape(1, 1, rc, rc, rc)
    fine = torch.nn.functional.interpolate(vc, size=(2 * rc - 1,) * 3, mode="trilinear", align_corners=True)
    fine = fine[0, 0, :r, :r, :r].contiguous()
    band_c = torch.nn.functional.max_pool3d((vc.abs() < 0.999).float(), 5, stride=1, padding=2) > 0
    band = torch.nn.functional.interpolate(band_c.float(), size=(2 * rc - 1,) * 3, mode="nearest")[0, 0, :r, :r, :r] > 0
    band |= torch.nn.functional.max_pool3d(band[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    idx = torch.nonzero(band.reshape(-1)).squeeze(1)
    ijk = torch.stack([idx // (r * r), (idx // r) % r, idx % r], 1).float()
    pts = ijk * grid.voxel + torch.as_tensor(grid.origin, dtype=torch.float32)
    flat = fine.reshape(-1)
    flat[idx] = tsdf_at(pts, rgba, depth, c2w, K_norm, trunc)
    return flat.reshape(r, r, r).numpy()


def marching_cubes(tsdf: np.ndarray, grid: Grid) -> trimesh.Trimesh:
    from skimage.measure import marching_cubes as _mc

    if not (tsdf.min() < 0 < tsdf.max()):
        raise StageError("mesh extraction found no surface: the TSDF has no zero crossing",
                         hint="the scene renders empty or fills the whole grid; check the fit (alpha) and the head bounds",
                         stage="export")
    # pad with 'outside' so the surface is closed where the head leaves the grid
    vol = np.pad(tsdf, 1, constant_values=1.0)
    verts, faces, _, _ = _mc(vol, level=0.0, spacing=(grid.voxel,) * 3)
    verts = verts - grid.voxel + grid.origin
    mesh = trimesh.Trimesh(verts, faces, process=True)
    if mesh.volume < 0:          # we want outward normals whatever skimage's winding is
        mesh.invert()
    return mesh


def largest_component(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    keep = np.bincount(labels).argmax()
    sub = mesh.submesh([np.nonzero(labels == keep)[0]], append=True)
    return sub


# ------------------------------------------------------------------- clean + decimate
def _ms_from(mesh: trimesh.Trimesh):
    import pymeshlab

    ms = pymeshlab.MeshSet()
    ms.add_mesh(pymeshlab.Mesh(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int32)))
    return ms


def _to_trimesh(ms) -> trimesh.Trimesh:
    m = ms.current_mesh()
    return trimesh.Trimesh(m.vertex_matrix().copy(), m.face_matrix().copy(), process=False)


def clean_mesh(mesh: trimesh.Trimesh, smooth_steps: int = 3) -> trimesh.Trimesh:
    """Duplicates, degenerate faces, small islands, non-manifold repair, holes, light Taubin smoothing."""
    import pymeshlab

    ms = _ms_from(mesh)
    ms.meshing_remove_duplicate_vertices()
    ms.meshing_remove_duplicate_faces()
    ms.meshing_remove_null_faces()
    ms.meshing_remove_connected_component_by_face_number(mincomponentsize=max(25, len(mesh.faces) // 100))
    ms.meshing_repair_non_manifold_edges(method=0)
    ms.meshing_repair_non_manifold_vertices()
    ms.meshing_remove_unreferenced_vertices()
    try:
        ms.meshing_close_holes(maxholesize=200)
    except pymeshlab.PyMeshLabException:
        pass  # close_holes refuses meshes it judges non-manifold; the mesh stays as repaired
    if smooth_steps > 0:
        # marching cubes on a coarse grid leaves voxel terraces; Taubin keeps the volume
        ms.apply_coord_taubin_smoothing(stepsmoothnum=smooth_steps)
    ms.meshing_remove_unreferenced_vertices()
    out = _to_trimesh(ms)
    out.fix_normals()
    return out


def decimate(mesh: trimesh.Trimesh, faces: int) -> trimesh.Trimesh:
    """Quadric edge collapse to at most `faces` triangles; the budget is checked after."""
    if len(mesh.faces) <= faces:
        return mesh
    ms = _ms_from(mesh)
    target = faces
    # quadric collapse can stop a little above the target: ask for less; when keeping the
    # topology blocks it (tiny budgets on a surface with handles), the last tries may close them
    for attempt in range(5):
        ms.meshing_decimation_quadric_edge_collapse(targetfacenum=int(target), preservenormal=True,
                                                   preservetopology=attempt < 3, qualitythr=0.3, planarquadric=True,
                                                   autoclean=True)
        got = ms.current_mesh().face_number()
        if got <= faces:
            return _to_trimesh(ms)
        target = max(4, int(target * faces / got * 0.98))
    raise StageError(f"decimation could not meet the face budget: {got} faces > export.faces={faces}",
                     hint="raise export.faces or lower export.mesh_resolution", stage="export")


# --------------------------------------------------------------------------- UVs
def unwrap(mesh: trimesh.Trimesh, texture: int, face_texel_scale: float = 1.0
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """xatlas charts packed for a texture x texture image; the face region (front of
    the head, see uv_atlas.face_region) gets `face_texel_scale` times the linear
    texel density of the rest (1.0 = uniform).

    Returns (vmapping (V',) original vertex per new vertex, faces (F,3) into the new
    vertices, uvs (V',2) in [0,1] with v up (OBJ/trimesh convention), face_ids (F,)
    the original face of each new face).
    """
    from .uv_atlas import unwrap_atlas

    return unwrap_atlas(np.asarray(mesh.vertices), np.asarray(mesh.faces), np.asarray(mesh.vertex_normals), texture,
                        face_texel_scale)


# ------------------------------------------------------------------------- baking
def rasterize_uv(uvs: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texels covered by each UV triangle. Returns (texel flat index (T,), face id (T,),
    barycentrics (T, 3)). Texel (row, col) centre is at uv = ((col+.5)/S, 1-(row+.5)/S)."""
    # triangle corners in texel space (x = col, y = row), centres at integer + 0.5
    tri = uvs[faces]                                  # (F, 3, 2)
    px = tri[..., 0] * size - 0.5
    py = (1.0 - tri[..., 1]) * size - 0.5
    x0 = np.clip(np.floor(px.min(1)), 0, size - 1).astype(np.int64)
    x1 = np.clip(np.ceil(px.max(1)), 0, size - 1).astype(np.int64)
    y0 = np.clip(np.floor(py.min(1)), 0, size - 1).astype(np.int64)
    y1 = np.clip(np.ceil(py.max(1)), 0, size - 1).astype(np.int64)
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    counts = bw * bh
    fid = np.repeat(np.arange(len(faces)), counts)
    start = np.repeat(np.cumsum(counts) - counts, counts)
    local = np.arange(counts.sum()) - start
    cx = x0[fid] + local % bw[fid]
    cy = y0[fid] + local // bw[fid]
    # barycentrics of the texel centre
    ax, ay = px[fid, 0], py[fid, 0]
    e1x, e1y = px[fid, 1] - ax, py[fid, 1] - ay
    e2x, e2y = px[fid, 2] - ax, py[fid, 2] - ay
    den = e1x * e2y - e2x * e1y
    ok = np.abs(den) > 1e-12
    den = np.where(ok, den, 1.0)
    qx, qy = cx - ax, cy - ay
    b1 = (qx * e2y - e2x * qy) / den
    b2 = (e1x * qy - qx * e1y) / den
    b0 = 1.0 - b1 - b2
    eps = -1e-3   # include texels on shared edges so islands have no cracks
    keep = ok & (b0 >= eps) & (b1 >= eps) & (b2 >= eps)
    bary = np.stack([b0, b1, b2], 1)[keep]
    return (cy * size + cx)[keep], fid[keep], np.clip(bary, 0.0, 1.0)


def dilate(color: np.ndarray, weight: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Grow filled texels outward by `steps` texels, each new texel the mean of its
    filled 3x3 neighbours: gutters take their own island's colour (no bleeding of
    neighbouring islands into seams under bilinear filtering)."""
    import cv2

    c = (color * (weight > 0)[..., None]).astype(np.float32)
    m = (weight > 0).astype(np.float32)
    for _ in range(steps):
        cs = cv2.boxFilter(c, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        ms = cv2.boxFilter(m, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        grow = (m == 0) & (ms > 0)
        if not grow.any():
            break
        c[grow] = cs[grow] / ms[grow][:, None]
        m[grow] = 1.0
    return c, m


def push_pull_fill(color: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Fill texels with weight 0 from their neighbourhood (a mip pyramid pushed down
    and pulled up). Covers unseen texels inside islands and the gutters around them,
    so bilinear filtering and mipmaps do not bleed background into the seams."""
    levels = [(color * weight[..., None], weight)]
    c, w = levels[0]
    while min(w.shape) > 1:
        h2, w2 = (w.shape[0] + 1) // 2, (w.shape[1] + 1) // 2
        cp = np.zeros((h2 * 2, w2 * 2, c.shape[2]), c.dtype); cp[: c.shape[0], : c.shape[1]] = c
        wp = np.zeros((h2 * 2, w2 * 2), w.dtype); wp[: w.shape[0], : w.shape[1]] = w
        c = cp.reshape(h2, 2, w2, 2, -1).sum((1, 3))
        w = wp.reshape(h2, 2, w2, 2).sum((1, 3))
        levels.append((c, w))
    c, w = levels[-1]
    fill = c / np.maximum(w, 1e-8)[..., None]
    for c, w in reversed(levels[:-1]):
        up = np.repeat(np.repeat(fill, 2, 0), 2, 1)[: w.shape[0], : w.shape[1]]
        own = c / np.maximum(w, 1e-8)[..., None]
        # blend by weight so partially covered coarse texels do not create halos
        a = np.clip(w, 0.0, 1.0)[..., None]
        fill = own * a + up * (1.0 - a)
    return fill


def bake_texture(positions: np.ndarray, normals: np.ndarray, faces: np.ndarray, uvs: np.ndarray, size: int,
                 images: np.ndarray, c2w: np.ndarray, K_norm: np.ndarray, depth: np.ndarray,
                 depth_c2w: np.ndarray | None = None, power: float = 4.0, tol: float = 0.02,
                 progress: Progress = None) -> tuple[np.ndarray, float]:
    """Albedo (size, size, 3) uint8 from posed RGBA views.

    Per texel: its 3D point and normal (interpolated over its UV triangle), projected
    into every view; a view counts where the point is not hidden (camera z within
    `tol` world units of that view's depth map), the pixel is foreground, and it
    faces the camera; weights are cos(normal, view)^power so near-frontal views
    dominate (sharper than a plain average). `depth` has the views' cameras
    (`depth_c2w` defaults to `c2w`) and may have another resolution than `images`.
    Returns the texture and the fraction of used texels that some view saw.
    """
    texel, fid, bary = rasterize_uv(uvs, faces, size)
    # later triangles win shared-edge texels; dedupe keeps one sample per texel
    texel_u, first = np.unique(texel[::-1], return_index=True)
    sel = len(texel) - 1 - first
    fid, bary = fid[sel], bary[sel]
    p = torch.as_tensor(np.einsum("tk,tkd->td", bary, positions[faces[fid]]), dtype=torch.float32)
    nrm = torch.as_tensor(np.einsum("tk,tkd->td", bary, normals[faces[fid]]), dtype=torch.float32)
    nrm = nrm / nrm.norm(dim=1, keepdim=True).clamp_min(1e-8)
    t = p.shape[0]
    acc = torch.zeros(t, 3)
    wsum = torch.zeros(t)
    n, h, w = images.shape[:3]
    dh, dw = depth.shape[1:]
    Kp = cameras.intrinsics_pixels(K_norm, 1.0, 1.0)   # normalised: u in [0,1]
    imgs = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0   # (N,4,H,W)
    dep = torch.as_tensor(depth)[:, None]                               # (N,1,dh,dw)
    for i in range(n):
        # back-facing texels first: about half of them never need projecting
        cam = torch.as_tensor(c2w[i][:3, 3], dtype=torch.float32)
        view_dir = cam - p
        cos = (nrm * view_dir).sum(1) / view_dir.norm(dim=1)
        sel = torch.nonzero(cos > 0.05).squeeze(1)
        ps, cs = p[sel], cos[sel]
        w2c = torch.as_tensor(np.linalg.inv(c2w[i]), dtype=torch.float32)
        pc = ps @ w2c[:3, :3].T + w2c[:3, 3]
        z = pc[:, 2].clamp_min(1e-6)
        un = pc[:, 0] / z * float(Kp[i, 0, 0]) + float(Kp[i, 0, 2])
        vn = pc[:, 1] / z * float(Kp[i, 1, 1]) + float(Kp[i, 1, 2])
        ok = (un >= 0) & (un < 1) & (vn >= 0) & (vn < 1) & (pc[:, 2] > 1e-4)
        grid = torch.stack([un * 2 - 1, vn * 2 - 1], -1)[None, None]    # (1,1,T,2), align_corners=False
        col = torch.nn.functional.grid_sample(imgs[i : i + 1], grid, mode="bilinear", align_corners=False)[0, :, 0].T
        if depth_c2w is None:
            zd = pc[:, 2]
        else:
            w2cd = torch.as_tensor(np.linalg.inv(depth_c2w[i]), dtype=torch.float32)
            zd = (ps @ w2cd[:3, :3].T + w2cd[:3, 3])[:, 2]
        d = torch.nn.functional.grid_sample(dep[i : i + 1], grid, mode="nearest", align_corners=False)[0, 0, 0]
        vis = ok & (d > 0) & (zd <= d + tol) & (col[:, 3] > ALPHA_THRESHOLD)
        wt = torch.where(vis, cs ** power * col[:, 3], torch.zeros_like(cs))
        acc.index_add_(0, sel, wt[:, None] * col[:, :3])
        wsum.index_add_(0, sel, wt)
        if progress:
            progress(i + 1, n, "bake texture")
    color = np.zeros((size * size, 3), np.float32)
    weight = np.zeros(size * size, np.float32)
    seen = (wsum > 0).numpy()
    color[texel_u] = (acc / wsum.clamp_min(1e-8)[:, None]).numpy()
    weight[texel_u] = seen.astype(np.float32)
    color, weight = dilate(color.reshape(size, size, 3), weight.reshape(size, size), steps=max(2, size // 128))
    filled = push_pull_fill(color, weight)
    img = np.clip(filled * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return img, float(seen.mean()) if len(seen) else 0.0


def sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear texture lookup at (M, 2) uvs (v up) -> (M, C) float in the image's range."""
    s_h, s_w = image.shape[:2]
    x = np.clip(uv[:, 0] * s_w - 0.5, 0, s_w - 1)
    y = np.clip((1.0 - uv[:, 1]) * s_h - 0.5, 0, s_h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, s_w - 1), np.minimum(y0 + 1, s_h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    im = image.astype(np.float64)
    return (im[y0, x0] * (1 - fx) * (1 - fy) + im[y0, x1] * fx * (1 - fy)
            + im[y1, x0] * (1 - fx) * fy + im[y1, x1] * fx * fy)


# ----------------------------------------------------------------------- pipeline
@dataclass
class TexturedMesh:
    """One LOD: geometry with per-vertex UVs (split at seams) and its albedo; optionally
    a tangent-space normal map of the dense surface with the tangents it was baked in
    (glTF conventions, see normal_map.py)."""

    vertices: np.ndarray     # (V, 3) world units
    faces: np.ndarray        # (F, 3)
    uvs: np.ndarray          # (V, 2) v up
    normals: np.ndarray      # (V, 3)
    texture: np.ndarray      # (S, S, 3) uint8
    coverage: float | None = None   # fraction of used texels some view saw (the rest is filled)
    normal_map: np.ndarray | None = None   # (S, S, 3) uint8, RGB = (n_ts + 1) / 2, +Y green (glTF)
    tangents: np.ndarray | None = None     # (V, 4) float32: xyz unit, orthogonal to normals; w = ±1 handedness

    @property
    def num_faces(self) -> int:
        return int(len(self.faces))

    def render(self, c2w, K_norm, width, height):
        """Bound-renderer contract (rgba, depth): the textured mesh instead of the splats."""
        return render_textured(self.vertices, self.faces, self.uvs, self.normals, self.texture,
                               np.asarray(c2w), np.asarray(K_norm), int(width), int(height))

    def to_trimesh(self, material=None) -> trimesh.Trimesh:
        from PIL import Image

        if material is None:
            material = trimesh.visual.material.PBRMaterial(
                name="head_albedo", baseColorTexture=Image.fromarray(self.texture), metallicFactor=0.0, roughnessFactor=0.8)
        visual = trimesh.visual.TextureVisuals(uv=self.uvs, material=material)
        return trimesh.Trimesh(self.vertices, self.faces, vertex_normals=self.normals, visual=visual, process=False)


def surface_mesh(render_fn: BoundRenderFn, cfg: ExportConfig, bounds: np.ndarray, *, n_azimuth: int = 8,
                 progress: Progress = None, timings: dict | None = None) -> tuple[trimesh.Trimesh, dict]:
    """Renders + TSDF + marching cubes + clean: the untextured surface (world units).
    Also returns the renders (for baking when no ViewSet is given)."""
    timings = {} if timings is None else timings
    t0 = time.process_time()
    c2w = meshing_cameras(n_azimuth)
    rgba, depth, K = render_views(render_fn, c2w, cfg.render_resolution, progress=progress, label="render for meshing")
    t0 = _tick(timings, "mesh_render", t0)
    if not (rgba[..., 3] >= ALPHA_THRESHOLD * 255).any():
        raise StageError("the scene renders empty from every meshing camera",
                         hint="the fitted scene has no opaque Gaussians near the origin; check the fit", stage="export")
    grid = grid_for_bounds(bounds, cfg.mesh_resolution)
    tsdf = fuse_tsdf(rgba, depth, c2w, K, grid)
    t0 = _tick(timings, "tsdf", t0)
    mesh = largest_component(marching_cubes(tsdf, grid))
    mesh = clean_mesh(mesh)
    _tick(timings, "marching_cubes_clean", t0)
    if len(mesh.faces) < 4:
        raise StageError("mesh clean-up left no surface", hint="raise export.mesh_resolution", stage="export")
    return mesh, {"rgba": rgba, "depth": depth, "c2w": c2w, "K": K}


def _tick(timings: dict, name: str, t0: float) -> float:
    """Record CPU seconds (all threads) since t0; CPU time, not wall, so a busy machine does not distort it."""
    t = time.process_time()
    timings[name] = round(t - t0, 3)
    return t


def extract_mesh(render_fn: BoundRenderFn, cfg: ExportConfig, *, views: ViewSet | None = None,
                 bounds: np.ndarray | None = None, n_azimuth: int = 8, progress: Progress = None) -> trimesh.Trimesh:
    """LOD0 of the textured head mesh (world units), as a trimesh with a PBR texture;
    every LOD of cfg.lods is built and baked too (see build_lods).

    render_fn: bound renderer (see module doc). views: the ViewSet the scene was fitted
    to; its images are baked into the texture (visibility from the mesh's own
    z-buffer at the views' cameras); without it the meshing renders are used.
    bounds: (2, 3) world box holding the head (default: the box the ring cameras all see).
    n_azimuth: cameras per meshing ring (4 rings at -30, 0, 30, 60 degrees + 2 poles).
    The result's metadata:
      "textured": LOD0's TexturedMesh (= "lods"[0]),
      "lods": list[TexturedMesh], one per cfg.lods fraction, LOD0 first,
      "dense": the clean undecimated surface (trimesh) the LOD chain was decimated from,
      "renders": the meshing renders {"rgba", "depth", "c2w", "K"},
      "export": the numbers (with CPU seconds per step in "cpu_s").
    """
    if bounds is None:
        half = cameras.RADIUS * math.tan(math.radians(cameras.FOV_DEG) / 2) * 1.05
        bounds = np.array([[-half] * 3, [half] * 3])
    timings: dict = {}
    dense, renders = surface_mesh(render_fn, cfg, bounds, n_azimuth=n_azimuth, progress=progress, timings=timings)
    lods = build_lods(dense, cfg.lods, cfg.faces, cfg=cfg, views=views, renders=renders, progress=progress,
                      timings=timings)
    tm = lods[0]
    out = tm.to_trimesh()
    out.metadata["textured"] = tm
    out.metadata["lods"] = lods
    out.metadata["dense"] = dense
    out.metadata["renders"] = renders
    out.metadata["export"] = {"faces_marching_cubes": int(len(dense.faces)), "faces": tm.num_faces, **tm_info(tm),
                              "texel_coverage": tm.coverage, "meshing_views": int(len(renders["c2w"])),
                              "faces_per_lod": [t.num_faces for t in lods],
                              "texture_per_lod": [int(t.texture.shape[0]) for t in lods],
                              "face_texel_scale": float(cfg.face_texel_scale), "normal_map": bool(cfg.normal_map),
                              "cpu_s": timings}
    return out


def tm_info(tm: TexturedMesh) -> dict:
    return {"vertices": int(len(tm.vertices)), "texture": int(tm.texture.shape[0])}


def texture_mesh(mesh: trimesh.Trimesh, cfg: ExportConfig, *, views: ViewSet | None,
                 renders: dict | None, progress: Progress = None, timings: dict | None = None,
                 texture: int | None = None, dense: trimesh.Trimesh | None = None, tag: str = "",
                 depth: np.ndarray | None = None) -> TexturedMesh:
    """UV-unwrap `mesh` (face region at cfg.face_texel_scale) and bake its albedo from
    the views (or the meshing renders); with cfg.normal_map and a `dense` surface, also
    its tangents and a tangent-space normal map of `dense`.

    The colours come from images already rendered (views, else the meshing renders).
    texture: side of the maps
    (default cfg.texture). tag: suffix of the timing keys (one LOD's name).
    depth: the visibility z-buffers at the bake cameras (bake_depth); default: this
    mesh's own (build_lods shares LOD0's between the LODs: the z-buffer is most of a
    bake's cost and the 2% visibility tolerance covers the LODs' differences).
    """
    timings = {} if timings is None else timings
    size = int(cfg.texture if texture is None else texture)
    images, c2w, K = _bake_sources(views, renders)
    t0 = time.process_time()
    vmap, faces, uvs, _ = unwrap(mesh, size, cfg.face_texel_scale)
    t0 = _tick(timings, f"uv_unwrap{tag}", t0)
    verts = np.asarray(mesh.vertices)[vmap]
    normals = np.asarray(mesh.vertex_normals)[vmap]
    extent = float(np.ptp(mesh.vertices, axis=0).max())
    tol = 0.02 * extent
    if depth is None:
        depth = bake_depth(mesh, cfg, views=views, renders=renders)
    label = (lambda i, n, msg: progress(i, n, f"{msg} ({tag.strip('_')})")) if (progress and tag) else progress
    tex, coverage = bake_texture(verts, normals, faces, uvs, size, images, c2w, K, depth, tol=tol, progress=label)
    t0 = _tick(timings, f"bake{tag}", t0)
    nmap = tangents = None
    if cfg.normal_map:
        from .normal_map import bake_normal_map, vertex_tangents

        if dense is None:
            raise StageError("export.normal_map needs the dense surface to bake from",
                             hint="call texture_mesh(..., dense=the surface_mesh result) or build_lods", stage="export")
        tangents = vertex_tangents(verts, normals, faces, uvs)
        nmap = bake_normal_map(verts, normals, tangents, faces, uvs, size, np.asarray(dense.vertices),
                               np.asarray(dense.faces), np.asarray(dense.vertex_normals))
        _tick(timings, f"normal_map{tag}", t0)
    return TexturedMesh(verts, faces, uvs, normals, tex, coverage, normal_map=nmap, tangents=tangents)


def _bake_sources(views: ViewSet | None, renders: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, c2w, K) the albedo is baked from: the fitted views, else the meshing renders."""
    if views is not None:
        return views.images, views.c2w, views.K      # colours from the fitted views
    if renders is None:
        raise StageError("texture_mesh has nothing to bake from: no ViewSet and no meshing renders",
                         hint="pass views= or renders= (surface_mesh returns the renders)", stage="export")
    return renders["rgba"], renders["c2w"], renders["K"]


def bake_depth(mesh: trimesh.Trimesh, cfg: ExportConfig, *, views: ViewSet | None, renders: dict | None) -> np.ndarray:
    """Visibility z-buffers (N, R, R) of `mesh` at the bake cameras (the surface being
    textured, so occlusion is exact and cheap), R = min(cfg.render_resolution, image side)."""
    images, c2w, K = _bake_sources(views, renders)
    res = min(cfg.render_resolution, images.shape[1])
    return mesh_depth(np.asarray(mesh.vertices), np.asarray(mesh.faces), c2w, K, res, res)


def lod_texture_size(texture: int, lod: int) -> int:
    """Texture side of LOD `lod`: halved per level, never below 256 nor above `texture`
    (a 0.1 LOD is for distant views; 1024 -> 1024, 512, 256, 256)."""
    return int(min(texture, max(256, int(texture) >> lod)))


def lod_meshes(dense: trimesh.Trimesh, fractions, faces: int) -> list[trimesh.Trimesh]:
    """Untextured LOD geometry: the dense surface decimated to each budget fractions[i] *
    faces in turn, LOD i+1 from LOD i (no UVs yet, so no seam can stop the collapse).
    fractions must decrease strictly; each budget is checked exactly."""
    fr = [float(f) for f in fractions]
    if not fr:
        raise StageError("export.lods is empty", hint="e.g. 1,0.5,0.25,0.1", stage="export")
    if any(b >= a for a, b in zip(fr, fr[1:])):
        raise StageError(f"export.lods={tuple(fr)} must be strictly decreasing", hint="e.g. 1,0.5,0.25,0.1", stage="export")
    if not all(0 < f <= 1 for f in fr):
        raise StageError(f"export.lods={tuple(fr)} must be fractions in (0, 1]", hint="e.g. 1,0.5,0.25,0.1", stage="export")
    out = []
    src = dense
    for f in fr:
        budget = max(4, int(f * faces))
        # each LOD from the previous one (a chain, as engines' LOD tools do): the dense
        # surface is collapsed once, not once per LOD (4x less decimation work)
        m = decimate(src, budget)
        src = m
        if len(m.faces) > budget:       # decimate checks too; this is the contract of this function
            raise StageError(f"LOD at {f} of export.faces={faces} has {len(m.faces)} faces > {budget}", stage="export")
        out.append(m)
    return out


def build_lods(dense: trimesh.Trimesh, fractions, faces: int, *, cfg: ExportConfig | None = None,
               views: ViewSet | None = None, renders: dict | None = None, progress: Progress = None,
               timings: dict | None = None) -> list[TexturedMesh]:
    """Textured LODs: LOD i is the dense surface decimated to at most fractions[i] * faces
    triangles (lod_meshes), with its own UV atlas and its own albedo baked from the same
    views (texture side lod_texture_size(cfg.texture, i)); with cfg.normal_map each LOD
    also gets tangents and a normal map of the dense surface. fractions must decrease.

    dense: the clean undecimated surface (surface_mesh). views / renders: what to bake
    from, as in texture_mesh (views win). cfg: texture, face_texel_scale, normal_map,
    render_resolution (default ExportConfig()).
    """
    timings = {} if timings is None else timings
    t0 = time.process_time()
    meshes = lod_meshes(dense, fractions, faces)   # validates fractions before any work
    _tick(timings, "decimate_lods", t0)
    cfg = ExportConfig() if cfg is None else cfg
    t0 = time.process_time()
    depth0 = bake_depth(meshes[0], cfg, views=views, renders=renders)
    _tick(timings, "bake_zbuffer", t0)
    out: list[TexturedMesh] = []
    for i, m in enumerate(meshes):
        # LOD0's z-buffer serves a LOD whose surface stays well within the bake's
        # visibility tolerance (2% of the extent) of LOD0's; a very coarse LOD (flat
        # faces cutting deep inside) gets its own
        tol = 0.02 * float(np.ptp(m.vertices, axis=0).max())
        depth = depth0 if i == 0 or _deviation(m, meshes[0]) < 0.5 * tol else None
        out.append(texture_mesh(m, cfg, views=views, renders=renders, progress=progress, timings=timings,
                                texture=lod_texture_size(cfg.texture, i), dense=dense, tag=f"_lod{i}", depth=depth))
    return out


def _deviation(mesh: trimesh.Trimesh, dense: trimesh.Trimesh) -> float:
    """Largest distance of `mesh`'s vertices and face centroids to the surface `dense`
    (centroids: where flat faces sag furthest from a curved surface)."""
    from .normal_map import closest_on_surface

    v = np.asarray(mesh.vertices)
    pts = np.concatenate([v, v[np.asarray(mesh.faces)].mean(1)])
    return float(closest_on_surface(pts, dense.vertices, dense.faces)[0].max())
