"""Regression tests of issue 21, items 2-4: a saved guide can be used, ``median`` /
``quantiles`` are reproducible and leave the user's random stream alone, and a Sylvester
bottleneck larger than the latent dimension is an error, not silently capped."""

import io

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_nfvi.guides import AutoNormalizingFlow, AutoPlanarFlow, AutoSylvesterFlow
from pyro_nfvi.transforms import StackedSylvester

# ------------------------------------------------------------------------- models
SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools():
    """Centred: ``theta``'s prior depends on ``mu`` and ``tau`` (a hierarchical site)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


def plain(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


PLAIN_DATA = 3.0 + torch.randn(30, generator=torch.Generator().manual_seed(1))


def _fit(model, guide, *args, steps=30):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(steps):
        svi.step(*args)
    return guide


def _round_trip(guide):
    f = io.BytesIO()
    torch.save(guide, f)
    f.seek(0)
    loaded = torch.load(f, weights_only=False)
    # a fresh session: the loaded guide must use its own parameters, not the store's
    pyro.clear_param_store()
    return loaded


def _predict(model, guide, *args):
    torch.manual_seed(7)
    return Predictive(model, guide=guide, num_samples=20)(*args)


# ------------------------------------------------------- item 2: saved guides
@pytest.mark.parametrize("model, args", [(eight_schools, ()), (plain, (PLAIN_DATA,))],
                         ids=["eight-schools-centred", "plain"])
def test_saved_guide_works_when_called_and_in_predictive(model, args):
    guide = _fit(model, AutoPlanarFlow(model, num_flows=4), *args)
    if model is eight_schools:
        assert guide.hierarchical_sites  # the case that re-runs the model
    expected = _predict(model, guide, *args)
    loaded = _round_trip(guide)
    got = _predict(model, loaded, *args)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    torch.manual_seed(3)
    a = loaded(*args)
    torch.manual_seed(3)
    b = guide(*args)  # saving must not have broken the live guide either
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_saved_guide_of_an_unpicklable_model_says_how_to_reattach():
    def local_model():  # a closure: pickle cannot store it by reference
        eight_schools()

    guide = _fit(local_model, AutoPlanarFlow(local_model, num_flows=4))
    expected = _predict(local_model, guide)
    loaded = _round_trip(guide)  # loads; only the model is missing
    with pytest.raises(RuntimeError, match=r"guide\.model = "):
        loaded()
    with pytest.raises(RuntimeError, match=r"guide\.model = "):
        Predictive(local_model, guide=loaded, num_samples=3)()
    loaded.model = local_model
    got = _predict(local_model, loaded)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# ------------------------------------------- item 3: reproducible summaries
def _conjugate_guide():
    """A guide set to the exact posterior of a conjugate model: ``mu ~ N(0, 2)`` seen
    through 5 draws of ``N(mu, 1)`` per coordinate gives ``mu | y ~ N(m, s)``; ``sigma ~
    LogNormal(0.5, 0.3)`` has no data, so its posterior median is ``exp(0.5)``. The flow
    is the identity, so any error of the summaries is the estimator's."""
    y = torch.tensor([[0.3, -1.2, 2.0, 0.1], [1.1, 0.4, -0.5, 3.0], [0.8, -0.9, 1.5, 0.0],
                      [0.5, -2.0, 2.2, 0.7], [1.6, -0.4, 0.9, 1.2]])
    prec = 1 / 4 + 5.0
    m, s = y.sum(0) / prec, torch.full((4,), prec**-0.5)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.zeros(4), 2.0).to_event(1))
        pyro.sample("sigma", dist.LogNormal(0.5, 0.3))
        pyro.sample("y", dist.Normal(mu, 1.0).expand([5, 4]).to_event(2), obs=y)

    guide = AutoNormalizingFlow(model, lambda d: [], full_rank=False, centered=1.0, init_scale=1.0)
    guide()
    with torch.no_grad():
        guide.loc.copy_(torch.cat([m, torch.tensor([0.5])]))
        guide.scale = torch.cat([s, torch.tensor([0.3])])
    return guide, m, s


