"""A test harness any user can run on a bijective transform of ``R^D``.

>>> import torch
>>> from pyro_nfvi import helpers
>>> from pyro_nfvi.testing import check_transform
>>> report = check_transform(helpers.planar(3), input_dim=3)
>>> report["logdet_err"] < 1e-10
True
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch.distributions import Transform

__all__ = ["check_transform"]


def _fail(msg: str):
    raise AssertionError(msg)


def _call_and_ladj(t: Transform, x: torch.Tensor):
    if hasattr(t, "call_and_ladj"):
        return t.call_and_ladj(x)
    y = t._call(x)
    return y, t.log_abs_det_jacobian(x, y)


def check_transform(
    t,
    input_dim: int,
    context: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
    batch_shapes: Sequence[Tuple[int, ...]] = ((), (7,), (3, 4)),
    x_scale: float = 2.0,
    atol: Optional[float] = None,
    check_inverse: bool = True,
    seed: int = 0,
) -> Dict[str, float]:
    r"""Check a transform of ``R^input_dim`` against independent references.

    On a deep copy of ``t`` cast to ``dtype`` (``t`` itself is not touched):

    - shapes: ``y`` has the input's shape, ``log_abs_det_jacobian`` its batch shape;
    - log-det: equals ``slogdet`` of the autograd Jacobian (``torch.autograd.functional
      .jacobian``) of each batch row; rows do not influence each other;
    - inverse: ``_inverse(_call(x)) == x`` and ``_call(_inverse(y)) == y`` for fresh
      ``y``, calling the private methods so no cache is involved;
    - gradients of ``y`` and the log-det w.r.t. the input and all parameters, and of the
      inverse, are finite; outputs stay finite for ``|x| = 1e4``.

    :param t: a ``Transform``, or a ``ConditionalTransform`` when ``context`` is given.
    :param input_dim: the event size ``D``.
    :param context: a context of shape ``(*cb, M)``; inputs then have batch shapes
        ``batch_shape + cb`` (so every row sees its own context row).
    :param batch_shapes: input batch shapes to try (before the context's batch shape).
    :param atol: tolerance (default ``1e-10`` for float64, ``1e-4`` otherwise), applied
        relative to ``max(1, |value|)``.
    :returns: the largest errors seen, ``{"logdet_err", "inverse_err", "forward_err"}``.
    :raises AssertionError: naming the failed check and the error.
    """
    if atol is None:
        atol = 1e-10 if dtype == torch.float64 else 1e-4
    gen = torch.Generator().manual_seed(seed)
    t = copy.deepcopy(t)
    if isinstance(t, torch.nn.Module):
        t = t.to(dtype)
    # parameters of the module (a conditional one's hypernetwork), before conditioning
    params = [p for p in t.parameters() if p.requires_grad] if isinstance(t, torch.nn.Module) else []
    ctx_batch: Tuple[int, ...] = ()
    if context is not None:
        context = context.to(dtype)
        ctx_batch = tuple(context.shape[:-1])
        t = t.condition(context)
    errs = {"logdet_err": 0.0, "inverse_err": 0.0, "forward_err": 0.0}

    def rel(a, b):
        a, b = a.detach(), b.detach()
        return float(((a - b).abs() / b.abs().clamp_min(1.0)).max()) if a.numel() else 0.0

    for bs in batch_shapes:
        shape = tuple(bs) + ctx_batch + (input_dim,)
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * x_scale).to(dtype)
        y, ladj = _call_and_ladj(t, x)
        if y.shape != x.shape:
            _fail(f"output shape {tuple(y.shape)} != input shape {tuple(x.shape)}")
        if ladj.shape != x.shape[:-1]:
            _fail(f"log-det shape {tuple(ladj.shape)} != batch shape {tuple(x.shape[:-1])}")
        if not (torch.isfinite(y).all() and torch.isfinite(ladj).all()):
            _fail(f"non-finite output or log-det for batch shape {bs}")
        ladj_api = t.log_abs_det_jacobian(x, y)
        errs["forward_err"] = max(errs["forward_err"], rel(ladj_api, ladj))

        # log-det against slogdet of the float64 autograd Jacobian, row by row
        x_flat = x.detach().reshape(-1, input_dim).to(torch.float64)
        n = x_flat.shape[0]

        def f(z):
            return _call_and_ladj(t, z.to(dtype).reshape(x.shape))[0].reshape(n, input_dim).to(torch.float64)

        jac = torch.autograd.functional.jacobian(f, x_flat)  # (n, D, n, D)
        idx = torch.arange(n)
        blocks = jac[idx, :, idx, :]  # (n, D, D)
        off = jac.clone()
        off[idx, :, idx, :] = 0
        if float(off.abs().max()) > atol:
            _fail(f"batch rows influence each other (max off-diagonal Jacobian {float(off.abs().max()):.3g})")
        sign, logabsdet = torch.linalg.slogdet(blocks)
        if not bool((sign != 0).all()):
            _fail("singular Jacobian")
        err = rel(ladj.detach().reshape(-1).to(torch.float64), logabsdet)
        errs["logdet_err"] = max(errs["logdet_err"], err)
        if err > atol:
            _fail(f"log-det differs from slogdet of the autograd Jacobian by {err:.3g} (batch shape {bs})")

        # gradients of y and log-det w.r.t. input and parameters
        xg = x.detach().clone().requires_grad_()
        yg, lg = _call_and_ladj(t, xg)
        grads = torch.autograd.grad((yg.sum() + lg.sum()), [xg] + params, allow_unused=True)
        for g in grads:
            if g is not None and not torch.isfinite(g).all():
                _fail(f"non-finite gradient of the forward pass (batch shape {bs})")

        if check_inverse:
            x_back = t._inverse(y.detach())
            err = rel(x_back, x)
            errs["inverse_err"] = max(errs["inverse_err"], err)
            if err > atol:
                _fail(f"_inverse(_call(x)) differs from x by {err:.3g} (batch shape {bs})")
            y_new = (torch.randn(shape, generator=gen, dtype=torch.float64) * x_scale).to(dtype)
            err = rel(t._call(t._inverse(y_new)), y_new)
            errs["inverse_err"] = max(errs["inverse_err"], err)
            if err > atol:
                _fail(f"_call(_inverse(y)) differs from y by {err:.3g} for fresh y (batch shape {bs})")
            yg = y_new.clone().requires_grad_()
            xi = t._inverse(yg)
            grads = torch.autograd.grad(xi.sum(), [yg] + params, allow_unused=True)
            for g in grads:
                if g is not None and not torch.isfinite(g).all():
                    _fail(f"non-finite gradient through the inverse (batch shape {bs})")

    # far from the origin
    x_far = torch.full(ctx_batch + (input_dim,), 1e4, dtype=dtype)
    y_far, l_far = _call_and_ladj(t, x_far)
    if not (torch.isfinite(y_far).all() and torch.isfinite(l_far).all()):
        _fail("non-finite output or log-det at |x| = 1e4")
    if check_inverse and not torch.isfinite(t._inverse(y_far)).all():
        _fail("non-finite inverse at |y| = 1e4")
    return errs
