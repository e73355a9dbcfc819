"""The one home of the package's argument checks: one rule and one exception type each.

Every check raises :class:`ArgumentError`, which is both a ``ValueError`` and a
``TypeError``: a wrong type (``2.5`` layers) and a wrong value (``0`` layers) are the same
mistake to a caller, and ``except ValueError`` / ``except TypeError`` both catch it (as
NumPy's ``AxisError`` is both a ``ValueError`` and an ``IndexError``).
"""

from __future__ import annotations

import numbers
from typing import Any, List, Optional

import torch

__all__ = ["ArgumentError", "check_context", "check_hidden_dims", "check_int", "check_positive"]


class ArgumentError(ValueError, TypeError):
    """A bad argument (wrong type or value); the message names it and what it must be."""


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int``, or :class:`ArgumentError` unless it is an integer (Python
    or NumPy, not ``bool``) of at least ``minimum``.

    >>> check_int(3, "num_flows")
    3
    >>> check_int(0, "num_flows", minimum=0)
    0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_positive(value: Any, name: str) -> float:
    """``value`` as a ``float``, or :class:`ArgumentError` unless it is a finite real
    number > 0 (not ``bool``).

    >>> check_positive(0.1, "head_scale")
    0.1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
        raise ArgumentError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_hidden_dims(hidden_dims: Any, name: str = "hidden_dims") -> List[int]:
    """A sequence of positive ints (e.g. ``[20, 20]``) as a list, or :class:`ArgumentError`."""
    if isinstance(hidden_dims, (int, str)) or not hasattr(hidden_dims, "__iter__"):
        raise ArgumentError(
            f"{name} must be a sequence of positive ints, e.g. [20, 20], got {hidden_dims!r}"
        )
    hidden_dims = list(hidden_dims)
    for h in hidden_dims:
        if isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1:
            raise ArgumentError(f"{name} must be a sequence of positive ints, got {hidden_dims!r}")
    return [int(h) for h in hidden_dims]


def check_context(context: Any, context_dim: Optional[int]) -> None:
    """:class:`ArgumentError` unless ``context`` is a tensor of shape ``(..., context_dim)``
    (any last dim when ``context_dim`` is ``None``)."""
    if not isinstance(context, torch.Tensor):
        raise ArgumentError(f"context must be a torch.Tensor, got {type(context).__name__}")
    if context_dim is not None and (context.dim() < 1 or context.shape[-1] != context_dim):
        raise ArgumentError(
            f"context must have shape (..., {context_dim}) (last dim = context_dim), "
            f"got shape {tuple(context.shape)}"
        )