def test_median_and_quantiles_are_reproducible():
    guide = _fit(eight_schools, AutoPlanarFlow(eight_schools, num_flows=4))
    a, b = guide.median(), guide.median()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    qa, qb = guide.quantiles([0.1, 0.9]), guide.quantiles([0.1, 0.9])
    for k in qa:
        assert torch.equal(qa[k], qb[k]), k


def test_median_and_quantiles_leave_the_global_rng_alone():
    guide = _fit(plain, AutoPlanarFlow(plain, num_flows=4), PLAIN_DATA)
    torch.manual_seed(0)
    ref = torch.rand(3)
    torch.manual_seed(0)
    guide.median(PLAIN_DATA)
    guide.quantiles([0.2, 0.5], PLAIN_DATA, num_samples=64)
    assert torch.equal(torch.rand(3), ref)


def test_median_close_to_the_exact_posterior_median():
    guide, m, s = _conjugate_guide()
    med = guide.median()
    # Monte Carlo with 1000 draws: standard error 1.25 s / sqrt(1000) = 0.04 s per coordinate;
    # the scrambled Sobol points are well inside 0.01 s
    assert ((med["mu"] - m).abs() < 0.01 * s).all(), (med["mu"] - m) / s
    assert abs(float(med["sigma"].log()) - 0.5) < 0.01 * 0.3
    q = guide.quantiles([0.1587, 0.8413])["mu"]  # ±1 sd
    assert ((q[0] - (m - s)).abs() < 0.02 * s).all() and ((q[1] - (m + s)).abs() < 0.02 * s).all()


# ------------------------------------------------- item 4: Sylvester bottleneck
def test_sylvester_bottleneck_larger_than_the_latent_dimension_is_an_error():
    def model():
        pyro.sample("x", dist.Normal(torch.zeros(5), 1.0).to_event(1))

    guide = AutoSylvesterFlow(model, num_flows=2, bottleneck=99)
    with pytest.raises(ValueError, match=r"bottleneck.*99.*latent dimension.*5"):
        guide()
    assert guide.prototype_trace is None  # nothing half set up: a fixed guide can retry
    ok = AutoSylvesterFlow(model, num_flows=2, bottleneck=5)
    ok()
    (stack,) = [m for m in ok.modules() if isinstance(m, StackedSylvester)]
    assert stack.bottleneck == 5
    for kind in ("householder", "triangular"):
        with pytest.raises(ValueError, match=r"bottleneck.*latent dimension.*5"):
            AutoSylvesterFlow(model, num_flows=2, bottleneck=3, kind=kind)()


def test_a_support_that_depends_on_a_latent_site_is_named_at_setup():
    def model():
        a = pyro.sample("a", dist.LogNormal(0.0, 1.0))
        pyro.sample("x", dist.Uniform(0.0, a))

    with pytest.raises(ValueError, match=r"site 'x' has a support whose bounds depend on .*'a'"):
        AutoPlanarFlow(model)()


def _exp_link_model(group_scale: float):
    """``h ~ Normal(mu, sigma)`` per datum with ``sigma ~ HalfCauchy(group_scale)`` and
    ``y ~ Normal(0, exp(h / 2))``: a wide group scale feeding an exponential link, and 40
    data points."""
    y = 0.3 * torch.randn(40, generator=torch.Generator().manual_seed(0))

    def model(y):
        sigma = pyro.sample("sigma", dist.HalfCauchy(group_scale))
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("t", len(y)):
            h = pyro.sample("h", dist.Normal(mu, sigma))
            pyro.sample("y", dist.Normal(0.0, (h / 2).exp()), obs=y)

    return model, y


