"""Smoke and correctness tests of the posterior benchmark suite (benchmarks/suite_models.py,
benchmarks/make_references.py, benchmarks/posterior_suite.py): every model takes an SVI step
with every guide, the stored references load with the expected shapes and agree with what is
known exactly, the non-centred NUTS models have the same prior as the centred ones, and the
summary columns are right on an exactly known guide."""

import json
import math
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.poutine.util import site_is_subsample

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import make_references as mr  # noqa: E402
import posterior_suite as ps  # noqa: E402
from suite_models import MODELS  # noqa: E402

FALLBACK = {"num_steps": 3, "lr": 0.01, "lr_end": 0.001, "num_particles": 1, "clip_norm": 10.0,
            "use_fit_defaults": False}


def _dim(spec):
    ref = mr.load_reference(spec.name)
    return len(ref["mean"])


@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_guide_takes_an_svi_step(model_name):
    spec = MODELS[model_name]
    for guide_name, make_guide in ps.GUIDES.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = make_guide(spec.model)
        svi = SVI(spec.model, guide, ps.make_optim(FALLBACK), ps.make_loss(FALLBACK))
        loss = svi.step(*spec.args)
        assert math.isfinite(loss), (model_name, guide_name)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_reference_files(model_name):
    spec = MODELS[model_name]
    ref = mr.load_reference(model_name, draws=True)
    shapes = ref["site_shapes"]
    assert ref["latent_sites"] == list(spec.latent_sites)
    D = sum(math.prod(shapes[s]) for s in spec.latent_sites)
    assert len(ref["coords"]) == D
    for key in ("mean", "sd", "ess", "r_hat", "mcse_mean"):
        assert ref[key].shape == (D,), key
    assert ref["quantiles"].shape == (len(mr.Q_LEVELS), D)
    assert torch.all(ref["quantiles"][1:] >= ref["quantiles"][:-1])  # quantiles are ordered
    assert torch.all(ref["sd"] > 0)
    assert ref["draws"].shape[1] == D and 500 <= ref["draws"].shape[0] <= mr.NUM_STORED_DRAWS
    assert torch.isfinite(ref["draws"]).all()
    # converged: r_hat near 1 (NUTS chains agree); the Monte-Carlo error of the means is small
    # (stored: 0.014-0.017 sd for eight schools / logistic, 0.04-0.05 for stoch_vol /
    # hier_scales, 0.072 for the horseshoe, whose NUTS run is the costliest)
    assert float(ref["r_hat"].max()) < 1.05
    assert float((ref["mcse_mean"] / ref["sd"]).max()) < 0.08
    # the median of the stored thinned draws agrees with the stored median
    med = ref["draws"].median(0).values
    assert torch.all((med - ref["quantiles"][2]).abs() < 0.25 * ref["sd"])
    # a guide's flattened draws have the reference's coordinates
    pyro.clear_param_store()
    guide = ps.GUIDES["AutoNormal"](spec.model)
    draws = ps.guide_draws(spec.model, guide, spec.args, spec.latent_sites, 8)
    assert draws["z"].shape == (8, D) and draws["log_w"].shape == (8,)


def test_exact_references_match_closed_forms():
    normal_q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(mr.Q_LEVELS, dtype=torch.float64))
    funnel = mr.load_reference("funnel")
    assert funnel["log_Z"] == 0.0
    assert torch.allclose(funnel["quantiles"][:, 0], 3.0 * normal_q, atol=0.05)  # v ~ N(0, 3)
    assert funnel["sd"][1] == pytest.approx(math.exp(9 / 4))
    banana = mr.load_reference("banana")
    assert torch.allclose(banana["quantiles"][:, 0], 10.0 * normal_q, atol=0.15)  # x1 ~ N(0, 10)
    # x2 = b (100 - x1^2) + e: its largest quantile is below b * 100 + a few
    assert float(banana["quantiles"][-1, 1]) < 0.1 * 100 + 3


