"""portrait3d engine and Python API: one portrait in, a 360-degree 3D head out.

    import recon
    assets = recon.make("photo.jpg", out="runs/me", preset="default", export=["glb"])
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["make", "run", "preprocess", "backview", "views", "fit", "export", "render", "__version__"]


def __getattr__(name):
    # The API pulls in torch and friends: import it on first use, keep `import recon` cheap.
    if name in __all__ and name != "__version__":
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
