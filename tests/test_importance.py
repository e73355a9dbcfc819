"""Importance-weighted posteriors (pyro_nfvi.importance): PSIS against known tails,
weighted moments against exact conjugate posteriors, shapes with plates and constrained
sites, resampling into Predictive, the k-hat warning and the log-evidence estimate."""

import doctest
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import (
    AutoDelta,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.autoguide.initialization import init_to_value
from pyro.ops.stats import fit_generalized_pareto

import pyro_nfvi
from pyro_nfvi import importance
from pyro_nfvi.diagnostics import importance_log_weights, psis_khat
from pyro_nfvi.guides import AutoPlanarFlow, AutoRadialFlow
from pyro_nfvi.importance import (
    ImportanceWarning,
    WeightedPosterior,
    importance_sample,
    khat_threshold,
    psis_smooth,
)

# --------------------------------------------------------------------- models
# Normal-Normal: mu ~ N(0, 10^2), x_i ~ N(mu, 1)
PRIOR_SD = 10.0
X = torch.tensor([1.2, 0.4, 2.1, 1.7, 0.9, 1.4, 2.5, 0.3, 1.1, 1.6])
POST_VAR = 1.0 / (1.0 / PRIOR_SD**2 + len(X))
POST_MEAN = POST_VAR * float(X.sum())
POST_SD = math.sqrt(POST_VAR)


def normal_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def normal_log_Z(x):
    # marginal x ~ N(0, PRIOR_SD^2 11^T + I)
    cov = PRIOR_SD**2 * torch.ones(len(x), len(x)) + torch.eye(len(x))
    return float(dist.MultivariateNormal(torch.zeros(len(x)), cov.double()).log_prob(x.double()))


def normal_guide_at(loc, scale):
    def guide(x):
        pyro.sample("mu", dist.Normal(loc, scale))

    return guide


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceWarning)
        return fn(*args, **kwargs)


# --------------------------------------------------------------------- (a) PSIS
@pytest.mark.parametrize("k", [0.2, 0.5, 0.8])
def test_psis_khat_recovers_exact_pareto_shape(k):
    # log w = k E, E ~ Exp(1)  =>  w is Pareto with tail index 1/k: P(w > t) = t^(-1/k)
    est = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        lw = -k * torch.log(torch.rand(40000, generator=g, dtype=torch.float64))
        smoothed, khat = psis_smooth(lw)
        assert khat == pytest.approx(psis_khat(lw), abs=1e-12)  # the same k-hat as diagnostics
        est.append(khat)
    assert abs(sum(est) / len(est) - k) < 0.1


def test_psis_khat_for_normal_proposals():
    torch.manual_seed(0)
    q = dist.Normal(0.0, 1.0)
    z = q.sample((40000,)).double()
    # target wider than the proposal: w ~ exp(z^2 (1 - 1/4) / 2), true k = 1 - 1/4 = 0.75
    wide = dist.Normal(0.0, 2.0).log_prob(z) - q.log_prob(z)
    assert abs(psis_smooth(wide)[1] - 0.75) < 0.12
    # Student-t target under a Normal proposal: k -> 1 (weights with no finite variance)
    heavy = dist.StudentT(3.0).log_prob(z) - q.log_prob(z)
    assert psis_smooth(heavy)[1] > 0.7
    # proposal wider than the target: bounded weights
    z2 = dist.Normal(0.0, 2.0).sample((4000,)).double()
    bounded = dist.Normal(0.0, 1.0).log_prob(z2) - dist.Normal(0.0, 2.0).log_prob(z2)
    assert psis_smooth(bounded)[1] < 0.5


