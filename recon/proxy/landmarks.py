"""Face key points (eyes, nose tip, mouth, chin) from whatever landmark layout the
preprocess stage delivered: mediapipe face mesh (468/478), dlib (68), InsightFace-style
5 points, mediapipe face detection (6). Any other layout with at least 5 points is
read from its bounding box, and the result says so (`layout == "bbox"`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class FaceKeypoints:
    eye_a: np.ndarray      # (2,) eye on the image's left (subject's right), crop pixels
    eye_b: np.ndarray      # (2,) eye on the image's right
    nose: np.ndarray       # (2,) nose tip
    mouth: np.ndarray      # (2,) mouth centre
    chin: np.ndarray       # (2,) chin (estimated when the layout has none)
    mouth_half_width: float
    layout: str

    @property
    def eye_mid(self) -> np.ndarray:
        return 0.5 * (self.eye_a + self.eye_b)

    @property
    def iod(self) -> float:
        """Inter-ocular distance in pixels."""
        return float(np.linalg.norm(self.eye_b - self.eye_a))

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Unit face axes in the image: `right` (eye_a -> eye_b) and `down` (perpendicular)."""
        right = (self.eye_b - self.eye_a) / max(self.iod, 1e-6)
        return right, np.array([-right[1], right[0]])


def _mean(lm, idx):
    return lm[list(idx)].mean(0)


def face_keypoints(landmarks: np.ndarray) -> FaceKeypoints:
    lm = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2) if np.size(landmarks) else np.zeros((0, 2))
    n = lm.shape[0]
    if n < 5:
        raise InputError(f"the proxy head needs at least 5 face landmarks, the portrait has {n}",
                         hint="re-run preprocess so it records face landmarks")
    if not np.all(np.isfinite(lm)):
        raise InputError("the portrait's face landmarks contain NaN or infinite values",
                         hint="re-run preprocess")
    kp = None
    if n in (468, 478):    # mediapipe face mesh
        e1, e2 = _mean(lm, (33, 133, 159, 145)), _mean(lm, (263, 362, 386, 374))
        kp = (e1, e2, lm[1], _mean(lm, (13, 14)), lm[152], 0.5 * np.linalg.norm(lm[61] - lm[291]), "mediapipe")
    elif n == 68:          # dlib / iBUG 68
        e1, e2 = _mean(lm, range(36, 42)), _mean(lm, range(42, 48))
        kp = (e1, e2, lm[30], _mean(lm, range(48, 68)), lm[8], 0.5 * np.linalg.norm(lm[48] - lm[54]), "dlib68")
    elif n == 5:           # eyes, nose, two mouth corners
        kp = (lm[0], lm[1], lm[2], 0.5 * (lm[3] + lm[4]), None, 0.5 * np.linalg.norm(lm[3] - lm[4]), "five")
    elif n == 6:           # mediapipe detection: eyes, nose, mouth, ears
        kp = (lm[0], lm[1], lm[2], lm[3], None, None, "mediapipe6")
    if kp is not None:
        e1, e2, nose, mouth, chin, mhw, layout = kp
        ea, eb = (e1, e2) if e1[0] <= e2[0] else (e2, e1)
        if _plausible(ea, eb, nose, mouth):
            return _complete(ea, eb, nose, mouth, chin, mhw, layout)
    # Unknown layout (or one that fails the sanity check): place features in the landmarks' box.
    x0, y0 = lm.min(0)
    x1, y1 = lm.max(0)
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    ea, eb = np.array([x0 + 0.3 * w, y0 + 0.38 * h]), np.array([x0 + 0.7 * w, y0 + 0.38 * h])
    return _complete(ea, eb, np.array([x0 + 0.5 * w, y0 + 0.62 * h]), np.array([x0 + 0.5 * w, y0 + 0.8 * h]),
                     np.array([x0 + 0.5 * w, y1]), 0.2 * w, "bbox")


def _plausible(ea, eb, nose, mouth) -> bool:
    iod = np.linalg.norm(eb - ea)
    if iod < 2:
        return False
    right = (eb - ea) / iod
    down = np.array([-right[1], right[0]])
    mid = 0.5 * (ea + eb)
    return bool(0.1 * iod < (nose - mid) @ down < (mouth - mid) @ down < 3 * iod)


def _complete(ea, eb, nose, mouth, chin, mhw, layout) -> FaceKeypoints:
    mid = 0.5 * (ea + eb)
    iod = float(np.linalg.norm(eb - ea))
    if chin is None:
        # chin ~ as far below the mouth as 0.55x the eye-to-mouth distance (adult proportions)
        chin = mouth + 0.55 * (mouth - mid)
    if mhw is None or not np.isfinite(mhw) or mhw < 0.1 * iod:
        mhw = 0.38 * iod
    return FaceKeypoints(np.asarray(ea, float), np.asarray(eb, float), np.asarray(nose, float),
                         np.asarray(mouth, float), np.asarray(chin, float), float(mhw), layout)
