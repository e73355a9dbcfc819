import os

import pytest
import torch

# Small tensors: one intra-op thread avoids OpenMP wake-up stalls on busy 2-core CI boxes.
torch.set_num_threads(int(os.environ.get("PYRO_NFVI_TEST_THREADS", "1")))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    import pyro

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