def test_psis_smooth_replaces_the_tail_by_gpd_order_statistics():
    torch.manual_seed(1)
    n = 3000
    lw = 3.0 + 0.6 * dist.Exponential(1.0).sample((n,)).double() + 0.1 * torch.randn(n).double()
    smoothed, khat = psis_smooth(lw)
    m = math.ceil(min(0.2 * n, 3 * math.sqrt(n)))
    order = torch.argsort(lw)
    tail, body = order[-m:], order[:-m]
    # the body is untouched
    assert torch.equal(smoothed[body], lw[body])
    # the tail: scipy's generalized Pareto quantiles at (j - 1/2)/M above the cutoff,
    # in the ranks of the raw weights, capped at the largest raw weight
    w = (lw - lw.max()).exp()
    cutoff = float(w[order[-m - 1]])
    k, sigma = fit_generalized_pareto(w[tail] - cutoff)
    assert khat == pytest.approx(k)
    p = (np.arange(1, m + 1) - 0.5) / m
    expected = np.minimum(cutoff + scipy.stats.genpareto.ppf(p, c=k, scale=sigma), 1.0)
    got = (smoothed[tail] - lw.max()).exp().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-14)
    assert float(smoothed.max()) <= float(lw.max()) + 1e-12


def test_psis_special_cases_and_bad_input():
    smoothed, khat = psis_smooth(torch.full((100,), 2.0))
    assert khat == -math.inf and torch.equal(smoothed, torch.full((100,), 2.0, dtype=torch.float64))
    with pytest.warns(ImportanceWarning, match="too few"):
        assert psis_smooth(torch.randn(20))[1] == math.inf
    lw = torch.randn(400).double()
    lw[:50] = -math.inf  # zero weights are allowed
    assert math.isfinite(psis_smooth(lw)[1])
    with pytest.raises(ValueError, match="NaN"):
        psis_smooth(torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="shape"):
        psis_smooth(torch.zeros(3, 2))
    with pytest.raises(TypeError):
        psis_smooth([0.0, 1.0])
    assert khat_threshold(4000) == 0.7 and khat_threshold(100) == pytest.approx(0.5)


def test_psis_lowers_the_error_of_heavy_tailed_estimates():
    # E_p[z^2] = 2.56 for p = N(0, 1.6^2) from a N(0, 1) proposal (k = 0.61)
    p, q = dist.Normal(0.0, 1.6), dist.Normal(0.0, 1.0)
    err_is, err_psis = [], []
    torch.manual_seed(2)
    for _ in range(100):
        z = q.sample((1000,)).double()
        lw = p.log_prob(z) - q.log_prob(z)
        plain = WeightedPosterior({"z": z}, lw, smooth=False, warn=False)
        smooth = WeightedPosterior({"z": z}, lw, warn=False)
        err_is.append(float(plain.mean(z**2)) - 2.56)
        err_psis.append(float(smooth.mean(z**2)) - 2.56)
    rmse_is = math.sqrt(sum(e * e for e in err_is) / 100)
    rmse_psis = math.sqrt(sum(e * e for e in err_psis) / 100)
    assert rmse_psis < 0.8 * rmse_is


# ------------------------------------------------ (b) a mis-fitted guide, corrected
def test_misfitted_autonormal_corrected_to_exact_posterior():
    # AutoNormal placed 1 posterior sd off and 1.6x too wide, by hand
    guide = AutoNormal(
        normal_model,
        init_loc_fn=init_to_value(values={"mu": torch.tensor(POST_MEAN + POST_SD)}),
        init_scale=1.6 * POST_SD,
    )
    post = importance_sample(normal_model, guide, X, num_samples=4000)
    mu = post.samples["mu"]
    assert mu.shape == (4000,)
    raw_mean, raw_sd = float(mu.mean()), float(mu.std())
    assert abs(raw_mean - POST_MEAN) > 0.8 * POST_SD and abs(raw_sd - POST_SD) > 0.4 * POST_SD
    assert post.khat < 0.5 and post.ess > 1000
    assert abs(float(post.mean("mu")) - POST_MEAN) < 0.1 * POST_SD
    assert abs(float(post.std("mu")) - POST_SD) < 0.1 * POST_SD
    assert float(post.mcse("mu")) < 0.05 * POST_SD
    # weighted quantiles against the exact Normal quantiles
    qs = post.quantile([0.05, 0.5, 0.95], "mu")
    exact = POST_MEAN + POST_SD * torch.tensor([-1.6449, 0.0, 1.6449])
    assert qs.shape == (3,)
    assert (qs.double() - exact).abs().max() < 0.1 * POST_SD


