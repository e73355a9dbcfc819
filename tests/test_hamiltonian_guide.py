"""AutoHamiltonianFlow: K = 0 is its base guide; its ELBO is the auxiliary bound computed
independently on a conjugate Gaussian model; it beats its base there; errors."""

import copy
import io
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Predictive, Trace_ELBO

from _helpers import assert_checkpoint_restores
from pyro_nfvi.diagnostics import evaluate_guide
from pyro_nfvi.guides import AutoNormalizingFlow, AutoPlanarFlow
from pyro_nfvi.guides import AutoHamiltonianFlow
from pyro_nfvi.importance import importance_sample
from pyro_nfvi.infer import default_optim, fit

TAU, SIG, N = 2.0, 0.5, 10


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    A = torch.stack([torch.ones(N), 1 + 0.3 * torch.randn(N, generator=g)], -1).to(dtype)
    y = A @ torch.tensor([1.0, -0.5], dtype=dtype) + SIG * torch.randn(N, generator=g).to(dtype)
    return A, y


def _model(A):
    def model(y):
        z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=y.dtype), TAU).to_event(1))
        with pyro.plate("data", N):
            # z: (2,) or (particles, 1, 2) -> loc (N,) or (particles, N)
            pyro.sample("y", dist.Normal((z @ A.T).reshape(z.shape[:-2] + (N,)), SIG), obs=y)
    return model


def _log_joint(z, A, y):
    """log p(z, y) of the conjugate model, by hand (batched over z's leading dims)."""
    prior = dist.Normal(0.0, TAU).log_prob(z).sum(-1)
    return prior + dist.Normal(z @ A.T, SIG).log_prob(y).sum(-1)


def _grad_U(z, A, y):
    return z / TAU**2 - (y - z @ A.T) @ A / SIG**2


def _log_Z(A, y):
    cov = TAU**2 * A @ A.T + SIG**2 * torch.eye(N, dtype=y.dtype)
    return float(dist.MultivariateNormal(torch.zeros(N, dtype=y.dtype), cov).log_prob(y))


def _model_with_constraints():
    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("groups", 3):
            theta = pyro.sample("theta", dist.Normal(loc, scale))
        with pyro.plate("data", x.shape[-1]):
            pyro.sample("x", dist.Normal(theta.unsqueeze(-1), 1.0).to_event(0), obs=x)
    return model


