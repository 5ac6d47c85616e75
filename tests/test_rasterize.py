"""Our tile-based CPU rasterizer against (a) closed-form single Gaussians and
(b) a brute-force dense reference (every Gaussian against every pixel, built on
gsplat's own pure-torch projection), for images, alphas, depths and gradients."""
import math

import pytest
import torch

from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

from recon.fit.rasterize import rasterization

SH_C0 = 0.28209479177387814


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- dense reference
def rasterize_dense(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, sh_degree=None,
                    backgrounds=None, render_mode="RGB", eps2d=0.3):
    """gsplat semantics without tiles: sort all visible Gaussians by depth and
    composite them over every pixel with sequential cumulative products."""
    covars, _ = _quat_scale_to_covar_preci(quats, scales, True, False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(means, covars, viewmats, Ks, width, height, eps2d=eps2d)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=means.dtype), torch.arange(width, dtype=means.dtype), indexing="ij")
    pix = torch.stack([xs.reshape(-1) + 0.5, ys.reshape(-1) + 0.5], -1)  # [P, 2]
    imgs, alphas = [], []
    for c in range(viewmats.shape[0]):
        if sh_degree is None:
            col = colors
        else:
            campos = torch.inverse(viewmats[c])[:3, 3]
            col = torch.clamp_min(_spherical_harmonics(sh_degree, means - campos, colors) + 0.5, 0.0)
        if render_mode in ("D", "ED"):
            col = depths[c][:, None]
        elif render_mode in ("RGB+D", "RGB+ED"):
            col = torch.cat([col, depths[c][:, None]], -1)
        elif render_mode == "MD":
            col = torch.zeros_like(depths[c][:, None])
        valid = torch.nonzero((radii[c] > 0).all(-1)).squeeze(1)
        order = valid[torch.sort(depths[c][valid], stable=True).indices]
        d = pix[None] - means2d[c, order][:, None]  # [n, P, 2]
        a, b, cc = conics[c, order].unbind(-1)
        sigma = 0.5 * (a[:, None] * d[..., 0] ** 2 + cc[:, None] * d[..., 1] ** 2) + b[:, None] * d[..., 0] * d[..., 1]
        alpha = torch.clamp_max(opacities[order][:, None] * torch.exp(-sigma), 0.999)
        alpha = torch.where((sigma >= 0) & (alpha >= 1 / 255), alpha, torch.zeros_like(alpha))
        T_incl = torch.cumprod(1 - alpha, 0)
        T_excl = torch.cat([torch.ones_like(T_incl[:1]), T_incl[:-1]], 0)
        keep = T_incl > 1e-4
        w = alpha * T_excl * keep
        img = w.T @ col[order]                                   # [P, D]
        if render_mode in ("MD", "RGB+MD"):
            # the Gaussian j whose T goes from > 0.5 to <= 0.5; on the pixel ray x = z r its density peaks at
            # z* = r'A mu / r'A r (A: camera-frame precision); alpha 0.5 is reached where
            # alpha_j exp(-(z - z*)^2 r'A r / 2) = 1 - 0.5 / T_j
            cross = keep & (T_excl > 0.5) & (T_incl <= 0.5)                   # [n, P]
            _, preci = _quat_scale_to_covar_preci(quats[order], scales[order], False, True)
            R = viewmats[c, :3, :3]
            A = R @ preci @ R.T                                              # [n, 3, 3]
            mu = means[order] @ R.T + viewmats[c, :3, 3]
            K = Ks[c]
            r = torch.stack([(pix[:, 0] - K[0, 2]) / K[0, 0], (pix[:, 1] - K[1, 2]) / K[1, 1], torch.ones_like(pix[:, 0])], -1)
            rAr = torch.einsum("pi,nij,pj->np", r, A, r)
            rAm = torch.einsum("pi,nij,nj->np", r, A, mu)
            a_need = 1 - 0.5 / T_excl.clamp(min=1e-12)
            lift = torch.log(alpha.clamp(min=1e-30) / a_need.clamp(min=1e-12)).clamp(min=0)
            zc = rAm / rAr - torch.sqrt(2 * lift / rAr)
            md = torch.where(cross, zc, torch.zeros_like(zc)).sum(0)[:, None]
            img = md if render_mode == "MD" else torch.cat([img, md], -1)
        T = torch.prod(1 - alpha * keep, 0)                      # [P]
        if backgrounds is not None:
            bg = backgrounds[c]
            if render_mode in ("D", "ED", "MD"):
                bg = torch.zeros(1, dtype=img.dtype)
            elif render_mode in ("RGB+D", "RGB+ED", "RGB+MD"):
                bg = torch.cat([bg, torch.zeros(1, dtype=img.dtype)])
            img = img + T[:, None] * bg
        if render_mode in ("ED", "RGB+ED"):
            img = torch.cat([img[:, :-1], img[:, -1:] / (1 - T[:, None]).clamp(min=1e-10)], -1)
        imgs.append(img.reshape(height, width, -1))
        alphas.append((1 - T).reshape(height, width, 1))
    return torch.stack(imgs), torch.stack(alphas)


