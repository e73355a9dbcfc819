"""The one way this package runs code on the user's random streams without moving them."""

from __future__ import annotations

import contextlib
import random
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["fork_rng"]


@contextlib.contextmanager
def fork_rng(devices: Sequence = ()) -> Iterator[None]:
    """Run a block with torch's CPU stream (and those of ``devices``), NumPy's global
    stream and Python's ``random`` saved and restored after it: the block may run the
    user's model, whose own code may draw from any of the three.

    >>> import numpy as np
    >>> np.random.seed(0); expected = np.random.rand()
    >>> np.random.seed(0)
    >>> with fork_rng():
    ...     _ = np.random.rand(3)
    >>> float(np.random.rand()) == expected
    True
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(devices)):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
