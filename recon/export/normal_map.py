"""Tangent-space normal maps: the dense surface's detail on a decimated LOD (issue 5).

glTF conventions (core spec, material.normalTexture and TANGENT):
- the texel stores n_ts as RGB = (n_ts + 1) / 2, +X right (tangent = direction of
  increasing u), +Y up (green, "OpenGL": direction of increasing v in our v-up UVs,
  i.e. up in the image), +Z out of the surface;
- TANGENT is a VEC4 per vertex: xyz a unit vector orthogonal to the normal, w = ±1
  the handedness, bitangent = cross(normal, tangent.xyz) * w.
We write our own tangents, so a consumer uses exactly the frame the map was baked
in. The bake inverts what a viewer's shader does: per texel the interpolated
(normalised) tangent, bitangent and normal form a 3x3 basis M and the shaded
normal is normalize(M n_ts); we solve M n_ts = n_dense for n_ts.
"""
from __future__ import annotations

import numpy as np

from ..errors import StageError


# ---------------------------------------------------------------------- tangents
def vertex_tangents(vertices: np.ndarray, normals: np.ndarray, faces: np.ndarray, uvs: np.ndarray) -> np.ndarray:
    """(V, 4) float32 per-vertex tangents: xyz unit and orthogonal to the vertex normal,
    w = +1 or -1 the handedness of the UV layout (-1 where the chart is mirrored).

    Per triangle dP/du and dP/dv from its UVs (Lengyel), each normalised and
    weighted by the triangle's area, summed at its corners; then Gram-Schmidt
    against the vertex normal. Vertices must be split at UV seams (one UV each).
    """
    p = np.asarray(vertices, np.float64)
    n = np.asarray(normals, np.float64)
    n = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    f = np.asarray(faces, np.int64)
    t = np.asarray(uvs, np.float64)
    e1, e2 = p[f[:, 1]] - p[f[:, 0]], p[f[:, 2]] - p[f[:, 0]]
    d1, d2 = t[f[:, 1]] - t[f[:, 0]], t[f[:, 2]] - t[f[:, 0]]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    ok = np.abs(det) > 1e-14
    r = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)[:, None]
    tf = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * r                    # dP/du
    bf = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * r                    # dP/dv
    area = 0.5 * np.linalg.norm(np.cross(e1, e2), axis=1, keepdims=True)
    tf = tf / np.maximum(np.linalg.norm(tf, axis=1, keepdims=True), 1e-30) * area
    bf = bf / np.maximum(np.linalg.norm(bf, axis=1, keepdims=True), 1e-30) * area
    T = np.zeros_like(p)
    B = np.zeros_like(p)
    for k in range(3):
        np.add.at(T, f[:, k], tf)
        np.add.at(B, f[:, k], bf)
    T = T - n * (n * T).sum(1, keepdims=True)
    length = np.linalg.norm(T, axis=1, keepdims=True)
    bad = length[:, 0] < 1e-12
    if bad.any():
        # no usable UV gradient (degenerate UV triangles only): any unit vector
        # orthogonal to the normal keeps the frame valid
        a = np.where(np.abs(n[bad, 0:1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
        alt = a - n[bad] * (n[bad] * a).sum(1, keepdims=True)
        T[bad] = alt
        length[bad] = np.linalg.norm(alt, axis=1, keepdims=True)
    T = T / length
    w = np.where((np.cross(n, T) * B).sum(1) < 0, -1.0, 1.0)
    return np.concatenate([T, w[:, None]], 1).astype(np.float32)


# ------------------------------------------------------------ closest dense point
def _one_ring(faces: np.ndarray, n_vertices: int, cap: int = 16) -> np.ndarray:
    """(V, cap) faces around each vertex, padded with the vertex's first face."""
    f = np.asarray(faces, np.int64)
    vid = f.reshape(-1)
    fid = np.repeat(np.arange(len(f)), 3)
    order = np.argsort(vid, kind="stable")
    vid, fid = vid[order], fid[order]
    count = np.bincount(vid, minlength=n_vertices)
    start = np.cumsum(count) - count
    rank = np.arange(len(vid)) - start[vid]
    cap = int(min(cap, max(1, count.max())))       # marching-cubes meshes have valence ~6: no wasted columns
    table = np.full((n_vertices, cap), -1, np.int64)
    keep = rank < cap
    table[vid[keep], rank[keep]] = fid[keep]
    first = np.where(count > 0, table[:, 0], 0)
    return np.where(table < 0, first[:, None], table)


def _closest_on_triangles(q: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest points of (..., 3) query points on triangles (a, b, c): (squared distance, barycentrics (..., 3))."""
    ab, ac, aq = b - a, c - a, q - a
    d00 = (ab * ab).sum(-1)
    d01 = (ab * ac).sum(-1)
    d11 = (ac * ac).sum(-1)
    d20 = (aq * ab).sum(-1)
    d21 = (aq * ac).sum(-1)
    den = d00 * d11 - d01 * d01
    den = np.where(np.abs(den) > 1e-30, den, 1e-30)
    v = (d11 * d20 - d01 * d21) / den
    w = (d00 * d21 - d01 * d20) / den
    bary = np.stack([1.0 - v - w, v, w], -1)
    inside = (bary >= 0).all(-1)
    best_p = a + v[..., None] * ab + w[..., None] * ac
    best_d = np.where(inside, ((q - best_p) ** 2).sum(-1), np.inf)
    # outside the triangle: the closest point is on one of its edges
    for i, (p0, p1) in enumerate(((a, b), (b, c), (c, a))):
        e = p1 - p0
        t = np.clip(((q - p0) * e).sum(-1) / np.maximum((e * e).sum(-1), 1e-30), 0.0, 1.0)
        pe = p0 + t[..., None] * e
        de = ((q - pe) ** 2).sum(-1)
        better = ~inside & (de < best_d)
        be = np.zeros(bary.shape)
        be[..., i] = 1.0 - t
        be[..., (i + 1) % 3] = t
        bary = np.where(better[..., None], be, bary)
        best_d = np.where(better, de, best_d)
    return best_d, bary


def closest_on_surface(points: np.ndarray, dense_vertices: np.ndarray, dense_faces: np.ndarray,
                       query_normals: np.ndarray | None = None, chunk: int = 65536
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest points of (P, 3) `points` on a dense triangle mesh.

    Nearest dense vertex (KD-tree), then the closest point on the triangles around it
    (exact where the closest triangle touches the nearest vertex, which holds for
    points near a fine mesh). query_normals (P, 3): the low-poly surface's normals;
    then the nearest vertex is searched in (position, lam * normal) space (lam = two
    mean dense edges), so a vertex of the far side of a thin part (an ear) loses to
    one facing the same way, and triangles facing away are skipped when another
    candidate faces the same way.
    Returns (distance (P,), triangle's vertex ids (P, 3), barycentrics (P, 3)).
    """
    from scipy.spatial import cKDTree

    dv = np.asarray(dense_vertices, np.float64)
    df = np.asarray(dense_faces, np.int64)
    ring = _one_ring(df, len(dv))
    fn = np.cross(dv[df[:, 1]] - dv[df[:, 0]], dv[df[:, 2]] - dv[df[:, 0]])     # unnormalised face normals
    if query_normals is None:
        tree = cKDTree(dv)
    else:
        vn = np.zeros_like(dv)
        for k in range(3):
            np.add.at(vn, df[:, k], fn)
        vn /= np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-30)
        lam = 2.0 * float(np.linalg.norm(dv[df[:, 1]] - dv[df[:, 0]], axis=1).mean())
        tree = cKDTree(np.concatenate([dv, lam * vn], 1))
    origin = dv.mean(0)
    dv32 = (dv - origin).astype(np.float32)
    dist = np.zeros(len(points))
    tris = np.zeros((len(points), 3), np.int64)
    barys = np.zeros((len(points), 3))
    for s in range(0, len(points), chunk):
        q = np.asarray(points[s : s + chunk], np.float64)
        if query_normals is None:
            _, near = tree.query(q)
        else:
            qn = np.asarray(query_normals[s : s + chunk], np.float64)
            qn = qn / np.maximum(np.linalg.norm(qn, axis=1, keepdims=True), 1e-30)
            _, near = tree.query(np.concatenate([q, lam * qn], 1))
        cand = ring[near]                                   # (P, R) faces
        tri = df[cand]                                      # (P, R, 3)
        # float32 about the mesh centre: half the memory traffic, ~1e-7 relative error
        q32 = (q - origin).astype(np.float32)[:, None]
        d2, bary = _closest_on_triangles(q32, dv32[tri[..., 0]], dv32[tri[..., 1]], dv32[tri[..., 2]])
        if query_normals is not None:
            away = (fn[cand] * qn[:, None]).sum(-1) <= 0
            d2 = np.where(away & ~away.all(1, keepdims=True), np.inf, d2)
        k = d2.argmin(1)
        rows = np.arange(len(q))
        dist[s : s + chunk] = np.sqrt(d2[rows, k])
        tris[s : s + chunk] = tri[rows, k]
        barys[s : s + chunk] = bary[rows, k]
    return dist, tris, barys


def dense_normals_at(points: np.ndarray, dense_vertices: np.ndarray, dense_faces: np.ndarray,
                     dense_normals: np.ndarray, query_normals: np.ndarray | None = None) -> np.ndarray:
    """(P, 3) unit normals of the dense surface at the points closest to `points`
    (closest_on_surface), the dense vertex normals interpolated there (smooth, like
    the dense mesh shades)."""
    _, tri, bary = closest_on_surface(points, dense_vertices, dense_faces, query_normals)
    out = np.einsum("pk,pkd->pd", bary, np.asarray(dense_normals, np.float64)[tri])
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------- baking
def tangent_frames(normals: np.ndarray, tangents: np.ndarray, faces: np.ndarray, fid: np.ndarray,
                   bary: np.ndarray) -> np.ndarray:
    """(P, 3, 3) per-sample basis with columns (T, B, N) as a glTF viewer builds it:
    per-vertex bitangent = cross(N, T.xyz) * w, all three interpolated and normalised."""
    fv = np.asarray(faces)[fid]                              # (P, 3)
    nv = np.asarray(normals, np.float64)
    nv = nv / np.maximum(np.linalg.norm(nv, axis=1, keepdims=True), 1e-12)
    tv = np.asarray(tangents, np.float64)
    bv = np.cross(nv, tv[:, :3]) * tv[:, 3:4]

    def interp(x):
        y = np.einsum("pk,pkd->pd", bary, x[fv])
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)

    return np.stack([interp(tv[:, :3]), interp(bv), interp(nv)], -1)


def encode(n_ts: np.ndarray) -> np.ndarray:
    """Unit tangent-space normals -> uint8 RGB (n + 1) / 2."""
    return np.clip((n_ts + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def decode(rgb: np.ndarray) -> np.ndarray:
    """uint8 (or float 0..255) RGB -> unit tangent-space normals (what a viewer does)."""
    n = np.asarray(rgb, np.float64) / 255.0 * 2.0 - 1.0
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)


def bake_normal_map(positions: np.ndarray, normals: np.ndarray, tangents: np.ndarray, faces: np.ndarray,
                    uvs: np.ndarray, size: int, dense_vertices: np.ndarray, dense_faces: np.ndarray,
                    dense_normals: np.ndarray) -> np.ndarray:
    """(size, size, 3) uint8 tangent-space normal map of the dense surface on this UV layout.

    positions/normals/tangents/uvs are per (seam-split) vertex of the low-poly mesh,
    tangents from `vertex_tangents`. Texels outside every chart are filled from
    their neighbours (gutters for bilinear filtering and mipmaps).
    """
    from .mesh import dilate, push_pull_fill, rasterize_uv

    if tangents is None or len(tangents) != len(positions):
        raise StageError("bake_normal_map needs one tangent per vertex", hint="compute them with vertex_tangents",
                         stage="export")
    texel, fid, bary = rasterize_uv(uvs, faces, size)
    # later triangles win shared-edge texels (the albedo bake's rule)
    texel_u, first = np.unique(texel[::-1], return_index=True)
    sel = len(texel) - 1 - first
    fid, bary = fid[sel], bary[sel]
    p = np.einsum("tk,tkd->td", bary, np.asarray(positions, np.float64)[np.asarray(faces)[fid]])
    basis = tangent_frames(normals, tangents, faces, fid, bary)                # (T, 3, 3)
    target = dense_normals_at(p, dense_vertices, dense_faces, dense_normals, query_normals=basis[:, :, 2])
    det = np.linalg.det(basis)
    ok = np.abs(det) > 1e-6
    n_ts = np.tile([0.0, 0.0, 1.0], (len(p), 1))
    n_ts[ok] = np.linalg.solve(basis[ok], target[ok][..., None])[..., 0]
    n_ts /= np.maximum(np.linalg.norm(n_ts, axis=1, keepdims=True), 1e-12)
    # a normal pointing into the surface cannot be shaded sensibly: fold it onto the tangent plane
    n_ts[:, 2] = np.maximum(n_ts[:, 2], 0.0)
    n_ts /= np.maximum(np.linalg.norm(n_ts, axis=1, keepdims=True), 1e-12)
    color = np.zeros((size * size, 3), np.float32)
    weight = np.zeros(size * size, np.float32)
    color[texel_u] = ((n_ts + 1.0) * 0.5).astype(np.float32)
    weight[texel_u] = 1.0
    color, weight = dilate(color.reshape(size, size, 3), weight.reshape(size, size), steps=max(2, size // 128))
    filled = push_pull_fill(color, weight)
    return np.clip(filled * 255.0 + 0.5, 0, 255).astype(np.uint8)
