"""Align and crop a face the way PanoHead's cropper does (FFHQ/EG3D recipe).

PanoHead (`3DDFA_V2_cropping/recrop_images.py`, `crop_final`) builds the FFHQ oriented
quad from the eye centres and mouth corners, maps it with an affine warp onto a square
of side 511 whose top-left corner sits at (25, 51) of a 563x563 canvas (512 x 1.1:
5% margin left and right, 10% on top, none below), warps at 2x with Lanczos and
reflected borders then halves with INTER_AREA, and blends a box-blurred copy in where
the quad left the photo. PanoHead's projector and DiffPortrait360's loader then resize
the 563 canvas to 512 (Lanczos). We do the same and keep the whole chain as one 3x3
matrix, `crop_from_source`, so any source pixel maps exactly into the final crop.

PanoHead additionally re-centres and re-scales the quad with 3DDFA's fitted head
translation/scale ("recrop"); that needs 3DDFA's BFM fit, which we do not have, so the
quad is the plain landmark quad (as EG3D's FFHQ crop).
"""
from __future__ import annotations

import math

import numpy as np

PANOHEAD_SIZE = 512                 # the face square's nominal side
TOP_EXPAND, LEFT_EXPAND, RIGHT_EXPAND, BOTTOM_EXPAND = 0.1, 0.05, 0.05, 0.0
CANVAS_W = int(PANOHEAD_SIZE * (1 + LEFT_EXPAND + RIGHT_EXPAND))   # 563
CANVAS_H = int(PANOHEAD_SIZE * (1 + TOP_EXPAND + BOTTOM_EXPAND))   # 563
CANVAS_TOP = int(PANOHEAD_SIZE * TOP_EXPAND)                       # 51
CANVAS_LEFT = int(PANOHEAD_SIZE * LEFT_EXPAND)                     # 25
UPSAMPLE = 2


def ffhq_quad(eye_right, eye_left, mouth_right, mouth_left):
    """FFHQ oriented quad (4, 2) plus its centre c and half-axes x, y (source pixels).

    eye_right/mouth_right are the subject's right (image left in a frontal photo),
    i.e. PanoHead's `left_e`/`left_m` (dlib 36-41 and 48).
    """
    le, re_ = np.asarray(eye_right, np.float64), np.asarray(eye_left, np.float64)
    lm, rm = np.asarray(mouth_right, np.float64), np.asarray(mouth_left, np.float64)
    eye_to_eye = re_ - le
    eye_avg = (le + re_) * 0.5
    mouth_avg = (lm + rm) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    n = np.hypot(*x)
    if not np.isfinite(n) or n < 1e-6:
        raise ValueError("degenerate eye/mouth landmarks")
    x = x / n
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, c, x, y


