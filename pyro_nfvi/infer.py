"""Training helpers.

* :func:`fit` runs Pyro's :class:`~pyro.infer.SVI` for a model/guide pair with a progress
  bar and a finite-loss check, and returns the loss history.
* :func:`fit_density` fits a normalizing flow to an unnormalised density
  ``log p̃(z)`` by minimising the reverse KL divergence
  ``E_q[log q(z) − β log p̃(z)]`` with β annealed from ``beta0`` to 1.

Example (SVI)::

    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from pyro_nfvi.infer import fit
    >>> def model(x):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)
    >>> pyro.clear_param_store()
    >>> losses = fit(model, AutoNormal(model), torch.ones(5), num_steps=10, progress=False)
    >>> len(losses)
    10

Example (reverse-KL fitting of a 2-D density)::

    >>> from pyro.distributions.transforms import Planar, ComposeTransformModule
    >>> from pyro_nfvi.targets import get_target
    >>> flow = ComposeTransformModule([Planar(2) for _ in range(4)])
    >>> result = fit_density(flow, get_target("U2"), num_steps=20, progress=False, seed=0)
    >>> len(result.losses), result.q.sample((3,)).shape
    (20, torch.Size([3, 2]))
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.util import zero_grads
from torch.distributions import Transform
from torch.distributions.transforms import AffineTransform

from ._rng import fork_rng
from ._validation import ArgumentError, check_int, check_positive
from .diagnostics import plate_nesting
from ._weights import vectorization_problem
from .targets import log_density_fn
try:  # notebook widget bars need ipywidgets; without it tqdm.auto only warns
    import ipywidgets  # noqa: F401
    from tqdm.auto import tqdm
except ImportError:
    from tqdm import tqdm

__all__ = ["fit", "fit_density", "DensityFit", "AffineBase"]


#: ``fit``'s defaults, chosen on the posterior suite (``benchmarks/posterior_suite.py``):
#: vectorised particles cut the gradient noise that held flow guides back on hierarchical
#: models; the learning rate decays tenfold over the run (Adam's noise floor at a fixed
#: rate costs a fraction of a nat on every model of the suite).
DEFAULT_NUM_STEPS = 2000
DEFAULT_NUM_PARTICLES = 8
DEFAULT_LR = 0.01
DEFAULT_LR_END = 0.001


def default_optim(num_steps: int, lr: float = DEFAULT_LR, lr_end: float = DEFAULT_LR_END):
    """``ClippedAdam`` with the learning rate decaying geometrically from ``lr`` to
    ``lr_end`` over ``num_steps`` steps (the optimiser :func:`fit` uses by default)."""
    num_steps = check_int(num_steps, "num_steps")
    lr, lr_end = check_positive(lr, "lr"), check_positive(lr_end, "lr_end")
    return pyro.optim.ClippedAdam({"lr": lr, "lrd": (lr_end / lr) ** (1.0 / num_steps)})


def _max_plate_nesting(model: Callable, args, kwargs) -> int:
    """How many plate dims the model uses (what ``Trace_ELBO`` would guess, without its
    log line): the particle plate of vectorised particles goes left of them."""
    with fork_rng():
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
    return plate_nesting(trace)


def fit(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_steps: int = DEFAULT_NUM_STEPS,
    num_particles: int = DEFAULT_NUM_PARTICLES,
    optim: Optional[pyro.optim.PyroOptim] = None,
    loss: Optional[pyro.infer.ELBO] = None,
    progress: bool = True,
    callback: Optional[Callable[[int, float], Any]] = None,
    **kwargs: Any,
) -> List[float]:
    """Run SVI for ``num_steps`` steps and return the loss history.

    Defaults (chosen on the posterior suite, see the README): ``num_particles = 8``
    vectorised particles per step (``Trace_ELBO(num_particles, vectorize_particles=True)``;
    a model that does not broadcast over the particle dim falls back to sequential
    particles, with a warning) and ``ClippedAdam`` with the learning rate decaying from
    0.01 to 0.001 over the run (:func:`default_optim`).

    :param model: Pyro model.
    :param guide: Pyro guide (e.g. an autoguide).
    :param args: positional arguments passed to model and guide at every step.
    :param num_steps: number of SVI steps (positive int).
    :param num_particles: ELBO particles per step (ignored when ``loss`` is given).
    :param optim: a Pyro optimiser; default :func:`default_optim` ``(num_steps)``.
    :param loss: an ELBO; default ``Trace_ELBO(num_particles, vectorize_particles=True)``.
    :param progress: show a ``tqdm`` progress bar with the running loss.
    :param callback: called as ``callback(step, loss)`` after every step (as in
        :func:`fit_density`); an exception it raises stops the fit and propagates (how
        :func:`pyro_nfvi.tune.tune` reports validation scores and prunes trials).
    :param kwargs: keyword arguments passed to model and guide at every step.
    :returns: list of the ``num_steps`` losses (floats).
    :raises FloatingPointError: if a loss or a gradient is NaN or infinite. The check runs
        before the optimiser step, so the guide keeps the parameters of the last good step
        (the message names the step and the parameters with non-finite gradients).
    """
    num_steps = check_int(num_steps, "num_steps")
    num_particles = check_int(num_particles, "num_particles")
    for name, value in (("model", model), ("guide", guide)):
        if not callable(value):
            raise ArgumentError(f"{name} must be callable (a Pyro {name}), got {type(value).__name__}")
    if loss is not None and not (isinstance(loss, pyro.infer.ELBO) or callable(loss)):
        raise ArgumentError(f"loss must be a Pyro ELBO (e.g. Trace_ELBO()), got {type(loss).__name__}")
    if callback is not None and not callable(callback):
        raise ArgumentError(f"callback must be callable or None, got {type(callback).__name__}")
    if optim is None:
        optim = default_optim(num_steps)
    fallback = None
    if loss is None:
        if num_particles > 1:
            try:
                nesting = _max_plate_nesting(model, args, kwargs)
            except ValueError as e:  # e.g. Pyro's argument validation
                raise ValueError(f"SVI step 0 (of {num_steps}) failed: {e}") from e
            loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=True,
                              max_plate_nesting=nesting)
            fallback = Trace_ELBO(num_particles=num_particles, max_plate_nesting=nesting)
        else:
            loss = Trace_ELBO()
    svi = SVI(model, guide, optim, loss)
    history: List[float] = []
    running: Optional[float] = None
    with tqdm(total=num_steps, disable=not progress, desc="SVI") as bar:
        for step in range(num_steps):
            try:
                value = _checked_svi_step(svi, step, num_steps, args, kwargs)
            except (ValueError, RuntimeError) as e:
                if step == 0 and fallback is not None:
                    # shape errors of a model that does not broadcast over particles: the
                    # step again with sequential particles; if that fails too, the error
                    # is the model's own (e.g. invalid data), not vectorisation's
                    sequential = SVI(model, guide, optim, fallback)
                    try:
                        value = _checked_svi_step(sequential, step, num_steps, args, kwargs)
                    except ValueError as e2:
                        raise ValueError(f"SVI step {step} (of {num_steps}) failed: {e2}") from e2
                    warnings.warn(
                        f"the model does not run with vectorised particles ({e}); fit() "
                        f"uses {num_particles} sequential particles per step instead",
                        RuntimeWarning,
                    )
                    svi, fallback = sequential, None
                elif isinstance(e, ValueError):  # e.g. Pyro's argument validation
                    raise ValueError(f"SVI step {step} (of {num_steps}) failed: {e}") from e
                else:
                    raise
            if step == 0 and fallback is not None:
                # after step 0 (the guide is set up): a model that runs vectorised with
                # the right shapes can still mix its particles (e.g. a sum over a batch
                # dim); two of them are re-scored one at a time, off the random stream
                problem = vectorization_problem(model, guide, args, kwargs, nesting)
                if problem is not None:
                    warnings.warn(
                        f"{problem}; fit() uses {num_particles} sequential particles per step "
                        "from step 1 on (the loss of step 0 is the vectorised one)",
                        RuntimeWarning,
                    )
                    svi = SVI(model, guide, optim, fallback)
                fallback = None
            history.append(value)
            running = value if running is None else 0.95 * running + 0.05 * value
            bar.update(1)
            if progress and (step % 10 == 0 or step == num_steps - 1):
                bar.set_postfix(loss=f"{running:.4g}", refresh=False)
            if callback is not None:
                callback(step, value)
    return history


def _checked_svi_step(svi: SVI, step: int, num_steps: int, args, kwargs) -> float:
    """One :meth:`SVI.step`, with the loss and every gradient checked for finiteness
    *before* the optimiser runs: a NaN/inf raises ``FloatingPointError`` and leaves the
    parameters as they were after the last good step (so the fit can be resumed)."""
    # the same public steps as SVI.step: loss_and_grads under a param trace, then optim
    with poutine.trace(param_only=True) as param_capture:
        loss = svi.loss_and_grads(svi.model, svi.guide, *args, **kwargs)
    params = {
        name: site["value"].unconstrained() for name, site in param_capture.trace.nodes.items()
    }
    value = float(loss)
    bad = None
    if not math.isfinite(value):
        bad = f"SVI loss is {value} at step {step} (of {num_steps})"
    else:
        grads = [(n, p.grad) for n, p in params.items() if p.grad is not None]
        # one synchronising check for all parameters, names only on failure
        if grads and not bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):
            names = [n for n, g in grads if not bool(torch.isfinite(g).all())]
            bad = (
                f"SVI loss is finite ({value:.6g}) at step {step} (of {num_steps}) but the "
                f"gradient of parameter(s) {', '.join(repr(n) for n in names)} is not"
            )
    if bad is not None:
        zero_grads(params.values())
        raise FloatingPointError(
            bad + "; no optimiser step was taken, so the parameters are those after the last "
            "good step and fit() can be resumed. Check the model/guide for invalid "
            "parameters, or lower the learning rate"
        )
    svi.optim(set(params.values()))
    zero_grads(params.values())
    return value


class AffineBase(torch.nn.Module):
    """A learnable elementwise affine map ``z = loc + exp(log_scale) ⊙ x`` used by
    :func:`fit_density` after the user's flow (so the flow works in a standardised frame).

    :meth:`transform` returns a fresh :class:`~torch.distributions.AffineTransform`
    with ``cache_size=1`` (so Pyro's cache-only inverses keep working through it).
    """

    def __init__(self, dim: int, loc: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        self.loc = torch.nn.Parameter(torch.full((dim,), float(loc)))
        self.log_scale = torch.nn.Parameter(torch.full((dim,), math.log(scale)))

    def transform(self) -> AffineTransform:
        return AffineTransform(self.loc, self.log_scale.exp(), event_dim=1, cache_size=1)


@dataclass
class DensityFit:
    """Result of :func:`fit_density`.

    :ivar q: the fitted distribution (a ``TransformedDistribution``; ``log_prob`` works on
        any point if the flow has a true inverse).
    :ivar transforms: the list of transforms applied to the base (flow, then affine).
    :ivar losses: per-step loss ``E_q[log q − β log p̃]`` (estimate on the batch).
    :ivar betas: the β used at each step.
    :ivar seconds: wall-clock training time.
    """

    q: dist.TransformedDistribution
    transforms: List[Transform]
    losses: List[float] = field(default_factory=list)
    betas: List[float] = field(default_factory=list)
    seconds: float = 0.0
    affine: Optional[AffineBase] = None

    def __getitem__(self, key: str) -> Any:  # dict-style access
        return getattr(self, key)


def _as_transform_list(flow: Union[Transform, Sequence[Transform]]) -> List[Transform]:
    if isinstance(flow, Transform):
        return [flow]
    if isinstance(flow, (list, tuple)):
        if not all(isinstance(t, Transform) for t in flow):
            raise TypeError("flow must be a Transform or a list of Transforms")
        return list(flow)
    raise TypeError(f"flow must be a Transform or a list of Transforms, got {type(flow)}")


def _parameters(transforms: Iterable[Any]) -> List[torch.nn.Parameter]:
    params: List[torch.nn.Parameter] = []
    seen = set()
    for t in transforms:
        if isinstance(t, torch.nn.Module):
            for p in t.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def fit_density(
    flow: Union[Transform, Sequence[Transform]],
    target: Any,
    num_steps: int = 12000,
    batch_size: int = 512,
    lr: float = 1e-2,
    lr_min: float = 0.0,
    anneal_steps: Optional[int] = None,
    beta0: float = 0.01,
    clip_norm: Optional[float] = None,
    affine: bool = True,
    init_scale: float = 1.0,
    base: Optional[dist.Distribution] = None,
    dim: int = 2,
    progress: bool = True,
    seed: Optional[int] = None,
    callback: Optional[Callable[[int, float], Any]] = None,
) -> DensityFit:
    """Fit a flow to an unnormalised density by reverse KL with β-annealing.

    The fitted distribution is ``q = TransformedDistribution(base, [*flow, affine])``
    with ``base = N(0, I)`` by default.  Each step draws ``batch_size`` reparameterised
    samples ``z ~ q`` and takes an Adam step on
    ``mean(log q(z) − β log p̃(z))``; β rises linearly from ``beta0`` to 1 over the first
    ``anneal_steps`` steps (default: a quarter of training), and the learning rate follows
    a cosine decay from ``lr`` to ``lr_min``.  At β = 1 the loss is ``KL(q‖p) − log Z``.
    By default a learnable elementwise affine layer ``z = loc + scale ⊙ flow(ε)``
    (initialised to the identity) follows the flow, so global location and scale do not
    have to be built out of planar/radial layers.

    The defaults fit K = 32 planar layers to every one of U1–U4 (:mod:`pyro_nfvi.targets`)
    to KL < 0.05 nats without collapsing U1 onto one mode; what mattered, measured with
    K = 32 planar:

    * β-annealing: on U1 (two lobes), 4000 steps without it (``anneal_steps=0``) gave
      KL = 0.084, 0.030, 0.30 and 0.004 (seeds 0–3), with it 0.002–0.005 (measured
      2026-12; with the earlier planar parameterisation the runs without it collapsed onto
      one lobe, KL ≈ ln 2);
    * the number of steps with a decaying learning rate (cosine to 0): U3 went from
      ≈ 0.12 at 3000 steps to 0.01–0.02 at 12000; U4 from 0.03–0.08 at 5000 to 0.01–0.03;
    * a batch of 512 rather than 256, the affine layer and a shorter β ramp (U3 at 5000
      steps: 0.042 → 0.018 with the affine layer, 0.023 with a 1/4 ramp).

    :param flow: a ``Transform``/``TransformModule`` on ``R^dim`` or a list of them.
    :param target: a :class:`~pyro_nfvi.targets.Target` or a callable ``z -> log p̃(z)``
        batched over leading dims.
    :param num_steps: number of optimisation steps.
    :param batch_size: Monte-Carlo samples per step.
    :param lr: initial Adam learning rate.
    :param lr_min: final learning rate of the cosine schedule.
    :param anneal_steps: length of the β ramp (``None``: ``num_steps // 4``; 0: no ramp).
    :param beta0: initial inverse temperature.
    :param clip_norm: optional gradient-norm clipping.
    :param affine: append a learnable elementwise affine layer (loc, scale) after the flow
        (default ``True``).
    :param init_scale: initial scale of that affine layer (only with ``affine=True``).
    :param base: base distribution (event dim 1); default ``N(0, I_dim)``.
    :param dim: dimension for the default base.
    :param progress: show a ``tqdm`` progress bar.
    :param seed: seed for ``torch.manual_seed`` (``None``: leave the RNG alone).
    :param callback: called as ``callback(step, loss)`` after every step.
    :returns: a :class:`DensityFit` (``.q``, ``.losses``, ``.betas``, ``.seconds``).
    :raises FloatingPointError: on a NaN/inf loss (the message names the step).
    """
    num_steps = check_int(num_steps, "num_steps")
    batch_size = check_int(batch_size, "batch_size")
    dim = check_int(dim, "dim")
    lr = check_positive(lr, "lr")
    if isinstance(lr_min, bool) or not isinstance(lr_min, numbers.Real) or not 0.0 <= lr_min <= lr:
        raise ArgumentError(f"lr_min must be a number in [0, lr={lr}], got {lr_min!r}")
    if clip_norm is not None:
        clip_norm = check_positive(clip_norm, "clip_norm")
    if affine:
        init_scale = check_positive(init_scale, "init_scale")
    if callback is not None and not callable(callback):
        raise ArgumentError(f"callback must be callable or None, got {type(callback).__name__}")
    if isinstance(beta0, bool) or not isinstance(beta0, numbers.Real) or not 0.0 < beta0 <= 1.0:
        raise ArgumentError(f"beta0 must be a number in (0, 1], got {beta0!r}")
    anneal_steps = num_steps // 4 if anneal_steps is None else check_int(anneal_steps, "anneal_steps", minimum=0)
    if seed is not None:
        seed = check_int(seed, "seed", minimum=0)
    if base is not None and not (isinstance(base, torch.distributions.Distribution) and len(base.event_shape) == 1):
        raise ArgumentError(
            "base must be None or a distribution over vectors (event_shape of length 1, e.g. "
            f"dist.Normal(loc, scale).to_event(1)), got {base!r}"
        )
    log_p = log_density_fn(target)
    flows = _as_transform_list(flow)
    if seed is not None:
        torch.manual_seed(seed)
    if base is None:
        base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
        event_dim = dim
    else:
        event_dim = base.event_shape[-1]
    affine_layer = AffineBase(event_dim, scale=init_scale) if affine else None
    params = _parameters(flows) + (list(affine_layer.parameters()) if affine_layer else [])
    if not params:
        raise ValueError("the flow has no learnable parameters")
    optimizer = torch.optim.Adam(params, lr=lr)

    def make_q() -> dist.TransformedDistribution:
        ts = flows + ([affine_layer.transform()] if affine_layer is not None else [])
        return dist.TransformedDistribution(base, ts)

    losses: List[float] = []
    betas: List[float] = []
    running: Optional[float] = None
    t0 = time.perf_counter()
    with tqdm(total=num_steps, disable=not progress, desc="fit_density") as bar:
        for step in range(num_steps):
            if anneal_steps > 0:
                beta = min(1.0, beta0 + (1.0 - beta0) * step / anneal_steps)
            else:
                beta = 1.0
            lr_t = lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * step / num_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr_t
            q = make_q()
            z = q.rsample((batch_size,))
            loss = (q.log_prob(z) - beta * log_p(z)).mean()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"fit_density loss is {value} at step {step} (of {num_steps}); "
                    "lower lr or set clip_norm"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            # one synchronising check; a non-finite gradient would write NaN into the flow
            if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError(
                    f"fit_density loss is finite ({value:.6g}) at step {step} (of {num_steps}) "
                    "but its gradient is not; no optimiser step was taken (the parameters are "
                    "those after the last good step). Check the target's gradient, lower lr "
                    "or set clip_norm"
                )
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            optimizer.step()
            losses.append(value)
            betas.append(beta)
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.update(1)
            if progress and (step % 25 == 0 or step == num_steps - 1):
                bar.set_postfix(loss=f"{running:.4f}", beta=f"{beta:.3f}", refresh=False)
            if callback is not None:
                callback(step, value)
    seconds = time.perf_counter() - t0
    q = make_q()
    return DensityFit(
        q=q,
        transforms=list(q.transforms),
        losses=losses,
        betas=betas,
        seconds=seconds,
        affine=affine_layer,
    )
