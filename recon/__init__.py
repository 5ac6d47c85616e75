"""portrait3d engine and Python API: one portrait in, a 360-degree 3D head out.

    import recon
    assets = recon.make("photo.jpg", out="runs/me", preset="default", export=["glb"])
"""
from __future__ import annotations

import os as _os

# OpenMP threads that spin while waiting make torch on a busy 2-core machine up to 20x
# slower (measured: 9 s vs 0.5 s per rasterizer frame). Must be set before torch loads;
# an explicit user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["make", "run", "batch", "preprocess", "backview", "views", "fit", "export", "render", "__version__"]


def __getattr__(name):
    # The API pulls in torch and friends: import it on first use, keep `import recon` cheap.
    if name == "batch":
        # The submodule is callable (recon.batch(...) runs a batch): importing it makes
        # it the package attribute, so hand out the module, never a shadowing function.
        import importlib

        return importlib.import_module(".batch", __name__)
    if name in __all__ and name != "__version__":
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
