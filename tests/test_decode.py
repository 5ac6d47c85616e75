"""recon.preprocess.decode: every kind of bad input is refused with a one-line InputError;
every supported kind of good input becomes an upright 8-bit RGB (+ alpha)."""
from __future__ import annotations

import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from recon.errors import EXIT_BAD_INPUT, InputError
from recon.preprocess.decode import DecodedImage, load_image
from recon.testing.faces_samples import sample_rgb


def _refused(path, match: str, **kw) -> InputError:
    with pytest.raises(InputError, match=match) as ei:
        load_image(path, **kw)
    err = ei.value
    assert err.exit_code == EXIT_BAD_INPUT
    assert err.hint
    assert "\n" not in err.one_line()
    return err


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(path, w: int, h: int) -> None:
    """A PNG that claims w x h pixels but carries almost no data: a bomb costs nothing to write."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def astro() -> np.ndarray:
    return sample_rgb("astronaut")


# ------------------------------------------------------------------------ refusals
def test_missing_path(tmp_path):
    err = _refused(tmp_path / "nope.jpg", "does not exist")
    assert "nope.jpg" in err.message


def test_directory(tmp_path):
    _refused(tmp_path, "is a folder")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    _refused(p, "empty file")


def test_text_renamed_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\n" * 20)
    _refused(p, "not a recognised image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("force_truncated_flag", [False, True])
def test_truncated(tmp_path, astro, fmt, force_truncated_flag, monkeypatch):
    p = tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(astro).save(p, format=fmt)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 6 // 10])
    # another library may have switched PIL's "load truncated images" on: we must still refuse
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", force_truncated_flag)
    _refused(p, "damaged or truncated|cannot be read")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is force_truncated_flag   # restored


def test_one_pixel(tmp_path):
    p = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(p)
    _refused(p, "too small")


def test_thin_image(tmp_path):
    p = tmp_path / "strip.png"
    Image.new("RGB", (800, 40)).save(p)
    _refused(p, "too small")


def test_decompression_bomb_refused_from_header(tmp_path):
    p = tmp_path / "bomb.png"
    _png_header_only(p, 20000, 20000)
    assert p.stat().st_size < 1000
    tracemalloc.start()
    try:
        err = _refused(p, "20000x20000")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000          # 20000^2 RGB would be 1.2 GB: nothing was allocated
    assert "too large" in err.message


def test_over_max_side_refused_before_decoding(tmp_path):
    # 13000x13000 is under PIL's own bomb limit: our header check must catch it, not the decoder
    p = tmp_path / "big.png"
    _png_header_only(p, 13000, 13000)
    _refused(p, "over the 12000 px per side limit")
    p2 = tmp_path / "wide.png"
    _png_header_only(p2, 3000, 200)
    _refused(p2, "over the 2000 px", max_side=2000)


def test_unsupported_format(tmp_path, astro):
    p = tmp_path / "anim.gif"
    Image.fromarray(astro).save(p)
    _refused(p, "GIF images are not supported")


# ------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif"), ("BMP", "bmp")])
def test_formats_decode(tmp_path, astro, fmt, ext):
    p = tmp_path / f"a.{ext}"
    Image.fromarray(astro).save(p, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    d = load_image(p)
    assert isinstance(d, DecodedImage)
    assert d.rgb.shape == (512, 512, 3) and d.rgb.dtype == np.uint8
    assert d.alpha is None
    assert d.info["original_size"] == (512, 512) and d.info["bit_depth"] == 8 and not d.info["exif_rotated"]
    tol = 0 if fmt in ("PNG", "TIFF", "BMP") else 12
    assert np.abs(d.rgb.astype(int) - astro).mean() <= tol


def _quadrant_image() -> Image.Image:
    """200x100: left half red, right half blue, a green mark in the top-left corner."""
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :100] = (255, 0, 0)
    a[:, 100:] = (0, 0, 255)
    a[:20, :20] = (0, 255, 0)
    return Image.fromarray(a)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path, orientation):
    im = _quadrant_image()
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.jpg"
    im.save(p, quality=98, exif=exif.tobytes())
    d = load_image(p)
    with Image.open(p) as ref:
        expect = np.asarray(ImageOps.exif_transpose(ref).convert("RGB"))
    assert d.rgb.shape == expect.shape
    assert np.abs(d.rgb.astype(int) - expect).max() <= 1
    assert d.info["exif_rotated"] == (orientation != 1)
    assert d.info["original_size"] == (200, 100)


def test_exif_rotated_phone_photo_is_upright(tmp_path):
    # a phone stores the sensor image sideways plus "rotate 90 clockwise" (orientation 6)
    upright = _quadrant_image()                              # what the user saw
    stored = upright.transpose(Image.Transpose.ROTATE_90)    # sensor layout (100 wide, 200 tall)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "phone.jpg"
    stored.save(p, quality=98, exif=exif.tobytes())
    d = load_image(p)
    assert d.size == (200, 100)
    assert d.rgb[50, 50, 0] > 200 and d.rgb[50, 150, 2] > 200       # red left, blue right
    assert d.rgb[5, 5, 1] > 200                                       # green mark top-left


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (128, 96), (255, 0, 0, 0)).save(p, quality=98)   # pure cyan ink
    d = load_image(p)
    assert d.info["mode"] == "CMYK"
    assert d.rgb.shape == (96, 128, 3)
    r, g, b = d.rgb[48, 64].astype(int)
    assert r < 40 and g > 215 and b > 215


def test_gray_8bit(tmp_path, astro):
    p = tmp_path / "gray.png"
    Image.fromarray(astro).convert("L").save(p)
    d = load_image(p)
    assert d.rgb.shape == (512, 512, 3)
    assert (d.rgb[..., 0] == d.rgb[..., 1]).all() and (d.rgb[..., 1] == d.rgb[..., 2]).all()


def test_gray_16bit_png(tmp_path):
    a = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (80, 1))
    a[:, 0] = 257 * 100
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    d = load_image(p)
    assert d.info["bit_depth"] == 16
    assert d.rgb.dtype == np.uint8 and d.rgb.shape == (80, 256, 3)
    assert d.rgb[0, 0, 0] == 100 and d.rgb[0, -1, 0] == 255 and d.rgb[0, 1, 0] == 1


def test_rgb_16bit_png_keeps_channel_order(tmp_path):
    import cv2

    rgb16 = np.zeros((70, 90, 3), np.uint16)
    rgb16[..., 0] = 65535          # red full
    rgb16[..., 1] = 257 * 128      # green half
    rgb16[..., 2] = 257 * 3        # blue almost none
    p = tmp_path / "c16.png"
    cv2.imwrite(str(p), rgb16[..., ::-1])   # OpenCV writes BGR
    d = load_image(p)
    assert d.info["bit_depth"] == 16
    assert tuple(d.rgb[10, 10]) == (255, 128, 3)
    assert d.alpha is None


def test_rgba_16bit_png(tmp_path):
    import cv2

    bgra = np.zeros((70, 90, 4), np.uint16)
    bgra[..., 2] = 65535
    bgra[..., 3] = 0
    bgra[20:50, 30:60, 3] = 65535
    p = tmp_path / "c16a.png"
    cv2.imwrite(str(p), bgra)
    d = load_image(p)
    assert d.alpha is not None and d.alpha[0, 0] == 0 and d.alpha[30, 40] == 255
    assert tuple(d.rgb[30, 40]) == (255, 0, 0)


def test_rgba_png(tmp_path, astro):
    alpha = np.zeros((512, 512), np.uint8)
    alpha[100:400, 150:350] = 255
    p = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([astro, alpha])).save(p)
    d = load_image(p)
    assert d.info["has_alpha"]
    assert (d.alpha == alpha).all() and (d.rgb == astro).all()


def test_la_png(tmp_path):
    la = np.zeros((80, 80, 2), np.uint8)
    la[..., 0] = 90
    la[40:, :, 1] = 255
    p = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(p)
    d = load_image(p)
    assert d.alpha is not None and d.alpha[0, 0] == 0 and d.alpha[60, 5] == 255
    assert tuple(d.rgb[60, 5]) == (90, 90, 90)


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (96, 96), 0)
    im.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    im.paste(1, (20, 20, 70, 70))
    p = tmp_path / "pal.png"
    im.save(p, transparency=0)
    d = load_image(p)
    assert d.alpha is not None and d.alpha[0, 0] == 0 and d.alpha[40, 40] == 255
    assert tuple(d.rgb[40, 40]) == (250, 20, 20)


def test_palette_without_transparency_has_no_alpha(tmp_path, astro):
    p = tmp_path / "pal.png"
    Image.fromarray(astro).convert("P", palette=Image.Palette.ADAPTIVE).save(p)
    d = load_image(p)
    assert d.alpha is None and d.rgb.shape == (512, 512, 3)


def test_tiff_16bit_rgb_and_gray(tmp_path):
    import cv2

    rgb16 = np.zeros((70, 90, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 257 * 128, 257 * 3
    cv2.imwrite(str(tmp_path / "c16.tif"), rgb16[..., ::-1])
    d = load_image(tmp_path / "c16.tif")
    assert d.info["bit_depth"] == 16 and tuple(d.rgb[10, 10]) == (255, 128, 3)
    g16 = np.full((70, 90), 257 * 77, np.uint16)
    cv2.imwrite(str(tmp_path / "g16.tif"), g16)
    d = load_image(tmp_path / "g16.tif")
    assert d.info["bit_depth"] == 16 and tuple(d.rgb[10, 10]) == (77, 77, 77)


def test_webp_with_alpha(tmp_path):
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[20:60, 20:60, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.webp", lossless=True)
    d = load_image(tmp_path / "a.webp")
    assert d.info["format"] == "WebP" and d.alpha[0, 0] == 0 and d.alpha[30, 30] == 255


def test_heic_and_pdf_are_named(tmp_path):
    heic = tmp_path / "phone.jpg"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200)
    _refused(heic, "HEIC")
    pdf = tmp_path / "scan.png"
    pdf.write_bytes(b"%PDF-1.4\n" + b"x" * 300)
    _refused(pdf, "PDF")
