"""Shared plumbing for the flow transforms: input checks and the log-det cache."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional, Tuple

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch.distributions import Transform, constraints

from .._compat import functorch_transforms_active, tensor_version
from .._validation import check_context, check_hidden_dims, check_int
from ._fused import PLAIN, run_compiled, stack_route

__all__ = [
    "ConditionalFlow",
    "ConditionalStackedFlow",
    "ConditionedFlow",
    "LadjCacheMixin",
    "LearnableStack",
    "as_real_input",
    "check_context",
    "check_event",
    "check_hidden_dims",
    "check_input_dim",
    "nn_context_dim",
]


def check_input_dim(input_dim: Any, name: str = "input_dim") -> int:
    """``input_dim`` as an int, or :class:`~pyro_nfvi._validation.ArgumentError` (a
    ``TypeError`` and a ``ValueError``) unless it is a positive integer."""
    return check_int(input_dim, name, 1)


def as_real_input(x: torch.Tensor, name: str = "x", dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x`` as a floating tensor: integer and bool inputs are promoted to ``dtype`` (the
    parameters' floating dtype; default ``torch.get_default_dtype()``) instead of being
    truncated by the arithmetic; complex inputs raise ``TypeError`` naming ``name``.
    The one place where every transform of this package checks an input's dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point():
        return x
    if x.is_complex():
        raise TypeError(f"{name} must be a real tensor, got complex dtype {x.dtype}")
    if dtype is None or not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return x.to(dtype)


def check_event(
    x: torch.Tensor,
    input_dim: int,
    name: str = "x",
    dtype: Optional[torch.dtype] = None,
    batch_shape: Optional[torch.Size] = None,
) -> torch.Tensor:
    """Check ``x`` of shape ``(..., input_dim)`` and return it as a floating tensor (see
    :func:`as_real_input`). ``batch_shape``: the parameters' batch shape (from a context),
    which must broadcast against the batch shape of ``x``."""
    x = as_real_input(x, name, dtype)
    if x.dim() < 1 or x.shape[-1] != input_dim:
        raise ValueError(
            f"{name} must have shape (..., {input_dim}) (last dim = input_dim), "
            f"got shape {tuple(x.shape)}"
        )
    if batch_shape:
        try:
            torch.broadcast_shapes(x.shape[:-1], batch_shape)
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} (batch shape {tuple(x.shape[:-1])}) does not "
                f"broadcast against the parameters' batch shape {tuple(batch_shape)} (from the "
                f"context): row i of the context transforms row i of {name}"
            ) from None
    return x


def nn_context_dim(nn: torch.nn.Module) -> Optional[int]:
    """The context size a hypernetwork expects, if it says (Pyro's DenseNN does)."""
    dim = getattr(nn, "input_dim", None)
    return dim if isinstance(dim, int) else None


def _no_value_checks() -> bool:
    """Tracing, compiling or a ``torch.func`` transform: tensors there are symbolic or
    batched, so cache entries cannot be compared by value."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or functorch_transforms_active()


class _CacheEntry:
    """One ``x <-> y`` pair (and log|det J| when it came from a forward pass) with what
    makes it valid: the version counters of ``x`` and ``y`` (bumped by every in-place
    change of a sample), a copy of the parameters' values (``p.data.add_(...)`` and
    ``p.data = ...`` bypass version counters, so only values tell) and whether it was
    computed with gradients on."""

    __slots__ = ("x", "y", "ladj", "versions", "params", "symbolic", "forward", "key", "graph")

    def __init__(self, x, y, ladj, params, forward: bool, key=None):
        self.x, self.y, self.ladj, self.forward, self.key = x, y, ladj, forward, key
        self.graph = torch.is_grad_enabled()
        self.symbolic = _no_value_checks()
        if self.symbolic:
            self.versions, self.params = None, None
        else:
            self.versions = (tensor_version(x), tensor_version(y))
            self.params = tuple(p.detach().clone() for p in params)

    def valid(self, params, inverting: bool = False) -> bool:
        if _no_value_checks():
            # inside one trace only pairs made by a forward pass of that trace are safe:
            # anything else would be baked into the trace as a constant
            return self.symbolic and self.forward
        if self.symbolic or self.versions != (tensor_version(self.x), tensor_version(self.y)):
            return False
        if torch.is_grad_enabled() and (not self.graph or (inverting and not self.forward)):
            # a pair computed without gradients has no graph to give; and the graph of an
            # inverse of data (log_prob(data) twice: a validation pass, then training, or
            # two backward passes at the same parameters) may have been freed by a
            # backward already. A drawn sample y = f(x) shares its graph with x, so that
            # pair stays reusable (the one-pass rsample-then-log_prob)
            return False
        params = tuple(params)
        return len(params) == len(self.params) and all(
            a.shape == p.shape and torch.equal(a, p.detach()) for a, p in zip(self.params, params)
        )


class LadjCacheMixin(Transform):
    """Keeps the last ``x <-> y`` pair with its log|det J|, and keeps that cache honest.

    Subclasses implement ``call_and_ladj(x) -> (y, ladj)``. Scoring a sample that was
    just drawn (``TransformedDistribution.rsample`` then ``log_prob``) then costs one
    pass, as in Pyro; any other pair ``(x, y)`` is recomputed from ``x``.

    torch's own cache is keyed on tensor identity only, so it answers with stale values
    after an optimiser step, ``p.data.add_(...)``, ``p.data = ...`` or an in-place change
    of the sample. Here a cached pair is used only while ``x`` and ``y`` are unmodified
    (version counters) and the parameters equal, by value, those it was computed with.
    Under tracing/compiling/``torch.func`` only pairs from a forward pass of the same
    trace are reused (never values computed outside it, which would become constants).

    Integer/bool inputs are promoted to the parameters' floating dtype and complex ones
    rejected (:func:`as_real_input`).
    """

    _nfvi_cache: Optional[_CacheEntry] = None

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _param_tensors(self):
        """The tensors the map depends on: the module's own parameters, or those of the
        module whose method supplies the parameters (a conditioned hypernetwork) with the
        context it reads (an in-place change of the context changes the map)."""
        if isinstance(self, torch.nn.Module):
            return self._parameters.values()  # the flows own no submodules
        params = getattr(self, "_params", None)
        owner = getattr(getattr(params, "func", None), "__self__", None)
        if isinstance(owner, torch.nn.Module):
            context = [a for a in getattr(params, "args", ()) if isinstance(a, torch.Tensor)]
            return list(owner.parameters()) + context
        if isinstance(params, (tuple, list)):
            return [p for p in params if isinstance(p, torch.Tensor)]
        return ()

    def __getstate__(self):
        # the cached pair holds non-leaf tensors, which copy.deepcopy refuses; a copy
        # starts with an empty cache
        state = super().__getstate__()
        state.pop("_nfvi_cache", None)
        return state

    def _float_dtype(self) -> Optional[torch.dtype]:
        for p in self._param_tensors():
            return p.dtype
        return None

    def _cache_key(self) -> Any:
        """An object the map depends on beyond its tensors, compared by identity (``None``
        here; a Hamiltonian flow's potential)."""
        return None

    def _lookup(self, x=None, y=None, inverting: bool = False) -> Optional[_CacheEntry]:
        e = self._nfvi_cache
        if e is None or (x is not None and e.x is not x) or (y is not None and e.y is not y):
            return None
        if e.key is not self._cache_key():
            return None
        return e if e.valid(self._param_tensors(), inverting) else None

    def _store(self, x, y, ladj, forward: bool) -> None:
        if self._cache_size:
            self._nfvi_cache = _CacheEntry(x, y, ladj, self._param_tensors(), forward, self._cache_key())

    # __call__ and _inv_call are torch's Transform entry points (``t(x)``, ``t.inv(y)``,
    # the latter reached through ``_InverseTransform``); they are overridden, not _call /
    # _inverse, because torch's identity-keyed cache sits in them and would answer
    # first, with stale values. This package never touches torch's ``_cached_x_y`` (checked on
    # torch 2.13.0; Transform has had these two methods since torch 1.x).
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        e = self._lookup(x=x) if self._cache_size else None
        if e is not None:
            return e.y
        y, ladj = self.call_and_ladj(as_real_input(x, "x", self._float_dtype()))
        self._store(x, y, ladj, forward=True)
        return y

    def _inv_call(self, y: torch.Tensor) -> torch.Tensor:
        e = self._lookup(y=y, inverting=True) if self._cache_size else None
        if e is not None:
            return e.x
        y_in = as_real_input(y, "y", self._float_dtype())
        inverse_and_ladj = getattr(self, "inverse_and_ladj", None)
        if inverse_and_ladj is not None:  # log-det at the exact inverse (see radial)
            x, ladj = inverse_and_ladj(y_in)
        else:
            x, ladj = self._inverse(y_in), None
        self._store(x, y, ladj, forward=False)
        return x

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.call_and_ladj(x)[0]

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        e = self._lookup(x=x, y=y)
        if e is not None and e.ladj is not None:
            return e.ladj
        return self.call_and_ladj(as_real_input(x, "x", self._float_dtype()))[1]


class ConditionedFlow(LadjCacheMixin):
    """Base of the ``Conditioned*`` flows: a bijection of ``real_vector`` whose parameters
    are a tuple, or a callable returning one (re-read on every call)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    # orientation preserving (det J > 0). Defined, not inherited: Transform.sign raises
    # NotImplementedError, which defeats hasattr() probing (torch.jit.trace_module)
    sign = 1

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

    def _context_params(self, context: torch.Tensor):
        """The layer parameters for ``context`` (one hypernetwork call). Named apart from
        the ``Conditioned*`` flows' ``_params`` (the parameters themselves, or a callable
        returning them) so that one name never means both a method and data."""
        return self.nn(context)

    def condition(self, context: torch.Tensor) -> Transform:
        check_context(context, self.context_dim)
        return self._conditioned(partial(self._context_params, context))


class ConditionalStackedFlow(ConditionalFlow):
    """Base of the ``ConditionalStacked*`` flows: ``K`` layers whose parameters all come
    from ONE hypernetwork call, split per layer using the flow's ``input_dim``."""

    #: the per-layer size of each hypernetwork output, in order: ``1`` (a scalar per
    #: layer, last dim ``K``) or ``"D"`` (a vector per layer, last dim ``K*D``)
    layer_sizes: Tuple[Any, ...] = ()

    def __init__(self, nn: torch.nn.Module, input_dim: int):
        super().__init__(nn)
        self.input_dim = check_input_dim(input_dim)

    def _context_params(self, context: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The hypernetwork's outputs split per layer: last dim ``K*s`` -> ``(K, s)``."""
        outs = tuple(self.nn(context))
        D = self.input_dim
        sizes = [D if s == "D" else s for s in self.layer_sizes]
        K = outs[sizes.index(1)].shape[-1] if len(outs) == len(sizes) else -1
        if K < 0 or any(o.shape[-1] != K * s for o, s in zip(outs, sizes)):
            dims = ", ".join("K" if s == 1 else f"K*{s}" for s in sizes)
            got = ", ".join(str(tuple(o.shape)) for o in outs)
            raise ValueError(f"hypernetwork outputs must have last dims ({dims}); got {got}")
        return tuple(o.unflatten(-1, (K, s)) for o, s in zip(outs, sizes))


class LearnableStack:
    """The learnable ``K``-layer stacks (``StackedPlanar``, ``StackedRadial``): put first in
    the bases, before the ``ConditionedStacked*`` class whose parameters it supplies.

    All parameters live in ONE tensor ``theta`` of shape ``(K, P)`` (one optimiser entry,
    one gradient), each row the per-layer blocks of :attr:`theta_layout` side by side; the
    subclass exposes the blocks as properties and ``_params_tuple``. The forward pass is
    :attr:`packed_fn` on ``(x, theta)``, through ``torch.compile`` if ``compile=True``.
    """

    #: the width of each per-layer block of ``theta``: ``1`` or ``"D"``
    theta_layout: Tuple[Any, ...] = ()
    #: ``(x, theta) -> (y, ladj)``
    packed_fn: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
    #: ``(x, score, theta) -> (y, score_y)``: the score pushed through the stack
    packed_push: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
    #: ``(x, theta, score, route) -> (y, ladj, score_y)``: the kernel's forward pass that
    #: also pushes the score
    packed_kernel_push: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

    def __init__(self, input_dim: int, num_flows: int, compile: bool = False):
        input_dim = check_input_dim(input_dim)
        num_flows = check_input_dim(num_flows, "num_flows")
        super().__init__(self._params_tuple)
        self.input_dim, self.num_flows = input_dim, num_flows
        self.compile = bool(compile)
        width = sum(input_dim if s == "D" else s for s in self.theta_layout)
        self.theta = torch.nn.Parameter(torch.empty(num_flows, width))
        self.reset_parameters()

    def call_and_ladj(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(y, log|det dy/dx|)`` in one pass (compiled if ``compile=True``)."""
        x = check_event(x, self.input_dim, dtype=self.theta.dtype)
        return run_compiled(self, type(self).packed_fn, x, self.theta)

    def push_score(self, x: torch.Tensor, score: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, ∇_y log p_Y(y))`` from ``x`` and ``score = ∇_x log p_X(x)``, without an
        inverse and without an autograd graph (sticking-the-landing gradients): one fused
        pass where :func:`~pyro_nfvi.transforms._fused.stack_route` picks a kernel."""
        return type(self).packed_push(x, score, self.theta)

    def call_ladj_and_push(
        self, x: torch.Tensor, score: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y, log|det dy/dx|, ∇_y log p_Y(y))``: :meth:`call_and_ladj` and the score of
        :meth:`push_score` (no gradient through it), in ONE pass of the kernel where
        :func:`~pyro_nfvi.transforms._fused.stack_route` picks one (the push reuses the
        layers' activations; sticking-the-landing needs both every step), else the two
        calls."""
        x = check_event(x, self.input_dim, dtype=self.theta.dtype)
        if not self.compile and score.shape == x.shape and score.dtype == x.dtype:
            route = stack_route(x, self.theta)
            if route != PLAIN:
                return type(self).packed_kernel_push(x, self.theta, score, route)
        y, ladj = self.call_and_ladj(x)
        return y, ladj, self.push_score(x.detach(), score)[1]

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, num_flows={self.num_flows}, compile={self.compile}"
