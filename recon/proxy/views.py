"""The proxy back-end behind the BackView / ViewSet contracts (labelled previews)."""
from __future__ import annotations

import numpy as np

from .. import cameras
from ..config import ViewsConfig
from ..types import BackView, Portrait, ViewSet
from .head import Progress, ProxyHead, build_proxy


def proxy_backview(portrait: Portrait, cfg: ViewsConfig, head: ProxyHead | None = None) -> BackView:
    """The proxy's back of the head: camera at azimuth 180, elevation cfg.elevation."""
    head = head or build_proxy(portrait, cfg)
    c2w = cameras.orbit_cam2world(180.0, float(cfg.elevation))
    K = cameras.INTRINSICS_NORM.copy()
    rgba, _ = head.render(c2w[None], K[None], cfg.resolution, cfg.resolution)
    return BackView(image=rgba[0], c2w=c2w, K=K, backend="proxy",
                    meta={"preview": True, "azimuth_deg": 180.0, "elevation_deg": float(cfg.elevation)})


def proxy_views(portrait: Portrait, backview: BackView | None, cfg: ViewsConfig, head: ProxyHead | None = None,
                progress: Progress = None) -> ViewSet:
    """cfg.num_views renders of the proxy on the 360 ring (yaw_i = pi/2 + 2*pi*i/N at the
    PanoHead pitch of cfg.elevation), with depth. The proxy's own back is used: a given back
    view is not projected (recorded in meta)."""
    head = head or build_proxy(portrait, cfg)
    n = int(cfg.num_views)
    c2w = cameras.ring_cam2world(n, cameras.elevation_to_v(float(cfg.elevation)))
    K = np.repeat(cameras.INTRINSICS_NORM[None], n, 0)
    rgba, depth = head.render(c2w, K, cfg.resolution, cfg.resolution, progress=progress)
    meta = {"preview": True, "elevation_deg": float(cfg.elevation), "proxy": head.info}
    if backview is not None and backview.backend != "proxy":
        meta["backview_ignored"] = f"the proxy renders its own back; the {backview.backend} back view was not used"
    return ViewSet(images=rgba, c2w=c2w, K=K, names=[f"{i:03d}.png" for i in range(n)], depth=depth,
                   backend="proxy", preview=True, meta=meta)