def test_zero_steps_is_the_base_guide():
    model = _model_with_constraints()
    x = torch.randn(3, 4)
    base = AutoPlanarFlow(model, num_flows=3)
    guide = AutoHamiltonianFlow(model, num_steps=0, base=base)
    guide(x)
    for particles in (False, True):
        traces = []
        for g in (guide, base):
            pyro.set_rng_seed(7)
            with poutine.trace() as tr:
                if particles:
                    with pyro.plate("particles", 5, dim=-3):
                        g(x)
                else:
                    g(x)
            traces.append(tr.trace)
        t_h, t_b = traces
        for name in ("loc", "scale", "theta"):
            assert torch.equal(t_h.nodes[name]["value"], t_b.nodes[name]["value"])
        assert torch.allclose(t_h.log_prob_sum(), t_b.log_prob_sum(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_force", [None, 10.0, 0.5])
def test_elbo_is_the_auxiliary_bound(float64, max_force):
    """Trace_ELBO's estimate from the guide equals the auxiliary bound computed by hand
    from the same draws (x0, ω0): leapfrog with the closed-form ∇U of the conjugate model
    (bounded elementwise by max_force·√M when set), Caterini et al.'s tempering schedule,
    log q0 through the base flow's inverse."""
    A, y = _data(torch.float64)
    model = _model(A)
    K = 3
    guide = AutoHamiltonianFlow(model, num_steps=K, base=AutoPlanarFlow(model, num_flows=2),
                                max_force=max_force)
    guide(y)
    h = guide.hamiltonian
    with torch.no_grad():  # non-trivial parameters
        h.step_logit.copy_(torch.randn(h.step_logit.shape))
        h.log_mass.add_(0.3 * torch.randn(2))
        h.beta0_logit.fill_(-0.7)
    S = 64
    pyro.set_rng_seed(3)
    loss = Trace_ELBO(num_particles=S, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, y)
    pyro.set_rng_seed(3)
    with poutine.trace() as tr, pyro.plate("particles", S, dim=-2):
        guide(y)
    x0 = tr.trace.nodes["_AutoHamiltonianFlow_x0"]["value"].reshape(S, 2)
    w0 = tr.trace.nodes["_AutoHamiltonianFlow_momentum0"]["value"].reshape(S, 2)
    with torch.no_grad():
        eps = (1.0 * torch.sigmoid(h.step_logit))
        M = h.log_mass.exp()
        b0 = torch.sigmoid(h.beta0_logit)
        k = torch.arange(K + 1, dtype=torch.float64)
        beta = ((1 - b0 ** -0.5) * k**2 / K**2 + b0 ** -0.5) ** -2
        def force(z):
            g = _grad_U(z, A, y)
            if max_force is None:
                return g
            c = max_force * M.sqrt()
            return c * torch.tanh(g / c)

        z, w = x0.clone(), w0.clone()
        for j in range(K):
            w = w - 0.5 * eps[j] * force(z)
            z = z + eps[j] * w / M
            w = w - 0.5 * eps[j] * force(z)
            w = w * (beta[j] / beta[j + 1]).sqrt()
        log_q0 = guide.base.get_posterior(y).log_prob(x0.clone())  # through the inverse
        bound = (_log_joint(z, A, y) + dist.Normal(0.0, M.sqrt()).log_prob(w).sum(-1)
                 - log_q0 - dist.Normal(0.0, (M / b0).sqrt()).log_prob(w0).sum(-1)
                 + math.log(b0) * 2 / 2)  # (D/2) log β0 with D = 2
    zK = tr.trace.nodes["z"]["value"].reshape(S, 2)
    assert torch.allclose(zK, z, atol=1e-10)
    assert abs(-loss - float(bound.mean())) < 1e-8


def test_log_density_handles_constraints_and_plates(float64):
    """The potential is the log joint in the base guide's coordinates (support bijections'
    log-dets included), checked by hand on a model with a positive site and plates."""
    x = torch.randn(3, 4)
    model = _model_with_constraints()
    guide = AutoHamiltonianFlow(model, num_steps=2, base=AutoPlanarFlow(model, num_flows=2, centered=1.0))
    guide(x)
    u = torch.randn(6, 5)  # [loc, log scale, theta(3)], a batch of 6 points
    lp = guide.log_density(u.unsqueeze(-2), x)
    loc, log_scale, theta = u[:, 0], u[:, 1], u[:, 2:]
    ref = (dist.Normal(0.0, 5.0).log_prob(loc) + dist.LogNormal(0.0, 1.0).log_prob(log_scale.exp())
           + log_scale + dist.Normal(loc[:, None], log_scale.exp()[:, None]).log_prob(theta).sum(-1)
           + dist.Normal(theta[..., None], 1.0).log_prob(x).sum((-1, -2)))
    assert abs(float(lp) - float(ref.sum())) < 1e-9


def test_tighter_than_its_base_after_training():
    """Same mean-field Gaussian base, same training (300 steps, 4 particles, lr 0.03 ->
    0.003): the base ends at the analytic mean-field gap -½ log(1 - ρ²) (ρ ≈ -0.94), and
    the auxiliary bound of K = 4 leapfrog steps is clearly closer to log Z."""
    A, y = _data()
    model = _model(A)
    log_Z = _log_Z(A, y)
    C = torch.linalg.inv(torch.eye(2) / TAU**2 + A.T @ A / SIG**2)
    rho2 = float(C[0, 1] ** 2 / (C[0, 0] * C[1, 1]))
    mean_field_gap = -0.5 * math.log(1 - rho2)
    gaps = {}
    for K in (0, 4):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        base = AutoNormalizingFlow(model, lambda dim: [], full_rank=False)  # diagonal Gaussian
        guide = base if K == 0 else AutoHamiltonianFlow(model, num_steps=K, base=base)
        fit(model, guide, y, num_steps=300, num_particles=4, progress=False,
            optim=default_optim(300, 0.03, 0.003))
        pyro.set_rng_seed(1)
        d = evaluate_guide(model, guide, y, num_samples=2000)
        gaps[K] = (log_Z - d["elbo"], d["elbo_se"])
    assert abs(gaps[0][0] - mean_field_gap) < 0.1, (gaps, mean_field_gap)
    assert 0 < gaps[4][0] < gaps[0][0] - 0.08, gaps


def test_importance_sample_and_predictive():
    A, y = _data()
    model = _model(A)
    guide = AutoHamiltonianFlow(model, num_steps=2, base=AutoPlanarFlow(model, num_flows=2))
    fit(model, guide, y, num_steps=100, num_particles=4, progress=False)
    post = importance_sample(model, guide, y, num_samples=500)
    # the exact posterior mean of z1 + z2 (well identified by the data)
    prec = torch.eye(2) / TAU**2 + A.T @ A / SIG**2
    mean = torch.linalg.solve(prec, A.T @ y / SIG**2)
    s = post.mean("z").sum()
    assert abs(float(s - mean.sum())) < 0.1
    out = Predictive(model, guide=guide, num_samples=6)(y)
    assert out["z"].shape[0] == 6 and out["y"].shape == (6, N)


def test_discrete_latent_is_refused_by_name():
    def model():
        k = pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample("z", dist.Normal(k, 1.0))

    with pytest.raises(ValueError, match="discrete latent site 'k'"):
        AutoHamiltonianFlow(model, num_steps=2)()

    def enum_model():
        k = pyro.sample("k", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        pyro.sample("z", dist.Normal(k, 1.0))

    with pytest.raises(ValueError, match="discrete latent site 'k'"):
        AutoHamiltonianFlow(enum_model, num_steps=2)()


def test_non_finite_gradient_names_step_and_site():
    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("f", -torch.exp(20 * z))

    guide = AutoHamiltonianFlow(model, num_steps=3)
    guide()
    with torch.no_grad():
        guide.hamiltonian.log_mass.fill_(-30.0)  # tiny mass: z shoots off, exp overflows
    with pytest.raises(FloatingPointError, match=r"leapfrog step \d \(of 3\) at site 'z'"):
        guide()


def test_bad_arguments():
    model = _model_with_constraints()
    with pytest.raises(ValueError, match="num_steps"):
        AutoHamiltonianFlow(model, num_steps=-1)
    with pytest.raises(TypeError, match="base"):
        AutoHamiltonianFlow(model, base=lambda x: None)


def test_median_of_a_model_with_a_data_plate():
    """The draws' plate goes left of the model's plates, observed sites' included (the
    prototype trace has only latent sites: the draws' plate used to collide with "data",
    a shape error at "obs"); the user's random stream is not consumed by finding them."""

    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(loc, scale), obs=x)

    x = torch.randn(20) + 1.0
    guide = AutoHamiltonianFlow(model)
    guide(x)
    med = guide.median(x, num_samples=200)
    assert med["loc"].shape == () and med["scale"].shape == ()
    assert torch.isfinite(med["loc"]) and med["scale"] > 0


def test_median_is_reproducible_and_leaves_the_random_stream():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1))

    guide = AutoHamiltonianFlow(model, num_steps=2)
    guide()
    state = torch.get_rng_state()
    a = guide.median()
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(guide.median()["x"], a["x"], rtol=0, atol=0)


