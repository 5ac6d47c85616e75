"""Real, public-domain sample pictures that ship inside installed wheels (no download).

- astronaut: NASA portrait of astronaut Eileen Collins, public domain, shipped by scikit-image
  (`skimage.data.astronaut()`), 512x512.
- grace_hopper: US Navy portrait of Rear Admiral Grace Hopper, public domain, shipped by
  matplotlib (`mpl-data/sample_data/grace_hopper.jpg`), 512x600.
- chelsea: a cat (scikit-image, CC0 by Stefan van der Walt) — a face no human landmarker finds.
- coffee: a cup of coffee (scikit-image, CC0 by Rachel Michetti) — no face at all.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SAMPLES = ("astronaut", "grace_hopper", "chelsea", "coffee")


def grace_hopper_path() -> Path:
    import matplotlib

    p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not p.is_file():  # pragma: no cover - matplotlib always ships it
        from matplotlib import cbook

        p = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return p


def sample_rgb(name: str) -> np.ndarray:
    """(H, W, 3) uint8 of a named sample."""
    if name == "grace_hopper":
        from PIL import Image

        with Image.open(grace_hopper_path()) as im:
            return np.asarray(im.convert("RGB")).copy()
    from skimage import data

    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; samples: {', '.join(SAMPLES)}")
    return np.ascontiguousarray(getattr(data, name)()[..., :3])


def write_sample(name: str, folder: str | os.PathLike, fmt: str = "png") -> Path:
    """Write a sample to folder/name.fmt and return the path (JPEG quality 95)."""
    from PIL import Image

    path = Path(folder) / f"{name}.{fmt}"
    im = Image.fromarray(sample_rgb(name))
    im.save(path, quality=95) if fmt in ("jpg", "jpeg") else im.save(path)
    return path
