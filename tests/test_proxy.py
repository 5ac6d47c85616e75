"""The weight-free proxy head: geometry, exact multi-view consistency, texture, contracts."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from scipy import ndimage

from recon import cameras
from recon.config import ViewsConfig
from recon.contact_sheet import contact_sheet
from recon.errors import InputError
from recon.proxy import ProxyHead, build_proxy, proxy_backview, proxy_views
from recon.proxy.landmarks import face_keypoints
from recon.proxy.shape import PortraitCamera, clean_mask, star_hull
from recon.proxy.texture import pull_push
from recon.types import Portrait, ViewSet

S = 128
HAIR = (70, 45, 25)
SKIN = (215, 170, 140)
CFG = ViewsConfig(num_views=12, resolution=96, proxy_detail=48, proxy_texture=256, seed=0)


def synthetic_portrait(size: int = S, yaw: float = 0.0) -> Portrait:
    """An ellipse head (hair cap on top, skin face with features), a neck and shoulders."""
    rng = np.random.default_rng(1)
    img = np.full((size, size, 3), 235, np.uint8)            # light background
    alpha = np.zeros((size, size), np.uint8)
    c = size / 2
    cv2.ellipse(alpha, (int(c), int(c * 0.95)), (int(0.27 * size), int(0.34 * size)), 0, 0, 360, 255, -1)
    cv2.rectangle(alpha, (int(c - 0.13 * size), int(c + 0.2 * size)), (int(c + 0.13 * size), size), 255, -1)
    cv2.ellipse(alpha, (int(c), size), (int(0.45 * size), int(0.2 * size)), 0, 180, 360, 255, -1)
    fg = alpha > 0
    img[fg] = SKIN
    hair = np.zeros_like(alpha)
    cv2.ellipse(hair, (int(c), int(c * 0.95)), (int(0.27 * size), int(0.34 * size)), 0, 180, 360, 255, -1)
    hair[int(c * 0.72):] = 0
    img[hair > 0] = HAIR
    img[int(c + 0.3 * size):][fg[int(c + 0.3 * size):]] = (40, 60, 120)  # shirt
    # face texture: some detail so PSNR means something
    noise = rng.normal(0, 6, (size, size, 1))
    img = np.clip(img + noise * fg[..., None], 0, 255).astype(np.uint8)
    eyes = [(c - 0.1 * size, c * 0.95), (c + 0.1 * size, c * 0.95)]
    for e in eyes:
        cv2.circle(img, (int(e[0]), int(e[1])), max(2, size // 40), (30, 30, 30), -1)
    nose = (c, c * 0.95 + 0.1 * size)
    mouth = [(c - 0.07 * size, c * 0.95 + 0.19 * size), (c + 0.07 * size, c * 0.95 + 0.19 * size)]
    cv2.line(img, tuple(int(v) for v in mouth[0]), tuple(int(v) for v in mouth[1]), (150, 40, 40), max(1, size // 64))
    lm = np.array([eyes[0], eyes[1], nose, mouth[0], mouth[1]], float)
    c2w = cameras.orbit_cam2world(yaw, 0.0)
    return Portrait(image=img, alpha=alpha, c2w=c2w, K=cameras.INTRINSICS_NORM.copy(), yaw_deg=yaw, pitch_deg=0.0,
                    roll_deg=0.0, landmarks=lm, crop_from_source=np.eye(3))


@pytest.fixture(scope="module")
def portrait() -> Portrait:
    return synthetic_portrait()


@pytest.fixture(scope="module")
def head(portrait) -> ProxyHead:
    return build_proxy(portrait, CFG)


@pytest.fixture(scope="module")
def views(portrait, head) -> ViewSet:
    return proxy_views(portrait, None, CFG, head=head)


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return cv2.remap(img.astype(np.float32), x.astype(np.float32), y.astype(np.float32), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def test_views_contract(views):
    assert len(views) == CFG.num_views and views.names[0] == "000.png" and views.names[-1] == "011.png"
    assert views.images.shape == (12, 96, 96, 4) and views.images.dtype == np.uint8
    assert views.depth.shape == (12, 96, 96) and views.depth.dtype == np.float32
    assert views.backend == "proxy" and views.preview and views.meta["preview"]
    np.testing.assert_allclose(views.c2w, cameras.ring_cam2world(12))
    # colour is 0 where nothing was hit, depth is 0 exactly where alpha is 0
    empty = views.images[..., 3] == 0
    assert (views.images[..., :3][empty] == 0).all()
    assert ((views.depth > 0) == ~empty).all()
    # views 0 and N/2 look at the face and at the back: the camera azimuths are 0 and 180
    az, _ = cameras.azimuth_elevation_of(views.c2w)
    assert abs(az[0]) < 1e-4 and abs(abs(az[6]) - 180) < 1e-4


def test_depth_reprojects_between_neighbouring_views(views, head):
    """Unproject view i's depth, project into view i+1: depth and colour must agree there."""
    h, w = views.resolution
    Kp = views.K_pixels()
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    errs, cerrs = [], []
    for i in range(len(views)):
        j = (i + 1) % len(views)
        solid = ndimage.binary_erosion(views.images[i, ..., 3] == 255, iterations=2)
        z = views.depth[i][solid]
        cam = np.stack([(xs[solid] - Kp[i, 0, 2]) / Kp[i, 0, 0] * z, (ys[solid] - Kp[i, 1, 2]) / Kp[i, 1, 1] * z, z], -1)
        world = cam @ views.c2w[i, :3, :3].T + views.c2w[i, :3, 3]
        cj = (world - views.c2w[j, :3, 3]) @ views.c2w[j, :3, :3]
        u = Kp[j, 0, 0] * cj[:, 0] / cj[:, 2] + Kp[j, 0, 2] - 0.5
        v = Kp[j, 1, 1] * cj[:, 1] / cj[:, 2] + Kp[j, 1, 2] - 0.5
        solid_j = ndimage.binary_erosion(views.images[j, ..., 3] == 255, iterations=2).astype(np.float32)
        inside = _bilinear(solid_j, u, v)[:, 0] > 0.999
        dj = _bilinear(views.depth[j], u, v)[:, 0]
        diff = cj[:, 2] - dj
        vis = inside & (np.abs(diff) < 0.02)           # points occluded in view j are not errors
        assert vis.mean() > 0.5, f"views {i}->{j}: only {vis.mean():.2f} of the points are visible in both"
        errs.append(np.abs(diff[vis]))
        col_i = views.images[i, ..., :3][solid][vis].astype(np.float32)
        col_j = _bilinear(views.images[j, ..., :3], u[vis], v[vis]).reshape(-1, 3)
        cerrs.append(np.abs(col_i - col_j).mean(1))
    err = np.concatenate(errs)
    assert np.median(err) < 2e-4 * head.height / 0.5 and np.percentile(err, 95) < 3e-3
    assert np.median(np.concatenate(cerrs)) < 6.0