def test_misfitted_flow_guide_on_constrained_site():
    # precision tau ~ Gamma(2, 2), x_i ~ N(0, tau^-1/2): posterior Gamma(2 + n/2, 2 + sum x^2 / 2).
    # AutoPlanarFlow scores tau through its Delta site's Jacobian; without it the
    # weighted mean would be off by 1/b = 0.3 posterior sd.
    torch.manual_seed(3)
    x = torch.randn(20) * 0.7

    def model(x):
        tau = pyro.sample("tau", dist.Gamma(2.0, 2.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(0.0, tau.rsqrt()), obs=x)

    a, b = 2.0 + len(x) / 2, 2.0 + float((x**2).sum()) / 2
    mean, sd = a / b, math.sqrt(a) / b
    guide = AutoPlanarFlow(
        model, num_flows=4,
        init_loc_fn=init_to_value(values={"tau": torch.tensor(1.3 * mean)}), init_scale=0.45,
    )
    post = importance_sample(model, guide, x, num_samples=4000)
    tau = post.samples["tau"]
    assert post.vectorized and tau.shape == (4000,) and bool((tau > 0).all())
    assert abs(float(tau.mean()) - mean) > 0.5 * sd  # the raw guide is off
    assert post.khat < 0.7
    assert abs(float(post.mean("tau")) - mean) < 0.1 * sd
    assert abs(float(post.std("tau")) - sd) < 0.1 * sd


@pytest.mark.slow
@pytest.mark.parametrize("make_guide", [
    lambda m: AutoPlanarFlow(m, num_flows=8, base="studentt"),
    lambda m: AutoMultivariateNormal(m),
], ids=["AutoPlanarFlow-studentt", "AutoMultivariateNormal"])
def test_fitted_guide_on_normal_gamma_model(make_guide):
    # Normal-Gamma: a skewed, coupled posterior with exact marginals (tau ~ Gamma,
    # mu ~ Student t). A short SVI fit leaves the guide imperfect; the weights fix it.
    # The planar guide with its default normal base fits the moments closely here but its
    # Gaussian tails leave k-hat above 0.7 on some seeds (0.19-1.34 over seeds 0-5, this
    # protocol); the Student-t base is the package's remedy (-0.05-0.61 over seeds 0-5).
    x = torch.tensor([0.3, 1.9, 1.1, -0.4, 2.2])
    m0, k0, a0, b0 = 0.0, 1.0, 2.0, 1.0

    def model(x):
        tau = pyro.sample("tau", dist.Gamma(a0, b0))
        mu = pyro.sample("mu", dist.Normal(m0, (k0 * tau).rsqrt()))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, tau.rsqrt()), obs=x)

    n, xb = len(x), float(x.mean())
    kn, an = k0 + n, a0 + n / 2
    mn = (k0 * m0 + n * xb) / kn
    bn = b0 + 0.5 * float(((x - xb) ** 2).sum()) + k0 * n * (xb - m0) ** 2 / (2 * kn)
    exact = {"tau": (an / bn, math.sqrt(an) / bn), "mu": (mn, math.sqrt(bn / (kn * (an - 1))))}
    guide = make_guide(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(400):
        svi.step(x)
    post = importance_sample(model, guide, x, num_samples=4000)
    assert post.khat < 0.7
    for name, (mean, sd) in exact.items():
        assert abs(float(post.mean(name)) - mean) < 0.1 * sd
        assert abs(float(post.std(name)) - sd) < 0.1 * sd


# ------------------------------------------------ (c) a plate of local latents
J = 4
Y = torch.tensor([1.5, -0.3, 0.8, 2.2])
NOISE = 0.5


def hier_model(y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    noise = pyro.param("noise", torch.tensor(NOISE), constraint=dist.constraints.positive)
    with pyro.plate("groups", J):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(theta, noise), obs=y)


def hier_exact():
    # z = (mu, theta_1..J) is jointly Gaussian: precision and linear term
    prec = torch.zeros(J + 1, J + 1, dtype=torch.float64)
    prec[0, 0] = 1 / 25 + J
    prec[0, 1:] = prec[1:, 0] = -1.0
    prec[1:, 1:] = torch.eye(J, dtype=torch.float64) * (1 + 1 / NOISE**2)
    lin = torch.cat([torch.zeros(1), Y / NOISE**2]).double()
    cov = torch.linalg.inv(prec)
    return cov @ lin, cov.diagonal().sqrt()


def hier_guide_factory(mean, sd):
    def guide(y=None):
        pyro.sample("mu", dist.Normal(float(mean[0]) + 0.5 * float(sd[0]), 1.5 * float(sd[0])))
        with pyro.plate("groups", J):
            loc, scale = (mean[1:] - 0.5 * sd[1:]).float(), 1.5 * sd[1:].float()
            pyro.sample("theta", dist.Normal(loc, scale))

    return guide


def test_plate_of_local_latents_with_model_param():
    mean, sd = hier_exact()
    guide = hier_guide_factory(mean, sd)
    post = importance_sample(hier_model, guide, Y, num_samples=4000)
    assert post.samples["mu"].shape == (4000,) and post.samples["theta"].shape == (4000, J)
    assert post.vectorized and post.khat < 0.7
    got_mean = torch.cat([post.mean("mu").reshape(1), post.mean("theta")]).double()
    got_sd = torch.cat([post.std("mu").reshape(1), post.std("theta")]).double()
    assert ((got_mean - mean).abs() / sd).max() < 0.1
    assert ((got_sd - sd).abs() / sd).max() < 0.1
    # the dict forms
    assert set(post.mean()) == {"mu", "theta"} and post.std()["theta"].shape == (J,)
    assert post.quantile([0.1, 0.9])["theta"].shape == (2, J)


@pytest.mark.parametrize("vectorize", [True, False])
def test_log_weights_match_an_independent_computation(vectorize):
    mean, sd = hier_exact()
    guide = hier_guide_factory(mean, sd)
    post = quiet(importance_sample, hier_model, guide, Y, num_samples=60, vectorize=vectorize,
                 batch_size=25 if vectorize else None)
    assert post.vectorized is vectorize
    mu, theta = post.samples["mu"].double(), post.samples["theta"].double()
    log_p = (
        dist.Normal(0.0, 5.0).log_prob(mu)
        + dist.Normal(mu[:, None], 1.0).log_prob(theta).sum(-1)
        + dist.Normal(theta, NOISE).log_prob(Y.double()).sum(-1)
    )
    log_q = dist.Normal(float(mean[0]) + 0.5 * float(sd[0]), 1.5 * float(sd[0])).log_prob(mu) + (
        dist.Normal((mean[1:] - 0.5 * sd[1:]).float().double(), 1.5 * sd[1:].float().double())
        .log_prob(theta).sum(-1)
    )
    torch.testing.assert_close(post.raw_log_weights, log_p - log_q, rtol=1e-5, atol=1e-4)


GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoMultivariateNormal": lambda m: AutoMultivariateNormal(m),
    "AutoIAFNormal": lambda m: AutoIAFNormal(m, num_transforms=1),
    "AutoPlanarFlow": lambda m: AutoPlanarFlow(m, num_flows=4),
    "AutoRadialFlow": lambda m: AutoRadialFlow(m, num_flows=4),
    "AutoPlanarFlow-full": lambda m: AutoPlanarFlow(m, num_flows=2, full_rank=True),
}


