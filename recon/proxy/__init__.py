"""Weight-free, CPU-fast geometric head proxy (DESIGN §1): a star-shaped head fitted
to the portrait's matte with a face relief from the landmarks, the photo projected
on the front, hair and back filled from the image's own colours. Every output is
labelled a preview."""
from .head import ProxyHead, build_proxy
from .views import proxy_backview, proxy_views

__all__ = ["ProxyHead", "build_proxy", "proxy_backview", "proxy_views"]