def test_silhouette_matches_matte(portrait, head):
    rgba, depth = head.render(portrait.c2w[None], portrait.K[None], S, S)
    sil = rgba[0, ..., 3] > 127
    m = clean_mask(portrait.alpha)
    iou = (sil & m).sum() / (sil | m).sum()
    assert iou > 0.9, iou
    # the best a star-shaped head can do is the matte's star hull (neck notches filled)
    hull = star_hull(m, PortraitCamera(portrait).project(np.zeros(3))[0])
    iou_hull = (sil & hull).sum() / (sil | hull).sum()
    assert iou_hull > 0.95, iou_hull


def test_front_render_reproduces_photo(portrait, head):
    rgba, _ = head.render(portrait.c2w[None], portrait.K[None], S, S)
    kp = face_keypoints(portrait.landmarks)
    yy, xx = np.mgrid[0:S, 0:S]
    c = 0.5 * (kp.eye_mid + kp.mouth)
    face = ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 < (1.1 * kp.iod) ** 2) & ndimage.binary_erosion(portrait.alpha > 127, iterations=4)
    diff = rgba[0, ..., :3][face].astype(np.float64) - portrait.image[face].astype(np.float64)
    psnr = 10 * math.log10(255 ** 2 / max(np.mean(diff ** 2), 1e-9))
    assert psnr > 28, psnr


