"""NeuTra through the default flow guide (issue 25): Pyro's recipe
``NeuTraReparam(guide.requires_grad_(False)).reparam(model)`` then NUTS, with the guide's
hierarchical placement inside ``get_transform``; the transform's exact log-det; agreement
of the draws with independent references; the errors for argument-dependent placements."""

import json
import pickle
from pathlib import Path

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import MCMC, NUTS
from pyro.infer.reparam import NeuTraReparam as PyroNeuTraReparam
from pyro.ops.stats import effective_sample_size

import pyro_nfvi.guides as guides_mod
from pyro_nfvi.guides import AutoPlanarFlow, AutoSylvesterFlow, NeuTraReparam
from pyro_nfvi.guides.neutra import PlacedFlowTransform
from pyro_nfvi.infer import fit

ROOT = Path(__file__).resolve().parents[1]
ES_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]
ES_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]


# the models: written here (as a user would), the data of benchmarks/suite_models.py
def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def funnel(num_x=9):
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(0.0, (v / 2).exp().unsqueeze(-1)).expand(
        v.shape + (num_x,)).to_event(1))


def scales_model(y):
    """Hierarchical means and LogNormal scales; ``sigma`` is placed as a LogNormal site."""
    m = pyro.sample("m", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("groups", y.shape[-1]):
        sigma = pyro.sample("sigma", dist.LogNormal(m, s))
        theta = pyro.sample("theta", dist.Normal(mu, sigma))
        pyro.sample("obs", dist.Normal(theta, 1.0), obs=y)


def mvn_model():
    """A MultivariateNormal site whose loc and Cholesky factor depend on latent sites."""
    s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
    m = pyro.sample("m", dist.Normal(0.0, 1.0))
    L = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.2, -0.3, 1.0]])
    pyro.sample("h", dist.MultivariateNormal(m.unsqueeze(-1) * torch.ones(3),
                                             scale_tril=s[..., None, None] * L))


def plate_first(y):
    """The first latent site is inside a plate (NeuTra calls the transform there)."""
    groups = pyro.plate("g", y.shape[-1])
    with groups:
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
    tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
    with groups:
        theta = pyro.sample("theta", dist.Normal(a, tau))
        pyro.sample("obs", dist.Normal(theta, 1.0), obs=y)


def covariate_model(x):
    """The prior loc of ``theta`` is computed from the argument ``x``."""
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(1.0))
    with pyro.plate("groups", x.shape[-1]):
        pyro.sample("theta", dist.Normal(beta * x, tau))


def _es_data():
    return torch.tensor(ES_SIGMA), torch.tensor(ES_Y)


def _run_neutra(model, guide, args, warmup, samples, seed=0):
    """Pyro's recipe, unchanged; returns the MCMC object and the model-site draws."""
    neutra = PyroNeuTraReparam(guide.requires_grad_(False))
    pyro.set_rng_seed(seed)
    mcmc = MCMC(NUTS(neutra.reparam(model)), num_samples=samples, warmup_steps=warmup,
                disable_progbar=True)
    mcmc.run(*args)
    (latent,) = mcmc.get_samples().values()
    draws = [neutra.transform_sample(z) for z in latent]  # one draw at a time: any plates
    return mcmc, {k: torch.stack([d[k] for d in draws]) for k in draws[0]}


