"""A small CPU triangle rasterizer: z-buffers for baking visibility and textured
renders of the exported mesh (the mesh turntable). Pixel centres are sampled,
depth and attributes are interpolated perspective-correctly (1/z is linear in
screen space); no anti-aliasing.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import cameras


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, c2w: np.ndarray, K_pix: np.ndarray, width: int,
              height: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Visible triangle per pixel for one camera.

    vertices (V,3) float64 world, faces (F,3) long. Returns (pix (P,) flat pixel index,
    fid (P,) face, bary (P,3) perspective-correct barycentrics, z (P,) camera depth)
    for the P covered pixels, one entry each (nearest surface).
    """
    w2c = torch.as_tensor(np.linalg.inv(c2w))
    pc = vertices @ w2c[:3, :3].T + w2c[:3, 3]
    z = pc[:, 2].clamp_min(1e-6)
    sx = pc[:, 0] / z * float(K_pix[0, 0]) + float(K_pix[0, 2]) - 0.5      # pixel-centre coordinates
    sy = pc[:, 1] / z * float(K_pix[1, 1]) + float(K_pix[1, 2]) - 0.5
    # float32 from here: pixel coordinates and depths need ~1e-4 relative precision only
    tx, ty, tz = sx.float()[faces], sy.float()[faces], pc[:, 2].float()[faces]   # (F, 3)
    keep = (tz > 1e-4).all(1)
    x0 = tx.min(1).values.ceil().clamp(0, width - 1).long()
    x1 = tx.max(1).values.floor().clamp(-1, width - 1).long()
    y0 = ty.min(1).values.ceil().clamp(0, height - 1).long()
    y1 = ty.max(1).values.floor().clamp(-1, height - 1).long()
    bw, bh = (x1 - x0 + 1).clamp_min(0), (y1 - y0 + 1).clamp_min(0)
    cnt = torch.where(keep, bw * bh, torch.zeros_like(bw))
    fid = torch.repeat_interleave(torch.arange(len(faces)), cnt)
    empty = torch.zeros(0, dtype=torch.long)
    if fid.numel() == 0:
        return empty, empty, torch.zeros(0, 3), torch.zeros(0)
    start = torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
    local = torch.arange(fid.numel()) - start
    cx = (x0[fid] + local % bw[fid]).float()
    cy = (y0[fid] + local // bw[fid]).float()
    ax, ay = tx[fid, 0], ty[fid, 0]
    e1x, e1y, e2x, e2y = tx[fid, 1] - ax, ty[fid, 1] - ay, tx[fid, 2] - ax, ty[fid, 2] - ay
    den = e1x * e2y - e2x * e1y
    ok = den.abs() > 1e-9
    den = torch.where(ok, den, torch.ones_like(den))
    qx, qy = cx - ax, cy - ay
    b1 = (qx * e2y - e2x * qy) / den
    b2 = (e1x * qy - qx * e1y) / den
    b0 = 1 - b1 - b2
    ins = ok & (b0 >= -1e-5) & (b1 >= -1e-5) & (b2 >= -1e-5)
    fid, cx, cy = fid[ins], cx[ins], cy[ins]
    bs = torch.stack([b0[ins], b1[ins], b2[ins]], 1).clamp_min(0) / tz[fid]   # screen bary / z
    iz = bs.sum(1)
    depth = 1.0 / iz
    pix = cy.long() * width + cx.long()
    zb = torch.full((height * width,), float("inf"))
    zb.scatter_reduce_(0, pix, depth, reduce="amin")
    win = depth <= zb[pix]
    # one winner per pixel even on exact ties: the largest candidate index
    cand = torch.nonzero(win).squeeze(1)
    best = torch.full((height * width,), -1, dtype=torch.long)
    best.scatter_reduce_(0, pix[cand], cand, reduce="amax")
    sel = best[best >= 0]
    return pix[sel], fid[sel], bs[sel] / iz[sel, None], depth[sel]


def mesh_depth(vertices: np.ndarray, faces: np.ndarray, c2w: np.ndarray, K_norm: np.ndarray, width: int,
               height: int) -> np.ndarray:
    """Z-buffer of a triangle mesh: (N, H, W) float32 camera-z depth, 0 where empty."""
    n = len(c2w)
    out = np.zeros((n, height, width), np.float32)
    Kp = cameras.intrinsics_pixels(K_norm, width, height)
    v = torch.tensor(np.asarray(vertices), dtype=torch.float64)
    f = torch.tensor(np.asarray(faces), dtype=torch.long)
    for i in range(n):
        pix, _, _, z = rasterize(v, f, c2w[i], Kp[i], width, height)
        flat = out[i].reshape(-1)
        flat[pix.numpy()] = z.numpy()
    return out


def render_textured(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, normals: np.ndarray,
                    texture: np.ndarray, c2w: np.ndarray, K_norm: np.ndarray, width: int, height: int,
                    ambient: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """Textured, head-lit renders: (rgba uint8 (N,H,W,4) straight alpha, depth (N,H,W)),
    the bound-renderer contract, so a mesh can stand in for the splats (turntables).
    Shading = albedo * (ambient + (1 - ambient) * cos(normal, view))."""
    from .mesh import sample_texture

    n = len(c2w)
    rgba = np.zeros((n, height, width, 4), np.uint8)
    depth = np.zeros((n, height, width), np.float32)
    Kp = cameras.intrinsics_pixels(K_norm, width, height)
    v = torch.tensor(np.asarray(vertices), dtype=torch.float64)
    f = torch.tensor(np.asarray(faces), dtype=torch.long)
    uv_t = torch.tensor(np.asarray(uvs), dtype=torch.float64)
    nrm_t = torch.tensor(np.asarray(normals), dtype=torch.float64)
    for i in range(n):
        pix, fid, bary, z = rasterize(v, f, c2w[i], Kp[i], width, height)
        corners = f[fid]
        bary = bary.double()
        uv = (bary[..., None] * uv_t[corners]).sum(1).numpy()
        nrm = (bary[..., None] * nrm_t[corners]).sum(1)
        nrm = nrm / nrm.norm(dim=1, keepdim=True).clamp_min(1e-12)
        p = (bary[..., None] * v[corners]).sum(1)
        view = torch.as_tensor(c2w[i][:3, 3]) - p
        cos = ((nrm * view).sum(1) / view.norm(dim=1)).clamp_min(0).numpy()
        col = sample_texture(texture, uv) * (ambient + (1 - ambient) * cos)[:, None]
        pn = pix.numpy()
        img = rgba[i].reshape(-1, 4)
        img[pn, :3] = np.clip(col + 0.5, 0, 255).astype(np.uint8)
        img[pn, 3] = 255
        depth[i].reshape(-1)[pn] = z.numpy()
    return rgba, depth
