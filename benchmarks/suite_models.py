"""Models and data of the posterior benchmark suite (issue 11).

Ten models that Pyro users know, each written from its published definition, each in the
natural *centred* form a user would write (the form the guides are trained on). Every entry
of :data:`MODELS` is a :class:`SuiteModel` that holds

* ``model``: the Pyro model, called as ``model(*spec.args)``;
* ``args``: the data (built once, deterministically, and cached);
* ``latent_sites``: the latent sample sites, in a fixed order (the order of the flattened
  coordinates in the references and the metrics);
* how its reference posterior is made: either ``nuts_model`` — a non-centred version of the
  same joint density for NUTS whose centred values are recorded as ``pyro.deterministic``
  sites with the *same names* as the latent sites of ``model`` — or ``exact_sampler`` (direct
  draws, for targets written as models without observations, where ``log_Z = 0``), with
  exact moments where they are known in closed form (``exact_moments``).

Importing (from the repository root, where ``benchmarks`` is a namespace package)::

    >>> from benchmarks.suite_models import MODELS
    >>> spec = MODELS["eight_schools"]
    >>> import pyro
    >>> from pyro.infer.autoguide import AutoNormal
    >>> guide = AutoNormal(spec.model)
    >>> sorted(guide(*spec.args))
    ['mu', 'tau', 'theta']

From elsewhere put the folder on the path first:
``sys.path.insert(0, "<repo>/benchmarks"); from suite_models import MODELS``.

All data are float32 tensors (torch's default dtype); scikit-learn datasets are standardised
column-wise (mean 0, sd 1) and simulated data use fixed ``torch.Generator`` seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch

__all__ = ["SuiteModel", "MODELS", "get_model"]


@dataclass
class SuiteModel:
    """One model of the suite (see the module docstring).

    :ivar name: short key (also the reference file name).
    :ivar model: the centred Pyro model; ``model(*args)``.
    :ivar make_args: builds the data tuple (called once; see :attr:`args`).
    :ivar latent_sites: latent site names in reference order.
    :ivar description: one line, with the dimension and the source.
    :ivar nuts_model: non-centred model for NUTS (same arguments) that records every latent
        site of ``model`` as a ``pyro.deterministic`` site of the same name; ``None``: NUTS on
        ``model`` itself.
    :ivar exact_sampler: ``(num_samples, generator) -> {site: draws}`` for exact references.
    :ivar exact_moments: ``() -> (mean, sd)`` flattened in reference order, when known in
        closed form (they replace the Monte-Carlo moments of the exact draws).
    :ivar log_Z: the log evidence when known exactly (models without observations: 0).
    :ivar full_mass: use a dense NUTS mass matrix (strongly correlated posteriors).
    """

    name: str
    model: Callable
    make_args: Callable[[], tuple]
    latent_sites: Tuple[str, ...]
    description: str
    nuts_model: Optional[Callable] = None
    exact_sampler: Optional[Callable[[int, torch.Generator], Dict[str, torch.Tensor]]] = None
    exact_moments: Optional[Callable[[], Tuple[torch.Tensor, torch.Tensor]]] = None
    log_Z: Optional[float] = None
    full_mass: bool = False
    _args: Optional[tuple] = field(default=None, repr=False)

    @property
    def args(self) -> tuple:
        """The model's arguments (the data), built on first use and cached."""
        if self._args is None:
            self._args = tuple(self.make_args())
        return self._args