def _prior_draws(spec, n):
    sites = list(spec.latent_sites)
    a = Predictive(spec.model, num_samples=n, parallel=True, return_sites=sites)(*spec.args)
    b = Predictive(spec.nuts_model, num_samples=n, parallel=True, return_sites=sites)(*spec.args)
    return a, b


@pytest.mark.parametrize("model_name", [n for n, s in MODELS.items() if s.nuts_model is not None])
def test_noncentred_nuts_model_has_the_same_prior(model_name):
    spec = MODELS[model_name]
    n = 4000
    pyro.set_rng_seed(1)
    # prior draws of mu ~ Cauchy(0, 10) in stoch_vol can underflow exp(h/2) to 0 at the
    # observed site; only the latent sites matter here
    with pyro.validation_enabled(False):
        a, b = _prior_draws(spec, n)
    za = mr.flatten_sites(a, spec.latent_sites, n)
    zb = mr.flatten_sites(b, spec.latent_sites, n)
    qs = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    qa, qb = torch.quantile(za, qs, dim=0), torch.quantile(zb, qs, dim=0)
    iqr = (qa[2] - qa[0]).clamp(min=1e-3)
    # quantiles of 4000 draws differ by a few percent of the IQR; a wrong map differs by more
    assert float(((qa - qb).abs() / iqr).max()) < 0.15, model_name


class _ExactBanana:
    """A guide that samples the banana exactly (log w = 0 for every draw)."""

    def __call__(self, b=0.1):
        x1 = pyro.sample("x1", dist.Normal(0.0, 10.0))
        pyro.sample("x2", dist.Normal(b * (100.0 - x1**2), 1.0))


def test_metrics_of_an_exact_guide():
    spec = MODELS["banana"]
    ref = mr.load_reference("banana")
    pyro.set_rng_seed(0)
    draws = ps.guide_draws(spec.model, _ExactBanana(), spec.args, spec.latent_sites, 4000)
    m = ps.metrics(draws["log_w"], draws["z"], ref)
    assert abs(m["elbo"]) < 1e-4 and abs(m["iwae"]) < 1e-4  # log Z = 0
    assert m["mean_err"] < 0.08 and m["sd_err"] < 0.15
    # a guide that is too narrow in x2 shows up in the sd error and the ELBO
    narrow = draws["z"].clone()
    narrow[:, 1] = narrow[:, 1] * 0.5
    assert ps.metrics(draws["log_w"], narrow, ref)["sd_err"] > 0.4


def test_resolve_settings(monkeypatch):
    import pyro_nfvi

    monkeypatch.delattr(pyro_nfvi.infer, "FIT_DEFAULTS", raising=False)
    for key in ("NUM_STEPS", "LR", "LR_END", "NUM_PARTICLES", "CLIP_NORM"):
        monkeypatch.delattr(pyro_nfvi.infer, "DEFAULT_" + key, raising=False)
    s = ps.resolve_settings({"num_steps": 7})
    assert s["num_steps"] == 7 and s["sources"]["num_steps"] == "flag"
    assert s["lr"] > 0 and s["lr_end"] > 0 and s["num_particles"] >= 1
    monkeypatch.setattr(pyro_nfvi.infer, "FIT_DEFAULTS",
                        {"lr": 0.02, "lr_end": 0.002, "num_particles": 4, "clip_norm": 5.0}, raising=False)
    s = ps.resolve_settings({"num_steps": 7})
    assert (s["lr"], s["num_particles"], s["use_fit_defaults"]) == (0.02, 4, True)
    s = ps.resolve_settings({"lr": 0.05})
    assert s["lr"] == 0.05 and not s["use_fit_defaults"]


