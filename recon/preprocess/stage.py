"""The preprocess stage: image file -> Portrait (DESIGN §1 stage 1, §5)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import PreprocessConfig
from ..errors import InputError, NoFaceError, UsageError
from ..types import Portrait
from . import align, faces, matte as matting, pose
from .decode import load_image

Progress = Callable[[int, int, str], None]
STEPS = 5


def _has_real_alpha(alpha: np.ndarray | None) -> bool:
    """An alpha channel that actually cuts something out (not a fully opaque RGBA export)."""
    return alpha is not None and float((alpha < 128).mean()) > 0.005


def preprocess(image_path, cfg: PreprocessConfig | None = None, progress: Progress | None = None) -> Portrait:
    """Decode, find the face, align like PanoHead (563 canvas -> cfg.size), estimate the
    camera, matte. Raises InputError / NoFaceError (exit 3) for unusable input."""
    cfg = cfg or PreprocessConfig()
    if cfg.detector != "mediapipe":
        raise UsageError(f"preprocess.detector={cfg.detector!r} is not available", hint="use mediapipe")
    if cfg.matte not in ("mediapipe", "none"):
        raise UsageError(f"preprocess.matte={cfg.matte!r} is not available", hint="use mediapipe or none")
    if not 64 <= cfg.size <= 4096:
        raise UsageError(f"preprocess.size={cfg.size} is out of range", hint="use 512 (PanoHead's size)")
    tick = progress or (lambda i, n, msg: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # 1. decode
    tick(0, STEPS, "decoding image")
    dec = load_image(image_path, max_side=cfg.max_side)
    rgb = dec.rgb
    notes = list(dec.info.get("notes", []))
    timings["decode"] = time.perf_counter() - t0

    # 2. face + landmarks (source pixels)
    tick(1, STEPS, "finding the face")
    t = time.perf_counter()
    try:
        fit = faces.find_face(rgb, cfg.face_box, cfg.min_face)
    except NoFaceError as e:
        raise NoFaceError(f"no face found in {image_path}", hint=e.hint) from None
    notes += fit.notes
    timings["face"] = time.perf_counter() - t

    # 3. PanoHead alignment
    tick(2, STEPS, "aligning the crop")
    t = time.perf_counter()
    five = fit.five()
    try:
        quad, _, qx, _ = align.ffhq_quad(five[0], five[1], five[3], five[4])
    except ValueError:
        raise InputError("the face landmarks are degenerate (eyes and mouth coincide)",
                         hint="pass the face with --face-box x,y,w,h") from None
    T = align.crop_from_source_matrix(quad, cfg.size)
    canvas, outside = align.warp_canvas(rgb, quad)
    image = align.resize_canvas(canvas, cfg.size)
    roll = align.roll_degrees(qx)
    quad_side = float(np.linalg.norm(quad[1] - quad[0]))
    if quad_side < 256:
        # PanoHead's cropper drops such faces (min_size=256); we go on but say the crop is soft
        notes.append(f"small face: the {quad_side:.0f} px crop square is upscaled {align.PANOHEAD_SIZE / quad_side:.1f}x (soft result)")
    if outside > 0.25:
        notes.append(f"{outside:.0%} of the crop lies outside the photo (filled by reflection and blur)")
    timings["align"] = time.perf_counter() - t

    # 4. pose, measured in the crop (the crop's similarity transform removed the roll)
    tick(3, STEPS, "estimating head pose")
    t = time.perf_counter()
    pts_crop = align.apply_h(T, fit.points[:, :2])
    scale = float(np.sqrt(abs(np.linalg.det(T[:2, :2]))))
    pose_info: dict = {"source": "face mesh"}
    if fit.has_depth:
        R, rms = pose.head_rotation(np.column_stack([pts_crop, fit.points[:, 2] * scale]))
        az, el, residual_roll = pose.camera_angles(R)
        pose_info.update(estimated_yaw_deg=az, estimated_pitch_deg=el, residual_roll_deg=residual_roll, fit_rms_cm=rms)
    else:
        az, el = 0.0, 0.0
        pose_info["source"] = "none (no 3D landmarks)"
        if cfg.yaw is None or cfg.pitch is None:
            notes.append("head pose unknown without landmarks; assumed frontal (set --yaw/--pitch to correct)")
    if cfg.yaw is not None:
        az = float(cfg.yaw)
        notes.append(f"yaw set by the user to {az:g} deg")
    if cfg.pitch is not None:
        el = float(cfg.pitch)
        notes.append(f"pitch set by the user to {el:g} deg")
    if not (-180.0 <= az <= 180.0 and -89.0 <= el <= 89.0):
        raise InputError(f"camera yaw {az:g} / pitch {el:g} deg is out of range", hint="yaw in [-180, 180], pitch in [-89, 89]")
    c2w, K = pose.pose_camera(az, el)
    timings["pose"] = time.perf_counter() - t

    # 5. matte
    tick(4, STEPS, "matting the foreground")
    t = time.perf_counter()
    face_xy = tuple(align.apply_h(T, five[2:3])[0])  # nose tip in the crop
    if _has_real_alpha(dec.alpha):
        a_canvas, _ = align.warp_canvas(dec.alpha, quad, blur_borders=False)
        alpha = align.resize_canvas(a_canvas, cfg.size)
        matte_source = "input alpha channel"
    elif cfg.matte == "none":
        alpha = np.full(image.shape[:2], 255, np.uint8)
        matte_source = "none (opaque)"
    else:
        alpha = matting.matte(image, face_xy)
        matte_source = "mediapipe selfie segmentation"
        if (alpha >= 128).mean() < 0.01:
            alpha = np.full(image.shape[:2], 255, np.uint8)
            matte_source = "none (segmentation found no foreground)"
            notes.append("the matte found no person in the crop; alpha left fully opaque")
    timings["matte"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    tick(5, STEPS, "done")

    x, y, bw, bh = fit.box
    return Portrait(
        image=np.ascontiguousarray(image[..., :3]), alpha=np.ascontiguousarray(alpha), c2w=c2w, K=K,
        yaw_deg=float(az), pitch_deg=float(el), roll_deg=float(roll), landmarks=pts_crop,
        crop_from_source=T, source=str(Path(image_path)), source_size=dec.size,
        face_box=(float(x), float(y), float(bw), float(bh)), notes=notes,
        meta={
            "decode": {k: v for k, v in dec.info.items() if k != "notes"},
            "landmark_layout": fit.layout,
            "landmarks_z": (fit.points[:, 2] * scale).tolist() if fit.has_depth else None,
            "detection_score": fit.score, "num_faces": fit.num_faces,
            "quad_source": quad.tolist(), "canvas_size": [align.CANVAS_W, align.CANVAS_H],
            "face_square_in_canvas": [align.CANVAS_LEFT, align.CANVAS_TOP, align.PANOHEAD_SIZE],
            "outside_fraction": outside, "pose": pose_info, "matte": matte_source,
            "timings_s": timings,
        },
    )