def test_every_view_is_one_solid_blob(views):
    for i, im in enumerate(views.images):
        fg = im[..., 3] > 0
        _, n = ndimage.label(fg, structure=np.ones((3, 3)))
        assert n == 1, f"view {i} has {n} blobs"
        solid = im[..., 3] > 0
        holes = ndimage.binary_fill_holes(solid) & ~solid
        assert holes.sum() == 0, f"view {i} has {holes.sum()} transparent pixels inside the head"
        # anti-aliased edge: some partial alpha exists on the silhouette
        assert ((im[..., 3] > 0) & (im[..., 3] < 255)).any()


def test_back_is_hair_not_a_copy_of_the_front(portrait, head, views):
    back = proxy_backview(portrait, CFG, head=head)
    assert back.backend == "proxy" and back.meta["preview"] is True
    assert back.image.shape == (CFG.resolution, CFG.resolution, 4)
    az, el = cameras.azimuth_elevation_of(back.c2w)
    assert abs(abs(az) - 180) < 1e-4 and abs(el) < 1e-4
    # the upper half of the back view is hair-coloured
    a = back.image[..., 3] == 255
    upper = a & (np.arange(CFG.resolution)[:, None] < CFG.resolution * 0.45)
    mean = back.image[..., :3][upper].astype(np.float64).mean(0)
    assert np.linalg.norm(mean - HAIR) < 0.5 * np.linalg.norm(mean - SKIN), mean
    front = views.images[0]
    both = (front[..., 3] == 255) & a
    assert np.abs(front[..., :3][both].astype(int) - back.image[..., :3][both].astype(int)).mean() > 20


def test_render_is_deterministic_and_depth_matches_geometry(head):
    c2w = cameras.orbit_cam2world(np.array([30.0, -100.0]), np.array([10.0, -5.0]))
    a1, d1 = head.render(c2w, cameras.INTRINSICS_NORM, 40, 48)
    a2, d2 = head.render(c2w, cameras.INTRINSICS_NORM, 40, 48)
    assert a1.shape == (2, 48, 40, 4) and d1.shape == (2, 48, 40)
    assert np.array_equal(a1, a2) and np.array_equal(d1, d2)
    # depths lie between the camera's distance to the origin minus/plus the head's max radius
    z = d1[d1 > 0]
    r = head.surface.r_max
    assert z.min() > cameras.RADIUS - r - 1e-3 and z.max() < cameras.RADIUS + r


def test_rebuild_is_deterministic(portrait, head):
    again = build_proxy(portrait, CFG)
    assert np.array_equal(again.radius, head.radius) and np.array_equal(again.texture, head.texture)


def test_mesh_is_closed_and_textured(head):
    mesh = head.to_mesh()
    assert mesh.visual.uv is not None and mesh.visual.uv.shape == (len(mesh.vertices), 2)
    assert 0 <= mesh.visual.uv.min() and mesh.visual.uv.max() <= 1
    merged = mesh.copy()
    merged.merge_vertices(merge_tex=True, merge_norm=True)
    assert merged.is_watertight and merged.is_winding_consistent
    assert merged.volume > 0                         # outward-facing triangles
    # its vertices lie on the rendered surface
    v = mesh.vertices[::7]
    r = head.surface.radius_np(v)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), r, rtol=1e-4, atol=1e-5)
    small = head.to_mesh(rows=17)
    assert len(small.faces) < len(mesh.faces)


def test_render_input_errors(head):
    K_pix = cameras.intrinsics_pixels(cameras.INTRINSICS_NORM, 64, 64)
    with pytest.raises(InputError):
        head.render(cameras.orbit_cam2world(0.0)[None], K_pix[None], 64, 64)
    with pytest.raises(InputError):
        head.render(np.eye(3)[None], cameras.INTRINSICS_NORM[None], 64, 64)
    with pytest.raises(InputError):
        head.render(cameras.orbit_cam2world(0.0)[None], cameras.INTRINSICS_NORM[None], 0, 64)