def _randomize_guide(guide, seed):
    """Move every parameter of a set-up guide far from its initialisation (centredness in
    (0.1, 0.9), so that the placement is non-trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.transform.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        guide.loc.copy_(torch.randn(guide.loc.shape, generator=gen, dtype=guide.loc.dtype))
        guide.scale = 0.3 + torch.rand(guide.loc.shape, generator=gen, dtype=guide.loc.dtype)
        if guide.full_rank:
            d = guide.latent_dim
            guide.scale_tril = torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen).tril(-1)
        if guide.centered is None:
            guide.centering = 0.1 + 0.8 * torch.rand(guide.centering.shape, generator=gen)


# ------------------------------------------------------------------ the transform
CASES = {
    "eight_schools": (eight_schools, lambda: (torch.tensor(ES_SIGMA), torch.tensor(ES_Y))),
    "funnel": (funnel, lambda: (4,)),
    "lognormal_scales": (scales_model, lambda: (torch.tensor([0.3, -1.0, 2.0]),)),
    "mvn": (mvn_model, lambda: ()),
}


@pytest.mark.parametrize("centered", [None, 0.0, 0.4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_log_det_matches_float64_jacobian(float64, case, centered):
    model, make_args = CASES[case]
    args = make_args()
    guide = AutoPlanarFlow(model, num_flows=3, centered=centered)
    guide(*args)
    assert guide.hierarchical_sites  # the placement is part of the map
    _randomize_guide(guide, seed=len(case))
    t = guide.get_transform()
    assert isinstance(t, PlacedFlowTransform)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        eps = torch.randn(guide.latent_dim, generator=gen)
        u = t(eps)
        jac = torch.autograd.functional.jacobian(t, eps)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        assert torch.allclose(t.log_abs_det_jacobian(eps, u), logabsdet, atol=1e-9, rtol=1e-9)
        assert torch.allclose(t.inv(u), eps, atol=1e-8, rtol=0)
    # a batch of draws (placed to the left of the model's plates) gives the same rows
    eps = torch.randn(5, guide.latent_dim, generator=gen)
    u = t(eps)
    ladj = t.log_abs_det_jacobian(eps, u)
    for i in range(5):
        assert torch.allclose(u[i], t(eps[i]), atol=1e-12)
        assert torch.allclose(ladj[i], t.log_abs_det_jacobian(eps[i], t(eps[i])), atol=1e-10)
    assert torch.allclose(t.inv(u), eps, atol=1e-8)


def test_transform_places_sites_as_the_guide_does(float64):
    """The transform's draw, split per site and mapped to the support, is the guide's own
    sample from the same base noise (same flow, affine and placement)."""
    args = _es_data()
    guide = AutoSylvesterFlow(eight_schools, num_flows=2)
    guide(*args)
    _randomize_guide(guide, seed=3)
    eps = torch.randn(guide.latent_dim)
    u = guide.get_transform()(eps)
    z = guide.get_posterior().transforms[-1](guide.get_posterior().transforms[0](eps))
    expected = guide._emit_sites(z, args, {})
    for site, value in guide._unpack_latent(u):
        got = torch.distributions.biject_to(site["fn"].support)(value)
        assert torch.allclose(got, expected[site["name"]], atol=1e-10)


# ---------------------------------------------------------------- Pyro's recipe
@pytest.mark.parametrize("case", ["eight_schools", "funnel"])
def test_pyro_recipe_runs_with_default_guide(case):
    cases = {"eight_schools": (eight_schools, _es_data), "funnel": (funnel, lambda: ())}
    model, make_args = cases[case]
    args = make_args()
    guide = AutoPlanarFlow(model)  # defaults: hierarchical placement on
    fit(model, guide, *args, num_steps=20, progress=False)
    assert guide.hierarchical_sites
    mcmc, draws = _run_neutra(model, guide, args, warmup=10, samples=10)
    nodes = guide.prototype_trace.iter_stochastic_nodes()
    shapes = {name: site["value"].shape for name, site in nodes}
    assert {k: v.shape[1:] for k, v in draws.items()} == shapes
    assert all(torch.isfinite(v).all() for v in draws.values())
    assert (draws["tau" if case == "eight_schools" else "v"].std(0) > 0).all()


def _reference_log_density(model, guide, args, eps):
    """log p(sites of T(eps)) + log|det dT/deps| + the support bijections' log-dets: the
    log density of eps that NeuTra must target, from the transform, its log-det and the
    model's own log joint (no reparameterizer involved)."""
    t = guide.get_transform(*args)
    u = t(eps)
    values, logdet = {}, t.log_abs_det_jacobian(eps, u)
    for site, v in guide._unpack_latent(u):
        b = torch.distributions.biject_to(site["fn"].support)
        values[site["name"]] = b(v)
        logdet = logdet + b.log_abs_det_jacobian(v, values[site["name"]]).sum()
    trace = pyro.poutine.trace(pyro.poutine.condition(model, values)).get_trace(*args)
    return trace.log_prob_sum() + logdet


def _reparam_log_density(neutra, model, args, eps):
    first = next(iter(neutra.guide.prototype_trace.iter_stochastic_nodes()))[0]
    conditioned = pyro.poutine.condition(neutra.reparam(model), {f"{first}_shared_latent": eps})
    return pyro.poutine.trace(conditioned).get_trace(*args).log_prob_sum()


