"""Turntable: the scene orbited once around +Y, as H.264 mp4 and looping GIF.

Frame i looks from azimuth 360 * i / frames degrees (0 = the face, then the camera
moves toward the subject's left, +X) at `turntable_elevation`, PanoHead radius and
focal length, over a neutral grey background. The renderer is any bound renderer:
the splats (recon.fit.render.render_scene, the default) or the textured mesh
(`TexturedMesh.render`, export.turntable_source = "mesh"; about half the CPU time of the
CPU splat rasterizer at 20k Gaussians, 384^2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .. import cameras
from ..config import ExportConfig
from ..errors import MissingError, StageError

BACKGROUND = np.array([0.82, 0.82, 0.82])   # light neutral grey: reads well behind hair and skin
Progress = Callable[[int, int, str], None] | None


def turntable_cameras(frames: int, elevation_deg: float) -> np.ndarray:
    az = 360.0 * np.arange(frames) / frames
    return cameras.orbit_cam2world(az, np.full(frames, float(elevation_deg)))


def render_turntable(render_fn, cfg: ExportConfig, batch: int = 8, progress: Progress = None) -> np.ndarray:
    """(frames, H, W, 3) uint8 with even H and W, composited over BACKGROUND.

    render_fn is a bound renderer: (c2w (N,4,4), K_norm (N,3,3), width, height) -> (rgba, depth).
    """
    n = int(cfg.turntable_frames)
    if n < 1:
        raise StageError(f"export.turntable_frames={n} must be at least 1", stage="export")
    size = int(cfg.turntable_resolution)
    size += size % 2                                   # yuv420p needs even sides
    c2w = turntable_cameras(n, cfg.turntable_elevation)
    K = np.repeat(cameras.INTRINSICS_NORM[None], n, axis=0)
    out = np.empty((n, size, size, 3), np.uint8)
    bg = BACKGROUND * 255.0
    for s in range(0, n, batch):
        e = min(n, s + batch)
        rgba, _ = render_fn(c2w[s:e], K[s:e], size, size)
        # renders are straight (not premultiplied) alpha: blend over the background
        a = rgba[..., 3:4].astype(np.float32) / 255.0
        out[s:e] = np.clip(rgba[..., :3].astype(np.float32) * a + bg * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)
        if progress:
            progress(e, n, "turntable")
    return out


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError:
        raise MissingError("imageio-ffmpeg is not installed: cannot write mp4", hint="pip install imageio-ffmpeg") from None
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as e:
        raise MissingError(f"no ffmpeg binary found ({e})", hint="reinstall imageio-ffmpeg or set IMAGEIO_FFMPEG_EXE") from None


def write_mp4(path: str | Path, frames: np.ndarray, fps: int, crf: int = 20) -> Path:
    """H.264, yuv420p (plays everywhere), +faststart (streams on the web)."""
    import imageio_ffmpeg

    ffmpeg_exe()
    path = Path(path)
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise StageError(f"mp4 frames must have even sides, got {w}x{h}", stage="export")
    writer = imageio_ffmpeg.write_frames(str(path), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24",
                                         pix_fmt_out="yuv420p", quality=None, macro_block_size=2,
                                         ffmpeg_log_level="error",
                                         output_params=["-crf", str(crf), "-preset", "medium", "-movflags", "+faststart"])
    writer.send(None)
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()
    return path


def write_gif(path: str | Path, frames: np.ndarray, fps: int, max_side: int = 320) -> Path:
    """Looping GIF with one shared adaptive palette (no palette flicker between frames)."""
    from PIL import Image

    path = Path(path)
    h, w = frames.shape[1:3]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    imgs = [Image.fromarray(f).resize(size, Image.LANCZOS) if scale < 1 else Image.fromarray(f) for f in frames]
    # palette from a strip of a few frames so all views' colours are represented
    pick = imgs[:: max(1, len(imgs) // 8)][:8]
    strip = Image.new("RGB", (size[0], size[1] * len(pick)))
    for i, im in enumerate(pick):
        strip.paste(im, (0, size[1] * i))
    pal = strip.quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    q = [im.quantize(palette=pal, dither=Image.Dither.NONE) for im in imgs]
    duration = max(20, int(round(1000.0 / fps)))   # GIF delays are in 10 ms units; most players floor at 20 ms
    q[0].save(path, format="GIF", save_all=True, append_images=q[1:], duration=duration, loop=0, optimize=False,
              disposal=1)
    return path