def test_initial_scales_are_halved_where_draws_collapse_the_log_joint():
    # at the prior median (sigma = 25) the curvature scales let a few draws reach
    # exp(-h) ~ e^30 (halvings 2-3 over the seeds of init_to_median's prior draws)
    model, y = _exp_link_model(25.0)

    from pyro_nfvi._weights import _draw
    from pyro_nfvi.guides.curvature import _TAME_GAP_PER_DIM

    pyro.clear_param_store()
    guide = AutoPlanarFlow(model, num_flows=2)
    state = torch.get_rng_state()
    guide(y)
    assert guide.initial_scale_halvings >= 1
    with torch.no_grad():
        lw = _draw(model, guide, (y,), {}, 64, None, None, None)[1]
    assert lw.median() - lw.mean() < _TAME_GAP_PER_DIM * guide.latent_dim

    def benign(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("t", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    pyro.clear_param_store()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    g = AutoPlanarFlow(benign, num_flows=2)
    g(y)
    assert g.initial_scale_halvings == 0
    # the draws of the check come from a forked stream: the user's stream has moved only
    # by what the guide's setup and its first draw take without it
    after = torch.get_rng_state()
    pyro.clear_param_store()
    torch.set_rng_state(state)
    import pyro_nfvi.guides.flow as flow_module

    original = flow_module.tame_initial_scale
    flow_module.tame_initial_scale = lambda *a, **k: 0
    try:
        AutoPlanarFlow(benign, num_flows=2)(y)
    finally:
        flow_module.tame_initial_scale = original
    assert torch.equal(torch.get_rng_state(), after)


def test_a_param_store_left_by_another_model_is_named():
    def small():
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    def large():
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([5]).to_event(1))

    pyro.clear_param_store()
    AutoPlanarFlow(small, num_flows=2)()
    guide = AutoPlanarFlow(large, num_flows=2)
    with pytest.raises(ValueError, match=r"param store holds 'AutoPlanarFlow.loc' of shape \(3,\)"):
        guide()
    pyro.clear_param_store()
    assert guide()["x"].shape == (5,)  # usable once the store is cleared


# --- masks: the guide reads its own mask, not the model's --------------------------------

_MASK_LATENT = {"on": False}


def _model_with_masked_latent():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with poutine.mask(mask=not _MASK_LATENT["on"]):
        # a hierarchical (placed) site on a constrained support: both log-Jacobians count
        pyro.sample("s", dist.LogNormal(a, 0.5))


def _guide_log_densities(guide):
    pyro.set_rng_seed(1)
    trace = poutine.trace(guide).get_trace()
    return {n: site["fn"].log_density for n, site in trace.nodes.items()
            if site["type"] == "sample" and isinstance(site["fn"], dist.Delta)}


def test_guide_site_log_densities_ignore_the_models_masks():
    """A latent site the *model* masks keeps its log-Jacobian in the guide (as Pyro's
    AutoContinuous, which checks the mask in the guide's context): the model's mask
    scales the model's log-density, not the guide's. Under the guide's own
    mask(False), every site's log-density is 0."""
    pyro.clear_param_store()
    guide = AutoPlanarFlow(_model_with_masked_latent, num_flows=2)
    guide()
    assert "s" in guide.hierarchical_sites
    plain = _guide_log_densities(guide)
    _MASK_LATENT["on"] = True
    try:
        masked = _guide_log_densities(guide)
    finally:
        _MASK_LATENT["on"] = False
    assert torch.is_tensor(plain["s"]) and plain["s"].abs() > 1e-3
    assert torch.equal(masked["s"], plain["s"])
    with poutine.mask(mask=False):
        off = _guide_log_densities(guide)
    assert all(float(v) == 0.0 for v in off.values())


@pytest.mark.parametrize("guide_cls", ["AutoPlanarFlow", "AutoHamiltonianFlow"])
def test_summaries_leave_numpy_and_python_streams_alone(guide_cls):
    """median() and quantiles() run the model (the hierarchical placement); a model whose
    own code draws from NumPy's or Python's global stream must not see them move."""
    import random

    import numpy as np

    import pyro_nfvi

    def model(x):
        jitter = np.random.normal(size=len(x)) * 0.0 + random.random() * 0.0
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(2.0))
        with pyro.plate("g", len(x)):
            th = pyro.sample("th", dist.Normal(mu, tau))
            pyro.sample("obs", dist.Normal(th, 1.0), obs=x + torch.as_tensor(jitter, dtype=x.dtype))

    x = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])
    pyro.clear_param_store()
    guide = getattr(pyro_nfvi, guide_cls)(model)
    guide(x)
    np.random.seed(123)
    random.seed(7)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(7)
    guide.median(x)
    if hasattr(guide, "quantiles"):
        guide.quantiles([0.1, 0.9], x)
    assert (np.random.rand(), random.random()) == expected


def _hierarchical_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("g", len(x)):
        th = pyro.sample("th", dist.Normal(mu, tau))
        s = pyro.sample("s", dist.LogNormal(th, 0.5))
        corr = pyro.sample("v", dist.MultivariateNormal(th[..., None].expand(th.shape + (2,)),
                                                        scale_tril=torch.eye(2) * tau))
        pyro.sample("obs", dist.Normal(th + s + corr.sum(-1), 1.0), obs=x)