@pytest.mark.parametrize("centered", [None, 1.0])
@pytest.mark.parametrize("case", ["eight_schools", "lognormal_scales", "mvn", "plate_first"])
def test_reparam_log_density_is_exact(float64, case, centered):
    """Both reparameterizers' log density of the shared latent equals the independent
    reference (Pyro's on models whose first latent site is outside every plate: inside
    one, Pyro adds the log-det once per element of that plate). ``centered=1.0``: no
    placement, the guide's plain transform."""
    cases = dict(CASES, plate_first=(plate_first, lambda: (torch.tensor([0.5, -1.0, 2.0]),)))
    model, make_args = cases[case]
    args = make_args()
    guide = AutoPlanarFlow(model, num_flows=3, centered=centered)
    guide(*args)
    _randomize_guide(guide, seed=7)
    for i in range(3):
        eps = torch.randn(guide.latent_dim, generator=torch.Generator().manual_seed(i))
        expected = _reference_log_density(model, guide, args, eps)
        ours = _reparam_log_density(NeuTraReparam(guide), model, args, eps)
        assert torch.allclose(ours, expected, atol=1e-9, rtol=1e-10)
        if case != "plate_first":
            pyros = _reparam_log_density(PyroNeuTraReparam(guide), model, args, eps)
            assert torch.allclose(pyros, expected, atol=1e-9, rtol=1e-10)


def test_first_latent_inside_a_plate():
    """Pyro's reparameterizer makes the latent vector at the first site, here inside a
    plate: our error names the way out; this package's NeuTraReparam samples."""
    args = (torch.tensor([0.5, -1.0, 2.0]),)
    guide = AutoPlanarFlow(plate_first, num_flows=2)
    guide(*args)
    assert "theta" in guide.hierarchical_sites
    with pytest.raises(ValueError, match=r"inside a plate.*pyro_nfvi\.guides\.NeuTraReparam"):
        _run_neutra(plate_first, guide, args, warmup=2, samples=2)
    neutra = NeuTraReparam(guide.requires_grad_(False))
    mcmc = MCMC(NUTS(neutra.reparam(plate_first)), num_samples=5, warmup_steps=5,
                disable_progbar=True)
    mcmc.run(*args)
    draws = neutra.transform_sample(mcmc.get_samples()["a_shared_latent"].unsqueeze(-2))
    assert draws["theta"].shape == (5, 3) and draws["tau"].shape == (5, 1)


# ------------------------------------------------------- agreement with references
def _within_mc_error(draws, ref_mean, ref_sd, ref_mcse=None, k=4.0):
    """|mean - ref| and |sd - ref| within k standard errors (from the chain's ESS; the sd's
    standard error from the sample kurtosis)."""
    n = draws.shape[0]
    ess = effective_sample_size(draws.unsqueeze(0)).clamp_min(2.0)
    mean, sd = draws.mean(0), draws.std(0)
    se_mean = torch.sqrt(sd ** 2 / ess + (0 if ref_mcse is None else ref_mcse ** 2))
    # the sd's error: from the ESS of the squared deviations (NUTS can be antithetic in
    # the draws, ESS > n, but not in their squares), at most n
    sq = (draws - mean) ** 2
    ess_sq = effective_sample_size(sq.unsqueeze(0)).clamp(2.0, n)
    kurt = (sq ** 2).mean(0) / sd ** 4
    se_sd = sd * torch.sqrt((kurt - 1).clamp_min(0.5) / (4 * ess_sq))
    assert ((mean - ref_mean).abs() < k * se_mean).all(), (mean, ref_mean, se_mean)
    assert ((sd - ref_sd).abs() < k * se_sd).all(), (sd, ref_sd, se_sd)


def test_neutra_funnel_agrees_with_exact_moments():
    """Neal's funnel (10-D): v ~ N(0, 3) and x / e^{v/2} ~ N(0, 1) exactly."""
    guide = AutoPlanarFlow(funnel)
    fit(funnel, guide, num_steps=300, progress=False)
    mcmc, draws = _run_neutra(funnel, guide, (), warmup=100, samples=200)
    v, x = draws["v"].double(), draws["x"].double()
    ref_mean, ref_sd = torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
    ref_sd[0] = 3.0
    _within_mc_error(torch.cat([v[:, None], x / (v[:, None] / 2).exp()], -1), ref_mean, ref_sd)
    assert sum(len(d) for d in mcmc.diagnostics()["divergences"].values()) <= 3


def test_neutra_eight_schools_agrees_with_nuts_reference():
    """Centred eight schools against the long NUTS reference of the benchmark suite (4
    chains x 1000 draws on the non-centred model, ``benchmarks/references``)."""
    ref = json.loads((ROOT / "benchmarks" / "references" / "eight_schools.json").read_text())
    args = _es_data()
    guide = AutoPlanarFlow(eight_schools)
    fit(eight_schools, guide, *args, num_steps=600, num_particles=4, progress=False)
    _, draws = _run_neutra(eight_schools, guide, args, warmup=100, samples=200)
    flat = torch.cat([draws[s].reshape(200, -1) for s in ("mu", "tau", "theta")], -1).double()
    t = lambda key: torch.tensor(ref[key], dtype=torch.float64)  # noqa: E731
    _within_mc_error(flat, t("mean"), t("sd"), t("mcse_mean"))