# ----------------------------------------------------------------------------- 1. eight schools
EIGHT_SCHOOLS_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
EIGHT_SCHOOLS_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def eight_schools(sigma: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    r"""Eight schools, centred (Rubin 1981; Gelman et al., *Bayesian Data Analysis*, 3rd ed.,
    §5.5), 10 latent dimensions:

    .. math::

        \mu \sim \mathcal N(0, 5),\quad \tau \sim \text{HalfCauchy}(5),\quad
        \theta_j \sim \mathcal N(\mu, \tau),\quad y_j \sim \mathcal N(\theta_j, \sigma_j),
        \quad j = 1..8.

    The centred form has a funnel between ``tau`` and ``theta``.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def eight_schools_nc(sigma: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    """Non-centred eight schools for NUTS: ``theta = mu + tau * theta_tilde``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[-1]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_tilde)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def _eight_schools_data() -> tuple:
    return torch.tensor(EIGHT_SCHOOLS_SIGMA), torch.tensor(EIGHT_SCHOOLS_Y)


# ----------------------------------------------------------------------------- 2. Neal's funnel
def funnel(num_x: int = 9) -> None:
    r"""Neal's funnel (Neal 2003, "Slice sampling", Ann. Statist. 31(3), §8), 10-D with
    ``num_x = 9``, written as a model without observations (so ``log Z = 0``):

    .. math::

        v \sim \mathcal N(0, 3),\qquad x_i \mid v \sim \mathcal N(0, e^{v/2}),\ i = 1..9.
    """
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(0.0, (v / 2).exp().unsqueeze(-1)).expand(
        v.shape + (num_x,)).to_event(1))


def _funnel_exact(num_samples: int, generator: torch.Generator, num_x: int = 9) -> Dict[str, torch.Tensor]:
    v = 3.0 * torch.randn(num_samples, generator=generator, dtype=torch.float64)
    x = torch.randn(num_samples, num_x, generator=generator, dtype=torch.float64) * (v / 2).exp()[:, None]
    return {"v": v, "x": x}


def _funnel_moments(num_x: int = 9) -> Tuple[torch.Tensor, torch.Tensor]:
    # E x_i = 0 and Var x_i = E[e^v] = e^{9/2} for v ~ N(0, 3^2): sd = e^{9/4}
    mean = torch.zeros(1 + num_x, dtype=torch.float64)
    sd = torch.tensor([3.0] + [math.exp(9.0 / 4.0)] * num_x, dtype=torch.float64)
    return mean, sd


