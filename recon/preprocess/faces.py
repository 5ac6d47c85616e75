"""Face detection and landmarks with the models that ship inside the mediapipe wheel.

mediapipe 0.10.21's legacy `solutions` API bundles its tflite graphs (face detection
short/full range, 468+10-point face mesh), so this runs offline on the CPU. We detect
on the whole picture, keep the most prominent face (box area x confidence), then run
the face mesh on a square crop around that face only, so the mesh describes the face
we chose and not a neighbour.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, MissingError, NoFaceError

os.environ.setdefault("GLOG_minloglevel", "2")        # mediapipe's C++ logging
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# mediapipe face-mesh indices of the 6 points dlib's 68-point model puts on each eye
# (PanoHead's cropper averages dlib 36-41 and 42-47) and of the outer mouth corners (dlib 48, 54).
EYE_RIGHT = (33, 160, 158, 133, 153, 144)     # subject's right eye: image left in a frontal photo
EYE_LEFT = (362, 385, 387, 263, 373, 380)
MOUTH_RIGHT, MOUTH_LEFT = 61, 291
NOSE_TIP = 1

# Where eyes and mouth corners sit inside a mediapipe-style face box (brows to chin, square),
# measured on real frontal faces; used when no landmarker can run (a drawn face, an animal).
CANONICAL_IN_BOX = np.array([
    [0.29, 0.33],   # right eye centre
    [0.71, 0.33],   # left eye centre
    [0.50, 0.58],   # nose tip
    [0.32, 0.72],   # right mouth corner
    [0.68, 0.72],   # left mouth corner
])
LAYOUT_MESH = "mediapipe478"
LAYOUT_CANONICAL = "canonical5"   # rows as in CANONICAL_IN_BOX

MESH_INPUT = 512          # side of the square crop the face mesh sees
MESH_MARGIN = 2.0         # crop side / face box side: the mesh's own detector wants context
DETECT_MAX_SIDE = 1280    # detection runs on a downscaled copy; boxes are scaled back


@dataclass
class FaceFit:
    """One face in source pixel coordinates."""

    box: tuple[float, float, float, float]     # x, y, w, h
    score: float
    points: np.ndarray                         # (L, 3) x, y (source px), z (px, + away from camera; 0 if unknown)
    layout: str                                # LAYOUT_MESH or LAYOUT_CANONICAL
    num_faces: int = 1
    notes: list[str] = field(default_factory=list)

    def five(self) -> np.ndarray:
        """(5, 2): right eye, left eye, nose tip, right mouth corner, left mouth corner."""
        p = self.points[:, :2]
        if self.layout == LAYOUT_CANONICAL:
            return p.copy()
        return np.stack([p[list(EYE_RIGHT)].mean(0), p[list(EYE_LEFT)].mean(0), p[NOSE_TIP], p[MOUTH_RIGHT], p[MOUTH_LEFT]])

    @property
    def has_depth(self) -> bool:
        return self.layout == LAYOUT_MESH


# ------------------------------------------------------------------ mediapipe graphs
_lock = threading.Lock()
_graphs: dict = {}


def _solutions():
    try:
        from mediapipe.python import solutions
    except ImportError as e:  # pragma: no cover - mediapipe is a hard dependency
        raise MissingError(f"mediapipe cannot be imported ({e})",
                           hint="pip install mediapipe==0.10.21 (it ships the face models)") from None
    return solutions


def _graph(name: str):
    """Build each mediapipe graph once per process (building costs ~0.1 s)."""
    with _lock:
        if name not in _graphs:
            s = _solutions()
            if name == "detect_full":
                _graphs[name] = s.face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5)
            elif name == "detect_short":
                _graphs[name] = s.face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5)
            elif name == "mesh":
                _graphs[name] = s.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                                     refine_landmarks=True, min_detection_confidence=0.5)
            elif name == "selfie":
                _graphs[name] = s.selfie_segmentation.SelfieSegmentation(model_selection=0)
            else:  # pragma: no cover
                raise KeyError(name)
        return _graphs[name]


def run_graph(name: str, rgb: np.ndarray):
    """Graphs are not re-entrant: one call at a time per graph."""
    g = _graph(name)
    with _lock:
        return g.process(np.ascontiguousarray(rgb))


# ------------------------------------------------------------------------ detection
def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def detect_faces(rgb: np.ndarray) -> list[tuple[tuple[float, float, float, float], float]]:
    """All faces as ((x, y, w, h) source pixels, score), most prominent first.

    Both detectors run (full range finds small faces, short range close-ups); duplicates merge.
    """
    import cv2

    h, w = rgb.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    small = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else rgb
    sh, sw = small.shape[:2]
    found: list[tuple[tuple[float, float, float, float], float]] = []
    for name in ("detect_full", "detect_short"):
        res = run_graph(name, small)
        for d in res.detections or []:
            b = d.location_data.relative_bounding_box
            box = (b.xmin * sw / scale, b.ymin * sh / scale, b.width * sw / scale, b.height * sh / scale)
            score = float(d.score[0]) if d.score else 0.0
            if box[2] <= 1 or box[3] <= 1:
                continue
            dup = [i for i, (fb, _) in enumerate(found) if _iou(fb, box) > 0.3]
            if dup:
                i = dup[0]
                if score > found[i][1]:
                    found[i] = (box, score)
            else:
                found.append((box, score))
    found.sort(key=lambda f: f[0][2] * f[0][3] * f[1], reverse=True)
    return found


# ------------------------------------------------------------------------ landmarks
def _square_crop_matrix(box, out: int, margin: float) -> np.ndarray:
    """2x3 affine: source px -> a square crop of side margin*max(w, h) centred on the box."""
    x, y, bw, bh = box
    side = margin * max(bw, bh)
    cx, cy = x + bw / 2, y + bh / 2
    s = out / side
    return np.array([[s, 0.0, out / 2 - s * cx], [0.0, s, out / 2 - s * cy]])


def mesh_in_box(rgb: np.ndarray, box) -> np.ndarray | None:
    """Face-mesh landmarks (478, 3) in source pixels for the face inside `box`, or None.

    The mesh runs on a square crop around the box (edges replicated outside the image);
    a mesh whose centre falls outside the box belongs to another face and is refused.
    """
    import cv2

    A = _square_crop_matrix(box, MESH_INPUT, MESH_MARGIN)
    src, B = rgb, A
    if A[0, 0] < 1.0:
        # warpAffine does not prefilter: shrink with INTER_AREA first so the mesh sees no aliasing
        h, w = rgb.shape[:2]
        sw, sh = max(1, round(w * A[0, 0])), max(1, round(h * A[0, 0]))
        src = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
        # source px -> small px is x_s = (x + 0.5) * sw / w - 0.5; fold it into the crop matrix
        fx, fy = sw / w, sh / h
        D = np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5], [0.0, 0.0, 1.0]])
        B = A @ np.linalg.inv(D)
    crop = cv2.warpAffine(src, B, (MESH_INPUT, MESH_INPUT), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    res = run_graph("mesh", crop)
    if not res.multi_face_landmarks:
        return None
    lm = res.multi_face_landmarks[0].landmark
    pts = np.array([[p.x * MESH_INPUT, p.y * MESH_INPUT, p.z * MESH_INPUT] for p in lm], dtype=np.float64)
    s = A[0, 0]
    out = np.empty_like(pts)
    out[:, 0] = (pts[:, 0] - A[0, 2]) / s
    out[:, 1] = (pts[:, 1] - A[1, 2]) / s
    out[:, 2] = pts[:, 2] / s
    x, y, bw, bh = box
    c = out[:, :2].mean(0)
    if not (x - 0.25 * bw <= c[0] <= x + 1.25 * bw and y - 0.25 * bh <= c[1] <= y + 1.25 * bh):
        return None
    return out


def canonical_in_box(box) -> np.ndarray:
    x, y, bw, bh = box
    side = max(bw, bh)   # the layout was measured in square boxes
    cx, cy = x + bw / 2, y + bh / 2
    xy = (CANONICAL_IN_BOX - 0.5) * side + [cx, cy]
    return np.column_stack([xy, np.zeros(len(xy))])


def find_face(rgb: np.ndarray, face_box=None, min_face: int = 48) -> FaceFit:
    """The face to reconstruct, with landmarks, in source pixels.

    face_box (x, y, w, h, source pixels of the upright image) skips detection. Like a face
    detector's box it should span the face from the brows to the chin. The mesh runs inside
    it; when the mesh finds nothing there (a cat, a drawing) a canonical 5-point
    eye/nose/mouth layout is placed in it.
    """
    h, w = rgb.shape[:2]
    notes: list[str] = []
    if face_box is not None:
        if len(face_box) != 4:
            raise InputError(f"--face-box needs 4 numbers x,y,w,h, got {len(face_box)}", hint="e.g. --face-box 120,80,200,200")
        x, y, bw, bh = (float(v) for v in face_box)
        if not (np.isfinite([x, y, bw, bh]).all() and bw > 0 and bh > 0):
            raise InputError(f"--face-box {face_box} must have a positive width and height", hint="x,y,w,h in source pixels")
        if x >= w or y >= h or x + bw <= 0 or y + bh <= 0:
            raise InputError(f"--face-box {x:g},{y:g},{bw:g},{bh:g} lies outside the {w}x{h} image",
                             hint="give x,y,w,h in pixels of the (EXIF-rotated) image")
        box, score, n = (x, y, bw, bh), 1.0, 1
        notes.append("face box given by the user; detection skipped")
    else:
        faces = detect_faces(rgb)
        if not faces:
            raise NoFaceError("no face found in the image",
                              hint="pass the face yourself with --face-box x,y,w,h (source pixels), "
                                   "and --yaw/--pitch if the pose is not frontal")
        (box, score), n = faces[0], len(faces)
        if n > 1:
            notes.append(f"{n} faces found; used the largest")
    if min(box[2], box[3]) < min_face:
        raise InputError(f"the face is only {min(box[2], box[3]):.0f} px wide (minimum {min_face} px)",
                         hint="use a larger or closer photo, or lower preprocess.min_face")
    pts = mesh_in_box(rgb, box)
    if pts is not None:
        return FaceFit(box=tuple(float(v) for v in box), score=score, points=pts, layout=LAYOUT_MESH, num_faces=n, notes=notes)
    notes.append("landmarker found no face in the box; placed a canonical eye/mouth layout in it (pose unknown)")
    return FaceFit(box=tuple(float(v) for v in box), score=score, points=canonical_in_box(box),
                   layout=LAYOUT_CANONICAL, num_faces=n, notes=notes)
