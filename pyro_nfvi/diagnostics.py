"""Diagnostics for variational approximations.

For a fitted density ``q`` (any torch ``Distribution`` with ``sample``/``log_prob``)
against an unnormalised target ``p̃`` with known ``log Z``:

* :func:`kl_divergence` — ``KL(q‖p) = E_q[log q − log p̃] + log Z`` (nats) with its
  Monte-Carlo standard error;
* :func:`evaluate_density` — KL, ELBO, importance-sampling ESS, PSIS k̂ and an
  importance-sampling estimate of ``log Z``, all from one batch of samples.

For a guide against a Pyro model: :func:`evaluate_guide` — ELBO, IWAE bound, k̂ and ESS
from the log weights ``log p(x, z) − log q(z)``.

The helpers :func:`psis_khat`, :func:`ess_fraction` and :func:`log_mean_exp` work on any
vector of log importance weights.

Example::

    >>> import torch, pyro.distributions as dist
    >>> from pyro_nfvi.diagnostics import evaluate_density
    >>> p = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    >>> class StdNormal:  # an unnormalised target with known log Z
    ...     log_Z = float(torch.log(torch.tensor(2 * torch.pi)))
    ...     def log_prob_unnormalized(self, z):
    ...         return -0.5 * (z ** 2).sum(-1)
    >>> d = evaluate_density(p, StdNormal(), num_samples=2000, seed=0)
    >>> abs(d["kl"]) < 1e-6 and d["ess"] > 0.999
    True
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from pyro.ops.stats import fit_generalized_pareto

from ._rng import fork_rng
from ._validation import check_int
from ._weights import _draw, plate_nesting
from .targets import log_density_fn

__all__ = [
    "log_mean_exp",
    "ess_fraction",
    "psis_khat",
    "kl_divergence",
    "evaluate_density",
    "evaluate_guide",
    "importance_log_weights",
]


def log_mean_exp(log_w: torch.Tensor) -> Tuple[float, float]:
    """``log mean exp(log_w)`` and its delta-method standard error
    ``std(w) / (sqrt(n) mean(w))``.

    >>> import torch
    >>> log_mean_exp(torch.zeros(10))
    (0.0, 0.0)
    """
    log_w = log_w.detach().double().reshape(-1)
    n = log_w.numel()
    est = torch.logsumexp(log_w, 0) - math.log(n)
    w = (log_w - est).exp()  # normalised so that mean(w) = 1
    se = float(w.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(est), se


def ess_fraction(log_w: torch.Tensor) -> float:
    """Importance-sampling effective sample size ``(Σw)² / Σw²`` divided by ``n``
    (1 when all weights are equal).

    >>> import torch
    >>> round(ess_fraction(torch.zeros(5)), 6)
    1.0
    """
    log_w = log_w.detach().double().reshape(-1)
    n = log_w.numel()
    return float((2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)).exp() / n)


def psis_khat(log_w: torch.Tensor) -> float:
    """Pareto-smoothed importance sampling tail index k̂ of the weights ``exp(log_w)``
    (Vehtari et al.), computed exactly as :func:`pyro.infer.importance.psis_diagnostic`
    does (the largest ``min(0.2 n, 3 sqrt(n))`` weights, fitted with
    :func:`pyro.ops.stats.fit_generalized_pareto`), but on given weights.

    k̂ < 0.5: good; 0.5–0.7: usable; > 0.7: poor (unreliable importance sampling).
    Returns ``inf`` (with a warning) when there are too few tail samples, and ``-inf``
    when all weights are equal (spread of ``log_w`` below 1e-5: q = p up to a constant)
    or the largest is shared by more draws than the tail holds (bounded weights; Pyro's
    ``psis_diagnostic`` returns ``inf`` there).
    """
    log_w = log_w.detach().double().reshape(-1)
    n = log_w.numel()
    log_w = torch.sort(log_w - log_w.max())[0]
    # constant weights up to float round-off (q = p): bounded weights, k = -inf
    if float(log_w[-1] - log_w[0]) < 1e-5:
        return -float("inf")
    cutoff_index = -int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))) - 1
    if -cutoff_index > n:
        cutoff_index = -n
    if float(log_w[cutoff_index]) >= 0.0:  # the largest weight shared by more than the tail
        return -float("inf")  # holds: bounded weights (an atom at the maximum)
    lw_cutoff = max(math.log(1.0e-15), float(log_w[cutoff_index]))
    tail = log_w[log_w > lw_cutoff]
    if tail.numel() < 10:
        warnings.warn("Not enough tail samples to compute PSIS k-hat; increase num_samples.")
        return float("inf")
    exceed = tail.exp() - math.exp(lw_cutoff)
    if float(exceed.max()) <= 0.0:  # all tail weights equal: bounded weights
        return -float("inf")
    k, _ = fit_generalized_pareto(exceed)
    return float(k)


def _log_density_and_log_Z(target: Any, log_Z: Optional[float]) -> Tuple[Callable, Optional[float]]:
    """:func:`~pyro_nfvi.targets.log_density_fn` and ``log_Z``: the one given, else the
    target's (a :class:`~pyro_nfvi.targets.Target`), else 0 for a distribution's
    normalised ``log_prob``."""
    fn = log_density_fn(target)
    if log_Z is None:
        if hasattr(target, "log_prob_unnormalized"):
            log_Z = getattr(target, "log_Z", None)
        elif callable(getattr(target, "log_prob", None)):
            log_Z = 0.0
    return fn, None if log_Z is None else float(log_Z)


@torch.no_grad()
def _density_log_weights(
    q: Any, log_p: Callable, num_samples: int, seed: Optional[int] = None, batch: int = 20000
) -> torch.Tensor:
    """``log p̃(z) - log q(z)`` of ``num_samples`` draws ``z ~ q`` (from ``seed`` on forked
    streams if given)."""
    if seed is not None:
        with fork_rng():
            torch.manual_seed(check_int(seed, "seed", minimum=0))
            return _density_log_weights(q, log_p, num_samples, None, batch)
    out = []
    remaining = num_samples
    while remaining > 0:
        m = min(batch, remaining)
        z = q.sample((m,))
        out.append((log_p(z).double() - q.log_prob(z).double()).reshape(-1))
        remaining -= m
    return torch.cat(out)


def _check_num_samples(num_samples: Any) -> int:
    return check_int(num_samples, "num_samples", minimum=2)


def kl_divergence(
    q: Any,
    target: Any,
    num_samples: int = 10000,
    log_Z: Optional[float] = None,
    seed: Optional[int] = None,
) -> Tuple[float, float]:
    """Monte-Carlo ``KL(q‖p) = E_q[log q − log p̃] + log Z`` in nats, with its standard
    error ``std(log q − log p̃) / sqrt(n)``.

    :param q: a distribution with ``sample`` and ``log_prob``.
    :param target: a :class:`~pyro_nfvi.targets.Target` (or anything with
        ``log_prob_unnormalized`` and ``log_Z``), or a callable ``z -> log p̃(z)``
        together with ``log_Z``.
    :param seed: draw from this seed on forked random streams (the caller's streams are
        left as they were); ``None``: from the global stream.
    :returns: ``(kl, se)``.

    >>> import torch, pyro.distributions as dist
    >>> q = dist.Normal(torch.zeros(1), 1.0).to_event(1)
    >>> p = lambda z: dist.Normal(1.0, 1.0).log_prob(z).sum(-1)
    >>> kl, se = kl_divergence(q, p, 20000, log_Z=0.0, seed=0)   # exact: 0.5
    >>> abs(kl - 0.5) < 4 * se
    True
    """
    num_samples = _check_num_samples(num_samples)
    log_p, log_Z = _log_density_and_log_Z(target, log_Z)
    if log_Z is None:
        raise ValueError("kl_divergence needs log_Z (target.log_Z or the log_Z argument)")
    lw = _density_log_weights(q, log_p, num_samples, seed)
    return float(log_Z - lw.mean()), float(lw.std() / math.sqrt(num_samples))


def evaluate_density(
    q: Any,
    target: Any,
    num_samples: int = 10000,
    log_Z: Optional[float] = None,
    seed: Optional[int] = None,
) -> Dict[str, float]:
    """All density diagnostics from one batch of ``num_samples`` draws ``z ~ q``, with
    log weights ``log w = log p̃(z) − log q(z)``:

    * ``kl``, ``kl_se``: ``log Z − mean(log w)`` (nats) and its standard error
      (``nan`` if ``log Z`` is unknown);
    * ``elbo``, ``elbo_se``: ``mean(log w)``;
    * ``log_Z_is``, ``log_Z_is_se``: importance-sampling estimate ``log mean w``;
    * ``log_Z``: the true ``log Z`` (or ``nan``);
    * ``ess``: effective sample size as a fraction of ``num_samples``;
    * ``k_hat``: PSIS tail index (< 0.5 good, > 0.7 bad);
    * ``num_samples``.

    ``seed``: as in :func:`kl_divergence`.
    """
    num_samples = _check_num_samples(num_samples)
    log_p, log_Z = _log_density_and_log_Z(target, log_Z)
    lw = _density_log_weights(q, log_p, num_samples, seed)
    elbo = float(lw.mean())
    elbo_se = float(lw.std() / math.sqrt(num_samples))
    lz, lz_se = log_mean_exp(lw)
    return {
        "kl": (log_Z - elbo) if log_Z is not None else float("nan"),
        "kl_se": elbo_se if log_Z is not None else float("nan"),
        "elbo": elbo,
        "elbo_se": elbo_se,
        "log_Z": log_Z if log_Z is not None else float("nan"),
        "log_Z_is": lz,
        "log_Z_is_se": lz_se,
        "ess": ess_fraction(lw),
        "k_hat": psis_khat(lw),
        "num_samples": num_samples,
    }


@torch.no_grad()
def importance_log_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    max_plate_nesting: Optional[int] = None,
    vectorize: Optional[bool] = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``num_samples`` log weights ``log p(x, z) − log q(z)``, ``z ~ guide``.

    Drawn as :func:`~pyro_nfvi.importance.importance_sample` draws them (one home):
    vectorised over an outer ``pyro.plate`` (Pyro's
    :func:`~pyro.infer.importance.vectorized_importance_weights`) when ``vectorize`` is
    ``True`` or ``None``, with two draws re-scored one at a time (a model that broadcasts
    its own tensors against the particle dim runs vectorised with the right shapes and
    wrong numbers); if that fails and ``vectorize`` is ``None``, a loop over samples with
    ``poutine.trace``/``poutine.replay``.
    """
    num_samples = _check_num_samples(num_samples)
    return _draw(model, guide, args, kwargs, num_samples, max_plate_nesting, vectorize, None)[1]