@pytest.mark.parametrize("model_name", list(MODELS))
def test_vectorised_particles_match_single_particles(model_name):
    # the suite trains and scores with vectorised particles: the models' plates must line up
    # with the particle dimension, so each particle's vectorised log joint equals the
    # unvectorised model's log joint at that particle's values
    spec = MODELS[model_name]
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = ps.GUIDES["AutoNormal"](spec.model)
    with torch.no_grad():
        proto = pyro.poutine.trace(spec.model).get_trace(*spec.args)
        num = 3
        _, mtr, _ = ps.vectorized_importance_weights(
            spec.model, guide, *spec.args, num_samples=num,
            max_plate_nesting=ps._max_plate_nesting(spec.model, spec.args))
        mtr.compute_log_prob()
        latents = [n for n, site in proto.nodes.items()
                   if site["type"] == "sample" and not site["is_observed"]
                   and not site_is_subsample(site)]
        vectorised = sum(site["log_prob"].reshape(num, -1).sum(-1) for site in mtr.nodes.values()
                         if site["type"] == "sample" and not site_is_subsample(site))
        for i in range(num):
            values = {n: mtr.nodes[n]["value"][i].reshape(proto.nodes[n]["value"].shape) for n in latents}
            single = pyro.poutine.trace(pyro.poutine.condition(spec.model, data=values)).get_trace(*spec.args)
            assert float(vectorised[i]) == pytest.approx(float(single.log_prob_sum()), rel=1e-5, abs=1e-3)


def test_lever_variants_build_and_step():
    import suite_levers

    spec = MODELS["eight_schools"]
    for name, make_guide in suite_levers.VARIANTS.items():
        pyro.clear_param_store()
        guide = make_guide(spec.model)
        svi = SVI(spec.model, guide, ps.make_optim(FALLBACK), ps.make_loss(FALLBACK))
        assert math.isfinite(svi.step(*spec.args)), name


def test_runner_quick(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert ps.main(["--quick", "--steps", "5", "--eval-samples", "100", "--models", "eight_schools",
                    "--guides", "AutoNormal", "AutoPlanarFlow", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 2 and all("error" not in r for r in res["rows"])
    for a in res["summary"]:
        for c in ps.COLUMNS:
            assert math.isfinite(a[c]), (a["guide"], c)
    table = capsys.readouterr().out
    assert "| eight_schools | AutoPlanarFlow |" in table
    with pytest.raises(ValueError, match="unknown guides"):
        ps.main(["--guides", "NoSuchGuide"])


def _first_losses_on_stochastic_volatility(make_guide, seed, num_steps):
    # the suite's training settings (ClippedAdam 0.01, 8 vectorised particles)
    spec = MODELS["stoch_vol"]
    settings = dict(FALLBACK, num_steps=1000, num_particles=8)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(spec.model)
    svi = SVI(spec.model, guide, ps.make_optim(settings), ps.make_loss(settings))
    return [svi.step(*spec.args) for _ in range(num_steps)]


@pytest.mark.parametrize("seed", [0, 1])
def test_sylvester_guide_survives_its_first_steps_on_stochastic_volatility(seed):
    # The placed AR(1) series makes the first losses huge (1e3-1e5). Adam's first steps move
    # every raw entry of the 16 layers' 53 x 53 triangles by ~lr at once; with off-diagonals
    # equal to the raw values, seed 0 ran to a loss of 1e24 and NaN by step 5. Scaled by
    # 1/sqrt(M), one step changes a row by ~lr sqrt(M), and training recovers.
    from pyro_nfvi.guides import AutoSylvesterFlow

    losses = _first_losses_on_stochastic_volatility(AutoSylvesterFlow, seed, 30)
    assert all(math.isfinite(v) for v in losses), losses
    assert min(losses[-10:]) < 1e4, losses


@pytest.mark.parametrize("seed", [0, 1])
def test_hamiltonian_guide_survives_its_first_steps_on_stochastic_volatility(seed):
    # the first draws sit where the log joint's gradient is ~1e4: an unbounded leapfrog kick
    # moved phi out of (-1, 1) (an invalid AR(1) scale_tril raised at step 0 on both seeds)
    import pyro_nfvi

    losses = _first_losses_on_stochastic_volatility(
        lambda model: pyro_nfvi.AutoHamiltonianFlow(model, num_steps=4), seed, 5)
    assert all(math.isfinite(v) for v in losses), losses
