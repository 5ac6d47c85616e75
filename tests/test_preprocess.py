"""The preprocess stage on real public-domain photos that ship in wheels (no download):
face found, PanoHead alignment, pose sign conventions, crop transform, matte, dataset.json."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from recon import cameras
from recon.config import PreprocessConfig
from recon.errors import EXIT_BAD_INPUT, InputError, NoFaceError
from recon.preprocess import preprocess
from recon.preprocess import align, faces
from recon.testing.faces_samples import grace_hopper_path, sample_rgb
from recon.types import Portrait

CFG = PreprocessConfig()


def _save(tmp_path_factory, name: str, rgb: np.ndarray) -> str:
    p = tmp_path_factory.mktemp("img") / f"{name}.png"
    Image.fromarray(rgb).save(p)
    return str(p)


@pytest.fixture(scope="module")
def astro_rgb():
    return sample_rgb("astronaut")


@pytest.fixture(scope="module")
def astro(tmp_path_factory, astro_rgb):
    path = _save(tmp_path_factory, "astronaut", astro_rgb)
    return path, preprocess(path, CFG)


@pytest.fixture(scope="module")
def astro_mirror(tmp_path_factory, astro_rgb):
    return preprocess(_save(tmp_path_factory, "astronaut_mirror", astro_rgb[:, ::-1].copy()), CFG)


@pytest.fixture(scope="module")
def astro_rot20(tmp_path_factory, astro_rgb):
    rotated = np.asarray(Image.fromarray(astro_rgb).rotate(20, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128)))
    return preprocess(_save(tmp_path_factory, "astronaut_rot20", rotated), CFG)


# ------------------------------------------------------------------ real photos
def test_astronaut(astro):
    _, p = astro
    assert isinstance(p, Portrait)
    assert p.image.shape == (512, 512, 3) and p.image.dtype == np.uint8
    assert p.alpha.shape == (512, 512) and p.alpha.dtype == np.uint8
    assert p.meta["num_faces"] == 1 and not any("faces found" in n for n in p.notes)
    assert abs(p.yaw_deg) < 20 and abs(p.pitch_deg) < 25 and abs(p.roll_deg) < 15
    assert p.meta["landmark_layout"] == faces.LAYOUT_MESH and p.landmarks.shape == (478, 2)
    assert p.source_size == (512, 512)
    # the camera is the PanoHead orbit camera at the estimated angles
    np.testing.assert_allclose(p.c2w, cameras.orbit_cam2world(p.yaw_deg, p.pitch_deg), atol=1e-12)
    np.testing.assert_allclose(p.K, cameras.INTRINSICS_NORM)
    az, el = cameras.azimuth_elevation_of(p.c2w)
    assert abs(az - p.yaw_deg) < 1e-3 and abs(el - p.pitch_deg) < 1e-3
    # the matte holds the face and leaves the corners of the studio background out
    five = align.apply_h(p.crop_from_source, np.array(p.meta["quad_source"]).mean(0, keepdims=True))[0]
    assert p.alpha[int(five[1]), int(five[0])] == 255
    assert p.alpha[5, 5] == 0 and p.alpha[5, -5] == 0
    assert 0.2 < (p.alpha > 127).mean() < 0.9


def test_grace_hopper():
    p = preprocess(grace_hopper_path(), CFG)
    assert p.meta["num_faces"] == 1
    assert abs(p.yaw_deg) < 20
    assert p.source_size == (512, 600)
    assert p.meta["decode"]["format"] == "JPEG"


def test_mirrored_photo_negates_yaw_and_roll(astro, astro_mirror):
    _, p = astro
    assert abs(astro_mirror.yaw_deg + p.yaw_deg) < 3.0
    assert abs(astro_mirror.pitch_deg - p.pitch_deg) < 3.0
    assert abs(astro_mirror.roll_deg + p.roll_deg) < 3.0


def test_in_plane_rotation_is_roll(astro, astro_rot20):
    _, p = astro
    # PIL rotates counter-clockwise: roll is counter-clockwise on screen
    assert abs((astro_rot20.roll_deg - p.roll_deg) - 20.0) < 3.0
    assert abs(astro_rot20.yaw_deg - p.yaw_deg) < 3.0
    assert abs(astro_rot20.pitch_deg - p.pitch_deg) < 3.0
    # the crop removed the rotation: the residual roll measured in the crop is small
    assert abs(astro_rot20.meta["pose"]["residual_roll_deg"]) < 3.0


def test_yaw_sign_on_a_turned_head(astro_rgb, tmp_path):
    """Squeezing the right half of the face and stretching the left fakes nothing reliable,
    so use geometry instead: a camera toward the subject's left (+yaw) sees the nose move to
    the subject's left (image right). Check the sign through the landmark model directly."""
    from recon.preprocess import pose

    fit = faces.find_face(astro_rgb)
    R0, _ = pose.head_rotation(fit.points)
    az0 = pose.camera_angles(R0)[0]
    # rotate the 3D landmarks about the vertical axis through their centre: the head turns to its
    # own right (nose toward image left), which is what a camera moved to the subject's left sees
    pts = fit.points.copy()
    c = pts.mean(0)
    th = math.radians(25)
    Ry = np.array([[math.cos(th), 0, math.sin(th)], [0, 1, 0], [-math.sin(th), 0, math.cos(th)]])
    turned = (pts - c) @ Ry.T + c
    nose_dx = turned[faces.NOSE_TIP, 0] - pts[faces.NOSE_TIP, 0]
    R1, _ = pose.head_rotation(turned)
    az1 = pose.camera_angles(R1)[0]
    assert nose_dx < 0                       # nose moved toward image left
    assert abs((az1 - az0) - 25.0) < 2.0     # camera azimuth grew: camera toward the subject's left


