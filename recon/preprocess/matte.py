"""Foreground matte of the aligned crop: mediapipe selfie segmentation, cleaned.

The raw segmentation is soft and can hold stray blobs (a second person, a poster) and
holes (a dark collar). We keep the connected component that holds the face (else the
largest), fill its holes, keep the model's soft edge along the outline and feather it
slightly.
"""
from __future__ import annotations

import numpy as np

from .faces import run_graph


def segment(rgb: np.ndarray) -> np.ndarray:
    """Selfie-segmentation probability (H, W) float32 in [0, 1]."""
    res = run_graph("selfie", rgb)
    if res.segmentation_mask is None:
        return np.zeros(rgb.shape[:2], np.float32)
    return np.clip(np.asarray(res.segmentation_mask, np.float32), 0.0, 1.0)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the background regions that do not touch the border."""
    import cv2

    m = mask.astype(np.uint8)
    n, lab = cv2.connectedComponents(1 - m, connectivity=4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    holes = ~np.isin(lab, border) & (m == 0)
    return mask | holes


def clean_matte(prob: np.ndarray, face_xy: tuple[float, float] | None = None, feather: float = 1.0) -> np.ndarray:
    """Soft probability -> cleaned uint8 alpha; all zeros if nothing is foreground."""
    import cv2

    hard = prob >= 0.5
    n, lab, stats, _ = cv2.connectedComponentsWithStats(hard.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(prob.shape, np.uint8)
    keep_label = None
    if face_xy is not None:
        fx, fy = int(round(face_xy[0])), int(round(face_xy[1]))
        if 0 <= fy < lab.shape[0] and 0 <= fx < lab.shape[1] and lab[fy, fx] > 0:
            keep_label = int(lab[fy, fx])
    if keep_label is None:
        keep_label = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = _fill_holes(lab == keep_label)
    # inside the region (away from its outline) the matte is solid; along the outline keep the
    # model's soft probability so hair edges stay soft
    k = np.ones((5, 5), np.uint8)
    inner = cv2.erode(region.astype(np.uint8), k).astype(bool)
    near = cv2.dilate(region.astype(np.uint8), k).astype(bool)
    alpha = np.where(inner, 1.0, np.where(near, prob, 0.0)).astype(np.float32)
    if feather > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), feather)
    return np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8)


def matte(rgb: np.ndarray, face_xy: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W) uint8 alpha of the person in the crop."""
    return clean_matte(segment(rgb), face_xy)
