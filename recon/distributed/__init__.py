"""Batches on a Ray cluster (optional extra: `pip install 'portrait3d[ray]'`).

recon.batch(..., ray="local" | "auto" | ADDRESS) is the entry point; this package
holds the Ray side: connecting, per-stage resources, the GPU stage actors and the
driver loop that gathers results into the same batch.json as a local batch.
"""
from __future__ import annotations

from .ray_batch import DEFAULT_RESOURCES, connect, require_ray, run_ray_batch

__all__ = ["DEFAULT_RESOURCES", "connect", "require_ray", "run_ray_batch"]