@pytest.mark.parametrize("first", ["call", "median"])
def test_param_store_checkpoint_restores_the_guide(tmp_path, first):
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("g", len(x)):
            pyro.sample("obs", dist.Normal(mu, s), obs=x)

    x = torch.tensor([1.0, 3.0, -1.0, 2.0, 0.5])
    pyro.set_rng_seed(0)
    assert_checkpoint_restores(lambda m: AutoHamiltonianFlow(m, num_steps=2), model, (x,),
                               lambda g: fit(model, g, x, num_steps=100, progress=False),
                               tmp_path / "store.pt", first)


# ------------------------------------------------------------------ saving and copying
def hierarchical_model(x):
    """Top level: pickled by reference with the guide (hierarchical and constrained sites:
    the base guide re-runs the model to place them, the potential is the log joint)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfNormal(2.0))
    with pyro.plate("g", len(x)):
        th = pyro.sample("th", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(th, 1.0), obs=x)


X_SAVE = torch.tensor([1.0, 2.0, -1.0, 0.5])


def _trained_guide(steps=3):
    guide = AutoHamiltonianFlow(hierarchical_model, num_steps=2,
                                base=AutoPlanarFlow(hierarchical_model, num_flows=2))
    svi = SVI(hierarchical_model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(steps):
        svi.step(X_SAVE)
    return guide, svi


def _assert_same_guide(guide, other):
    """Same medians, and the same draws from the same seed; the inner base guide is the
    copy's own, a whole guide again (not a part of a master, which has no plates)."""
    assert other.base is not guide.base and other.hamiltonian is not guide.hamiltonian
    assert other.base.master is None
    expected, got = guide.median(X_SAVE, num_samples=50), other.median(X_SAVE, num_samples=50)
    assert set(got) == set(expected) == {"mu", "tau", "th"}
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    draws = []
    for g in (guide, other):
        pyro.set_rng_seed(11)
        draws.append(g(X_SAVE))
    for name in draws[0]:
        assert torch.equal(draws[0][name], draws[1][name]), name