def evaluate_guide(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    max_plate_nesting: Optional[int] = None,
    vectorize: Optional[bool] = None,
    **kwargs: Any,
) -> Dict[str, float]:
    """Evaluate a guide against a Pyro model from ``num_samples`` importance weights.

    Returns a dict with

    * ``elbo``, ``elbo_se``: ``mean(log w)`` and its standard error;
    * ``iwae``: the importance-weighted bound ``log mean exp(log w)`` (≥ ELBO in
      expectation, → log evidence as ``num_samples`` grows), ``iwae_se`` (delta method);
    * ``k_hat``: PSIS tail index, as :func:`pyro.infer.importance.psis_diagnostic`;
    * ``ess``: importance-sampling ESS as a fraction of ``num_samples``;
    * ``num_samples``.

    ``args``/``kwargs`` are passed to model and guide.

    >>> import torch, pyro, pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> def guide():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> d = evaluate_guide(model, guide, num_samples=100)
    >>> abs(d["elbo"]) < 1e-6 and abs(d["iwae"]) < 1e-6
    True
    """
    lw = importance_log_weights(
        model,
        guide,
        *args,
        num_samples=num_samples,
        max_plate_nesting=max_plate_nesting,
        vectorize=vectorize,
        **kwargs,
    )
    iwae, iwae_se = log_mean_exp(lw)
    return {
        "elbo": float(lw.mean()),
        "elbo_se": float(lw.std() / math.sqrt(lw.numel())),
        "iwae": iwae,
        "iwae_se": iwae_se,
        "k_hat": psis_khat(lw),
        "ess": ess_fraction(lw),
        "num_samples": int(lw.numel()),
    }