# ----------------------------------------------------------------------------- 3. logistic regression
def logistic_regression(X: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    r"""Bayesian logistic regression (e.g. Gelman et al., *BDA3*, §16.3) on scikit-learn's
    Wisconsin breast-cancer data (``load_breast_cancer``; Street, Wolberg & Mangasarian 1993):
    569 cases, the 10 "mean" features (columns 0–9) standardised, plus an intercept; 11
    latent dimensions, independent :math:`\mathcal N(0, 1)` priors:

    .. math::

        \alpha \sim \mathcal N(0, 1),\quad \beta_j \sim \mathcal N(0, 1),\quad
        y_n \sim \text{Bernoulli}(\sigma(\alpha + x_n^\top \beta)).

    The features (radius, perimeter, area, ...) are strongly collinear, so the posterior of
    ``beta`` is strongly correlated.
    """
    alpha = pyro.sample("alpha", dist.Normal(0.0, 1.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    # beta: (p,) or (particles, 1, p): its last batch dim lines up with the data plate
    logits = alpha + (X * beta).sum(-1)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y)


def _logistic_data() -> tuple:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X = torch.tensor(data.data[:, :10], dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    return X.float(), torch.tensor(data.target, dtype=torch.float32)


# ----------------------------------------------------------------------------- 4. horseshoe
def horseshoe_regression(X: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    r"""Sparse linear regression with a horseshoe prior (Carvalho, Polson & Scott 2010,
    "The horseshoe estimator for sparse signals", Biometrika 97(2)) on scikit-learn's diabetes
    data (``load_diabetes``; Efron et al. 2004): 442 cases, 10 standardised features,
    standardised response (no intercept); 22 latent dimensions:

    .. math::

        \tau \sim \text{HalfCauchy}(1),\quad \lambda_j \sim \text{HalfCauchy}(1),\quad
        \beta_j \sim \mathcal N(0, \tau\lambda_j),\quad \sigma \sim \text{HalfNormal}(1),\quad
        y_n \sim \mathcal N(x_n^\top\beta, \sigma).
    """
    p = X.shape[-1]
    tau = pyro.sample("tau", dist.HalfCauchy(1.0))
    with pyro.plate("features", p):
        lam = pyro.sample("lam", dist.HalfCauchy(1.0))
        beta = pyro.sample("beta", dist.Normal(0.0, tau * lam))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    mean = (X * beta.unsqueeze(-2)).sum(-1)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def horseshoe_regression_nc(X: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    """Non-centred horseshoe for NUTS: ``beta = tau * lam * beta_tilde``, and each
    half-Cauchy scale as ``a * sqrt(b)`` with ``a ~ HalfNormal(1)``, ``b ~ InverseGamma(1/2,
    1/2)`` (a half-normal over the root of a χ²₁ is a half-Cauchy; Piironen & Vehtari 2017,
    §C), which NUTS explores without the heavy-tailed geometry."""
    p = X.shape[-1]
    tau_a = pyro.sample("tau_a", dist.HalfNormal(1.0))
    tau_b = pyro.sample("tau_b", dist.InverseGamma(0.5, 0.5))
    tau = pyro.deterministic("tau", tau_a * tau_b.sqrt())
    with pyro.plate("features", p):
        lam_a = pyro.sample("lam_a", dist.HalfNormal(1.0))
        lam_b = pyro.sample("lam_b", dist.InverseGamma(0.5, 0.5))
        lam = pyro.deterministic("lam", lam_a * lam_b.sqrt())
        beta_tilde = pyro.sample("beta_tilde", dist.Normal(0.0, 1.0))
        beta = pyro.deterministic("beta", tau * lam * beta_tilde)
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    mean = (X * beta.unsqueeze(-2)).sum(-1)
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def _horseshoe_data() -> tuple:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    X = torch.tensor(data.data, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(data.target, dtype=torch.float64)
    y = (y - y.mean()) / y.std()
    return X.float(), y.float()


# ----------------------------------------------------------------------------- 5. group scales
HIER_GROUP_SIZES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48)


def hierarchical_scales(group: torch.Tensor, num_groups: int, y: Optional[torch.Tensor] = None) -> None:
    r"""Normal hierarchical model with group-specific means *and* scales, both partially
    pooled (Gelman et al., *BDA3*, §5.4–5.5, with unequal variances modelled hierarchically
    as in Gelman & Hill 2007, §13), on simulated data: 10 groups of sizes 2..48 (155 cases);
    24 latent dimensions:

    .. math::

        \mu \sim \mathcal N(0, 5),\ \tau \sim \text{HalfNormal}(2.5),\
        m \sim \mathcal N(0, 1),\ s \sim \text{HalfNormal}(1),\\
        \theta_g \sim \mathcal N(\mu, \tau),\ \sigma_g \sim \text{LogNormal}(m, s),\
        y_{gi} \sim \mathcal N(\theta_g, \sigma_g).

    Both ``(tau, theta)`` and ``(s, sigma)`` form funnels for the small groups.
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.5))
    m = pyro.sample("m", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("groups", num_groups):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        sigma = pyro.sample("sigma", dist.LogNormal(m, s))
    with pyro.plate("data", group.shape[0]):
        pyro.sample("obs", dist.Normal(theta[..., group], sigma[..., group]), obs=y)


def hierarchical_scales_nc(group: torch.Tensor, num_groups: int, y: Optional[torch.Tensor] = None) -> None:
    """Non-centred version for NUTS: ``theta = mu + tau*z1``, ``sigma = exp(m + s*z2)``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.5))
    m = pyro.sample("m", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("groups", num_groups):
        z1 = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        z2 = pyro.sample("log_sigma_tilde", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * z1)
        sigma = pyro.deterministic("sigma", (m + s * z2).exp())
    with pyro.plate("data", group.shape[0]):
        pyro.sample("obs", dist.Normal(theta[..., group], sigma[..., group]), obs=y)


def _hier_data() -> tuple:
    g = torch.Generator().manual_seed(20251)
    G = len(HIER_GROUP_SIZES)
    # true values: mu = 1, tau = 1.5, log sigma_g ~ N(0, 0.5)
    theta = 1.0 + 1.5 * torch.randn(G, generator=g, dtype=torch.float64)
    sigma = (0.5 * torch.randn(G, generator=g, dtype=torch.float64)).exp()
    group = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(HIER_GROUP_SIZES)])
    y = theta[group] + sigma[group] * torch.randn(len(group), generator=g, dtype=torch.float64)
    return group, G, y.float()


# ----------------------------------------------------------------------------- 6. stochastic volatility
SV_T = 50


def _ar1_scale_tril(phi: torch.Tensor, sigma: torch.Tensor, T: int) -> torch.Tensor:
    # h - mu = A^{-1} D eps with A bidiagonal (1, -phi) and D = diag(sigma/sqrt(1-phi^2),
    # sigma, ..., sigma); A^{-1}[t, s] = phi^(t-s) for t >= s, so L = A^{-1} D is lower
    # triangular with a positive diagonal: the exact Cholesky factor of the AR(1) covariance.
    t = torch.arange(T, dtype=phi.dtype, device=phi.device)
    lag = t[:, None] - t[None, :]
    lower = lag >= 0
    powers = phi[..., None, None] ** lag.clamp(min=0)  # integer exponents: fine for phi < 0
    d = sigma[..., None].expand(sigma.shape + (T,)).clone()
    d[..., 0] = sigma / (1 - phi**2).sqrt()
    return torch.where(lower, powers, torch.zeros_like(powers)) * d[..., None, :]


def stochastic_volatility(y: torch.Tensor) -> None:
    r"""Stochastic volatility (Kim, Shephard & Chib 1998, Rev. Econ. Stud. 65(3); priors as
    in the Stan User's Guide, "Stochastic volatility models"), on T = 50 simulated returns;
    53 latent dimensions:

    .. math::

        \mu \sim \text{Cauchy}(0, 10),\ \phi \sim \text{Uniform}(-1, 1),\
        \sigma \sim \text{HalfCauchy}(5),\\
        h_1 \sim \mathcal N\!\big(\mu, \sigma/\sqrt{1-\phi^2}\big),\
        h_t \sim \mathcal N(\mu + \phi(h_{t-1} - \mu), \sigma),\
        y_t \sim \mathcal N(0, e^{h_t/2}).

    Centred, in one vectorised site: the AR(1) chain of conditionals *is* the Gaussian
    ``h ~ MultivariateNormal(mu 1, scale_tril=L(phi, sigma))`` with ``L = A^{-1} D``
    (``A`` the bidiagonal matrix of the recursion, ``D`` the innovation scales), i.e. the
    same joint density as the ``pyro.markov`` loop without one Pyro site per time step.
    """
    T = y.shape[-1]
    mu = pyro.sample("mu", dist.Cauchy(0.0, 10.0))
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(5.0))
    L = _ar1_scale_tril(phi, sigma, T)
    loc = mu[..., None].expand(mu.shape + (T,))
    h = pyro.sample("h", dist.MultivariateNormal(loc, scale_tril=L))
    pyro.sample("obs", dist.Normal(0.0, (h / 2).exp()).to_event(1), obs=y)


def stochastic_volatility_nc(y: torch.Tensor) -> None:
    """Non-centred SV for NUTS: ``h = mu + L(phi, sigma) h_tilde``, ``h_tilde ~ N(0, I)``."""
    T = y.shape[-1]
    mu = pyro.sample("mu", dist.Cauchy(0.0, 10.0))
    phi = pyro.sample("phi", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(5.0))
    h_tilde = pyro.sample("h_tilde", dist.Normal(0.0, 1.0).expand([T]).to_event(1))
    L = _ar1_scale_tril(phi, sigma, T)
    h = pyro.deterministic("h", mu[..., None] + (L @ h_tilde[..., None]).squeeze(-1), event_dim=1)
    pyro.sample("obs", dist.Normal(0.0, (h / 2).exp()).to_event(1), obs=y)


def _sv_data() -> tuple:
    g = torch.Generator().manual_seed(20252)
    mu, phi, sigma = -1.0, 0.9, 0.35
    h = torch.empty(SV_T, dtype=torch.float64)
    h[0] = mu + sigma / math.sqrt(1 - phi**2) * torch.randn((), generator=g, dtype=torch.float64)
    for t in range(1, SV_T):
        h[t] = mu + phi * (h[t - 1] - mu) + sigma * torch.randn((), generator=g, dtype=torch.float64)
    y = (h / 2).exp() * torch.randn(SV_T, generator=g, dtype=torch.float64)
    return (y.float(),)


# ----------------------------------------------------------------------------- 7. banana
def banana(b: float = 0.1) -> None:
    r"""Haario's twisted Gaussian ("banana"; Haario, Saksman & Tamminen 1999, Comput.
    Statist. 14, §4: ``f_b = f ∘ φ_b`` with ``f = N(0, diag(100, 1))`` and
    ``φ_b(x) = (x_1, x_2 + b x_1^2 - 100 b)``), 2-D, ``b = 0.1`` (their strongly twisted case),
    written as a model without observations (``log Z = 0``):

    .. math::

        x_1 \sim \mathcal N(0, 10),\qquad x_2 \mid x_1 \sim \mathcal N(b(100 - x_1^2), 1).
    """
    x1 = pyro.sample("x1", dist.Normal(0.0, 10.0))
    pyro.sample("x2", dist.Normal(b * (100.0 - x1**2), 1.0))


def _banana_exact(num_samples: int, generator: torch.Generator, b: float = 0.1) -> Dict[str, torch.Tensor]:
    x1 = 10.0 * torch.randn(num_samples, generator=generator, dtype=torch.float64)
    x2 = b * (100.0 - x1**2) + torch.randn(num_samples, generator=generator, dtype=torch.float64)
    return {"x1": x1, "x2": x2}


def _banana_moments(b: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    # E x2 = b (100 - E x1^2) = 0;  Var x2 = 1 + b^2 Var(x1^2) = 1 + b^2 * 2 * 100^2
    mean = torch.zeros(2, dtype=torch.float64)
    sd = torch.tensor([10.0, math.sqrt(1.0 + b * b * 2.0e4)], dtype=torch.float64)
    return mean, sd


# ----------------------------------------------------------------------------- 8. softmax regression
def softmax_regression(X: torch.Tensor, num_classes: int, y: Optional[torch.Tensor] = None) -> None:
    r"""Multinomial (softmax) regression with one prior scale per class (a hierarchical
    shrinkage prior in the style of Gelman et al., *BDA3*, §16.6; Gelman & Hill 2007, §6.7) on
    scikit-learn's wine data (``load_wine``; Forina et al. 1988): 178 cases, 13 standardised
    features, 3 classes; 45 latent dimensions, centred:

    .. math::

        s_c \sim \text{HalfNormal}(1),\quad \alpha_c \sim \mathcal N(0, 2),\quad
        \beta_{jc} \sim \mathcal N(0, s_c),\quad
        y_n \sim \text{Categorical}(\text{softmax}(\alpha + x_n^\top \beta)).

    The classes are almost separable, so the likelihood alone leaves the coefficients
    unbounded along a few directions: the per-class scales set how far they go.
    """
    p = X.shape[-1]
    with pyro.plate("classes", num_classes, dim=-1):
        scale = pyro.sample("scale", dist.HalfNormal(1.0))
        alpha = pyro.sample("alpha", dist.Normal(0.0, 2.0))
        with pyro.plate("features", p, dim=-2):
            beta = pyro.sample("beta", dist.Normal(0.0, scale))
    # beta: (p, C) or (particles, p, C); logits (..., 1, N, C): the data plate is dim -1
    logits = (X @ beta + alpha).unsqueeze(-3)
    with pyro.plate("data", X.shape[0], dim=-1):
        pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


def softmax_regression_nc(X: torch.Tensor, num_classes: int, y: Optional[torch.Tensor] = None) -> None:
    """Non-centred version for NUTS: ``beta = scale * beta_tilde``."""
    p = X.shape[-1]
    with pyro.plate("classes", num_classes, dim=-1):
        scale = pyro.sample("scale", dist.HalfNormal(1.0))
        alpha = pyro.sample("alpha", dist.Normal(0.0, 2.0))
        with pyro.plate("features", p, dim=-2):
            beta_tilde = pyro.sample("beta_tilde", dist.Normal(0.0, 1.0))
    beta = pyro.deterministic("beta", scale * beta_tilde)
    logits = (X @ beta + alpha).unsqueeze(-3)
    with pyro.plate("data", X.shape[0], dim=-1):
        pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


def _softmax_data() -> tuple:
    from sklearn.datasets import load_wine

    data = load_wine()
    X = torch.tensor(data.data, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    return X.float(), 3, torch.tensor(data.target, dtype=torch.long)


# ----------------------------------------------------------------------------- 9. varying slopes
SLOPES_GROUP_SIZES = (6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 50)
SLOPES_NUM_COVARIATES = 3


def varying_slopes(X: torch.Tensor, group: torch.Tensor, num_groups: int,
                   y: Optional[torch.Tensor] = None) -> None:
    r"""Hierarchical logistic regression with varying intercepts and slopes (Gelman & Hill
    2007, §14.2 and §13.1, with independent group effects), on simulated data: 12 groups of
    6 to 50 cases (260 in all), 3 standardised covariates plus an intercept; 56 latent
    dimensions, centred:

    .. math::

        \mu_k \sim \mathcal N(0, 2),\quad \sigma_k \sim \text{HalfNormal}(1),\quad
        b_{gk} \sim \mathcal N(\mu_k, \sigma_k),\quad
        y_n \sim \text{Bernoulli}(\sigma(b_{g_n 0} + x_n^\top b_{g_n, 1:})),

    for the 4 coefficients ``k`` (intercept first) and the 12 groups ``g``. The small groups
    make the ``(sigma_k, b_{.k})`` pairs funnels; the large ones pin their slopes down.
    """
    k = X.shape[-1] + 1
    with pyro.plate("coefficients", k, dim=-1):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("groups", num_groups, dim=-2):
            b = pyro.sample("b", dist.Normal(mu, sigma))  # (G, k) or (particles, G, k)
    bg = b[..., group, :]  # (..., N, k)
    logits = bg[..., 0] + (X * bg[..., 1:]).sum(-1)
    with pyro.plate("data", X.shape[0], dim=-1):
        pyro.sample("obs", dist.Bernoulli(logits=logits.unsqueeze(-2)), obs=y)


def varying_slopes_nc(X: torch.Tensor, group: torch.Tensor, num_groups: int,
                      y: Optional[torch.Tensor] = None) -> None:
    """Non-centred version for NUTS: ``b = mu + sigma * b_tilde``."""
    k = X.shape[-1] + 1
    with pyro.plate("coefficients", k, dim=-1):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("groups", num_groups, dim=-2):
            b_tilde = pyro.sample("b_tilde", dist.Normal(0.0, 1.0))
    b = pyro.deterministic("b", mu + sigma * b_tilde)
    bg = b[..., group, :]
    logits = bg[..., 0] + (X * bg[..., 1:]).sum(-1)
    with pyro.plate("data", X.shape[0], dim=-1):
        pyro.sample("obs", dist.Bernoulli(logits=logits.unsqueeze(-2)), obs=y)


def _slopes_data() -> tuple:
    g = torch.Generator().manual_seed(20261)
    G, K = len(SLOPES_GROUP_SIZES), SLOPES_NUM_COVARIATES
    # true values: mu = (-0.5, 1, -0.7, 0.3), sigma = (0.8, 0.5, 0.3, 0.1)
    mu = torch.tensor([-0.5, 1.0, -0.7, 0.3], dtype=torch.float64)
    sd = torch.tensor([0.8, 0.5, 0.3, 0.1], dtype=torch.float64)
    b = mu + sd * torch.randn(G, K + 1, generator=g, dtype=torch.float64)
    group = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(SLOPES_GROUP_SIZES)])
    X = torch.randn(len(group), K, generator=g, dtype=torch.float64)
    logits = b[group, 0] + (X * b[group, 1:]).sum(-1)
    y = torch.bernoulli(torch.sigmoid(logits), generator=g)
    return X.float(), group, G, y.float()


# ----------------------------------------------------------------------------- 10. count GLMM
COUNTS_NUM_GROUPS = 50
COUNTS_NUM_COVARIATES = 5


def count_glmm(X: torch.Tensor, group: torch.Tensor, num_groups: int,
               y: Optional[torch.Tensor] = None) -> None:
    r"""Negative-binomial regression with random intercepts (a generalised linear mixed
    model; Gelman & Hill 2007, §15.2–15.3, overdispersed counts), on simulated data: 50 groups
    of 1 to 8 cases (211 in all), 5 standardised covariates; 58 latent dimensions, centred:

    .. math::

        \alpha \sim \mathcal N(0, 2),\ \beta_j \sim \mathcal N(0, 1),\
        \sigma \sim \text{HalfNormal}(1),\ \phi \sim \text{LogNormal}(1, 1),\\
        u_g \sim \mathcal N(0, \sigma),\quad
        y_n \sim \text{NegBinomial}(\text{mean } e^{\alpha + x_n^\top\beta + u_{g_n}},
        \text{ concentration } \phi).

    Groups of one or two cases leave their ``u_g`` close to the prior: a funnel in
    ``(sigma, u)`` next to well-identified fixed effects.
    """
    alpha = pyro.sample("alpha", dist.Normal(0.0, 2.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    phi = pyro.sample("phi", dist.LogNormal(1.0, 1.0))
    with pyro.plate("groups", num_groups):
        u = pyro.sample("u", dist.Normal(0.0, sigma))
    _count_likelihood(X, group, alpha, beta, u, phi, y)


def count_glmm_nc(X: torch.Tensor, group: torch.Tensor, num_groups: int,
                  y: Optional[torch.Tensor] = None) -> None:
    """Non-centred version for NUTS: ``u = sigma * u_tilde``."""
    alpha = pyro.sample("alpha", dist.Normal(0.0, 2.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    phi = pyro.sample("phi", dist.LogNormal(1.0, 1.0))
    with pyro.plate("groups", num_groups):
        u_tilde = pyro.sample("u_tilde", dist.Normal(0.0, 1.0))
    u = pyro.deterministic("u", sigma * u_tilde)
    _count_likelihood(X, group, alpha, beta, u, phi, y)


def _count_likelihood(X, group, alpha, beta, u, phi, y) -> None:
    # alpha, sigma, phi: () or (particles, 1); beta (..., p) lines up as in ``logistic``
    log_mean = alpha + (X * beta).sum(-1) + u[..., group]
    # GammaPoisson(concentration, rate) has mean concentration / rate
    rate = phi / log_mean.exp()
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.GammaPoisson(phi, rate), obs=y)


def _counts_data() -> tuple:
    g = torch.Generator().manual_seed(20262)
    G, P = COUNTS_NUM_GROUPS, COUNTS_NUM_COVARIATES
    sizes = torch.randint(1, 9, (G,), generator=g)
    group = torch.repeat_interleave(torch.arange(G), sizes)
    X = torch.randn(len(group), P, generator=g, dtype=torch.float64)
    beta = torch.tensor([0.5, -0.3, 0.2, 0.0, 0.1], dtype=torch.float64)
    u = 0.6 * torch.randn(G, generator=g, dtype=torch.float64)
    mean = (1.0 + X @ beta + u[group]).exp()
    phi = 4.0
    # overdispersed rates: Gamma(phi, phi / mean), drawn with a seeded NumPy generator
    # (torch's Gamma sampler takes no generator)
    import numpy as np

    lam = torch.from_numpy(np.random.default_rng(20262).gamma(phi, (mean / phi).numpy()))
    y = torch.poisson(lam, generator=g)
    return X.float(), group, G, y.float()


# ----------------------------------------------------------------------------- registry
MODELS: Dict[str, SuiteModel] = {
    s.name: s
    for s in [
        SuiteModel(
            "eight_schools", eight_schools, _eight_schools_data, ("mu", "tau", "theta"),
            "eight schools, centred (10-D; Rubin 1981)", nuts_model=eight_schools_nc,
        ),
        SuiteModel(
            "funnel", funnel, lambda: (9,), ("v", "x"),
            "Neal's funnel (10-D; Neal 2003), exact draws, log Z = 0",
            exact_sampler=_funnel_exact, exact_moments=_funnel_moments, log_Z=0.0,
        ),
        SuiteModel(
            "logistic", logistic_regression, _logistic_data, ("alpha", "beta"),
            "logistic regression, breast cancer, 10 features + intercept, N(0,1) priors (11-D)",
            full_mass=True,
        ),
        SuiteModel(
            "horseshoe", horseshoe_regression, _horseshoe_data, ("tau", "lam", "beta", "sigma"),
            "horseshoe regression, diabetes (22-D; Carvalho et al. 2010)",
            nuts_model=horseshoe_regression_nc,
        ),
        SuiteModel(
            "hier_scales", hierarchical_scales, _hier_data, ("mu", "tau", "m", "s", "theta", "sigma"),
            "hierarchical means and scales, 10 simulated groups (24-D)",
            nuts_model=hierarchical_scales_nc,
        ),
        SuiteModel(
            "stoch_vol", stochastic_volatility, _sv_data, ("mu", "phi", "sigma", "h"),
            "stochastic volatility, T = 50 simulated (53-D; Kim et al. 1998)",
            nuts_model=stochastic_volatility_nc,
        ),
        SuiteModel(
            "banana", banana, lambda: (0.1,), ("x1", "x2"),
            "Haario's banana b = 0.1 (2-D), exact draws, log Z = 0",
            exact_sampler=_banana_exact, exact_moments=_banana_moments, log_Z=0.0,
        ),
        SuiteModel(
            "softmax", softmax_regression, _softmax_data, ("scale", "alpha", "beta"),
            "softmax regression, per-class prior scales, wine, 13 features x 3 classes (45-D)",
            nuts_model=softmax_regression_nc,
        ),
        SuiteModel(
            "varying_slopes", varying_slopes, _slopes_data, ("mu", "sigma", "b"),
            "hierarchical logistic regression, varying intercepts and 3 slopes, 12 groups (56-D)",
            nuts_model=varying_slopes_nc,
        ),
        SuiteModel(
            "count_glmm", count_glmm, _counts_data, ("alpha", "beta", "sigma", "phi", "u"),
            "negative-binomial regression with random intercepts, 50 groups (58-D)",
            nuts_model=count_glmm_nc,
        ),
    ]
}


def get_model(name: str) -> SuiteModel:
    """The :class:`SuiteModel` called ``name`` (a clear error listing the names otherwise)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]
