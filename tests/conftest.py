import os

import pytest
import torch

# Small tensors: one intra-op thread avoids OpenMP wake-up stalls on busy 2-core CI boxes.
torch.set_num_threads(int(os.environ.get("PYRO_NFVI_TEST_THREADS", "1")))
os.environ.setdefault("MPLBACKEND", "Agg")

# PyPI's torchvision wheel (a CUDA build) cannot import next to CPU torch, and Lightning
# imports torchvision when it is installed: the package's workaround, before any test
# imports Lightning.
from pyro_nfvi._compat import import_lightning_pytorch  # noqa: E402

try:
    import_lightning_pytorch()
except ImportError:  # Lightning is optional; its tests say so themselves
    pass


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    import pyro

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def float64():
    """Run a test with float64 as torch's default dtype, restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