@pytest.mark.parametrize("centered", [None, 0.0, 0.5])
def test_flow_guides_start_at_init_loc_fn_values_on_hierarchical_sites(centered):
    """A hierarchical site is emitted at the placement of the guide's coordinate; the
    guide must still start at init_loc_fn's point (it started at the placement of the
    init value itself, e.g. 24 away on a LogNormal site)."""
    from pyro.infer.autoguide import init_to_value


    x = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])
    init = dict(mu=torch.tensor(1.5), tau=torch.tensor(0.7), th=torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0]),
                s=torch.tensor([0.5, 3.0, 1.0, 2.0, 0.2]), v=torch.arange(10.0).reshape(5, 2) - 4)
    for cls in (AutoPlanarFlow, AutoSylvesterFlow):
        pyro.clear_param_store()
        guide = cls(_hierarchical_model, init_loc_fn=init_to_value(values=init), init_scale=1e-5,
                    centered=centered)
        draw = guide(x)
        assert set(guide.hierarchical_sites) == {"th", "s", "v"}
        for name, value in init.items():
            assert torch.allclose(draw[name], value, atol=1e-3, rtol=1e-3), (cls.__name__, name, draw[name])


def _structured_model():
    w = pyro.sample("w", dist.Dirichlet(torch.ones(4)))
    L = pyro.sample("L", dist.LKJCholesky(3, concentration=2.0))
    s = pyro.sample("s", dist.LogNormal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("obs", dist.Normal((w[:3] * torch.diagonal(L)).sum() + s.sum(), 1.0), obs=torch.tensor(0.3))


def test_median_and_quantiles_of_structured_sites_are_points_of_their_supports():
    """A simplex median sums to one and a correlation Cholesky median is one (usable as
    init_to_value for MCMC); quantiles stay the marginal ones of each constrained
    coordinate, and an elementwise site's median is its marginal median."""
    from torch.distributions import constraints

    pyro.clear_param_store()
    guide = AutoPlanarFlow(_structured_model, init_scale=0.5)
    guide()
    med = guide.median()
    assert torch.allclose(med["w"].sum(), torch.tensor(1.0), atol=1e-5) and (med["w"] > 0).all()
    assert constraints.corr_cholesky.check(med["L"])
    from pyro_nfvi.guides.summaries import constrained_samples
    draws = constrained_samples(guide, 1000, (), {})
    levels = torch.tensor([0.1, 0.5, 0.9])
    q = guide.quantiles(levels)  # marginal quantiles of each constrained coordinate
    for name in ("w", "L", "s"):
        assert torch.allclose(q[name], torch.quantile(draws[name], levels, dim=0))
    assert torch.equal(med["s"], q["s"][1])
    assert not torch.allclose(q["w"][1].sum(), torch.tensor(1.0), atol=1e-5)  # why median differs


def test_initial_centredness_stays_defined_where_the_curvature_overflows():
    """A wide group scale (HalfCauchy(50)) with an exponential link: at some prototypes
    the curvature of a placed coordinate overflows, and tau^2 I / (1 + tau^2 I) was
    inf/inf = NaN, which made the first draw fail (6 of 12 seeds)."""
    from pyro_nfvi.guides.curvature import init_from_curvature

    model, y = _exp_link_model(50.0)

    for seed in (2, 3, 4, 7):
        pyro.clear_param_store()
        torch.manual_seed(seed)
        guide = AutoPlanarFlow(model, num_flows=2)
        guide(y)
        assert torch.isfinite(guide.centering).all() and torch.isfinite(guide.scale).all()
    # the formula itself: overflowing curvature -> centred, undefined -> non-centred
    shape = torch.Size([3])
    scale, c = init_from_curvature({"h": shape}, {"h": slice(0, 3)},
                                   {"h": -torch.tensor([float("inf"), float("nan"), 4.0])},
                                   {"h": torch.tensor(50.0)}, None, None, dict(dtype=torch.float32))
    assert torch.allclose(c, torch.tensor([0.98, 0.02, 0.98])) and torch.isfinite(scale).all()