# ------------------------------------------------------------------- scene helpers
def look_at_viewmat(eye, target=(0.0, 0.0, 0.0), up=(0.0, -1.0, 0.0), dtype=torch.float64):
    """world-to-camera, OpenCV axes (z toward the target, y down)."""
    eye, target, up = (torch.tensor(v, dtype=dtype) for v in (eye, target, up))
    z = target - eye
    z = z / z.norm()
    x = torch.linalg.cross(z, up)
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    R = torch.stack([x, y, z])  # rows: camera axes in world
    vm = torch.eye(4, dtype=dtype)
    vm[:3, :3] = R
    vm[:3, 3] = -R @ eye
    return vm


def random_scene(n, seed, dtype=torch.float64, sh_k=None):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 1.2
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = torch.exp(torch.rand(n, 3, generator=g, dtype=dtype) * 1.5 - 4.0)
    opacities = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05
    if sh_k is None:
        colors = torch.rand(n, 3, generator=g, dtype=dtype)
    else:
        colors = torch.randn(n, sh_k, 3, generator=g, dtype=dtype) * 0.3
    return means, quats, scales, opacities, colors


def cameras(width, height, dtype=torch.float64):
    vms = torch.stack([look_at_viewmat((0.3, -0.2, 3.0), dtype=dtype), look_at_viewmat((-2.5, 0.5, 1.2), dtype=dtype)])
    f = 1.3 * width
    K = torch.tensor([[f, 0, width / 2 + 0.7], [0, f, height / 2 - 1.1], [0, 0, 1]], dtype=dtype)
    return vms, torch.stack([K, K])


# ---------------------------------------------------------------------------- tests
def test_single_gaussian_is_the_analytic_2d_gaussian():
    W, H = 48, 40
    vm = look_at_viewmat((0.0, 0.0, 4.0)).float()
    f = 60.0
    K = torch.tensor([[f, 0, 23.0], [0, f, 19.5], [0, 0, 1]])
    p = torch.tensor([[0.21, -0.13, 0.35]])
    s = 0.05
    o = 0.8
    img, alpha, meta = rasterization(p, torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), s), torch.tensor([o]),
                                     torch.tensor([[1.0, 0.5, 0.25]]), vm[None], K[None], W, H)
    pc = vm[:3, :3] @ p[0] + vm[:3, 3]
    u, v = (K[0, 0] * pc[0] / pc[2] + K[0, 2]).item(), (K[1, 1] * pc[1] / pc[2] + K[1, 2]).item()
    # EWA: J diag(s^2) J^T + 0.3 I with the perspective Jacobian at the mean.
    J = torch.tensor([[f / pc[2], 0, -f * pc[0] / pc[2] ** 2], [0, f / pc[2], -f * pc[1] / pc[2] ** 2]])
    cov = J @ (s * s * torch.eye(3)) @ J.T + 0.3 * torch.eye(2)
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    d = torch.stack([xs - u, ys - v], -1)
    expect = o * torch.exp(-0.5 * torch.einsum("hwi,ij,hwj->hw", d, torch.inverse(cov), d))
    expect = torch.where(expect >= 1 / 255, expect, torch.zeros_like(expect))
    assert torch.allclose(alpha[0, ..., 0], expect, atol=2e-5)
    assert torch.allclose(img[0], expect[..., None] * torch.tensor([1.0, 0.5, 0.25]), atol=2e-5)
    iy, ix = divmod(int(alpha[0, ..., 0].argmax()), W)
    assert abs(ix + 0.5 - u) <= 0.5 and abs(iy + 0.5 - v) <= 0.5
    assert torch.allclose(meta["means2d"][0, 0], torch.tensor([u, v]), atol=1e-4)