def test_build_input_errors(portrait):
    bad = synthetic_portrait()
    bad.alpha = np.zeros_like(bad.alpha)
    with pytest.raises(InputError, match="matte"):
        build_proxy(bad, CFG)
    few = synthetic_portrait()
    few.landmarks = few.landmarks[:3]
    with pytest.raises(InputError, match="landmarks"):
        build_proxy(few, CFG)


def test_landmark_layouts():
    rng = np.random.default_rng(0)
    eyes = np.array([[40.0, 50.0], [80.0, 50.0]])
    nose, mouth, chin = np.array([60.0, 70.0]), np.array([60.0, 85.0]), np.array([60.0, 105.0])
    mp = rng.uniform(30, 90, (478, 2))
    for i in (33, 133, 159, 145):
        mp[i] = eyes[0]
    for i in (263, 362, 386, 374):
        mp[i] = eyes[1]
    mp[1], mp[13], mp[14], mp[152], mp[61], mp[291] = nose, mouth, mouth, chin, mouth - [12, 0], mouth + [12, 0]
    kp = face_keypoints(mp)
    assert kp.layout == "mediapipe" and np.allclose(kp.nose, nose) and np.allclose(kp.chin, chin)
    assert np.allclose(kp.eye_a, eyes[0]) and abs(kp.iod - 40) < 1e-9
    d68 = rng.uniform(30, 90, (68, 2))
    d68[36:42], d68[42:48], d68[30], d68[48:68], d68[8] = eyes[1], eyes[0], nose, mouth, chin
    kp = face_keypoints(d68)
    assert kp.layout == "dlib68" and np.allclose(kp.eye_a, eyes[0])   # sorted left-to-right in the image
    kp = face_keypoints(np.array([eyes[0], eyes[1], nose, mouth - [10, 0], mouth + [10, 0]]))
    assert kp.layout == "five" and np.allclose(kp.mouth, mouth) and kp.chin[1] > mouth[1]
    kp = face_keypoints(rng.uniform(0, 100, (7, 2)))
    assert kp.layout == "bbox"
    with pytest.raises(InputError):
        face_keypoints(np.full((5, 2), np.nan))


def test_unknown_layout_is_reported(portrait):
    p = synthetic_portrait()
    p.landmarks = np.vstack([p.landmarks, p.landmarks[:2] + 1.0])    # 7 points: no known layout
    head = build_proxy(p, ViewsConfig(proxy_detail=24, proxy_texture=64))
    assert head.info["landmark_layout"] == "bbox" and "unknown" in head.info["notes"][0]


def test_pull_push_fills_and_wraps():
    img = np.zeros((16, 32, 3))
    w = np.zeros((16, 32))
    img[:, 0] = [255, 0, 0]
    w[:, 0] = 1
    out = pull_push(img, w)
    assert np.all(np.isfinite(out)) and np.allclose(out[:, 0], [255, 0, 0])
    # the wrapped neighbour of column 0 is column 31: both must be equally red
    assert np.allclose(out[:, 1, 0], out[:, 31, 0], atol=1e-6) and out[:, 1, 0].min() > 100


def test_contact_sheet(views):
    sheet = contact_sheet(views, columns=6, thumb=32)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[1] == 6 * 32
    assert sheet.shape[0] == 2 * (32 + 12)
    assert (sheet[0, 0] == 128).all()                 # neutral grey background
    assert sheet.std() > 10                           # the heads and labels are drawn


def test_turned_portrait_fits_its_own_camera():
    """A portrait taken from azimuth 30, elevation 10: the head is fitted in the world frame
    (face toward +Z), and the portrait camera still sees the matte and the photo."""
    p = synthetic_portrait()
    p.c2w = cameras.orbit_cam2world(30.0, 10.0)
    p.yaw_deg, p.pitch_deg = 30.0, 10.0
    cfg = ViewsConfig(proxy_detail=40, proxy_texture=128)
    head = build_proxy(p, cfg)
    rgba, _ = head.render(p.c2w, p.K, S, S)             # single camera, (4,4) and (3,3) accepted
    sil = rgba[0, ..., 3] > 127
    m = clean_mask(p.alpha)
    assert (sil & m).sum() / (sil | m).sum() > 0.9
    inner = ndimage.binary_erosion(m, iterations=6) & sil
    diff = rgba[0, ..., :3][inner].astype(np.float64) - p.image[inner].astype(np.float64)
    assert 10 * math.log10(255 ** 2 / np.mean(diff ** 2)) > 24
    # the back of this head (seen from azimuth 210) shows hair, not the photo's face
    back, _ = head.render(cameras.orbit_cam2world(210.0, 0.0), p.K, 64, 64)
    top = (back[0, ..., 3] == 255) & (np.arange(64)[:, None] < 28)
    mean = back[0, ..., :3][top].astype(np.float64).mean(0)
    assert np.linalg.norm(mean - HAIR) < np.linalg.norm(mean - SKIN)


