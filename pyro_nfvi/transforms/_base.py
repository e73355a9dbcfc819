"""Shared plumbing for the flow transforms: input checks and the log-det cache."""

from __future__ import annotations

from functools import partial

from typing import Any, Callable, Optional, Tuple

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch.distributions import Transform, constraints


def check_input_dim(input_dim, name: str = "input_dim") -> int:
    """Return ``input_dim`` as an int, or raise if it is not a positive integer."""
    if isinstance(input_dim, bool) or not isinstance(input_dim, int):
        raise TypeError(f"{name} must be a positive int, got {input_dim!r} ({type(input_dim).__name__})")
    if input_dim < 1:
        raise ValueError(f"{name} must be a positive int, got {input_dim}")
    return input_dim


def check_hidden_dims(hidden_dims) -> list:
    if isinstance(hidden_dims, int) or not hasattr(hidden_dims, "__iter__"):
        raise ValueError(
            f"hidden_dims must be a sequence of positive ints, e.g. [20, 20], got {hidden_dims!r}"
        )
    hidden_dims = list(hidden_dims)
    for h in hidden_dims:
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(
                f"hidden_dims must be a sequence of positive ints, got {hidden_dims!r}"
            )
    return hidden_dims


def check_event(x: torch.Tensor, input_dim: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != input_dim:
        raise ValueError(
            f"{name} must have shape (..., {input_dim}) (last dim = input_dim), "
            f"got shape {tuple(x.shape)}"
        )


def check_context(context: torch.Tensor, context_dim: Optional[int]) -> None:
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
    if context_dim is not None and (context.dim() < 1 or context.shape[-1] != context_dim):
        raise ValueError(
            f"context must have shape (..., {context_dim}) (last dim = context_dim), "
            f"got shape {tuple(context.shape)}"
        )


def nn_context_dim(nn: torch.nn.Module) -> Optional[int]:
    """The context size a hypernetwork expects, if it says (Pyro's DenseNN does)."""
    dim = getattr(nn, "input_dim", None)
    return dim if isinstance(dim, int) else None


class LadjCacheMixin(Transform):
    """Keeps the log|det J| computed with the last forward pass, and keeps caches honest.

    Subclasses implement ``call_and_ladj(x) -> (y, ladj)``. Scoring a sample that was
    just drawn (``TransformedDistribution.rsample`` then ``log_prob``) then costs one
    pass, as in Pyro; any other pair ``(x, y)`` is recomputed from ``x``.

    torch's ``x <-> y`` cache is keyed on tensor identity only, so calling
    ``log_prob(data)`` on the same ``data`` after an optimiser step would return the
    inverse computed with the old parameters. For modules we also key the caches on the
    parameters' version counters, which every in-place update (optimiser steps,
    ``load_state_dict``) bumps.
    """

    _cached_ladj_xy: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
    _param_key: Optional[tuple] = None

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _check_param_versions(self) -> None:
        if not isinstance(self, torch.nn.Module):
            return
        # direct parameters only: the flows own no submodules, and this runs every call
        key = tuple(p._version for p in self._parameters.values())
        if key != self._param_key:
            self._param_key = key
            self._cached_ladj_xy = None
            if self._cache_size:
                self._cached_x_y = None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check_param_versions()
        return super().__call__(x)

    def _inv_call(self, y: torch.Tensor) -> torch.Tensor:
        self._check_param_versions()
        return super()._inv_call(y)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        y, ladj = self.call_and_ladj(x)
        self._cached_ladj_xy = (x, y, ladj)
        return y

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check_param_versions()
        cached = self._cached_ladj_xy
        if cached is not None and cached[0] is x and cached[1] is y:
            return cached[2]
        return self.call_and_ladj(x)[1]


class ConditionedFlow(LadjCacheMixin):
    """Base of the ``Conditioned*`` flows: a bijection of ``real_vector`` whose parameters
    are a tuple, or a callable returning one (re-read on every call)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, params: Any, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self._params = params


class ConditionalFlow(ConditionalTransformModule):
    """Base of the ``Conditional*`` flows: ``condition(context)`` checks the context
    against the hypernetwork's input size and returns a ``Conditioned*`` flow that reads
    the hypernetwork lazily (so it stays valid across optimiser steps, as in Pyro)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, nn: torch.nn.Module):
        super().__init__()
        self.nn = nn
        self.context_dim = nn_context_dim(nn)

    def _conditioned(self, params: Callable[[], Any]) -> Transform:
        raise NotImplementedError

    def _params(self, context: torch.Tensor):
        return self.nn(context)

    def condition(self, context: torch.Tensor) -> Transform:
        check_context(context, self.context_dim)
        return self._conditioned(partial(self._params, context))