# ------------------------------------------------------------------- the errors
def test_argument_dependent_placement_raises_our_error_with_the_way_out():
    x = torch.linspace(-1.0, 1.0, 4)
    guide = AutoPlanarFlow(covariate_model, num_flows=2)
    guide(x)
    with pytest.raises(ValueError, match=r"depends on the model's arguments \['args\[0\]'\]"
                       r".*pyro_nfvi\.guides\.NeuTraReparam"):
        guide.get_transform()
    neutra = PyroNeuTraReparam(guide.requires_grad_(False))
    with pytest.raises(ValueError, match="pyro_nfvi.guides.NeuTraReparam"):  # not Pyro's message
        MCMC(NUTS(neutra.reparam(covariate_model)), num_samples=2, warmup_steps=2,
             disable_progbar=True).run(x)
    # the way out: the same recipe with this package's NeuTraReparam and the arguments
    neutra = NeuTraReparam(guide, x)
    mcmc = MCMC(NUTS(neutra.reparam(covariate_model)), num_samples=5, warmup_steps=5,
                disable_progbar=True)
    mcmc.run(x)
    draws = neutra.transform_sample(mcmc.get_samples()["beta_shared_latent"][0])
    assert draws["theta"].shape == (4,)
    assert isinstance(guide.get_transform(x), PlacedFlowTransform)  # arguments given: fine


def test_argument_independent_data_is_fine():
    """Eight schools' data (sigma, y) enter the likelihood only: no error."""
    guide = AutoPlanarFlow(eight_schools, num_flows=2)
    guide(*_es_data())
    assert isinstance(guide.get_transform(), PlacedFlowTransform)


def test_loaded_guide_without_arguments_says_how():
    guide = AutoPlanarFlow(eight_schools, num_flows=2)
    guide(*_es_data())
    loaded = pickle.loads(pickle.dumps(guide))
    assert "_placement_args" not in loaded.__dict__  # the data are not saved with the guide
    with pytest.raises(ValueError, match="loaded from a file.*NeuTraReparam\\(guide, \\*args"):
        loaded.get_transform()
    assert isinstance(loaded.get_transform(*_es_data()), PlacedFlowTransform)


def test_no_hierarchical_sites_keeps_the_plain_composition():
    guide = AutoPlanarFlow(funnel, num_flows=2, centered=1.0)
    guide()
    t = guide.get_transform()
    assert not isinstance(t, PlacedFlowTransform)
    assert isinstance(t, torch.distributions.transforms.ComposeTransform)


def test_exported():
    assert "NeuTraReparam" in guides_mod.__all__


def test_batch_of_draws_for_a_model_that_does_not_broadcast(float64):
    """``expand([3])`` of a scale computed from a batch of ``y`` fails in one batched run:
    the transform then maps the draws one at a time, with the same result."""
    def model():
        y = pyro.sample("y", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(0.0, torch.exp(y / 2)).expand([3]).to_event(1))

    guide = AutoPlanarFlow(model, num_flows=2)
    guide()
    _randomize_guide(guide, seed=5)
    t = guide.get_transform()
    eps = torch.randn(2, 3, 4)
    u = t(eps)
    ladj = t.log_abs_det_jacobian(eps, u)
    assert u.shape == (2, 3, 4) and ladj.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(u[i, j], t(eps[i, j]), atol=1e-12)
            assert torch.allclose(ladj[i, j], t.log_abs_det_jacobian(eps[i, j], t(eps[i, j])))
    assert torch.allclose(t.inv(u), eps, atol=1e-8)


@pytest.mark.parametrize("centered", [None, 1.0])
def test_transform_sample_of_a_batch_with_plated_sites(centered):
    from pyro_nfvi.guides import NeuTraReparam as OurNeuTra

    x = torch.tensor([1.0, 3.0, -1.0, 2.0, 0.5, 1.5])

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        tau = pyro.sample("tau", dist.HalfNormal(2.0))
        with pyro.plate("g", len(x)):
            th = pyro.sample("th", dist.Normal(mu, tau))
            pyro.sample("obs", dist.Normal(th, 1.0), obs=x)

    pyro.clear_param_store()
    guide = AutoPlanarFlow(model, num_flows=2, centered=centered)
    guide(x)
    neutra = OurNeuTra(guide.requires_grad_(False), x)
    latent = torch.randn(5, guide.latent_dim)
    batch = neutra.transform_sample(latent)
    assert batch["th"].shape == (5, 6) and batch["mu"].shape == (5,)
    for i in range(5):
        one = neutra.transform_sample(latent[i])
        for name in one:
            torch.testing.assert_close(batch[name][i], one[name])
