"""Small, defensive PNG/image read and write helpers shared by the contracts.

Full decoding of *user* images (EXIF, CMYK, 16-bit, bombs) lives in
recon.preprocess.decode; this module reads images we or other tools wrote as
views, still refusing absurd sizes and anything that is not an image.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

MAX_PIXELS = 100_000_000  # 10k x 10k; larger is a decompression bomb or a mistake


def read_png_rgba(path: str | os.PathLike) -> np.ndarray:
    """Any 8/16-bit grey/RGB/RGBA image -> (H, W, 4) uint8. RGB gets alpha 255."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise InputError(f"{path} is {w}x{h} pixels, over the {MAX_PIXELS:,} pixel limit", hint="downscale it first")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = np.clip(arr / (65535.0 if arr.max() > 255 else 255.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.dstack([arr, arr, arr, np.full_like(arr, 255)])
            return np.asarray(im.convert("RGBA"), dtype=np.uint8).copy()
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path}: {e}", hint="is it a complete PNG/JPEG file?") from None


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise TypeError(f"write_png wants uint8, got {arr.dtype}")
    Image.fromarray(arr).save(path, format="PNG", compress_level=4)
