r"""Binarised MNIST for the amortized (VAE) experiments of Rezende & Mohamed (2015, §6.2).

The images are read by :class:`torchvision.datasets.MNIST` (the optional extra
``pip install "pyro_nfvi[examples]"``) from ``root/MNIST/raw/``, the folder layout
torchvision's own downloader writes; nothing is downloaded here. Binarisation follows the
literature's *stochastic* scheme: a pixel of grey level :math:`g \in [0, 1]` is 1 with
probability :math:`g`. Training images are re-binarised every epoch ("dynamic"
binarisation, Burda et al. 2016); the test images are binarised once with a fixed seed,
so every model is scored on the same binary images.

Example::

    >>> from pyro_nfvi.datasets import binarize, load_mnist
    >>> x_train, x_test = load_mnist(root)              # doctest: +SKIP
    >>> x_test_bin = binarize(x_test, seed=0)           # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from ._compat import import_torchvision

__all__ = ["RAW_FILES", "binarize", "default_data_root", "load_mnist"]

#: The four uncompressed IDX files torchvision reads from ``root/MNIST/raw/``.
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_ENV = "PYRO_NFVI_DATA"


def default_data_root() -> Path:
    """The data root used when none is given: ``$PYRO_NFVI_DATA`` if set, else the first
    of ``data/`` beside the repository and the ``shared/data/`` folder next to it (where
    this project's machines keep MNIST) that holds ``MNIST/raw``, else ``data/``."""
    if os.environ.get(_ENV):
        return Path(os.environ[_ENV])
    repo = Path(__file__).resolve().parent.parent
    candidates = [repo / "data", repo.parent / "shared" / "data"]
    for c in candidates:
        if (c / "MNIST" / "raw").is_dir():
            return c
    return candidates[0]


def load_mnist(
    root: Union[str, Path, None] = None, dtype: torch.dtype = torch.float32
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 60,000 training and 10,000 test images as grey levels in [0, 1], each
    flattened to 784 values: ``(x_train (60000, 784), x_test (10000, 784))``.

    :param root: the folder holding ``MNIST/raw/`` (torchvision's layout); default
        :func:`default_data_root`.
    :raises FileNotFoundError: naming ``root`` and the missing files, before any loading.
    :raises ImportError: when torchvision (the ``examples`` extra) is not installed.
    """
    root = default_data_root() if root is None else Path(root)
    raw = root / "MNIST" / "raw"
    missing = [f for f in RAW_FILES if not (raw / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"root={str(root)!r}: MNIST not found, missing {', '.join(missing)} in {raw}. "
            "Point root (--data-root, or $PYRO_NFVI_DATA) at the folder that holds "
            "MNIST/raw/ with the four uncompressed IDX files, or fetch them once on a "
            "machine with internet: torchvision.datasets.MNIST(root, download=True)."
        )
    try:
        tv = import_torchvision()
    except ImportError as e:
        raise ImportError(
            'load_mnist needs torchvision: pip install "pyro_nfvi[examples]"'
        ) from e
    out = []
    for train in (True, False):
        data = tv.datasets.MNIST(str(root), train=train, download=False).data
        out.append(data.reshape(len(data), -1).to(dtype) / 255.0)
    return out[0], out[1]


def binarize(
    x: torch.Tensor, seed: Optional[int] = None, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Stochastic binarisation: each pixel is 1 with probability equal to its grey level.

    Draws from ``generator``, or from a fresh generator seeded with ``seed``; with neither,
    from the global stream (as :func:`torch.bernoulli`).
    """
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.bernoulli(x, generator=generator)
