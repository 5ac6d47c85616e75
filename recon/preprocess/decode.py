"""Decode a user's image defensively (DESIGN §1 stage 1).

Anything a person may hand us — a phone JPEG with an EXIF rotation, a PNG with
transparency, a 16-bit scan, a CMYK print file, a text file renamed .jpg, half a
download, a decompression bomb — either becomes an upright 8-bit RGB array (plus
alpha when the file has one) or a one-line `InputError` that names the file and
says what to do. The size is checked from the header before any pixel is decoded.
"""
from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import InputError

SUPPORTED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG", "WEBP": "WebP", "TIFF": "TIFF", "BMP": "BMP"}
MIN_SIDE = 64          # below this on the short side no face can be aligned to 512 meaningfully
_HINT_FORMATS = "give a JPEG, PNG, WebP, TIFF or BMP photo of a face"

# EXIF orientation -> numpy re-orientation of an (H, W, ...) array (same result as ImageOps.exif_transpose).
_ORIENT = {
    2: lambda a: a[:, ::-1],                      # mirror left-right
    3: lambda a: a[::-1, ::-1],                   # rotate 180
    4: lambda a: a[::-1],                         # mirror top-bottom
    5: lambda a: a.swapaxes(0, 1),                # transpose
    6: lambda a: np.rot90(a, k=-1),               # rotate 90 clockwise
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],    # transverse
    8: lambda a: np.rot90(a, k=1),                # rotate 90 counter-clockwise
}


@dataclass
class DecodedImage:
    rgb: np.ndarray                    # (H, W, 3) uint8, upright
    alpha: np.ndarray | None           # (H, W) uint8, or None when the file has no alpha channel
    info: dict = field(default_factory=dict)   # format, mode, original_size (w, h), exif_rotated, bit_depth, ...

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after EXIF rotation."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def _refuse(path: Path, what: str, hint: str = _HINT_FORMATS) -> InputError:
    return InputError(f"image {path}: {what}", hint=hint)


def _png_ihdr(path: Path) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from the PNG IHDR, read directly (PIL hides 16-bit RGB)."""
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", head[16:24])
    return w, h, head[24], head[25]


def _sniff(path: Path) -> str:
    """Why PIL could not identify the file, in words."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
        return "HEIC/HEIF photos are not supported (convert it to JPEG or PNG)"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "AVIF images are not supported (convert it to JPEG or PNG)"
    if head.startswith(b"%PDF"):
        return "this is a PDF, not an image"
    if head.lstrip().startswith((b"<svg", b"<?xml")):
        return "SVG/XML vector files are not supported (export a PNG)"
    return "not a recognised image file (is it another kind of file renamed to this extension?)"


def _too_large(path: Path, e: Exception, max_side: int) -> InputError:
    ihdr = _png_ihdr(path)
    what = f"{ihdr[0]}x{ihdr[1]} pixels" if ihdr else str(e).split(",")[0]
    return _refuse(path, f"{what} is too large to decode safely (decompression bomb or a mistake)",
                   f"downscale it below {max_side} px per side first")