@pytest.mark.parametrize("render_mode", ["RGB", "RGB+ED", "D", "ED", "MD", "RGB+MD"])
def test_matches_dense_reference_forward(render_mode):
    W, H = 37, 29  # not multiples of the tile size
    vms, Ks = cameras(W, H)
    means, quats, scales, opac, cols = random_scene(300, seed=1)
    bgs = torch.tensor([[0.2, 0.7, 0.1], [1.0, 1.0, 1.0]], dtype=torch.float64)
    ours, a_ours, _ = rasterization(means, quats, scales, opac, cols, vms, Ks, W, H, backgrounds=bgs,
                                    render_mode=render_mode, tile_size=8, chunk=16)
    ref, a_ref = rasterize_dense(means, quats, scales, opac, cols, vms, Ks, W, H, backgrounds=bgs, render_mode=render_mode)
    assert ours.shape == ref.shape == (2, H, W, {"RGB": 3, "RGB+ED": 4, "D": 1, "ED": 1, "MD": 1, "RGB+MD": 4}[render_mode])
    assert a_ref.max() > 0.99 and a_ref.min() < 0.01  # both opaque and empty pixels are exercised
    torch.testing.assert_close(a_ours, a_ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(ours, ref, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("sh_degree", [None, 2])
def test_matches_dense_reference_gradients(sh_degree):
    W, H = 33, 26
    vms, Ks = cameras(W, H)
    params = [t.requires_grad_() for t in random_scene(120, seed=2, sh_k=None if sh_degree is None else 9)]
    g = torch.Generator().manual_seed(3)
    wc = torch.randn(2, H, W, 4, generator=g, dtype=torch.float64)
    wa = torch.randn(2, H, W, 1, generator=g, dtype=torch.float64)
    bgs = torch.rand(2, 3, generator=g, dtype=torch.float64)

    def grads(fn, **kw):
        img, alpha = fn(*params, vms, Ks, W, H, sh_degree=sh_degree, backgrounds=bgs, render_mode="RGB+ED", **kw)[:2]
        return torch.autograd.grad((img * wc).sum() + (alpha * wa).sum(), params)

    ours = grads(rasterization, tile_size=8, chunk=8)
    ref = grads(rasterize_dense)
    for name, go, gr in zip(("means", "quats", "scales", "opacities", "colors"), ours, ref):
        assert gr.abs().max() > 0, name
        torch.testing.assert_close(go, gr, atol=1e-7, rtol=1e-6, msg=name)


def test_median_depth_of_a_stack_is_the_analytic_crossing():
    """Three Gaussians (scale s) on the optical axis at z = 2, 2.5, 3, seen through the
    on-axis pixel: Gaussian j takes transmittance from T_j > 0.5 to <= 0.5; along the ray
    its opacity rises as o_j exp(-(z - z_j)^2 / 2 s^2), so alpha 0.5 is reached at
    z_j - s sqrt(2 ln(o_j / (1 - 0.5 / T_j))). 0 if T never falls to 0.5. Expected depth
    lies behind an opaque front layer."""
    W = H = 33
    s = 0.05
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 2.5], [0.0, 0.0, 3.0]])
    quats = torch.tensor([[1.0, 0, 0, 0]] * 3)
    scales = torch.full((3, 3), s)
    K = torch.tensor([[[50.0, 0, 16.5], [0, 50.0, 16.5], [0, 0, 1]]])   # pixel (16, 16) looks down the axis
    cases = (([0.3, 0.4, 0.9], 1),   # T: .7, .42 -> the second layer
             ([0.6, 0.4, 0.9], 0),   # T: .4
             ([0.99, 0.3, 0.9], 0),  # an opaque front layer: ~1.17 s in front of its centre
             ([0.2, 0.2, 0.9], 2),   # T: .8, .64, .064
             ([0.3, 0.2, 0.1], None))  # T: .7, .56, .504: never opaque enough
    for opac, j in cases:
        o = torch.tensor(opac)
        img, alpha, _ = rasterization(means, quats, scales, o, torch.rand(3, 3), torch.eye(4)[None], K, W, H,
                                      render_mode="RGB+MD", backgrounds=torch.ones(1, 3))
        md = rasterization(means, quats, scales, o, torch.rand(3, 3), torch.eye(4)[None], K, W, H, render_mode="MD")[0]
        if j is None:
            expect = 0.0
        else:
            T = float(torch.prod(1 - o[:j]))
            expect = float(means[j, 2]) - s * math.sqrt(2 * math.log(opac[j] / (1 - 0.5 / T)))
        assert img[0, 16, 16, 3].item() == pytest.approx(expect, abs=1e-5), (opac, img[0, 16, 16, 3], expect)
        assert md[0, 16, 16, 0].item() == pytest.approx(expect, abs=1e-5)
        if j == 0:  # the front layer makes the pixel opaque; the layers behind pull expected depth back
            ed = rasterization(means, quats, scales, o, torch.rand(3, 3), torch.eye(4)[None], K, W, H, render_mode="ED")[0]
            assert ed[0, 16, 16, 0] > means[0, 2] > expect
        # off the blob nothing reaches alpha 0.5: median depth 0
        assert alpha[0, 0, 0, 0] < 0.5 and img[0, 0, 0, 3] == 0