def plate_model(x):
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("g", 3):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("obs", dist.Normal(theta, sigma), obs=x)


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_autoguides_vectorised_weights_and_shapes(name):
    x = torch.randn(5, 3)
    guide = GUIDES[name](plate_model)
    guide(x)
    pyro.set_rng_seed(4)
    post = quiet(importance_sample, plate_model, guide, x, num_samples=200)
    pyro.set_rng_seed(4)
    reference = importance_log_weights(plate_model, guide, x, num_samples=200)
    torch.testing.assert_close(post.raw_log_weights, reference)
    assert post.vectorized
    assert post.samples["sigma"].shape == (200,) and bool((post.samples["sigma"] > 0).all())
    assert post.samples["theta"].shape == (200, 3)
    loop = quiet(importance_sample, plate_model, guide, x, num_samples=60, vectorize=False)
    assert {k: v.shape for k, v in loop.samples.items()} == {
        "sigma": torch.Size([60]), "theta": torch.Size([60, 3])}


def amortized_model(x):
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=6) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        # s[..., None]: the particle dim of s must not meet the data rows
        pyro.sample("x", dist.Normal(z @ torch.ones(2, 3), s[..., None]).to_event(1), obs=x[idx])


def test_amortized_guide_with_subsampled_plate():
    from pyro_nfvi.amortized import AutoAmortizedFlow

    x = torch.randn(12, 3)
    guide = AutoAmortizedFlow(amortized_model, plate="data", local_sites=["z"],
                              encoder=torch.nn.Linear(3, 4), data_fn=lambda x: x, num_flows=2)
    guide(x)
    for vectorize in (True, False):
        post = quiet(importance_sample, amortized_model, guide, x, num_samples=80,
                     vectorize=vectorize)
        assert post.samples["z"].shape == (80, 6, 2) and post.samples["s"].shape == (80,)
        assert bool(torch.isfinite(post.raw_log_weights).all())


