"""Tests for pyro_nfvi.amortized: AmortizedFlow and AutoAmortizedFlow."""

import math

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import ClippedAdam

from pyro_nfvi.amortized import AmortizedFlow, AutoAmortizedFlow, ConditionalFlowPosterior
from pyro_nfvi._validation import ArgumentError
from pyro_nfvi.guides import AutoNormalizingFlow, AutoPlanarFlow
from pyro_nfvi.helpers import planar_flow
from pyro_nfvi.transforms import ConditionedPlanar, ConditionedRadial


# ----------------------------------------------------------------- AmortizedFlow
def _by_hand_log_prob(q_net, context, value):
    """log q(value | context_i) per row from single-layer conditioned transforms."""
    loc, scale, (p1, p2, p3) = q_net.params(context)
    out = torch.empty(value.shape[:-1], dtype=value.dtype)
    for i in range(context.shape[0]):
        if q_net.flow == "planar":
            layers = [ConditionedPlanar((p1[i, k], p2[i, k], p3[i, k])) for k in range(q_net.num_flows)]
        else:
            layers = [ConditionedRadial((p1[i, k], p2[i, k], p3[i, k])) for k in range(q_net.num_flows)]
        for s in range(value.shape[0]):
            y = value[s, i]
            log_det = torch.zeros((), dtype=value.dtype)
            for layer in reversed(layers):
                x = layer.inv(y)
                log_det = log_det + layer.log_abs_det_jacobian(x, y)
                y = x
            base = dist.Normal(loc[i], scale[i]).log_prob(y).sum()
            out[s, i] = base - log_det
    return out


@pytest.mark.parametrize("flow", ["planar", "radial"])
def test_log_prob_matches_composition_by_hand(flow):
    torch.manual_seed(0)
    q_net = AmortizedFlow(3, 4, num_flows=5, flow=flow, hidden_dims=[8]).double()
    context = torch.randn(6, 4, dtype=torch.float64) * 2
    value = torch.randn(2, 6, 3, dtype=torch.float64) * 1.5
    q = q_net(context)
    expected = _by_hand_log_prob(q_net, context, value)
    assert torch.allclose(q.log_prob(value), expected, atol=1e-10, rtol=0)
    # rows really differ (a broadcasting bug would give the same flow to every row)
    loc, _, params = q_net.params(context)
    assert (params[0][0] - params[0][1]).abs().max() > 1e-3
    # log_prob of a fresh sample (cached forward pass) equals that of an equal copy (inverse)
    z = q.rsample((4,))
    assert torch.allclose(q.log_prob(z), q.log_prob(z.clone()), atol=1e-9, rtol=0)


@pytest.mark.parametrize("num_flows", [0, 3])
@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 3)])
def test_shapes_follow_context(num_flows, batch_shape):
    q_net = AmortizedFlow(2, 4, num_flows=num_flows)
    q = q_net(torch.randn(batch_shape + (4,)))
    assert q.batch_shape == batch_shape and q.event_shape == (2,)
    assert q.has_rsample
    z = q.rsample((7,))
    assert z.shape == (7,) + batch_shape + (2,)
    assert q.log_prob(z).shape == (7,) + batch_shape
    z.sum().backward()
    assert all(p.grad is not None for p in q_net.parameters())


def test_zero_flows_is_gaussian_encoder_and_one_network_call():
    q_net = AmortizedFlow(3, 5, num_flows=0, init_scale=0.5)
    context = torch.randn(4, 5)
    q = q_net(context)
    assert isinstance(q, dist.Independent) and isinstance(q.base_dist, dist.Normal)
    assert ConditionalFlowPosterior is AmortizedFlow
    with torch.no_grad():
        q_net.net[-1].weight.zero_()
        q_net.net[-1].bias.zero_()
    assert torch.allclose(q_net(context).base_dist.scale, torch.tensor(0.5))
    calls = []
    q_net = AmortizedFlow(3, 5, num_flows=4, hidden_dims=[6])
    q_net.net.register_forward_hook(lambda *a: calls.append(1))
    q_net(context).rsample()
    assert len(calls) == 1  # loc, scale and all 4 layers' parameters from one call