def test_full_frame_matte_uses_the_landmarks_and_says_so():
    p = synthetic_portrait()
    p.alpha = np.full_like(p.alpha, 255)               # preprocess ran with matte=none
    head = build_proxy(p, ViewsConfig(proxy_detail=32, proxy_texture=64))
    assert any("matte" in n and "landmarks" in n for n in head.info["notes"])
    rgba, _ = head.render(p.c2w, p.K, S, S)
    cover = (rgba[0, ..., 3] > 127).mean()
    assert 0.2 < cover < 0.8                          # a head, not a box filling the frame


def test_tracer_agrees_with_brute_force_marching(head):
    """The fast renderer (coarse pass, bracketed refinement, safe stepping) finds the same
    first hits as a dense uniform march, including the face profile seen from the side."""
    import torch

    from recon.proxy.raycast import camera_rays, cast

    n = 64
    for az in (90.0, 200.0):
        c2w = cameras.orbit_cam2world(az, 5.0)
        rgba, depth = head.render(c2w, cameras.INTRINSICS_NORM, n, n)
        ys, xs = np.mgrid[0:n, 0:n] + 0.5
        o, d, zf = camera_rays(c2w, cameras.INTRINSICS_NORM, n, n, xs.ravel(), ys.ravel())
        with torch.no_grad():
            t = cast(head.surface, o.expand_as(d), d, step=0.0015)
        ref = torch.where(torch.isfinite(t), t * zf, torch.zeros_like(t)).reshape(n, n).numpy()
        a = rgba[0, ..., 3]
        assert (ref[a == 255] > 0).all() and (ref[a == 0] == 0).all()
        solid = a == 255
        err = np.abs(depth[0][solid] - ref[solid])
        # rays that only graze a surface (touching it over less than the tracer's smallest
        # step, at interior occluding contours) may take the surface behind: a few pixels
        assert (err < 1e-4).mean() > 0.995 and np.median(err) < 1e-5


def test_head_from_radius_and_texture_only(head):
    """A ProxyHead rebuilt from its grid and baked texture (e.g. loaded from disk) has the
    same geometry; its colours come from the texture alone and stay close to the original."""
    bare = ProxyHead(radius=head.radius, texture=head.texture)
    c2w = cameras.orbit_cam2world(np.array([0.0, 120.0]), np.zeros(2))
    a, da = head.render(c2w, cameras.INTRINSICS_NORM, 48, 48)
    b, db = bare.render(c2w, cameras.INTRINSICS_NORM, 48, 48)
    assert np.array_equal(a[..., 3], b[..., 3]) and np.array_equal(da, db)
    solid = a[..., 3] == 255
    assert np.abs(a[..., :3][solid].astype(int) - b[..., :3][solid].astype(int)).mean() < 12


def test_ring_elevation(portrait, head):
    cfg = ViewsConfig(num_views=4, resolution=32, elevation=20.0, proxy_detail=48, proxy_texture=256)
    vs = proxy_views(portrait, None, cfg, head=head)
    _, el = cameras.azimuth_elevation_of(vs.c2w)
    np.testing.assert_allclose(el, 20.0, atol=1e-3)
    back = proxy_backview(portrait, cfg, head=head)
    az, el = cameras.azimuth_elevation_of(back.c2w)
    assert abs(abs(az) - 180) < 1e-3 and abs(el - 20.0) < 1e-3