def affine_from_3_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 affine mapping src[i] -> dst[i] (i < 3), solved in float64 (cv2.getAffineTransform's maths)."""
    A = np.zeros((6, 6))
    b = np.zeros(6)
    for i in range(3):
        A[2 * i, 0:2], A[2 * i, 2] = src[i], 1.0
        A[2 * i + 1, 3:5], A[2 * i + 1, 5] = src[i], 1.0
        b[2 * i], b[2 * i + 1] = dst[i]
    return np.linalg.solve(A, b).reshape(2, 3)


def canvas_matrix(quad: np.ndarray) -> np.ndarray:
    """PanoHead's `mat`: quad corners 0, 1, 2 -> (25, 51), (25, 562), (536, 562) of the 563 canvas."""
    s = PANOHEAD_SIZE - 1
    bound = np.array([[CANVAS_LEFT, CANVAS_TOP], [CANVAS_LEFT, CANVAS_TOP + s], [CANVAS_LEFT + s, CANVAS_TOP + s]], np.float64)
    return affine_from_3_points(np.asarray(quad, np.float64)[:3], bound)


def crop_from_source_matrix(quad: np.ndarray, out_size: int = PANOHEAD_SIZE) -> np.ndarray:
    """3x3: source pixel (x, y, 1) -> pixel of the final out_size crop (pixel centres at integers).

    Chain: `mat` on the 2x-upsampled grid, INTER_AREA halving (a -0.25 px shift),
    then the 563 -> out_size resize (centres aligned: (u + 0.5) * out/563 - 0.5).
    """
    M = np.vstack([canvas_matrix(quad), [0.0, 0.0, 1.0]])
    half = np.array([[1.0, 0.0, -0.25], [0.0, 1.0, -0.25], [0.0, 0.0, 1.0]]) if UPSAMPLE == 2 else np.eye(3)
    sx, sy = out_size / CANVAS_W, out_size / CANVAS_H
    R = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
    return R @ half @ M


def apply_h(T: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 3x3 (affine) transform to (N, 2) points."""
    pts = np.asarray(pts, np.float64)
    return pts @ T[:2, :2].T + T[:2, 2]


def warp_canvas(img: np.ndarray, quad: np.ndarray, blur_borders: bool = True,
                border_mode: str = "reflect") -> tuple[np.ndarray, float]:
    """PanoHead's `crop_final`: the 563x563 canvas (uint8, same channels as img).

    One addition: a source more than 4x larger than the canvas is first shrunk with
    INTER_AREA (anti-aliasing); the geometry stays exactly `canvas_matrix(quad)`.

    Returns (canvas, fraction of the canvas that lies outside the source image).
    """
    import cv2

    M = canvas_matrix(quad)
    border = cv2.BORDER_REFLECT if border_mode == "reflect" else cv2.BORDER_CONSTANT
    src, Ms = img, M
    scale = math.sqrt(abs(np.linalg.det(M[:, :2])))
    if UPSAMPLE * scale < 0.5:
        # PanoHead warps straight from the full-resolution photo; when the face is large that
        # aliases (warpAffine does not low-pass). Shrink with INTER_AREA first so the 2x grid samples
        # at about 1:1, and fold the shrink into the matrix: the geometry is unchanged.
        h, w = img.shape[:2]
        f = UPSAMPLE * scale
        sw, sh = max(1, round(w * f)), max(1, round(h * f))
        src = cv2.resize(np.ascontiguousarray(img), (sw, sh), interpolation=cv2.INTER_AREA)
        fx, fy = sw / w, sh / h
        D = np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5], [0.0, 0.0, 1.0]])
        Ms = (np.vstack([M, [0.0, 0.0, 1.0]]) @ np.linalg.inv(D))[:2]
    big = cv2.warpAffine(np.ascontiguousarray(src), UPSAMPLE * Ms, (CANVAS_W * UPSAMPLE, CANVAS_H * UPSAMPLE),
                         flags=cv2.INTER_LANCZOS4, borderMode=border)
    canvas = cv2.resize(big, (CANVAS_W, CANVAS_H), interpolation=cv2.INTER_AREA)
    inside = cv2.warpAffine(np.full(src.shape[:2], 255, np.uint8), Ms, (CANVAS_W, CANVAS_H))
    outside = 1.0 - float(inside.mean()) / 255.0
    if blur_borders and inside.mean() < 255:
        s = PANOHEAD_SIZE - 1
        mask_kernel = int(s * 0.02) * 2 + 1      # 21
        blur_kernel = int(s * 0.03) * 2 + 1      # 31
        m = cv2.blur(inside.astype(np.float32), (mask_kernel, mask_kernel)) / 255.0
        blurred = cv2.blur(canvas, (blur_kernel, blur_kernel))
        if canvas.ndim == 3:
            m = m[..., None]
        canvas = (canvas * m + blurred * (1 - m)).astype(np.uint8)   # PanoHead truncates, it does not round
    return canvas, outside


def resize_canvas(canvas: np.ndarray, out_size: int = PANOHEAD_SIZE) -> np.ndarray:
    """563 -> out_size, Lanczos, as PanoHead's projector (PIL) does."""
    from PIL import Image

    if canvas.shape[0] == out_size and canvas.shape[1] == out_size:
        return canvas
    return np.asarray(Image.fromarray(canvas).resize((out_size, out_size), Image.LANCZOS))


def roll_degrees(x_axis: np.ndarray) -> float:
    """In-plane angle of the quad's x axis, counter-clockwise as seen on screen (image y points down)."""
    return -math.degrees(math.atan2(float(x_axis[1]), float(x_axis[0])))