def test_amortized_flow_in_handwritten_guide():
    encoder = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh())
    q_net = AmortizedFlow(2, 8, num_flows=4, flow="radial")

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("q", q_net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", q_net(encoder(x)))

    x = torch.randn(10, 1).expand(10, 3).contiguous()
    model_1 = lambda x: model(x[:, :1])  # noqa: E731
    svi = SVI(model_1, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(num_particles=2, vectorize_particles=True))
    losses = [svi.step(x) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)


def test_amortized_flow_errors():
    with pytest.raises(ValueError, match="num_flows must be an int >= 0"):
        AmortizedFlow(2, 3, num_flows=-1)
    with pytest.raises(ValueError, match="latent_dim"):
        AmortizedFlow(0, 3)
    with pytest.raises(ValueError, match="context_dim"):
        AmortizedFlow(2, 2.5)
    with pytest.raises(ValueError, match="flow must be one of"):
        AmortizedFlow(2, 3, flow="maf")
    with pytest.raises(ValueError, match="init_scale"):
        AmortizedFlow(2, 3, init_scale=0.0)
    with pytest.raises(ValueError, match="hidden_dims"):
        AmortizedFlow(2, 3, hidden_dims=8)
    q_net = AmortizedFlow(2, 3)
    with pytest.raises(ValueError, match=r"context must have shape \(\.\.\., 3\)"):
        q_net(torch.randn(4, 5))
    with pytest.raises(TypeError, match="context must be a torch.Tensor"):
        q_net([1.0, 2.0, 3.0])


# ------------------------------------------------------------- AutoAmortizedFlow
def _global_local_model(x, batch_size=50):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        loc = torch.cat([z, z.sum(-1, keepdim=True)], -1)
        pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x[idx])


class _Recorder(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out)
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return torch.tanh(self.lin(x))