def _keeps_training(guide, svi=None):
    svi = svi or SVI(hierarchical_model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    before = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    for _ in range(2):
        assert math.isfinite(svi.step(X_SAVE))
    after = guide.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("hamiltonian.") for k in moved), moved
    assert any(k.startswith("base.") for k in moved), moved


def test_deepcopy_keeps_the_original_and_the_copy_working():
    """copy.deepcopy used to drop the model from the live guide (Pyro's
    AutoGuide.__getstate__): the original's next svi.step and the copy's median() raised
    TypeError 'NoneType' object is not subscriptable."""
    guide, svi = _trained_guide()
    dup = copy.deepcopy(guide)
    assert dup.model is hierarchical_model and guide.model is hierarchical_model
    _assert_same_guide(guide, dup)
    _keeps_training(guide, svi)  # the original, with its SVI
    pyro.clear_param_store()  # the copy, in a fresh session
    _keeps_training(dup)


def test_torch_save_and_load_round_trip():
    """torch.save used to break the live guide as deepcopy did, and the loaded guide raised
    AttributeError 'plates' (its base guide made a part of it on loading)."""
    guide, svi = _trained_guide()
    f = io.BytesIO()
    torch.save(guide, f)
    f.seek(0)
    loaded = torch.load(f, weights_only=False)
    _assert_same_guide(guide, loaded)
    _keeps_training(guide, svi)  # the original keeps training after being saved
    pyro.clear_param_store()  # a fresh session: the loaded guide's own parameters
    out = Predictive(hierarchical_model, guide=loaded, num_samples=3)(X_SAVE)
    assert out["obs"].shape == (3, len(X_SAVE))
    _keeps_training(loaded)


def test_loaded_guide_without_its_model_says_how_to_reattach_it():
    def model(x):  # a closure: pickle cannot keep it by reference
        hierarchical_model(x)

    guide = AutoHamiltonianFlow(model, num_steps=1)
    guide(X_SAVE)
    f = io.BytesIO()
    torch.save(guide, f)
    f.seek(0)
    loaded = torch.load(f, weights_only=False)
    guide(X_SAVE)  # the live guide keeps its model
    with pytest.raises(RuntimeError, match=r"guide\.model = model"):
        loaded(X_SAVE)
    loaded.model = model  # re-attached to the guide and its base guide
    assert set(loaded(X_SAVE)) == {"mu", "tau", "th"}