def test_model_broadcasting_against_particles_is_caught():
    # s of shape (num_samples, 1) against loc (num_samples, rows, 3): with as many draws as
    # rows the shapes work out and the numbers are wrong (row i gets draw i's scale)
    def model(x):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z @ torch.ones(2, 3), s).to_event(1), obs=x)

    def guide(x):
        pyro.sample("s", dist.LogNormal(0.2, 0.3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.1, 0.8).expand([2]).to_event(1))

    x = torch.randn(50, 3)
    with pytest.raises(RuntimeError, match="broadcasts against the particle dim"):
        quiet(importance_sample, model, guide, x, num_samples=50, vectorize=True)
    post = quiet(importance_sample, model, guide, x, num_samples=50)  # falls back to a loop
    assert post.vectorized is False
    s, z = post.samples["s"], post.samples["z"]
    assert s.shape == (50,) and z.shape == (50, 50, 2)
    log_p = (
        dist.LogNormal(0.0, 1.0).log_prob(s)
        + dist.Normal(0.0, 1.0).log_prob(z).sum((-1, -2))
        + dist.Normal(z @ torch.ones(2, 3), s[:, None, None]).log_prob(x).sum((-1, -2))
    )
    log_q = dist.LogNormal(0.2, 0.3).log_prob(s) + dist.Normal(0.1, 0.8).log_prob(z).sum((-1, -2))
    torch.testing.assert_close(post.raw_log_weights, (log_p - log_q).double(), rtol=1e-5, atol=1e-3)


