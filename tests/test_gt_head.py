"""The ground-truth head of benchmarks/bench_fit.py: renders consistent with its surface."""
import numpy as np
import pytest
import torch

from recon import cameras
from recon.testing.gt_head import chamfer, gt_head, head_radius, ring_and_holdout, sample_surface, views_of


@pytest.fixture(scope="module")
def head():
    return gt_head(rows=65, cols=128, tex_rows=64)


def _K(n):
    return np.repeat(cameras.INTRINSICS_NORM[None], n, 0)


def test_shape_is_symmetric_and_head_sized(head):
    d = np.random.default_rng(0).normal(size=(500, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    np.testing.assert_allclose(head_radius(d), head_radius(d * [-1, 1, 1]), atol=1e-12)   # left-right mirror
    assert 0.4 < head.height < 0.6
    assert head_radius(np.array([[0.0, -0.08, 1.0]]) / np.linalg.norm([0, -0.08, 1]))[0] > 0.22   # the nose sticks out
    ring, held = ring_and_holdout()
    assert ring.shape == (36, 4, 4) and held.shape == (12, 4, 4)
    az, el = cameras.azimuth_elevation_of(held)
    assert np.all(np.abs(el) > 10)                            # held-out views are off the ring's pitch


def test_silhouettes_are_mirror_images_and_depth_reprojects_onto_the_surface(head):
    c2w = cameras.orbit_cam2world(np.array([0.0, 90.0, -90.0]), np.zeros(3))
    rgba, depth = head.render(c2w, _K(3), 32, 32)
    a = rgba[..., 3].astype(float) / 255
    np.testing.assert_allclose(a[0], a[0][:, ::-1], atol=0.02)        # front view: symmetric
    np.testing.assert_allclose(a[1], a[2][:, ::-1], atol=0.02)        # left and right profiles mirror
    assert (a[0] > 0.5).sum() > 100 and a[0][0, 0] == 0
    # unproject the front view's depth: every opaque pixel lands on the surface
    Kp = cameras.intrinsics_pixels(cameras.INTRINSICS_NORM, 32, 32)
    ys, xs = np.nonzero(rgba[0, ..., 3] == 255)
    z = depth[0, ys, xs]
    pc = np.stack([(xs + 0.5 - Kp[0, 2]) / Kp[0, 0] * z, (ys + 0.5 - Kp[1, 2]) / Kp[1, 1] * z, z], 1)
    pw = pc @ c2w[0, :3, :3].T + c2w[0, :3, 3]
    f = head.surface.signed(torch.as_tensor(pw, dtype=torch.float32)).numpy()
    assert np.abs(f).max() < 2e-3
    # and re-projects into the profile view where that view sees it at the same depth
    vm = cameras.world_to_camera(c2w[1])
    q = pw @ vm[:3, :3].T + vm[:3, 3]
    u, v = (q[:, 0] / q[:, 2] * Kp[0, 0] + Kp[0, 2]).astype(int), (q[:, 1] / q[:, 2] * Kp[1, 1] + Kp[1, 2]).astype(int)
    seen = (depth[1, v, u] > 0) & (np.abs(depth[1, v, u] - q[:, 2]) < 0.01)
    assert seen.sum() > 10                                      # the cheek/ear side is visible from both


def test_views_and_chamfer(head):
    vs = views_of(head, cameras.orbit_cam2world(np.array([0.0, 180.0]), np.zeros(2)), 24)
    assert vs.images.shape == (2, 24, 24, 4) and vs.depth.shape == (2, 24, 24)
    assert not np.array_equal(vs.images[0], vs.images[1][:, ::-1])      # front and back differ (texture)
    mesh = head.mesh()
    assert mesh.is_watertight
    a, b = sample_surface(mesh, 20000, seed=1), sample_surface(mesh, 20000, seed=2)
    self_cd = chamfer(a, b)["chamfer"] / head.height
    assert self_cd < 0.005                                              # ~0: sampling spacing only
    shifted = chamfer(a, b + [0.0, 0.01, 0.0])["chamfer"] / head.height
    assert shifted > 2 * self_cd and shifted > 0.005                    # and it notices a 0.01-unit (2 % of height) offset