def test_median_depth_of_a_tilted_disc_is_its_plane():
    """A flat opaque Gaussian tilted 45 degrees about the camera's y axis: where it is
    opaque, the median depth lies on its plane, z = z0 + x (the peak along each pixel ray
    moves with the pixel; the spread along the ray is ~0, so no lift)."""
    W = H = 48
    f = 60.0
    K = torch.tensor([[[f, 0, 24.0], [0, f, 24.0], [0, 0, 1]]])
    c, sn = math.cos(math.pi / 8), math.sin(math.pi / 8)      # quaternion of 45 degrees about y
    quat = torch.tensor([[c, 0.0, sn, 0.0]])
    means = torch.tensor([[0.0, 0.0, 3.0]])
    scales = torch.tensor([[0.3, 0.3, 1e-4]])
    md = rasterization(means, quat, scales, torch.tensor([0.99]), torch.ones(1, 3), torch.eye(4)[None], K, W, H,
                       render_mode="MD")[0][0, ..., 0]
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    rx, ry = (xs - 24.0) / f, (ys - 24.0) / f
    # the rotation takes the disc normal (0, 0, 1) to (sin 45, 0, cos 45): x + (z - 3) = 0 with x = z rx
    plane = 3.0 / (1.0 + rx)
    hit = md > 0
    assert hit.sum() > 60          # ~100 pixels have alpha >= 0.5
    torch.testing.assert_close(md[hit], plane[hit], atol=2e-3, rtol=0)


def test_median_depth_carries_no_gradient_but_rgb_does():
    vms, Ks = cameras(20, 16, torch.float32)
    params = [t.float().requires_grad_() for t in random_scene(40, seed=8)]
    img, alpha, _ = rasterization(*params, vms, Ks, 20, 16, render_mode="RGB+MD")
    img[..., :3].sum().backward()
    assert params[0].grad.abs().sum() > 0
    torch.testing.assert_close(img[..., :3], rasterization(*params, vms, Ks, 20, 16)[0])


def test_binned_median_depth_matches_the_exact_one():
    """recon.fit.render's gsplat-call median depth (what CUDA runs) against our exact "MD"
    on a dense blob: same coverage, close depths."""
    from recon.fit.render import median_depth_binned

    W, H = 40, 32
    vms, Ks = cameras(W, H, torch.float32)
    g = torch.Generator().manual_seed(9)
    n = 600
    means = torch.randn(n, 3, generator=g) * 0.25
    quats = torch.randn(n, 4, generator=g)
    scales = torch.full((n, 3), 0.04)
    opac = torch.rand(n, generator=g) * 0.5 + 0.5
    exact = rasterization(means, quats, scales, opac, torch.rand(n, 3), vms, Ks, W, H, render_mode="MD")[0][..., 0]
    binned = median_depth_binned(rasterization, means, quats, scales, opac, vms, Ks, W, H, bins=32)
    both = (exact > 0) & (binned > 0)
    assert both.float().mean() > 0.3 and ((exact > 0) != (binned > 0)).float().mean() < 0.01
    # the binned form takes each Gaussian's peak on its centre ray (the exact one per pixel ray)
    # and merges Gaussians sharing a slab: errors well under one Gaussian sigma (0.04), and
    # far below expected depth's
    ed = rasterization(means, quats, scales, opac, torch.rand(n, 3), vms, Ks, W, H, render_mode="ED")[0][..., 0]
    err = (exact - binned)[both].abs()
    assert err.mean() < 0.012 and err.quantile(0.95) < 0.04
    assert err.mean() < 0.2 * (exact - ed)[both].abs().mean()