# ------------------------------------------------ (d) resampling and Predictive
def test_resample_into_predictive():
    mean, sd = hier_exact()
    post = importance_sample(hier_model, hier_guide_factory(mean, sd), Y, num_samples=4000)
    g = torch.Generator().manual_seed(0)
    draws = post.resample(2000, generator=g)
    assert draws["mu"].shape == (2000,) and draws["theta"].shape == (2000, J)
    # resampled draws are (unweighted) posterior draws
    assert abs(float(draws["mu"].double().mean()) - float(mean[0])) < 0.15 * float(sd[0])
    pred = Predictive(hier_model, posterior_samples=draws, parallel=True)()
    assert pred["y"].shape == (2000, J)
    assert set(pred) == {"y"}
    # weighted predictive: one row per weighted draw; E[y_new] = E[theta | y]
    out = post.predictive(hier_model, parallel=True)
    assert out["y"].shape == (4000, J) and set(out) == {"y"}
    pred_sd = (sd[1:] ** 2 + NOISE**2).sqrt()
    assert ((post.mean(out["y"]).double() - mean[1:]).abs() / pred_sd).max() < 0.1
    assert ((post.std(out["y"]).double() - pred_sd).abs() / pred_sd).max() < 0.1
    same = post.resample(100, generator=torch.Generator().manual_seed(5))
    again = post.resample(100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(same["theta"], again["theta"])


def test_systematic_resampling_counts():
    torch.manual_seed(6)
    lw = torch.randn(50).double() * 1.5
    post = WeightedPosterior({"i": torch.arange(50)}, lw, smooth=False, warn=False)
    n = 1000
    idx = post.resample(n, method="systematic")["i"]
    counts = torch.bincount(idx, minlength=50).double()
    nw = n * post.weights
    # every draw appears floor(n w) or ceil(n w) times
    assert bool(((counts >= nw.floor() - 1e-9) & (counts <= nw.ceil() + 1e-9)).all())
    multi = post.resample(20000, method="multinomial")["i"]
    freq = torch.bincount(multi, minlength=50).double() / 20000
    assert (freq - post.weights).abs().max() < 0.02


# ------------------------------------------------ (e) the k-hat warning
def test_warning_when_guide_much_narrower_than_posterior():
    guide = normal_guide_at(POST_MEAN, 0.25 * POST_SD)
    with pytest.warns(ImportanceWarning, match="unreliable") as record:
        post = importance_sample(normal_model, guide, X, num_samples=4000)
    assert post.khat > 0.7 and not post.reliable
    assert record[0].filename == __file__  # points at the caller's line
    assert "unreliable" in repr(post) and "unreliable" in post.summary()
    # no warning for a good guide
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImportanceWarning)
        good = importance_sample(normal_model, normal_guide_at(POST_MEAN, 1.3 * POST_SD), X,
                                 num_samples=4000)
    assert good.khat < 0.5 and good.reliable


# ------------------------------------------------ (f) log evidence
def test_log_evidence_of_normal_normal():
    exact = normal_log_Z(X)
    guide = normal_guide_at(POST_MEAN - 0.3 * POST_SD, 1.3 * POST_SD)
    post = importance_sample(normal_model, guide, X, num_samples=4000)
    assert 0 < post.log_evidence_se < 0.05
    assert abs(post.log_evidence - exact) < 4 * post.log_evidence_se
    assert post.elbo < exact - 0.05  # the mis-fitted guide's ELBO has a visible gap


# ------------------------------------------------ bad input, reprs, exports
def test_bad_input():
    guide = normal_guide_at(POST_MEAN, POST_SD)
    for bad in (1, 0, True, 2.5):
        with pytest.raises(ValueError, match="num_samples"):
            importance_sample(normal_model, guide, X, num_samples=bad)
    with pytest.raises(ValueError, match="batch_size"):
        importance_sample(normal_model, guide, X, batch_size=0)
    with pytest.raises(TypeError, match="vectorize"):
        importance_sample(normal_model, guide, X, vectorize="yes")
    with pytest.raises(TypeError, match="smooth"):
        importance_sample(normal_model, guide, X, smooth=1)
    with pytest.raises(ValueError, match="no latent"):
        importance_sample(lambda: pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0)),
                          lambda: None)
    with pytest.raises(ValueError, match="does not sample.*'mu'"):
        importance_sample(normal_model, lambda x: None, X)
    with pytest.raises(ValueError, match="point mass"):
        importance_sample(normal_model, AutoDelta(normal_model), X, num_samples=10)
    post = importance_sample(normal_model, normal_guide_at(POST_MEAN, 1.3 * POST_SD), X,
                             num_samples=100)
    with pytest.raises(ValueError, match="unknown site 'nope'"):
        post.mean("nope")
    with pytest.raises(ValueError, match=r"\(100, ...\)"):
        post.mean(torch.zeros(99))
    with pytest.raises(ValueError, match="q must"):
        post.quantile(1.5, "mu")
    with pytest.raises(ValueError, match="num_samples"):
        post.resample(0)
    with pytest.raises(ValueError, match="method"):
        post.resample(10, method="stratified-ish")
    with pytest.raises(ValueError, match=r"samples\['a'\].*\(3, ...\)"):
        WeightedPosterior({"a": torch.zeros(4)}, torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        WeightedPosterior({"a": torch.zeros(3)}, torch.tensor([0.0, float("nan"), 0.0]))


def test_equal_weights_reduce_to_plain_sample_statistics():
    torch.manual_seed(7)
    z = torch.randn(101, 2).double()
    post = WeightedPosterior({"z": z}, torch.zeros(101))
    assert post.khat == -math.inf and post.ess == pytest.approx(101)
    torch.testing.assert_close(post.mean("z"), z.mean(0))
    torch.testing.assert_close(post.std("z"), z.std(0))
    qs = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0]
    expected = np.quantile(z.numpy(), qs, axis=0, method="inverted_cdf")
    np.testing.assert_allclose(post.quantile(qs, "z").numpy(), expected, rtol=1e-12)
    text = post.summary()
    assert "z[0]" in text and "z[1]" in text and "95.0%" in text


