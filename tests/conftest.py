import os
from pathlib import Path

# Before torch loads anywhere in the test process (see recon/__init__.py for why).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Golden data from the official code: ../shared/fixtures, or $P3D_FIXTURES laid out the same way.
FIXTURES = Path(os.environ.get("P3D_FIXTURES", ROOT.parent / "shared" / "fixtures")).resolve()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny models and tensors are dominated by per-op overhead: one torch thread is
    faster than two on a 2-core machine, and much faster when the machine is busy."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