@pytest.mark.parametrize("az,el", [(0.0, 0.0), (30.0, 10.0), (-40.0, -15.0), (120.0, 5.0), (-170.0, 20.0)])
def test_camera_angles_invert_the_orbit_camera(az, el):
    """pose.camera_angles reads back the angles recon.cameras built: one sign convention."""
    from recon.preprocess import pose

    c2w = cameras.orbit_cam2world(az, el)
    got_az, got_el, roll = pose.camera_angles(c2w[:3, :3].T)
    assert abs(got_az - az) < 1e-4 and abs(got_el - el) < 1e-4 and abs(roll) < 1e-4
    # the frontal camera sees the canonical face's subject-left eye on the image's right
    R = cameras.orbit_cam2world(0.0, 0.0)[:3, :3].T
    left_eye = R @ pose.CANON_PTS[list(pose.CANON_IDX).index(263)]
    right_eye = R @ pose.CANON_PTS[list(pose.CANON_IDX).index(33)]
    assert left_eye[0] > right_eye[0]


def test_crop_transform_maps_source_landmarks_onto_crop(astro, astro_rgb):
    path, p = astro
    src = faces.find_face(astro_rgb)                         # landmarks detected on the source
    mapped = align.apply_h(p.crop_from_source, src.points[:, :2])
    np.testing.assert_allclose(mapped, p.landmarks, atol=1e-6)
    on_crop = faces.find_face(p.image)                       # landmarks detected on the crop itself
    err = np.linalg.norm(on_crop.points[:, :2] - mapped, axis=1)
    assert np.median(err) < 3.0 and np.percentile(err, 90) < 6.0


