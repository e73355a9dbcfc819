r"""Importance-weighted posteriors from a fitted guide (Pareto-smoothed importance sampling).

A fitted guide :math:`q(z)` is an approximation. Its draws can be corrected towards the
exact posterior :math:`p(z \mid x)` by self-normalised importance sampling with the
weights

.. math::

    \log w_s = \log p(x, z_s) - \log q(z_s), \qquad z_s \sim q, \quad s = 1, \dots, S,

    \widehat{\mathbb{E}}_{p(z \mid x)}[h(z)] = \sum_s \bar w_s h(z_s), \qquad
    \bar w_s = w_s / \textstyle\sum_{s'} w_{s'} .

Plain importance weights can have infinite variance. Pareto smoothing (PSIS, Vehtari,
Simpson, Gelman, Yao & Gabry 2024) stabilises them: a generalized Pareto distribution is
fitted to the :math:`M = \lceil \min(S/5, 3\sqrt S) \rceil` largest weights (their
excesses over the :math:`(M{+}1)`-th largest, :math:`u`), and these :math:`M` weights are
replaced, in rank order, by the fitted distribution's expected order statistics

.. math::

    \tilde w_{(S-M+j)} = \min\Bigl(u + F^{-1}_{\hat k, \hat\sigma}\bigl(\tfrac{j - 1/2}{M}\bigr),
        \max_s w_s\Bigr), \qquad
    F^{-1}_{k, \sigma}(p) = \frac{\sigma}{k}\bigl((1 - p)^{-k} - 1\bigr), \quad j = 1..M.

The fitted shape :math:`\hat k` is also the diagnostic: the weights have
:math:`\lfloor 1/\hat k \rfloor` finite moments.

* :math:`\hat k \le 0.5`: good; importance-weighted expectations converge quickly.
* :math:`0.5 < \hat k \le 0.7`: borderline but usable (PSIS still converges, slower).
* :math:`\hat k > 0.7`: unreliable; an :class:`ImportanceWarning` is issued. Fit the
  guide longer or use a richer guide (more flows, ``full_rank=True``, a reparameterised
  model). With fewer than about 2200 draws the paper's threshold
  :math:`\min(1 - 1/\log_{10} S,\ 0.7)` is lower than 0.7, and that threshold is used.

:func:`importance_sample` draws from a guide, weighs and smooths, and returns a
:class:`WeightedPosterior` with the draws (``.samples``, sample dim first, as
:class:`~pyro.infer.Predictive`'s ``posterior_samples``), the normalised smoothed log
weights, :math:`\hat k`, the effective sample size :math:`1 / \sum_s \bar w_s^2`, an
estimate of :math:`\log p(x)` (``log mean w``, the IWAE bound of Burda et al. 2016),
weighted means, standard deviations and quantiles, and resampling into unweighted draws
for :class:`~pyro.infer.Predictive`.

Example::

    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.infer import Predictive
    >>> def model(x):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)
    >>> def guide(x):   # a deliberately mis-fitted guide: exact mean 2.0, sd 0.316
    ...     pyro.sample("mu", dist.Normal(2.3, 0.5))
    >>> x = torch.full((10,), 2.0)
    >>> pyro.set_rng_seed(0)
    >>> post = importance_sample(model, guide, x, num_samples=4000)
    >>> post.khat < 0.5, abs(float(post.mean("mu")) - 2.0) < 0.03
    (True, True)
    >>> draws = post.resample(100)     # unweighted draws, e.g. for Predictive
    >>> Predictive(model, posterior_samples=draws)(x)["obs"].shape
    torch.Size([100, 10])

**References**

[1] Aki Vehtari, Daniel Simpson, Andrew Gelman, Yuling Yao, Jonah Gabry (2024).
"Pareto smoothed importance sampling". *Journal of Machine Learning Research* 25(72).

[2] Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016). "Importance weighted
autoencoders". ICLR.

This module is longer than the package's other files (~760 lines) because the
estimator, its result object (:class:`WeightedPosterior`, whose methods are most of the
lines) and the PSIS call are one unit a reader follows top to bottom; the diagnostics it
shares live in :mod:`pyro_nfvi.diagnostics`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from pyro.infer import Predictive
from pyro.ops.stats import fit_generalized_pareto

from ._weights import _draw, check_draw_options
from .diagnostics import log_mean_exp

__all__ = [
    "ImportanceWarning",
    "WeightedPosterior",
    "importance_sample",
    "khat_threshold",
    "psis_smooth",
]

Site = Union[None, str, torch.Tensor]


class ImportanceWarning(UserWarning):
    """Issued when the Pareto k̂ of the importance weights exceeds
    :func:`khat_threshold` (importance-weighted estimates are unreliable), or when
    there are too few draws to fit the tail."""


def khat_threshold(num_samples: int) -> float:
    r"""The largest reliable Pareto :math:`\hat k` for ``num_samples`` draws,
    :math:`\min(1 - 1/\log_{10} S,\ 0.7)` (Vehtari et al. 2024): 0.7 from
    :math:`S \approx 2200` draws on, lower for fewer draws.

    >>> khat_threshold(4000), round(khat_threshold(100), 3)
    (0.7, 0.5)
    """
    if num_samples < 11:  # log10(S) <= 1: no k̂ is reliable
        return -float("inf")
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def _gpd_quantile(p: torch.Tensor, k: float, sigma: float) -> torch.Tensor:
    # F^{-1}(p) = sigma/k ((1-p)^{-k} - 1), written with expm1/log1p; k -> 0: exponential
    if abs(k) < 1e-8:
        return -sigma * torch.log1p(-p)
    return sigma / k * torch.expm1(-k * torch.log1p(-p))


def _check_log_weights(log_weights: Any, name: str = "log_weights") -> torch.Tensor:
    if not isinstance(log_weights, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(log_weights).__name__}")
    if log_weights.dim() != 1 or log_weights.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D tensor of shape (num_samples,) with num_samples >= 2, "
            f"got shape {tuple(log_weights.shape)}"
        )
    lw = log_weights.detach().double().cpu()  # (S,) numbers: the tail fit runs on the CPU
    if torch.isnan(lw).any() or (lw == float("inf")).any():
        raise ValueError(f"{name} contains NaN or +inf")
    if not torch.isfinite(lw).any():
        raise ValueError(f"{name} are all -inf (every draw has zero weight)")
    return lw


def psis_smooth(log_weights: torch.Tensor) -> Tuple[torch.Tensor, float]:
    r"""Pareto-smoothed log importance weights and the Pareto shape estimate
    :math:`\hat k` (Vehtari et al. 2024, algorithm 1).

    The :math:`M = \lceil\min(S/5, 3\sqrt S)\rceil` largest weights are replaced, in rank
    order, by :math:`u + F^{-1}((j - 1/2)/M)`, :math:`j = 1..M`, of a generalized Pareto
    distribution fitted (:func:`pyro.ops.stats.fit_generalized_pareto`, Zhang &
    Stephens 2009 with the weakly informative prior on :math:`k`) to their excesses over
    :math:`u`, the :math:`(M{+}1)`-th largest weight; the new weights are truncated at the
    largest raw weight. All other weights are unchanged. :math:`\hat k` is the value
    :func:`pyro_nfvi.diagnostics.psis_khat` reports for the same weights (weights below
    1e-15 of the largest are left out of the tail).

    Special cases: all weights equal (spread of ``log_weights`` < 1e-5): unchanged,
    :math:`\hat k = -\infty`; fewer than 10 draws in the tail: unchanged,
    :math:`\hat k = \infty` and an :class:`ImportanceWarning`.

    :param log_weights: ``(S,)`` log importance weights (unnormalised; ``-inf`` allowed).
    :returns: ``(smoothed, khat)``: ``smoothed`` (``float64``, same offset as the input,
        not normalised) and :math:`\hat k`.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> lw = torch.distributions.Exponential(1.0).sample((4000,)) / 2.0  # Pareto, k = 0.5
    >>> smoothed, khat = psis_smooth(lw)
    >>> bool(smoothed.max() <= lw.max()), bool(0.2 < khat < 0.8)  # k̂ from 4000 draws: ±0.2
    (True, True)
    """
    smoothed, khat, note = _psis_smooth(_check_log_weights(log_weights))
    if note:
        warnings.warn(note, ImportanceWarning, stacklevel=2)
    return smoothed, khat


def _psis_smooth(lw: torch.Tensor) -> Tuple[torch.Tensor, float, str]:
    """:func:`psis_smooth` without the warning: ``(smoothed, khat, why k̂ is inf or "")``."""
    n = lw.numel()
    shift = lw.max()
    x, order = torch.sort(lw - shift)
    finite = x[torch.isfinite(x)]
    if float(finite[-1] - finite[0]) < 1e-5 and finite.numel() == n:
        return lw.clone(), -float("inf"), ""  # q = p up to a constant: bounded weights
    tail_len = int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n))))
    cut_index = max(n - tail_len - 1, 0)
    # the tail: draws above the (M+1)-th largest (and above 1e-15 of the largest weight)
    if float(x[cut_index]) >= 0.0:
        # the largest weight is shared by more draws than the tail holds: the weights
        # are bounded (an atom at their maximum), nothing heavy-tailed to smooth
        return lw.clone(), -float("inf"), ""
    log_cutoff = max(math.log(1e-15), float(x[cut_index]))
    num_tail = int((x > log_cutoff).sum())
    if num_tail < 10:
        if tail_len >= 10:  # enough draws: the weights are spread beyond 1e-15
            note = (
                f"only {num_tail} of {n} importance weights are within 1e-15 of the largest: "
                "the weights are degenerate (k-hat = inf)"
            )
        else:
            note = (
                f"only {num_tail} draws in the tail of the importance weights: too few to fit "
                "a generalized Pareto distribution (k-hat = inf); draw more samples"
            )
        return lw.clone(), float("inf"), note
    tail = x[n - num_tail :]
    cutoff = math.exp(log_cutoff)
    k, sigma = fit_generalized_pareto(tail.exp() - cutoff)
    if not (math.isfinite(k) and math.isfinite(sigma) and sigma > 0):
        return lw.clone(), float(k) if math.isfinite(k) else float("inf"), ""
    p = (torch.arange(1, num_tail + 1, dtype=torch.float64) - 0.5) / num_tail
    smoothed_tail = (cutoff + _gpd_quantile(p, k, sigma)).clamp(max=1.0)  # max raw w = 1
    out = lw.clone()  # the body keeps its exact values
    out[order[n - num_tail :]] = smoothed_tail.log() + shift
    return out, float(k), ""


class WeightedPosterior:
    r"""Weighted draws from a posterior: ``samples`` with importance weights, Pareto
    smoothed, with weighted expectations, quantiles and resampling. Usually built by
    :func:`importance_sample`; can be built from any draws and raw log weights
    :math:`\log p(x, z_s) - \log q(z_s)`.

    Attributes:

    * ``samples``: dict site → tensor ``(S, *site_shape)`` (sample dim first, the
      layout of :class:`~pyro.infer.Predictive`'s ``posterior_samples`` and of
      ``MCMC.get_samples()``);
    * ``raw_log_weights``: ``(S,)`` unnormalised log weights (``float64``, on the CPU);
    * ``log_weights``: ``(S,)`` normalised (``logsumexp = 0``) log weights, Pareto
      smoothed if ``smooth``; ``weights`` is their ``exp``;
    * ``khat``: Pareto :math:`\hat k` (≤ 0.5 good, 0.5–0.7 borderline, > 0.7 unreliable);
      ``khat_threshold``: the reliability threshold for ``S`` draws;
    * ``ess``: effective sample size :math:`1/\sum_s \bar w_s^2` of the (smoothed)
      weights; ``ess_fraction``: ``ess / S``;
    * ``log_evidence``, ``log_evidence_se``: :math:`\log \frac1S \sum_s w_s` of the raw
      weights (an estimate of :math:`\log p(x)`, a lower bound in expectation: the IWAE
      bound) and its delta-method standard error;
    * ``elbo``, ``elbo_se``: the mean raw log weight and its standard error;
    * ``vectorized``: whether :func:`importance_sample` drew in vectorised passes (None
      for a posterior built directly).

    :param samples: dict site name → tensor with ``S`` rows.
    :param log_weights: ``(S,)`` raw log importance weights.
    :param smooth: Pareto-smooth the weights (default); ``False`` keeps plain
        self-normalised weights (``khat`` is still computed).
    :param warn: issue an :class:`ImportanceWarning` if ``khat > khat_threshold``.
    """

    def __init__(
        self,
        samples: Mapping[str, torch.Tensor],
        log_weights: torch.Tensor,
        *,
        smooth: bool = True,
        warn: bool = True,
    ) -> None:
        lw = _check_log_weights(log_weights)
        n = lw.numel()
        if not isinstance(samples, Mapping) or not samples:
            raise ValueError("samples must be a non-empty dict of site name -> tensor")
        for name, value in samples.items():
            if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != n:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(
                    f"samples[{name!r}] must be a tensor of shape ({n}, ...) (one row per "
                    f"log weight), got {shape}"
                )
        if not isinstance(smooth, bool):
            raise TypeError(f"smooth must be a bool, got {smooth!r}")
        self.samples: Dict[str, torch.Tensor] = dict(samples)
        self.raw_log_weights = lw
        smoothed, self.khat, self._khat_note = _psis_smooth(lw)
        if not smooth:
            smoothed = lw
        self.smooth = smooth
        self.vectorized: Optional[bool] = None
        self.log_weights = smoothed - torch.logsumexp(smoothed, 0)
        self.ess = float(torch.exp(-torch.logsumexp(2 * self.log_weights, 0)))
        self.ess_fraction = self.ess / n
        self.log_evidence, self.log_evidence_se = log_mean_exp(lw)
        self.elbo = float(lw.mean())
        self.elbo_se = float(lw.std() / math.sqrt(n)) if torch.isfinite(lw).all() else float("nan")
        if warn:
            self._warn(stacklevel=2)

    # ------------------------------------------------------------ diagnostics
    @property
    def num_samples(self) -> int:
        """The number of weighted draws ``S``."""
        return self.raw_log_weights.numel()

    @property
    def weights(self) -> torch.Tensor:
        """Normalised (smoothed) weights, ``(S,)``, summing to one."""
        return self.log_weights.exp()

    @property
    def khat_threshold(self) -> float:
        """:func:`khat_threshold` of ``num_samples``: 0.7 from about 2200 draws on."""
        return khat_threshold(self.num_samples)

    @property
    def reliable(self) -> bool:
        """``khat <= khat_threshold``."""
        return self.khat <= self.khat_threshold

    def _warn(self, stacklevel: int = 2) -> None:
        if not self.reliable:
            why = f" ({self._khat_note})" if self._khat_note else ""
            warnings.warn(
                f"Pareto k-hat = {self.khat:.2f} > {self.khat_threshold:.2f}{why}: "
                "importance-weighted estimates are unreliable; fit the guide longer or use a "
                f"richer guide (ESS = {self.ess:.1f} of {self.num_samples} draws).",
                ImportanceWarning,
                stacklevel=stacklevel + 1,
            )

    def _verdict(self) -> str:
        if not self.reliable:  # above khat_threshold, which is below 0.5 for S < 100
            return "unreliable"
        return "good" if self.khat <= 0.5 else "borderline"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, sites={list(self.samples)}, "
            f"khat={self.khat:.3f} ({self._verdict()}), ess={self.ess:.1f} "
            f"({100 * self.ess_fraction:.1f}%), log_evidence={self.log_evidence:.4f} "
            f"± {self.log_evidence_se:.4f})"
        )

    # ------------------------------------------------------------ expectations
    def _values(self, site: Union[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(site, str):
            if site not in self.samples:
                raise ValueError(f"unknown site {site!r}; sites: {sorted(self.samples)}")
            return self.samples[site]
        if isinstance(site, torch.Tensor):
            if site.dim() < 1 or site.shape[0] != self.num_samples:
                raise ValueError(
                    f"values must have shape ({self.num_samples}, ...) (one row per draw, e.g. "
                    f"a Predictive output for .samples), got {tuple(site.shape)}"
                )
            return site
        raise TypeError(f"site must be a site name, a tensor or None, got {type(site).__name__}")

    def _per_site(self, fn: Callable[[torch.Tensor], torch.Tensor], site: Site):
        if site is None:
            return {name: fn(self._values(name)) for name in self.samples}
        return fn(self._values(site))

    def _w(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights.to(x.device).reshape((-1,) + (1,) * (x.dim() - 1))

    @staticmethod
    def _out(result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return result.to(x.dtype) if x.is_floating_point() else result

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        return self._out((self._w(x) * x.double()).sum(0), x)

    def _var(self, x: torch.Tensor) -> torch.Tensor:
        w = self._w(x)
        xd = x.double()
        m = (w * xd).sum(0)
        # unbiased for reliability weights: divide by 1 - sum w^2 (= (S-1)/S for equal w)
        denom = max(1.0 - float(torch.exp(2 * self.log_weights).sum()), 1e-300)
        return self._out((w * (xd - m) ** 2).sum(0) / denom, x)

    def mean(self, site: Site = None):
        r"""Weighted mean :math:`\sum_s \bar w_s z_s` of a site (by name), of every site
        (``site=None``: a dict), or of any tensor with one row per draw (e.g. an output of
        ``Predictive(model, posterior_samples=post.samples)``, see :meth:`predictive`)."""
        return self._per_site(self._mean, site)

    def var(self, site: Site = None):
        r"""Weighted variance :math:`\sum_s \bar w_s (z_s - \hat\mu)^2 / (1 - \sum_s \bar
        w_s^2)` (the usual unbiased variance when the weights are equal)."""
        return self._per_site(self._var, site)

    def std(self, site: Site = None):
        """Weighted standard deviation, ``var(site).sqrt()``."""
        return self._per_site(lambda x: self._var(x).sqrt(), site)

    def mcse(self, site: Site = None):
        r"""Monte-Carlo standard error of :meth:`mean`,
        :math:`\sqrt{\sum_s \bar w_s^2 (z_s - \hat\mu)^2}` (the self-normalised importance
        sampling delta-method estimate; optimistic when ``khat`` is large)."""

        def fn(x: torch.Tensor) -> torch.Tensor:
            w = self._w(x)
            xd = x.double()
            m = (w * xd).sum(0)
            return self._out((w**2 * (xd - m) ** 2).sum(0).sqrt(), x)

        return self._per_site(fn, site)

    def quantile(self, q: Union[float, Sequence[float], torch.Tensor], site: Site = None):
        r"""Weighted quantiles: the inverse of the weighted empirical CDF, the draw
        :math:`z_{(i)}` with the smallest :math:`i` such that
        :math:`\sum_{r \le i} \bar w_{(r)} \ge q` (draws sorted per element; type 1 of
        Hyndman & Fan when the weights are equal). There is no interpolation between
        draws, so draws of negligible weight (far in the guide's tails, as importance
        weighting produces) never move a quantile. Output shape: ``q``'s shape + the
        site's shape, as :func:`torch.quantile`.

        :param q: probability or probabilities in [0, 1].
        """
        qt = torch.as_tensor(q, dtype=torch.float64)
        if qt.dim() > 1 or torch.isnan(qt).any() or (qt < 0).any() or (qt > 1).any():
            raise ValueError(f"q must be a float or a 1-D sequence of floats in [0, 1], got {q!r}")

        def fn(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            flat = x.reshape(n, -1)
            xs, idx = torch.sort(flat, 0)
            cw = torch.cumsum(self.weights.to(x.device)[idx], 0)
            cw = (cw / cw[-1:]).T.contiguous()  # (E, n), nondecreasing, ends at exactly 1
            # q = 0: the smallest draw of positive weight
            qs = qt.to(x.device).clamp(min=1e-300).reshape(1, -1).expand(cw.shape[0], -1)
            j = torch.searchsorted(cw, qs.contiguous()).clamp(max=n - 1)  # (E, Q)
            res = xs.T.gather(1, j).T  # (Q, E)
            return res.reshape(qt.shape + x.shape[1:])

        return self._per_site(fn, site)

    # ------------------------------------------------------------ resampling
    def resample(
        self,
        num_samples: Optional[int] = None,
        *,
        method: str = "multinomial",
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        r"""Unweighted draws: ``num_samples`` (default ``S``) draws chosen with
        probabilities ``weights``, as a dict site → ``(num_samples, *site_shape)``, ready
        for ``Predictive(model, posterior_samples=...)``.

        :param method: ``"multinomial"`` (independent choices with replacement) or
            ``"systematic"`` (one uniform :math:`u`, draws at :math:`(u + i)/n` of the
            cumulative weights: draw :math:`s` appears :math:`\lfloor n\bar w_s\rfloor` or
            :math:`\lceil n\bar w_s\rceil` times; lower variance).
        :param generator: a :class:`torch.Generator` for reproducible choices.
        """
        n = self.num_samples if num_samples is None else num_samples
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        n = int(n)
        w = self.weights
        if method == "multinomial":
            idx = torch.multinomial(w, n, replacement=True, generator=generator)
        elif method == "systematic":
            cw = torch.cumsum(w, 0)
            cw = cw / cw[-1]
            u = torch.rand((), dtype=torch.float64, generator=generator)
            positions = (u + torch.arange(n, dtype=torch.float64)) / n
            idx = torch.searchsorted(cw, positions, right=True).clamp(max=w.numel() - 1)
        else:
            raise ValueError(f"method must be 'multinomial' or 'systematic', got {method!r}")
        return {name: value[idx.to(value.device)] for name, value in self.samples.items()}

    def predictive(
        self,
        model: Callable,
        *args: Any,
        return_sites: Optional[Sequence[str]] = (),
        parallel: bool = False,
        **kwargs: Any,
    ) -> Dict[str, torch.Tensor]:
        """``Predictive(model, posterior_samples=self.samples, ...)(*args, **kwargs)``: one
        output row per weighted draw, so that ``post.mean(out["obs"])`` is a weighted
        posterior-predictive mean. ``return_sites`` and ``parallel`` as in Predictive
        (default: every site not in ``samples``). (For unweighted predictive draws use
        ``Predictive(model, posterior_samples=post.resample(n))``.)"""
        pred = Predictive(
            model, posterior_samples=self.samples, return_sites=return_sites, parallel=parallel
        )
        return pred(*args, **kwargs)

    # ------------------------------------------------------------ summary
    def summary(self, prob: float = 0.9) -> str:
        """A table of weighted mean, sd, median and the central ``prob`` interval of every
        element of every site, under a line with ``khat``, ESS and the log evidence."""
        if not 0 < prob < 1:
            raise ValueError(f"prob must be in (0, 1), got {prob!r}")
        lo, hi = (1 - prob) / 2, (1 + prob) / 2
        head = (
            f"{self.num_samples} draws, Pareto k-hat {self.khat:.3f} ({self._verdict()}; "
            f"reliable up to {self.khat_threshold:.2f}), ESS {self.ess:.1f} "
            f"({100 * self.ess_fraction:.1f}%), log evidence {self.log_evidence:.4f} "
            f"± {self.log_evidence_se:.4f}"
        )
        cols = ["mean", "std", "median", f"{100 * lo:.1f}%", f"{100 * hi:.1f}%"]
        rows = []
        for name, x in self.samples.items():
            stats = [
                self.mean(name),
                self.std(name),
                *self.quantile([0.5, lo, hi], name).unbind(0),
            ]
            flat = [s.double().reshape(-1) for s in stats]
            shape = x.shape[1:]
            for i in range(flat[0].numel()):
                label = name
                if len(shape) > 0:
                    index = [int(v) for v in torch.unravel_index(torch.tensor(i), shape)]
                    label = f"{name}[{','.join(map(str, index))}]"
                rows.append([label] + [f"{float(f[i]):.4g}" for f in flat])
        width = max([len(r[0]) for r in rows] + [4])
        lines = [head, " " * width + "".join(f"{c:>11}" for c in cols)]
        lines += [f"{r[0]:>{width}}" + "".join(f"{v:>11}" for v in r[1:]) for r in rows]
        return "\n".join(lines)


# ---------------------------------------------------------------- drawing
def importance_sample(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 4000,
    smooth: bool = True,
    max_plate_nesting: Optional[int] = None,
    vectorize: Optional[bool] = None,
    batch_size: Optional[int] = None,
    **kwargs: Any,
) -> WeightedPosterior:
    r"""Importance-weighted posterior draws from a (fitted) guide, Pareto smoothed.

    Draws :math:`z_s \sim q`, :math:`s = 1..S`, from ``guide(*args, **kwargs)``, scores
    them under the model, :math:`\log w_s = \log p(x, z_s) - \log q(z_s)` (every
    ``pyro.sample`` site of both traces, as :func:`pyro.infer.importance.
    vectorized_importance_weights` and :func:`pyro_nfvi.diagnostics.evaluate_guide` do:
    the guide's auxiliary sites and the Jacobian terms of its ``Delta`` sites included, so
    ``AutoContinuous`` guides such as :class:`~pyro_nfvi.guides.AutoPlanarFlow` are scored
    by their density in constrained space), Pareto-smooths the weights (:func:`psis_smooth`)
    and returns a :class:`WeightedPosterior`. Expectations :math:`\sum_s \bar w_s h(z_s)`
    are then consistent for the exact posterior whenever the guide covers it; they are
    reliable when :math:`\hat k \le 0.7` (≤ 0.5 good, 0.5–0.7 borderline) and an
    :class:`ImportanceWarning` is issued when :math:`\hat k` exceeds
    :func:`khat_threshold`. (Auxiliary guide sites that are *not* deterministic functions
    of the model's sites, as they are in ``AutoContinuous``, give weights on an extended
    space that are valid only if the model scores those sites too.)

    Draws are made in one vectorised pass over a particle plate (like
    :class:`~pyro.infer.Predictive` with ``parallel=True``) when the model and guide allow
    it, else one model/guide run per draw (``vectorize=None``: try, then fall back). The
    vectorised pass is checked: two of its draws are re-scored by sequential model runs,
    so a model that broadcasts its own tensors against the particle dim (right shapes,
    wrong numbers) falls back to the sequential path (or raises, with ``vectorize=True``).
    Sites in subsampled plates are weighed with the subsample's scaled log-likelihood
    (all draws of one vectorised pass share a minibatch): noisy weights; use the full
    data for exact ones.

    :param model: the Pyro model.
    :param guide: the guide (any callable with the model's arguments), e.g. a fitted
        autoguide.
    :param args: the model's positional arguments.
    :param num_samples: number of draws ``S`` (≥ 2; the tail fit needs about 50, and
        :math:`\hat k` is trustworthy from a few hundred on; default 4000).
    :param smooth: Pareto-smooth the weights (default) or keep plain self-normalised
        importance weights.
    :param max_plate_nesting: the model's plate nesting (guessed from one run if None).
    :param vectorize: ``True``: vectorised draws only; ``False``: one run per draw;
        ``None``: vectorised if it works.
    :param batch_size: draws per vectorised pass (default: all ``num_samples`` at once;
        smaller values bound the memory of large models).
    :param kwargs: the model's keyword arguments.
    :returns: a :class:`WeightedPosterior`; ``.samples[name]`` has shape
        ``(num_samples, *site_shape)``.

    Example (a posterior narrower than the guide, corrected by the weights)::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> from pyro.infer.autoguide.initialization import init_to_value
        >>> def model(x):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("obs", dist.Normal(mu, sigma), obs=x)
        >>> x = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0, 1.0, 1.2, 0.8])
        >>> guide = AutoNormal(model, init_loc_fn=init_to_value(
        ...     values={"mu": torch.tensor(1.0), "sigma": torch.tensor(0.6)}), init_scale=0.5)
        >>> pyro.set_rng_seed(1)
        >>> post = importance_sample(model, guide, x, num_samples=2000)
        >>> post.samples["mu"].shape, post.samples["sigma"].shape
        (torch.Size([2000]), torch.Size([2000]))
        >>> post.khat < 0.7 and post.ess > 200
        True
        >>> print(post.summary())  # doctest: +ELLIPSIS
        2000 draws, Pareto k-hat ...
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or (
        num_samples < 2
    ):
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    num_samples = int(num_samples)
    if not isinstance(smooth, bool):
        raise TypeError(f"smooth must be a bool, got {smooth!r}")
    check_draw_options(vectorize, max_plate_nesting, batch_size)
    if not callable(model) or not callable(guide):
        raise TypeError("model and guide must be callables (a Pyro model and its guide)")

    with torch.no_grad():  # not a decorator: warnings point at the caller's line
        samples, log_w, vectorized = _draw(
            model, guide, args, kwargs, num_samples, max_plate_nesting, vectorize, batch_size
        )
    if torch.isnan(log_w).any() or (log_w == float("inf")).any():
        raise ValueError(
            "log p(x, z) - log q(z) is NaN or +inf for some draws: the guide puts mass "
            "where the model's density is undefined"
        )
    if all(bool((v == v[:1]).all()) for v in samples.values()):
        raise ValueError(
            "every draw of the guide is the same point (a point mass such as AutoDelta): "
            "importance weighting needs a guide with a density that covers the posterior"
        )
    posterior = WeightedPosterior(samples, log_w, smooth=smooth, warn=False)
    posterior.vectorized = vectorized
    posterior._warn(stacklevel=2)
    return posterior