def _to_uint8_from_16(arr: np.ndarray) -> np.ndarray:
    # round to nearest: 65535 -> 255, 257*k -> k
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _decode_with_cv2(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """16-bit colour PNG/TIFF: PIL keeps only the high byte (or cannot open it); OpenCV keeps all 16 bits."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if arr is None:
        raise _refuse(path, "the file is damaged or truncated (OpenCV could not decode it)")
    if arr.dtype == np.uint16:
        arr = _to_uint8_from_16(arr)
    elif arr.dtype != np.uint8:
        raise _refuse(path, f"unsupported sample type {arr.dtype}", "save it as an 8- or 16-bit image")
    if arr.ndim == 2:
        return np.dstack([arr] * 3), None
    if arr.shape[2] == 4:
        return arr[..., 2::-1].copy(), arr[..., 3].copy()
    return arr[..., 2::-1].copy(), None


def _pixels(im: Image.Image, path: Path) -> tuple[np.ndarray, np.ndarray | None, int]:
    """A loaded PIL image in any mode -> (rgb uint8, alpha uint8 | None, bit depth)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im)
        # 16-bit grey (PNG/TIFF); PIL also hands 16-bit PNG grey over as 32-bit "I"
        a = _to_uint8_from_16(np.clip(a, 0, 65535))
        return np.dstack([a] * 3), None, 16
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        finite = a[np.isfinite(a)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        a = np.clip(np.nan_to_num(a) * scale + 0.5, 0, 255).astype(np.uint8)
        return np.dstack([a] * 3), None, 32
    if mode in ("1", "L"):
        a = np.asarray(im.convert("L"))
        return np.dstack([a] * 3), None, 1 if mode == "1" else 8
    if mode == "LA" or mode == "La":
        la = np.asarray(im.convert("LA"))
        return np.dstack([la[..., 0]] * 3), la[..., 1].copy(), 8
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    if mode in ("RGBA", "RGBa"):
        a = np.asarray(im.convert("RGBA"))
        return a[..., :3].copy(), a[..., 3].copy(), 8
    # RGB, CMYK (PIL undoes Adobe's inverted CMYK), YCbCr, LAB, HSV, RGBX...
    return np.asarray(im.convert("RGB")).copy(), None, 8


def load_image(path, max_side: int = 12000) -> DecodedImage:
    """Decode `path` into an upright 8-bit RGB image (+ alpha if present), or raise InputError.

    Refuses: missing paths, directories, empty files, non-images, unsupported formats,
    truncated or corrupt files, images over `max_side` on either side (checked from
    the header, before decoding), and images under 64 px on the short side.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist", hint="check the path (and quote it if it contains spaces)")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image", hint="pass one image file, e.g. photo.jpg")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file", hint=_HINT_FORMATS)
    if path.stat().st_size == 0:
        raise InputError(f"image {path} is an empty file (0 bytes)", hint="the download or copy probably failed; get the file again")

    # A truncated file must fail loudly, never decode as a half-grey picture. The flag is
    # global in PIL (some libraries switch it on), so force it off for this decode only.
    saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # our own side limit replaces PIL's pixel-count warning; PIL's hard bomb error still fires
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                im = Image.open(path)
            except UnidentifiedImageError:
                raise _refuse(path, _sniff(path)) from None
            except Image.DecompressionBombError as e:
                raise _too_large(path, e, max_side) from None
            except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
                raise _refuse(path, f"cannot be read ({e.__class__.__name__}: {e})") from None
            with im:
                return _decode_opened(im, path, max_side)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated


def _decode_opened(im: Image.Image, path: Path, max_side: int) -> DecodedImage:
    fmt = im.format or "unknown"
    if fmt not in SUPPORTED_FORMATS:
        raise _refuse(path, f"{fmt} images are not supported")
    w, h = im.size  # from the header: nothing decoded yet
    if w > max_side or h > max_side:
        raise _refuse(path, f"{w}x{h} pixels is over the {max_side} px per side limit (decompression bomb or a mistake)",
                      f"downscale it below {max_side} px per side (or raise preprocess.max_side)")
    if min(w, h) < MIN_SIDE:
        raise _refuse(path, f"{w}x{h} pixels is too small to hold a face (need at least {MIN_SIDE} px on the short side)",
                      "use a larger photo; the face should be at least ~100 px wide")
    notes: list[str] = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        notes.append(f"file has {frames} frames; used the first")

    try:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject a good picture
        orientation = 1
        notes.append("EXIF block unreadable; assumed upright")
    if orientation not in _ORIENT and orientation != 1:
        notes.append(f"EXIF orientation {orientation} is invalid; assumed upright")
        orientation = 1

    bit_depth = None
    use_cv2 = False
    if fmt == "PNG":
        ihdr = _png_ihdr(path)
        if ihdr is not None:
            bit_depth = ihdr[2]
            use_cv2 = ihdr[2] == 16 and ihdr[3] in (2, 6)  # 16-bit RGB / RGBA
    elif fmt == "TIFF":
        bps = im.tag_v2.get(258) if hasattr(im, "tag_v2") else None
        if bps is not None:
            bit_depth = int(bps[0] if isinstance(bps, (tuple, list)) else bps)
            use_cv2 = bit_depth == 16 and im.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I")

    try:
        if use_cv2:
            im.load()  # PIL's pass doubles as the truncation check; OpenCV keeps the low byte
            rgb, alpha = _decode_with_cv2(path)
            depth = 16
        else:
            im.load()
            rgb, alpha, depth = _pixels(im, path)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise _too_large(path, e, max_side) from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error, MemoryError) as e:
        raise _refuse(path, f"the file is damaged or truncated ({e.__class__.__name__}: {e})",
                      "the download or copy probably stopped early; get the file again") from None

    if rgb.shape[:2] != (h, w):
        raise _refuse(path, f"decoded size {rgb.shape[1]}x{rgb.shape[0]} differs from the header's {w}x{h}")
    if orientation in _ORIENT:
        rgb = np.ascontiguousarray(_ORIENT[orientation](rgb))
        alpha = None if alpha is None else np.ascontiguousarray(_ORIENT[orientation](alpha))
    info = {
        "format": SUPPORTED_FORMATS[fmt],
        "mode": im.mode,
        "original_size": (w, h),
        "exif_orientation": orientation,
        "exif_rotated": orientation != 1,
        "bit_depth": bit_depth if bit_depth is not None else depth,
        "has_alpha": alpha is not None,
        "notes": notes,
    }
    if "icc_profile" in im.info:
        info["icc_profile"] = True  # colours are taken as sRGB; the profile is not applied
    return DecodedImage(rgb=rgb, alpha=alpha, info=info)
