"""Head pose from 3D face-mesh landmarks, expressed as the PanoHead camera.

The face mesh gives every landmark an (x, y) in pixels and a relative depth z in the
same pixel scale (+z away from the camera): an OpenCV-axes point cloud under a
weak-perspective camera. A similarity (Umeyama) fit of a rigid canonical face to it
gives the head rotation without assuming a focal length.

The canonical points are landmark positions of mediapipe's canonical face model
(`face_geometry/data/canonical_face_model.obj`, Apache-2.0; centimetres). That model
is left-right symmetric, its +X is the subject's left, +Y up and +Z the direction the
face looks: exactly our world frame (DESIGN §5). Subject-left points are the mirror
images of the subject-right ones listed here.
"""
from __future__ import annotations

import math

import numpy as np

from .. import cameras

# mesh index: canonical (x, y, z), subject's right side or midline
_RIGHT_OR_MID = {
    1: (0.0, -1.126865, 7.475604),      # nose tip
    4: (0.0, -0.463170, 7.586580),
    6: (0.0, 2.473255, 5.788627),       # nose bridge
    10: (0.0, 8.261778, 4.481535),      # forehead top
    151: (0.0, 6.545390, 5.027311),
    9: (0.0, 4.885979, 5.385258),
    168: (0.0, 3.271027, 5.236015),
    197: (0.0, 1.728369, 6.316750),
    2: (0.0, -2.089024, 6.058267),
    0: (0.0, -3.406404, 5.979507),      # upper lip
    17: (0.0, -5.365123, 5.535441),     # lower lip
    200: (0.0, -6.991499, 5.153478),
    199: (0.0, -7.942194, 5.181173),
    152: (0.0, -9.403378, 4.264492),    # chin
    33: (-4.445859, 2.663991, 3.173422),     # eye outer corner
    133: (-1.856432, 2.585245, 3.757904),    # eye inner corner
    159: (-3.177186, 2.964136, 3.876973),    # upper lid
    145: (-3.177186, 2.294265, 3.775704),    # lower lid
    70: (-5.720968, 4.254584, 2.830852),     # brow outer
    105: (-3.986562, 5.109487, 4.466315),    # brow
    61: (-2.456206, -4.342621, 4.283884),    # mouth corner
    93: (-7.542244, -1.049282, -2.431321),   # face side (near the tragus)
    132: (-7.270895, -2.890917, -2.252455),
    58: (-6.719682, -4.788645, -1.745401),   # jaw
    172: (-5.940524, -6.223629, -0.631468),
    136: (-5.085276, -7.178590, 0.714711),
    149: (-3.210651, -8.533278, 2.802001),
    148: (-1.292924, -9.295920, 4.094063),
}
# subject-right index -> its subject-left mirror in the mesh topology
_MIRROR = {33: 263, 133: 362, 159: 386, 145: 374, 70: 300, 105: 334, 61: 291, 93: 323,
           132: 361, 58: 288, 172: 397, 136: 365, 149: 378, 148: 377}


def _canonical() -> tuple[np.ndarray, np.ndarray]:
    idx, pts = [], []
    for i, p in _RIGHT_OR_MID.items():
        idx.append(i)
        pts.append(p)
        if i in _MIRROR:
            idx.append(_MIRROR[i])
            pts.append((-p[0], p[1], p[2]))
    return np.array(idx), np.array(pts, np.float64)


CANON_IDX, CANON_PTS = _canonical()


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising |s R src + t - dst|^2 over (N, 3) point sets (no reflection)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1.0
    R = U @ D @ Vt
    var = (a ** 2).sum() / len(src)
    s = float(np.trace(np.diag(S) @ D) / var)
    return s, R, mu_d - s * R @ mu_s


def head_rotation(points: np.ndarray) -> tuple[np.ndarray, float]:
    """World-to-camera rotation (3, 3) of the head and the fit's rms residual (canonical cm).

    points: (478, 3) face-mesh landmarks, x right, y down (pixels), z away from the camera.
    """
    dst = np.asarray(points, np.float64)[CANON_IDX]
    s, R, t = umeyama(CANON_PTS, dst)
    resid = (s * CANON_PTS @ R.T + t) - dst
    return R, float(np.sqrt((resid ** 2).sum(1).mean()) / s)


def camera_angles(R_w2c: np.ndarray) -> tuple[float, float, float]:
    """(azimuth, elevation, roll) in degrees of the camera looking at the head.

    Azimuth 0 = frontal, + = camera toward the subject's left (+X); elevation + = above;
    roll = counter-clockwise on-screen tilt of the head's up axis.
    """
    R = np.asarray(R_w2c, np.float64)
    d = -R[2, :]          # unit vector from the head toward the camera, in world axes
    az = math.degrees(math.atan2(d[0], d[2]))
    el = math.degrees(math.atan2(d[1], math.hypot(d[0], d[2])))
    up_cam = R @ np.array([0.0, 1.0, 0.0])   # world up seen by the camera (y down on screen)
    roll = math.degrees(math.atan2(up_cam[0], -up_cam[1]))
    return az, el, -roll


def pose_camera(azimuth_deg: float, elevation_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(c2w 4x4, normalised K) of the PanoHead camera at these angles."""
    return cameras.orbit_cam2world(azimuth_deg, elevation_deg), cameras.INTRINSICS_NORM.copy()
