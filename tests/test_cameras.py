import json
import math
from pathlib import Path

import numpy as np
import pytest

from recon import cameras
from recon.errors import InputError

from .conftest import FIXTURES


@pytest.fixture(scope="module")
def cams():
    return json.loads((FIXTURES / "panohead" / "cameras.json").read_text())


def test_ring36_matches_panohead(cams):
    ring = cameras.ring_cam2world(36)
    ref = np.array([c["cam2world"] for c in cams["ring36"]])
    assert np.abs(ring - ref).max() < 1e-6
    labels = [cameras.label25(c) for c in ring]
    assert np.abs(np.array(labels) - np.array([c["label25"] for c in cams["ring36"]])).max() < 1e-6


def test_dp360_ring32_written_with_3p14(cams):
    ref = cams["dp360_ring32_3p14"]
    h = np.array([e["yaw_h"] for e in ref]); v = np.array([e["pitch_v"] for e in ref])
    c2w = cameras.lookat_cam2world(h, v)
    assert np.abs(c2w - np.array([e["cam2world"] for e in ref])).max() < 1e-6


def test_test_cameras(cams):
    for e in cams["test_cameras"]:
        assert np.abs(cameras.lookat_cam2world(e["yaw_h"], e["pitch_v"]) - np.array(e["cam2world"])).max() < 1e-6


def test_frontal_camera_looks_at_face_along_minus_z():
    c2w = cameras.orbit_cam2world(0.0, 0.0)
    assert np.allclose(c2w[:3, 3], [0, 0, cameras.RADIUS], atol=1e-6)
    assert np.allclose(c2w[:3, 2], [0, 0, -1], atol=1e-6)   # camera z (forward) = world -Z
    assert np.allclose(c2w[:3, 1], [0, -1, 0], atol=1e-6)   # camera y (down) = world -Y
    side = cameras.orbit_cam2world(90.0, 0.0)
    assert np.allclose(side[:3, 3], [cameras.RADIUS, 0, 0], atol=1e-5)
    az, el = cameras.azimuth_elevation_of(cameras.orbit_cam2world([10, -30, 170], [5, -20, 0]))
    assert np.allclose(az, [10, -30, 170], atol=1e-4) and np.allclose(el, [5, -20, 0], atol=1e-4)
    h, v = cameras.degrees_to_hv(25.0, 12.0)
    assert np.allclose(cameras.hv_to_degrees(h, v), (25.0, 12.0))
    assert cameras.elevation_to_v(0.0) == pytest.approx(math.pi / 2)


def test_ring_back_view_is_half_way():
    ring = cameras.ring_cam2world(36)
    assert np.allclose(ring[18][:3, 3], [0, 0, -cameras.RADIUS], atol=1e-5)


def test_intrinsics_and_fov():
    K = cameras.intrinsics_pixels(cameras.INTRINSICS_NORM, 512, 512)
    assert K[0, 0] == pytest.approx(4.2647 * 512) and K[0, 2] == 256
    assert cameras.FOV_DEG == pytest.approx(13.37, abs=0.01)
    assert np.allclose(cameras.intrinsics_normalised(K, 512, 512), cameras.INTRINSICS_NORM)


def test_conversions_round_trip():
    c2w = cameras.orbit_cam2world(33.0, 12.0)
    assert np.allclose(cameras.world_to_camera(c2w) @ c2w, np.eye(4), atol=1e-9)
    assert np.allclose(cameras.from_opengl_c2w(cameras.to_opengl_c2w(c2w)), c2w)
    gl = cameras.to_opengl_c2w(c2w)
    assert np.allclose(gl[:3, 2], -c2w[:3, 2])  # OpenGL looks down -z


def test_dataset_json_round_trip(tmp_path):
    ring = cameras.ring_cam2world(4)
    entries = [(f"{i:03d}.png", cameras.label25(c)) for i, c in enumerate(ring)]
    cameras.write_dataset_json(tmp_path / "dataset.json", entries)
    back = cameras.read_dataset_json(tmp_path / "dataset.json")
    assert [b[0] for b in back] == [e[0] for e in entries]
    assert np.allclose(np.stack([b[1] for b in back]), ring)


@pytest.mark.parametrize("content", ["", "{", '{"labels": []}', '{"labels": [["a.png", [1, 2, 3]]]}', '[1,2]'])
def test_dataset_json_malformed_is_input_error(tmp_path, content):
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(InputError):
        cameras.read_dataset_json(tmp_path / "dataset.json")


def test_pixel_rays_centre_looks_at_the_origin():
    c2w = cameras.orbit_cam2world(np.array([30.0]), np.array([10.0]))[0]
    o, d, z = cameras.pixel_rays(c2w, cameras.INTRINSICS_NORM, 64, 64)
    centre = 0.25 * (d[31, 31] + d[31, 32] + d[32, 31] + d[32, 32])
    np.testing.assert_allclose(o, cameras.camera_center(c2w[None])[0], atol=1e-9)
    np.testing.assert_allclose(centre / np.linalg.norm(centre), -o / np.linalg.norm(o), atol=1e-3)
    assert np.allclose(np.linalg.norm(d, axis=-1), 1) and (z <= 1).all() and z[32, 32] > 0.999