def test_autoguide_global_and_local_with_subsampling():
    torch.manual_seed(0)
    N, true_scale = 200, 0.3
    z = torch.randn(N, 2)
    x = torch.cat([z, z.sum(-1, keepdim=True)], -1) + true_scale * torch.randn(N, 3)
    encoder = _Recorder(3, 16)
    guide = AutoAmortizedFlow(
        _global_local_model, plate="data", local_sites="z", encoder=encoder,
        data_fn=lambda x, batch_size=50: x, num_flows=2,
        # a fixed initial scale: the loss-ratio check below compares with the start
        global_guide=lambda m: AutoNormalizingFlow(m, lambda dim: planar_flow(dim, 2), init_scale=0.1),
    )
    # the encoder sees exactly the rows of the model's minibatch
    guide_tr = poutine.trace(guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(_global_local_model, trace=guide_tr)).get_trace(x)
    assert guide_tr.nodes["z"]["value"].shape == (50, 2)
    assert torch.equal(encoder.seen[-1], model_tr.nodes["x"]["value"])
    assert guide_tr.nodes["scale"]["value"].shape == ()

    svi = SVI(_global_local_model, guide, ClippedAdam({"lr": 0.01, "lrd": 0.998}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(800)]
    assert all(math.isfinite(v) for v in losses)
    # medians: a single-sample ELBO has rare large spikes that would dominate sums
    start, end = torch.tensor(losses[:25]).median(), torch.tensor(losses[-100:]).median()
    assert end < 0.85 * start
    with torch.no_grad():
        scales = torch.stack([guide(x)["scale"] for _ in range(200)])
    assert abs(scales.mean().item() - true_scale) < 0.1
    # Predictive with the guide: global and local sites
    samples = Predictive(_global_local_model, guide=guide, num_samples=3)(x)
    assert samples["z"].shape == (3, 50, 2) and samples["scale"].shape[0] == 3


def test_default_global_guide_is_planar_flow():
    x = torch.randn(30, 3)
    guide = AutoAmortizedFlow(_global_local_model, plate="data", local_sites="z",
                              encoder=torch.nn.Linear(3, 4), data_fn=lambda x, b: x)
    values = guide(x, 10)
    assert isinstance(guide.global_guide, AutoPlanarFlow)
    assert values["z"].shape == (10, 2) and values["scale"].shape == ()
    assert math.isfinite(Trace_ELBO().loss(_global_local_model, guide, x, 10))


def test_autoguide_recovers_linear_gaussian_posterior():
    """z_i ~ N(0, I_2), x_i | z_i ~ N(A z_i, s^2 I_3): the posterior is
    N(S A^T x_i / s^2, S) with S = (I + A^T A / s^2)^-1, for every i."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 2, dtype=torch.float64))
    A = q * torch.tensor([1.0, 2.0], dtype=torch.float64)  # orthogonal columns
    s = 0.8
    N = 500
    x = torch.randn(N, 2, dtype=torch.float64) @ A.T + s * torch.randn(N, 3, dtype=torch.float64)

    def model(x):
        with pyro.plate("data", x.shape[0], subsample_size=100) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ A.T, s).to_event(1), obs=x[idx])

    guide = AutoAmortizedFlow(
        model, plate="data", local_sites=["z"], encoder=torch.nn.Identity(),
        data_fn=lambda x: x, num_flows=2, init_scale=0.5,
    )
    svi = SVI(model, guide, ClippedAdam({"lr": 0.02, "lrd": 0.999}), Trace_ELBO(num_particles=8, vectorize_particles=True))
    for _ in range(2000):
        svi.step(x)

    S = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + A.T @ A / s**2)
    # held-out points from the same process (typical x, as the encoder was trained on)
    x_new = torch.randn(4, 2, dtype=torch.float64) @ A.T + s * torch.randn(4, 3, dtype=torch.float64)
    mean = x_new @ A @ S / s**2
    sd = S.diagonal().sqrt().expand_as(mean)
    with torch.no_grad():
        z = guide.posterior(x_new).sample((40000,))
    m, sdq = z.mean(0), z.std(0)
    assert ((m - mean).abs() <= 0.05 * torch.maximum(mean.abs(), sd)).all(), (m, mean)
    assert ((sdq - sd).abs() <= 0.05 * sd).all(), (sdq, sd)


def _local_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_scalar_and_constrained_local_sites():
    def model(x):
        with pyro.plate("data", x.shape[0], subsample_size=5) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            r = pyro.sample("r", dist.LogNormal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, r), obs=x[idx])

    x = torch.randn(12)
    guide = AutoAmortizedFlow(model, plate="data", local_sites=["z", "r"],
                              encoder=torch.nn.Linear(1, 4), data_fn=lambda x: x[:, None])
    tr = poutine.trace(guide).get_trace(x)
    assert tr.nodes["z"]["value"].shape == (5,) and tr.nodes["r"]["value"].shape == (5,)
    assert (tr.nodes["r"]["value"] > 0).all()
    assert guide.global_guide is None and guide.local_dim == 2
    loss = Trace_ELBO().loss(model, guide, x)
    assert math.isfinite(loss)


def test_autoguide_errors():
    x = torch.randn(10)
    enc = torch.nn.Linear(1, 3)
    data_fn = lambda x: x[:, None]  # noqa: E731

    def make(model, **kw):
        kw.setdefault("plate", "data")
        kw.setdefault("local_sites", ["z"])
        return AutoAmortizedFlow(model, encoder=enc, data_fn=data_fn, **kw)

    with pytest.raises(ValueError, match="local site 'w' is not a latent sample site"):
        make(_local_model, local_sites=["w"])(x)
    with pytest.raises(ValueError, match="local site 'x' is observed"):
        make(_local_model, local_sites=["x"])(x)
    with pytest.raises(ValueError, match="no latent site of the model is inside a plate named 'rows'"):
        make(_local_model, plate="rows")(x)

    def outside(x):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + g, 1.0), obs=x)

    with pytest.raises(ValueError, match="local site 'g' is not inside plate 'data'"):
        make(outside, local_sites=["z", "g"])(x)

    def undeclared(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + u, 1.0), obs=x)

    with pytest.raises(ValueError, match="latent site 'u' is inside plate 'data' but is not in local_sites"):
        make(undeclared)(x)

    def nested(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            with pyro.plate("feat", 2, dim=-1):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0), obs=x[:, None])

    with pytest.raises(ValueError, match=r"local site 'z' is inside plates \['data', 'feat'\]"):
        make(nested)(x)

    def discrete(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match="local site 'z' is discrete"):
        make(discrete)(x)
    with pytest.raises(ValueError, match="data_fn returned data with 7 rows in dim 0, but plate 'data' has 10 rows"):
        AutoAmortizedFlow(_local_model, plate="data", local_sites="z", encoder=enc,
                          data_fn=lambda x: x[:7, None])(x)
    with pytest.raises(ValueError, match=r"encoder must map the 10 rows of plate 'data' to features of shape \(10, C\)"):
        AutoAmortizedFlow(_local_model, plate="data", local_sites="z", encoder=torch.nn.Flatten(0),
                          data_fn=data_fn)(x)
    with pytest.raises(ValueError, match="local_sites must be a non-empty list"):
        AutoAmortizedFlow(_local_model, plate="data", local_sites=[], encoder=enc, data_fn=data_fn)
    with pytest.raises(ValueError, match="num_flows must be an int >= 0"):
        AutoAmortizedFlow(_local_model, plate="data", local_sites="z", encoder=enc, data_fn=data_fn, num_flows=-2)
    with pytest.raises(TypeError, match="encoder must be a torch.nn.Module"):
        AutoAmortizedFlow(_local_model, plate="data", local_sites="z", encoder=lambda x: x, data_fn=data_fn)
    # a failed setup is retried on the next call (after the user fixes nothing, same error)
    g = make(_local_model, local_sites=["w"])
    for _ in range(2):
        with pytest.raises(ValueError, match="local site 'w'"):
            g(x)


def test_create_plates_with_user_chosen_subsample():
    """The model picks its own minibatch (``subsample=idx``): the guide's plate comes from
    ``create_plates`` with the same indices, and the encoder sees those rows."""
    x = torch.randn(30, 3)
    idx = torch.tensor([3, 17, 5, 29])

    def model(x, idx):
        with pyro.plate("data", x.shape[0], subsample=idx):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x[idx])

    encoder = _Recorder(3, 5)
    guide = AutoAmortizedFlow(
        model, plate="data", local_sites="z", encoder=encoder, data_fn=lambda x, idx: x,
        create_plates=lambda x, idx: pyro.plate("data", x.shape[0], subsample=idx),
    )
    tr = poutine.trace(guide).get_trace(x, idx)
    assert torch.equal(encoder.seen[-1], x[idx])
    assert tr.nodes["z"]["value"].shape == (4, 2)
    assert math.isfinite(Trace_ELBO().loss(model, guide, x, idx))


@pytest.mark.parametrize("flow", ["planar", "radial", "sylvester"])
def test_zero_network_output_is_the_identity_flow(flow):
    """Each amortized layer starts at the identity when its head outputs zero: with
    planar layers' raw ``u = 0`` Pyro's constraint gives w·û = log 2 - 1 (a 31 %
    contraction per layer, -0.34 K nats of log-det at step 0 and the digits VAE's
    -ELBO - (-ln p(x)) gap growing with K); here û = 0."""
    torch.manual_seed(0)
    q = AmortizedFlow(latent_dim=5, context_dim=7, num_flows=16, flow=flow).double()
    D = 5
    with torch.no_grad():  # keep w (planar) random and non-small, zero everything else
        head = q.net[-1]
        keep = slice(2 * D + 16 + 16 * D, None) if flow == "planar" else slice(0, 0)
        w_rows = head.weight[keep].clone(), head.bias[keep].clone()
        head.weight[2 * D:].zero_()
        head.bias[2 * D:].zero_()
        head.weight[keep], head.bias[keep] = w_rows[0] * 10, w_rows[1] * 10 + 1.0
    context = torch.randn(6, 7, dtype=torch.float64)
    transform = q.get_transform(context)
    x = torch.randn(6, D, dtype=torch.float64) * 2
    y = transform(x)
    assert torch.allclose(y, x, atol=1e-12, rtol=0)
    assert torch.allclose(transform.log_abs_det_jacobian(x, y), torch.zeros(6, dtype=torch.float64), atol=1e-12)


# --------------------------------------------------------------------- head_scale
def test_head_scale_errors():
    for bad in (0.0, -0.5, float("inf"), float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="head_scale"):
            AmortizedFlow(2, 3, head_scale=bad)
    with pytest.raises(ValueError, match="head_scale"):  # before any model run
        AutoAmortizedFlow(_global_local_model, plate="data", local_sites="z",
                          encoder=torch.nn.Linear(3, 4), data_fn=lambda x: x, head_scale=0.0)


@pytest.mark.parametrize("flow", ["planar", "radial", "sylvester"])
def test_head_scale_keeps_the_initial_posterior_and_scales_the_flow_step(flow):
    """The same seed gives the same q(z|x) at step 0 whatever head_scale; one Adam step
    (about lr per weight, whatever the gradient's scale) then moves the flow parameters
    head_scale times as far, and the location exactly as far."""
    D, C, K = 3, 5, 4
    context = torch.randn(7, C, dtype=torch.float64)
    moved = {}
    for c in (1.0, 0.1):
        torch.manual_seed(0)
        q_net = AmortizedFlow(D, C, num_flows=K, flow=flow, head_scale=c).double()
        before = q_net.params(context)
        opt = torch.optim.Adam(q_net.parameters(), lr=1e-3)
        torch.manual_seed(1)
        q = q_net(context)
        loss = -(dist.Normal(1.0, 0.5).expand([D]).to_event(1).log_prob(q.rsample()) - q.log_prob(q.rsample())).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        after = q_net.params(context)
        moved[c] = (before, after)
    (b1, a1), (b01, a01) = moved[1.0], moved[0.1]
    for p1, p01 in zip(b1[2], b01[2]):  # same start
        assert torch.allclose(p1, p01, atol=1e-7, rtol=0)  # float32 init rounding
    assert torch.allclose(b1[0], b01[0], atol=1e-12)
    # the location moves the same, the flow parameters a tenth as far
    assert torch.allclose(a1[0] - b1[0], a01[0] - b01[0], atol=1e-9)
    for p_b1, p_a1, p_b01, p_a01 in zip(b1[2], a1[2], b01[2], a01[2]):
        step1, step01 = p_a1 - p_b1, p_a01 - p_b01
        assert step1.abs().max() > 1e-4
        assert torch.allclose(step01, 0.1 * step1, atol=1e-6 * step1.abs().max().item(), rtol=1e-4)


def _reloaded(num_flows, **options):
    """A posterior built with ``options``, its state dict loaded into one built with the
    defaults, and a context and value to compare their log-densities at."""
    torch.manual_seed(0)
    trained = AmortizedFlow(3, 5, num_flows=num_flows, **options)
    fresh = AmortizedFlow(3, 5, num_flows=num_flows)
    fresh.load_state_dict(trained.state_dict())
    context, value = torch.randn(6, 5), torch.randn(6, 3)
    assert torch.allclose(fresh(context).log_prob(value), trained(context).log_prob(value))
    return trained, fresh, context, value


def test_head_scale_travels_with_the_state_dict():
    trained, fresh, _, _ = _reloaded(4, head_scale=0.5)  # default head_scale 0.1
    assert fresh.head_scale.item() == 0.5
    old = {k: v for k, v in trained.state_dict().items() if k != "head_scale"}
    with pytest.raises(RuntimeError, match="head_scale"):  # a checkpoint from before the option
        fresh.load_state_dict(old)


# ------------------------------------------------------------ constrained local sites
@pytest.mark.parametrize("prior", [
    dist.Normal(0.0, 1.0),  # unconstrained: the two ELBOs agreed before too
    dist.Gamma(2.0, 2.0),
    dist.LogNormal(0.0, 1.0),
    dist.Dirichlet(torch.ones(3)),
], ids=["normal", "gamma", "lognormal", "dirichlet"])
def test_trace_mean_field_elbo_agrees_with_trace_elbo_on_local_sites(prior):
    """Both ELBOs estimate the same quantity; on the same guide draws (same seed) they are
    equal, since the KL of a local site must keep the support bijection's log-Jacobian."""
    x = torch.rand(10, 1) + 0.5

    def model(x):
        with pyro.plate("data", x.shape[0]):
            t = pyro.sample("t", prior)
            loc = t[..., 0] if prior.event_dim else t
            pyro.sample("x", dist.Normal(loc, 0.5), obs=x[:, 0])

    torch.manual_seed(0)
    guide = AutoAmortizedFlow(model, plate="data", local_sites=["t"], encoder=torch.nn.Linear(1, 4),
                              data_fn=lambda x: x, num_flows=2)
    guide(x)
    losses = []
    for elbo in (Trace_ELBO, TraceMeanField_ELBO):
        pyro.set_rng_seed(1)
        with torch.no_grad():
            losses.append(elbo(num_particles=20, vectorize_particles=True).loss(model, guide, x))
    assert math.isfinite(losses[0])
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)


def test_local_site_whose_bijection_changes_rank():
    """A 3 x 3 correlation Cholesky factor per row is 3 unconstrained numbers, not 3 x 3."""
    torch.manual_seed(0)
    x = torch.randn(6, 3)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            L = pyro.sample("L", dist.LKJCholesky(3, 1.0))
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(3), scale_tril=L), obs=x)

    guide = AutoAmortizedFlow(model, plate="data", local_sites="L", encoder=torch.nn.Linear(3, 4),
                              data_fn=lambda x: x, num_flows=2)
    assert guide(x)["L"].shape == (6, 3, 3)
    assert guide.local_dim == 3 and guide._local_shapes["L"] == (3,)
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    losses = [svi.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    tr = poutine.trace(guide).get_trace(x)
    assert tr.nodes["L"]["value"].shape == (6, 3, 3)


# ------------------------------------------------------------------------ init_scale
def test_init_scale_travels_with_the_state_dict():
    trained, fresh, context, value = _reloaded(2, init_scale=0.1)  # default init_scale 1.0
    assert fresh.init_scale == pytest.approx(0.1)
    assert torch.allclose(fresh.params(context)[1], trained.params(context)[1])
    # a checkpoint from before the shift was stored loads with the module's own shift
    old = {k: v for k, v in trained.state_dict().items() if "shift" not in k}
    fresh = AmortizedFlow(3, 5, num_flows=2, init_scale=0.1)
    fresh.load_state_dict(old)
    assert torch.allclose(fresh(context).log_prob(value), trained(context).log_prob(value))


def test_init_scale_extremes():
    zero = torch.zeros(1, 3)
    for s in (1e-30, 1e-3, 50.0, 710.0, 1e30):  # 710: math.expm1 overflows
        q_net = AmortizedFlow(2, 3, num_flows=0, init_scale=s)
        q_net.net[-1].weight.data.zero_()
        q_net.net[-1].bias.data.zero_()
        scale = q_net.params(zero)[1].detach()
        assert torch.allclose(scale, torch.full((1, 2), s), rtol=1e-5, atol=0)
    # the scale must be a normal float32: 0 or inf would make log_prob -inf/nan
    for s in (1e-50, 1e39):
        with pytest.raises(ArgumentError, match="init_scale"):
            AmortizedFlow(2, 3, init_scale=s)
        with pytest.raises(ArgumentError, match="init_scale"):  # before any model run
            AutoAmortizedFlow(_local_model, plate="data", local_sites="z",
                              encoder=torch.nn.Linear(1, 2), data_fn=lambda x: x[:, None],
                              init_scale=s)


# --------------------------------------------------------------- side effects, stl
def test_setup_probes_the_encoder_in_eval_mode():
    """One guide call runs the encoder once in training mode (on the model's minibatch):
    sizing the head must not update a BatchNorm's running statistics too."""
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    enc = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.1))
    enc[2].eval()  # a submodule the user put in eval mode stays so
    guide = AutoAmortizedFlow(_global_local_model, plate="data", local_sites="z", encoder=enc,
                              data_fn=lambda x, batch_size: x, num_flows=1)
    guide(x, batch_size=4)
    assert enc[1].num_batches_tracked.item() == 1
    assert enc.training and enc[1].training and not enc[2].training


def test_constructor_leaves_the_random_stream_alone():
    encoder = torch.nn.Linear(1, 2)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    AutoAmortizedFlow(_local_model, plate="data", local_sites="z", encoder=encoder,
                      data_fn=lambda x: x[:, None], num_flows=4, hidden_dims=[8])
    assert torch.equal(torch.rand(3), expected)


def test_stl_must_be_bool():
    for bad in ("no", 1, None):
        with pytest.raises(ArgumentError, match="stl"):
            AmortizedFlow(2, 3, stl=bad)
    assert AmortizedFlow(2, 3, stl=True).stl is True