def test_float32_close_to_float64_reference():
    W, H = 64, 48
    vms, Ks = cameras(W, H)
    scene = random_scene(800, seed=4)
    ref, a_ref = rasterize_dense(*scene, vms, Ks, W, H)
    ours, a_ours, _ = rasterization(*(t.float() for t in scene), vms.float(), Ks.float(), W, H)
    # threshold decisions (1/255, 1e-4) may flip for a few pixels in float32
    assert (ours.double() - ref).abs().mean() < 1e-5
    assert ((ours.double() - ref).abs() > 1e-3).float().mean() < 0.01


def test_near_gaussian_occludes_far_one():
    W, H = 32, 32
    vm = look_at_viewmat((0.0, 0.0, 3.0)).float()
    K = torch.tensor([[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]])
    means = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]])  # blue far (z=-1 world), red near (z=+1)
    colors = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2)
    scales = torch.full((2, 3), 0.3)
    opac = torch.tensor([0.99, 0.99])
    for perm in ([0, 1], [1, 0]):  # input order must not matter, depth order must
        img, alpha, _ = rasterization(means[perm], quats, scales, opac, colors[perm], vm[None], K[None], W, H)
        centre = img[0, 16, 16]
        assert centre[0] > 0.98 and centre[2] < 0.02, centre


def test_background_is_composited_by_transmittance():
    W, H = 24, 20
    vms, Ks = cameras(W, H, torch.float32)
    scene = [t.float() for t in random_scene(60, seed=5)]
    bg = torch.tensor([[0.3, 0.6, 0.9], [0.1, 0.2, 0.3]])
    img0, a0, _ = rasterization(*scene, vms, Ks, W, H)
    img1, a1, _ = rasterization(*scene, vms, Ks, W, H, backgrounds=bg)
    torch.testing.assert_close(a0, a1)
    torch.testing.assert_close(img1, img0 + (1 - a0) * bg[:, None, None, :], atol=1e-6, rtol=0)
    empty = a0[..., 0] == 0
    assert empty.any()
    torch.testing.assert_close(img1[empty], bg[:, None, None, :].expand_as(img1)[empty])


def test_sh_degree_zero_equals_plain_colors():
    W, H = 24, 20
    vms, Ks = cameras(W, H, torch.float32)
    means, quats, scales, opac, rgb = (t.float() for t in random_scene(80, seed=6))
    sh = torch.zeros(80, 4, 3)
    sh[:, 0] = (rgb - 0.5) / SH_C0
    sh[:, 1:] = torch.randn(80, 3, 3)  # ignored at degree 0
    a, _, _ = rasterization(means, quats, scales, opac, rgb, vms, Ks, W, H)
    b, _, _ = rasterization(means, quats, scales, opac, sh, vms, Ks, W, H, sh_degree=0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_culls_behind_camera_and_keeps_gradients_finite():
    W, H = 16, 16
    vm = look_at_viewmat((0.0, 0.0, 1.0)).float()
    K = torch.tensor([[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]])
    means = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]], requires_grad=True)  # at, behind, in front
    quats = torch.tensor([[1.0, 0, 0, 0]] * 3, requires_grad=True)
    scales = torch.full((3, 3), 0.1, requires_grad=True)
    opac = torch.full((3,), 0.9, requires_grad=True)
    img, alpha, meta = rasterization(means, quats, scales, opac, torch.ones(3, 3), vm[None], K[None], W, H)
    assert meta["radii"][0, 0].sum() == 0 and meta["radii"][0, 1].sum() == 0 and meta["radii"][0, 2].min() > 0
    (img.sum() + alpha.sum()).backward()
    for t in (means, quats, scales, opac):
        assert torch.isfinite(t.grad).all()
    assert means.grad[:2].abs().sum() == 0


def test_empty_scene_renders_background():
    vms, Ks = cameras(20, 10, torch.float32)
    img, alpha, _ = rasterization(torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0),
                                  torch.zeros(0, 3), vms, Ks, 20, 10, backgrounds=torch.ones(2, 3))
    assert img.shape == (2, 10, 20, 3) and (img == 1).all() and (alpha == 0).all()


def test_backend_uses_our_rasterizer_on_cpu_and_says_so():
    from recon.fit.backend import select_rasterizer

    r = select_rasterizer("cpu")
    assert r.name == "torch-tiles" and "CUDA" in r.why
    vms, Ks = cameras(20, 16, torch.float32)
    scene = [t.float() for t in random_scene(30, seed=7)]
    a = r(*scene, vms, Ks, 20, 16)[0]
    b = rasterization(*scene, vms, Ks, 20, 16, tile_size=16)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # tile size changes only float rounding
