"""A contact sheet of a ViewSet: thumbnails composited on neutral grey, labelled by azimuth."""
from __future__ import annotations

import math

import cv2
import numpy as np

from . import cameras
from .errors import InputError
from .types import ViewSet

GREY = 128


def contact_sheet(views: ViewSet, columns: int = 9, thumb: int = 128) -> np.ndarray:
    """(rows*thumb', columns*thumb, 3) uint8; each cell is a view over grey with its
    azimuth (and elevation when not 0) written under it."""
    if columns < 1 or thumb < 16:
        raise InputError(f"contact sheet needs columns >= 1 and thumb >= 16, got {columns}, {thumb}")
    n = len(views)
    if n == 0:
        raise InputError("cannot make a contact sheet of an empty view set")
    rows = math.ceil(n / columns)
    label_h = max(12, thumb // 8)
    cell_h = thumb + label_h
    sheet = np.full((rows * cell_h, columns * thumb, 3), GREY, np.uint8)
    az, el = cameras.azimuth_elevation_of(views.c2w)
    h, w = views.resolution
    s = thumb / max(h, w)
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    for i in range(n):
        rgba = views.images[i].astype(np.float32)
        a_full = rgba[..., 3:4] / 255.0
        # resize premultiplied colour so transparent pixels do not darken the edges
        small = cv2.resize(np.dstack([rgba[..., :3] * a_full, a_full]), (tw, th), interpolation=cv2.INTER_AREA)
        small = small.reshape(th, tw, 4)
        a = small[..., 3:4]
        rgb = small[..., :3] + GREY * (1 - a)
        r, c = divmod(i, columns)
        y0, x0 = r * cell_h + (thumb - th) // 2, c * thumb + (thumb - tw) // 2
        sheet[y0:y0 + th, x0:x0 + tw] = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
        a_deg, e_deg = int(round(float(az[i]))), int(round(float(el[i])))
        text = f"{a_deg if a_deg != -180 else 180}" + (f"/{e_deg}" if e_deg else "")
        scale = label_h / 30.0
        (tw_txt, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        org = (c * thumb + (thumb - tw_txt) // 2, r * cell_h + thumb + label_h - max(2, label_h // 5))
        cv2.putText(sheet, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return sheet