@pytest.mark.parametrize("zoom", [1.0, 6.0])
def test_transform_chain_places_a_dot_exactly(zoom):
    """The 3x3 crop_from_source equals the real warp chain (2x Lanczos, INTER_AREA, 563 -> 512),
    also when a large photo is shrunk first (zoom 6: the face quad is ~1100 px)."""
    img = np.full((int(600 * zoom), int(700 * zoom), 3), 20, np.uint8)
    x0, y0 = 333.0 * zoom, 290.0 * zoom
    r = int(3 * zoom)
    img[int(y0) - r:int(y0) + r + 1, int(x0) - r:int(x0) + r + 1] = 255
    quad, *_ = align.ffhq_quad(np.array([300, 250]) * zoom, np.array([400, 262]) * zoom,
                               np.array([310, 370]) * zoom, np.array([392, 378]) * zoom)
    T = align.crop_from_source_matrix(quad)
    crop = align.resize_canvas(align.warp_canvas(img, quad)[0]).astype(np.float64)[..., 0] - 20
    w = np.clip(crop, 0, None)
    ys, xs = np.mgrid[:512, :512]
    got = np.array([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
    want = align.apply_h(T, [[x0, y0]])[0]
    assert np.linalg.norm(got - want) < 0.1
    # PanoHead geometry: quad corners land on the face square of the 563 canvas
    M = align.canvas_matrix(quad)
    corners = quad[:3] @ M[:, :2].T + M[:, 2]
    np.testing.assert_allclose(corners, [[25, 51], [25, 562], [536, 562]], atol=1e-9)
    assert (align.CANVAS_W, align.CANVAS_H, align.CANVAS_LEFT, align.CANVAS_TOP) == (563, 563, 25, 51)


def test_save_writes_official_dataset_json_and_round_trips(astro, tmp_path):
    _, p = astro
    p.save(tmp_path)
    for f in ("image.png", "alpha.png", "rgba.png", "dataset.json", "portrait.json"):
        assert (tmp_path / f).is_file()
    data = json.loads((tmp_path / "dataset.json").read_text())
    assert list(data) == ["labels"] and len(data["labels"]) == 1
    name, label = data["labels"][0]
    assert name == "image.png" and len(label) == 25 and all(isinstance(v, float) for v in label)
    entries = cameras.read_dataset_json(tmp_path / "dataset.json")
    np.testing.assert_allclose(entries[0][1], p.c2w, atol=1e-12)
    np.testing.assert_allclose(entries[0][2], cameras.INTRINSICS_NORM)
    q = Portrait.load(tmp_path)
    assert (q.image == p.image).all() and (q.alpha == p.alpha).all()
    np.testing.assert_allclose(q.crop_from_source, p.crop_from_source)
    np.testing.assert_allclose(q.landmarks, p.landmarks)
    assert q.yaw_deg == p.yaw_deg and q.roll_deg == p.roll_deg and q.notes == p.notes
    rgba = np.asarray(Image.open(tmp_path / "rgba.png"))
    assert rgba.shape == (512, 512, 4) and (rgba[..., 3] == p.alpha).all()


# ------------------------------------------------------------------ faces and overrides
def test_no_face_raises(tmp_path):
    for name, rgb in [("coffee", sample_rgb("coffee")), ("flat", np.full((300, 400, 3), 180, np.uint8))]:
        path = tmp_path / f"{name}.png"
        Image.fromarray(rgb).save(path)
        with pytest.raises(NoFaceError) as ei:
            preprocess(path, CFG)
        assert ei.value.exit_code == EXIT_BAD_INPUT
        assert f"{name}.png" in ei.value.message
        assert "--face-box" in ei.value.hint and "--yaw" in ei.value.hint


def test_face_box_on_a_photo_without_a_detected_face(tmp_path):
    path = tmp_path / "coffee.png"
    Image.fromarray(sample_rgb("coffee")).save(path)
    cfg = PreprocessConfig(face_box=(200.0, 100.0, 180.0, 180.0))
    p = preprocess(path, cfg)
    assert p.image.shape == (512, 512, 3)
    assert p.meta["landmark_layout"] == faces.LAYOUT_CANONICAL and p.landmarks.shape == (5, 2)
    assert p.face_box == (200.0, 100.0, 180.0, 180.0)
    assert any("canonical" in n for n in p.notes) and any("assumed frontal" in n for n in p.notes)
    assert p.yaw_deg == 0.0 and p.pitch_deg == 0.0
    # the box's centre lands near the middle of the crop's face square
    c = align.apply_h(p.crop_from_source, [[290.0, 190.0]])[0]
    assert 180 < c[0] < 330 and 180 < c[1] < 380


def test_cat_with_face_box_and_pose_override(tmp_path):
    path = tmp_path / "chelsea.png"
    Image.fromarray(sample_rgb("chelsea")).save(path)
    cfg = PreprocessConfig(face_box=(110.0, 40.0, 230.0, 230.0), yaw=15.0, pitch=-5.0)
    p = preprocess(path, cfg)
    assert p.image.shape == (512, 512, 3) and p.alpha.shape == (512, 512)
    assert p.yaw_deg == 15.0 and p.pitch_deg == -5.0
    np.testing.assert_allclose(p.c2w, cameras.orbit_cam2world(15.0, -5.0), atol=1e-12)
    assert any("yaw set by the user" in n for n in p.notes)


def test_face_box_outside_image_refused(astro):
    path, _ = astro
    with pytest.raises(InputError, match="outside"):
        preprocess(path, PreprocessConfig(face_box=(900.0, 900.0, 50.0, 50.0)))


def test_two_faces_uses_the_largest(tmp_path, astro_rgb):
    big = astro_rgb
    small = np.asarray(Image.fromarray(astro_rgb).resize((384, 384), Image.LANCZOS))
    canvas = np.full((512, 916, 3), 200, np.uint8)
    canvas[:, :512] = big
    canvas[64:448, 522:906] = small
    path = tmp_path / "two.png"
    Image.fromarray(canvas).save(path)
    p = preprocess(path, CFG)
    assert p.meta["num_faces"] == 2
    assert "2 faces found; used the largest" in p.notes
    assert p.face_box[0] + p.face_box[2] < 512          # the box lies in the big copy


def test_small_face_refused(astro):
    path, _ = astro
    with pytest.raises(InputError, match="face is only"):
        preprocess(path, PreprocessConfig(min_face=400))


def test_input_alpha_is_used_instead_of_matting(tmp_path, astro_rgb):
    alpha = np.zeros((512, 512), np.uint8)
    yy, xx = np.mgrid[:512, :512]
    alpha[(xx - 228) ** 2 + (yy - 125) ** 2 < 75 ** 2] = 255      # a disc around the face
    path = tmp_path / "cutout.png"
    Image.fromarray(np.dstack([astro_rgb, alpha])).save(path)
    p = preprocess(path, CFG)
    assert p.meta["matte"] == "input alpha channel"
    # the warped input alpha: the disc centre is opaque, the crop's corners are not
    c = align.apply_h(p.crop_from_source, [[228.0, 125.0]])[0]
    assert 0 <= c[0] < 512 and 0 <= c[1] < 512
    assert p.alpha[int(c[1]), int(c[0])] == 255
    assert p.alpha[5, 5] == 0 and p.alpha[-5, -5] == 0


def test_matte_none_and_progress(astro):
    path, _ = astro
    seen = []
    p = preprocess(path, PreprocessConfig(matte="none"), progress=lambda i, n, m: seen.append((i, n, m)))
    assert (p.alpha == 255).all()
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1]