# ------------------------------------------------------------------------------- JIT
def _constrained_model(x):
    sig = pyro.sample("sig", dist.LogNormal(0.0, 1.0))
    with pyro.plate("d", x.shape[0]):
        pyro.sample("obs", dist.Normal(0.0, sig), obs=x)


@pytest.mark.parametrize("jit_elbo", [JitTrace_ELBO, JitTraceMeanField_ELBO])
def test_jit_elbo_with_a_constrained_site_raises_a_clear_error(jit_elbo):
    """torch.jit's tracer cannot record the backward pass of exp (the LogNormal site's
    support bijection) that the leapfrog gradient runs inside the trace: the first step
    used to raise torch's "Cannot insert a Tensor that requires grad as a constant"."""
    x = torch.tensor([1.0, 2.0, 0.0, 1.5, 0.7])
    guide = AutoHamiltonianFlow(_constrained_model, num_steps=2)
    svi = SVI(_constrained_model, guide, pyro.optim.Adam({"lr": 0.01}),
              jit_elbo(ignore_jit_warnings=True))
    with pytest.raises(RuntimeError, match=r"AutoHamiltonianFlow cannot be traced by torch\.jit"
                                           r"(.|\n)*Use Trace_ELBO"):
        svi.step(x)
    # the guide is left usable with Trace_ELBO
    svi = SVI(_constrained_model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    assert math.isfinite(svi.step(x))


def test_jit_elbo_with_unconstrained_sites_matches_trace_elbo():
    """Where the tracer can record the leapfrog gradients (unconstrained sites), the JIT
    loss and gradients are Trace_ELBO's, draw for draw."""
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        nu = pyro.sample("nu", dist.Normal(0.0, 5.0))
        with pyro.plate("d", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu + nu * x, 1.0), obs=x)

    x = torch.tensor([1.0, 2.0, 0.0, 1.5, 0.7])
    guide = AutoHamiltonianFlow(model, num_steps=2, base=AutoPlanarFlow(model, num_flows=1))
    guide(x)
    params = list(guide.parameters())
    jit = JitTrace_ELBO(ignore_jit_warnings=True)
    jit.loss_and_grads(model, guide, x)  # traces
    results = []
    for elbo in (jit, Trace_ELBO()):
        for p in params:
            p.grad = None
        pyro.set_rng_seed(3)
        loss = elbo.loss_and_grads(model, guide, x)
        results.append((loss, [p.grad.clone() for p in params]))
    (loss_jit, grads_jit), (loss, grads) = results
    assert abs(loss_jit - loss) < 1e-4 * max(1.0, abs(loss))
    for a, b in zip(grads_jit, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_quantiles_and_median_of_the_hamiltonian_guide():
    """quantiles() as the other flow guides' (marginal, monotone, reproducible); median()
    a point of each support (a simplex median sums to one)."""
    def model():
        w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(w[..., 0] + s, 1.0), obs=torch.tensor(0.5))

    pyro.clear_param_store()
    guide = AutoHamiltonianFlow(model, num_steps=2)
    guide()
    state = torch.get_rng_state()
    q = guide.quantiles([0.1, 0.5, 0.9], num_samples=200)
    assert q["w"].shape == (3, 3) and q["s"].shape == (3,)
    assert (q["s"][0] < q["s"][1]).all() and (q["s"][1] < q["s"][2]).all()
    assert torch.equal(q["s"], guide.quantiles([0.1, 0.5, 0.9], num_samples=200)["s"])
    med = guide.median(num_samples=200)
    assert torch.allclose(med["w"].sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(med["s"], q["s"][1])
    assert torch.equal(torch.get_rng_state(), state)