def test_weighted_quantiles_ignore_zero_weight_draws():
    # draws 0..9; the heavy ones are 3 (weight 0.5) and 6 (0.5), the rest weigh ~nothing
    lw = torch.full((10,), -800.0).double()
    lw[3] = lw[6] = 0.0
    post = WeightedPosterior({"v": torch.arange(10.0)}, lw, smooth=False, warn=False)
    got = post.quantile([0.0, 0.3, 0.49, 0.51, 0.99, 1.0], "v")
    assert got.tolist() == [3.0, 3.0, 3.0, 6.0, 6.0, 6.0]
    lw[lw < 0] = -30.0  # tiny but positive weights: only the extreme probabilities see them
    post = WeightedPosterior({"v": torch.arange(10.0)}, lw, smooth=False, warn=False)
    assert post.quantile([0.01, 0.49, 0.51, 0.99], "v").tolist() == [3.0, 3.0, 6.0, 6.0]


def test_package_exports_and_doctests():
    assert pyro_nfvi.importance_sample is importance_sample
    assert pyro_nfvi.WeightedPosterior is WeightedPosterior
    result = doctest.testmod(importance, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_weights_tied_at_their_maximum_are_bounded_not_degenerate():
    """A third of the draws share the largest weight (a uniform proposal around a uniform
    posterior: the rest are outside the support, log w = -inf): bounded weights, k̂ =
    -inf, no warning (k̂ was inf with "only 0 weights within 1e-15 of the largest")."""
    lw = torch.full((4000,), -math.inf, dtype=torch.float64)
    lw[::3] = -1.0986
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post = WeightedPosterior({"z": torch.zeros(4000)}, lw)
    assert post.khat == -math.inf and post.reliable
    finite = torch.zeros(400, dtype=torch.float64)
    finite[::2] = -1.0  # half tie at the maximum, all finite
    assert WeightedPosterior({"z": torch.zeros(400)}, finite).khat == -math.inf
    assert psis_khat(finite) == -math.inf and psis_khat(lw) == -math.inf
    # a heavy tail above the ties is still seen
    heavy = torch.cat([finite, torch.tensor([5.0, 4.0, 3.5, 3.0, 2.8, 2.5, 2.2, 2.0, 1.8, 1.5] * 4,
                                            dtype=torch.float64)])
    assert psis_khat(heavy) > 0


def test_summary_calls_a_khat_above_the_threshold_unreliable():
    """With 50 draws the reliability threshold (0.41) is below 0.5: a k̂ between them is
    unreliable in the summary and repr, as the warning says."""
    assert importance.khat_threshold(50) < 0.5
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        lw = torch.randn(50, generator=gen, dtype=torch.float64) * 1.2
        post = WeightedPosterior({"z": torch.zeros(50)}, lw, warn=False)
        if post.khat_threshold < post.khat <= 0.5:
            assert not post.reliable and "unreliable" in post.summary() and "(unreliable)" in repr(post)
            return
    pytest.fail("no draw with k-hat between the threshold and 0.5")
