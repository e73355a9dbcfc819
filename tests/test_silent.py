"""Regression tests for issue 13: no silent wrong answers.

Each test names the item of the issue it covers.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_nfvi.infer import fit
from _helpers import randomize_


# --- item 1: fit() checks loss and gradients before the optimiser step ---------------------

def _nan_model_and_guide():
    # the data decide the failure (tensors, so that JitTrace_ELBO sees them too):
    # obs = inf gives an infinite loss; g = 1 gives a finite loss with a NaN gradient
    def model(obs, g):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=obs)
        # sqrt(1 - g) in value; for g = 1 the gradient is inf * 0 = NaN
        pyro.factor("f", torch.sqrt(g * (z - z) + (1 - g)))

    def guide(obs, g):
        loc = pyro.param("loc", torch.tensor(0.3))
        scale = pyro.param("scale", torch.tensor(0.5), constraint=dist.constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale))

    good = (torch.tensor(1.0), torch.tensor(0.0))
    bad = {"loss": (torch.tensor(float("inf")), torch.tensor(0.0)),
           "grad": (torch.tensor(1.0), torch.tensor(1.0))}
    return model, guide, good, bad


@pytest.mark.parametrize("mode", ["loss", "grad"])
@pytest.mark.parametrize(
    "make_loss, make_optim",
    [
        (Trace_ELBO, lambda: pyro.optim.Adam({"lr": 0.05})),
        (TraceMeanField_ELBO, lambda: pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})),
        (lambda: JitTrace_ELBO(ignore_jit_warnings=True), lambda: pyro.optim.SGD({"lr": 0.01})),
        (lambda: Trace_ELBO(num_particles=3, vectorize_particles=True),
         lambda: pyro.optim.Adam({"lr": 0.05})),
    ],
)
def test_fit_nan_leaves_guide_at_last_good_step(mode, make_loss, make_optim):
    model, guide, good, bad = _nan_model_and_guide()
    loss, optim = make_loss(), make_optim()
    fit(model, guide, *good, num_steps=3, optim=optim, loss=loss, progress=False)
    store = pyro.get_param_store()
    before = {k: v.detach().clone() for k, v in store.items()}
    with pytest.raises(FloatingPointError) as err:
        fit(model, guide, *bad[mode], num_steps=5, optim=optim, loss=loss, progress=False)
    msg = str(err.value)
    assert "step 0" in msg and "last good step" in msg
    if mode == "grad":
        assert "'loc'" in msg  # names the parameter whose gradient is not finite
    for k, v in store.items():
        assert torch.equal(v.detach(), before[k]), k
    # resumable: no NaN anywhere, and no stale gradient accumulated
    losses = fit(model, guide, *good, num_steps=3, optim=optim, loss=loss, progress=False)
    assert all(math.isfinite(v) for v in losses)
    for k, v in store.items():
        assert torch.isfinite(v).all() and not torch.equal(v.detach(), before[k]), k


# --- item 2: second derivatives through the fused stacks and the inverses ---------------

def _fd_hessian(fn, x, eps=1e-5):
    """Central differences of the autograd gradient (an independent reference)."""
    def grad(v):
        v = v.detach().clone().requires_grad_()
        return torch.autograd.grad(fn(v), v)[0]
    rows = [(grad(x + eps * e) - grad(x - eps * e)) / (2 * eps) for e in torch.eye(x.numel(), dtype=x.dtype)]
    return torch.stack(rows).reshape(x.shape + x.shape)


@pytest.mark.parametrize("kind", ["planar", "radial"])
def test_hessian_through_fused_stack(kind):
    from pyro_nfvi.transforms import StackedPlanar, StackedRadial

    torch.manual_seed(0)
    flow = (StackedPlanar if kind == "planar" else StackedRadial)(2, 4).double()
    x = torch.randn(3, 2, dtype=torch.float64)

    def ladj(v):
        return flow.call_and_ladj(v)[1].sum()

    def y_sum(v):
        return (flow.call_and_ladj(v)[0] ** 2).sum()

    for fn in (ladj, y_sum):
        H = torch.autograd.functional.hessian(fn, x)
        ref = torch.func.hessian(fn)(x)  # torch.func runs the plain autograd loop
        assert H.abs().max() > 1e-3
        assert torch.allclose(H, ref, atol=1e-10, rtol=1e-8)
    # mixed second derivative d²/dθ dx (a gradient penalty trains θ through dL/dx)
    g = torch.autograd.grad(ladj(x.requires_grad_()), x, create_graph=True)[0]
    (pen,) = torch.autograd.grad((g ** 2).sum(), flow.theta)

    def penalty(theta):  # first derivatives only: a finite-difference reference
        with torch.no_grad():
            flow.theta.copy_(theta)
        v = x.detach().requires_grad_()
        return (torch.autograd.grad(ladj(v), v)[0] ** 2).sum()

    theta0, eps = flow.theta.detach().clone(), 1e-6
    ref = torch.zeros_like(theta0)
    for i in range(theta0.numel()):
        e = torch.zeros_like(theta0).view(-1)
        e[i] = eps
        e = e.view_as(theta0)
        ref.view(-1)[i] = (penalty(theta0 + e) - penalty(theta0 - e)) / (2 * eps)
    assert pen.abs().max() > 1e-3
    assert torch.allclose(pen, ref, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", ["planar", "radial"])
def test_hessian_of_guide_posterior_log_prob(kind):
    from pyro_nfvi.guides import AutoPlanarFlow, AutoRadialFlow

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))

    cls = AutoPlanarFlow if kind == "planar" else AutoRadialFlow
    guide = cls(model, num_flows=4)
    guide()
    with torch.no_grad():  # move the flow away from the identity
        for p in guide.parameters():
            p.add_(0.5 * torch.randn_like(p))
    post = guide.get_posterior()
    z = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda v: post.log_prob(v), z)
    ref = _fd_hessian(lambda v: post.log_prob(v), z)
    assert torch.allclose(H, H.T, atol=1e-8)
    assert torch.allclose(H, ref, atol=1e-6, rtol=1e-5), (H, ref)


def test_hessian_through_planar_inverse():
    from pyro_nfvi.transforms import Planar

    torch.manual_seed(1)
    flow = Planar(3).double()
    with torch.no_grad():
        flow.u.mul_(4.0)
    y = torch.randn(3, dtype=torch.float64)
    H = torch.autograd.functional.hessian(lambda v: flow.inv(v).pow(3).sum(), y)
    ref = _fd_hessian(lambda v: flow.inv(v).pow(3).sum(), y)
    assert torch.allclose(H, ref, atol=1e-7, rtol=1e-6)


# --- item 4: a traced planar inverse is right for other inputs -----------------------------

@pytest.mark.filterwarnings("ignore")
def test_traced_planar_inverse_generalises():
    from pyro_nfvi.transforms import Planar, StackedPlanar

    flow = Planar(3).double().requires_grad_(False)
    with torch.no_grad():  # w·û ≈ 44: far inputs need many iterations, y = 0 needs one
        flow.w.copy_(torch.tensor([1.0, 0.5, 0.0]))
        flow.u.copy_(torch.tensor([40.0, 20.0, 3.0]))
        flow.bias.zero_()
    traced = torch.jit.trace(lambda y: flow.inv(y), (torch.zeros(5, 3, dtype=torch.float64),),
                             check_trace=False)
    y2 = 30 * torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(flow(traced(y2)), y2, atol=1e-10)
    # float32 and a stack: same fixed-count solve
    stack = StackedPlanar(2, 4).requires_grad_(False)
    with torch.no_grad():
        stack.theta.mul_(4.0)
    traced = torch.jit.trace(lambda y: stack.inv(y), (torch.zeros(2, 2),), check_trace=False)
    y2 = 10 * torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(stack(traced(y2)), y2, atol=1e-4, rtol=1e-5)


# --- item 4: JitTrace_ELBO with a flow inside the model ------------------------------------

def _flow_factories():
    from pyro_nfvi.transforms import Planar, Radial, StackedPlanar, StackedRadial

    return {
        "planar": lambda: Planar(2),
        "stacked_planar": lambda: StackedPlanar(2, 3),
        "radial": lambda: Radial(2),
        "stacked_radial": lambda: StackedRadial(2, 3),
    }


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["planar", "stacked_planar", "radial", "stacked_radial"])
def test_jit_trace_elbo_with_flow_in_model(kind):
    """An observed site whose distribution is a flow: maximum likelihood of the flow's
    parameters. JitTrace_ELBO must give the same losses and updates as Trace_ELBO."""
    make = _flow_factories()[kind]
    data = torch.randn(20, 2, generator=torch.Generator().manual_seed(0)) * 1.5 + 1.0
    runs = {}
    for name, elbo in (("eager", Trace_ELBO()), ("jit", JitTrace_ELBO(ignore_jit_warnings=True))):
        pyro.clear_param_store()
        torch.manual_seed(3)
        flow = make()

        def model(data):
            pyro.module("flow", flow)
            base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
            with pyro.plate("n", len(data)):
                pyro.sample("x", dist.TransformedDistribution(base, [flow]), obs=data)

        def guide(data):
            pass

        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
        runs[name] = [svi.step(data) for _ in range(4)]
    assert runs["eager"][-1] < runs["eager"][0]
    assert runs["jit"] == pytest.approx(runs["eager"], rel=1e-5, abs=1e-4)


# --- item 3: integer/bool input promoted, complex input rejected ---------------------------

def _all_flows(dtype=torch.float64):
    from pyro.nn import DenseNN

    from pyro_nfvi.transforms import (
        ConditionalPlanar, ConditionalRadial, ConditionalStackedPlanar, ConditionalStackedRadial,
    )

    torch.manual_seed(0)
    flows = {k: f().to(dtype) for k, f in _flow_factories().items()}
    ctx = torch.randn(3, 4, dtype=dtype)
    flows["cond_planar"] = ConditionalPlanar(DenseNN(4, [8], param_dims=[1, 2, 2]).to(dtype)).condition(ctx)
    flows["cond_radial"] = ConditionalRadial(DenseNN(4, [8], param_dims=[2, 1, 1]).to(dtype)).condition(ctx)
    flows["cond_stacked_planar"] = ConditionalStackedPlanar(
        DenseNN(4, [8], param_dims=[3, 6, 6]).to(dtype), input_dim=2).condition(ctx)
    flows["cond_stacked_radial"] = ConditionalStackedRadial(
        DenseNN(4, [8], param_dims=[6, 3, 3]).to(dtype), input_dim=2).condition(ctx)
    return flows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integer_and_bool_inputs_are_promoted(dtype):
    ints = torch.tensor([[1, 2], [-3, 0], [4, -1]])
    bools = torch.tensor([[True, False], [False, False], [True, True]])
    for name, flow in _all_flows(dtype).items():
        for data in (ints, bools):
            ref = data.to(dtype)
            for out, expected in (
                (flow(data), flow(ref)),
                (flow.inv(data), flow.inv(ref)),
                (flow.log_abs_det_jacobian(data, flow(ref)), flow.log_abs_det_jacobian(ref, flow(ref))),
            ):
                assert out.dtype == dtype, name
                assert torch.allclose(out, expected), name
            if hasattr(flow, "call_and_ladj"):
                y, ladj = flow.call_and_ladj(data)
                assert y.dtype == dtype and torch.allclose(y, flow(ref)), name


def test_log_prob_of_integer_data():
    from pyro_nfvi.transforms import Planar, StackedRadial

    torch.manual_seed(0)
    for flow in (Planar(3), StackedRadial(3, 2)):
        q = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [flow])
        data = torch.tensor([[1, 2, 3], [0, -1, 2]])
        assert torch.allclose(q.log_prob(data), q.log_prob(data.float()))


def test_complex_input_is_a_type_error():
    z = torch.tensor([[1.0 + 1j, 2.0 - 1j]])
    for name, flow in _all_flows().items():
        with pytest.raises(TypeError, match=r"\bx\b.*complex"):
            flow(z)
        with pytest.raises(TypeError, match=r"\by\b.*complex"):
            flow.inv(z)


# --- item 6: radial precision, scale-safe norm, caches, context shapes ---------------------

@pytest.mark.parametrize("stacked", [False, True])
def test_radial_float32_tiny_alpha_log_prob(stacked):
    from pyro_nfvi.transforms import Radial, StackedRadial

    make = (lambda: StackedRadial(3, 2)) if stacked else (lambda: Radial(3))
    f32 = make()
    with torch.no_grad():
        f32.alpha_prime.fill_(math.log(math.expm1(2e-9)))  # alpha = 2e-9
        f32.beta_prime.fill_(0.5)
        f32.x0.copy_(torch.tensor([0.3, -0.2, 0.1]))
    f64 = make().double()
    f64.load_state_dict({k: v.double() for k, v in f32.state_dict().items()})
    q32 = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [f32])
    q64 = dist.TransformedDistribution(
        dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1), [f64])
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0.3, -0.2, 0.1]) + torch.logspace(-9, 0, 200)[:, None] * torch.randn(200, 3, generator=g)
    err = (q32.log_prob(y).double() - q64.log_prob(y.double())).abs().max()
    assert err < 1e-3


@pytest.mark.parametrize("kind", ["radial", "stacked_radial"])
def test_radial_huge_inputs_float32(kind):
    torch.manual_seed(0)
    flow = _flow_factories()[kind]()
    x = torch.tensor([[3e19, 1e19], [1e30, -2e30], [0.5, -1.0]], requires_grad=True)
    y, ladj = flow.call_and_ladj(x)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    assert ladj[:2].abs().max() < 1e-3  # far from the centre the map is a translation
    (y.sum() + ladj.sum()).backward()
    assert torch.isfinite(x.grad).all()
    xi = flow.inv(y.detach())
    assert torch.isfinite(xi).all() and torch.allclose(xi, x.detach(), rtol=1e-5)


@pytest.mark.parametrize("kind", ["planar", "stacked_planar", "radial", "stacked_radial"])
@pytest.mark.parametrize("change", ["data_add_", "data_assign", "optimizer"])
def test_caches_follow_parameter_changes(kind, change):
    torch.manual_seed(0)
    flow = _flow_factories()[kind]().double()
    x = torch.randn(5, 2, dtype=torch.float64)
    y = flow(x)
    assert flow.inv(y) is x  # the cache answers while nothing changed
    p = next(iter(flow.parameters()))
    if change == "data_add_":
        p.data.add_(0.3)
    elif change == "data_assign":
        p.data = p.data + 0.3
    else:
        with torch.no_grad():
            p.add_(0.3)
    fresh = _flow_factories()[kind]().double()
    fresh.load_state_dict(flow.state_dict())
    assert torch.allclose(flow(x), fresh.call_and_ladj(x)[0])
    assert torch.allclose(flow.inv(y), fresh.inv(y.clone()))
    y2 = flow(x)
    assert torch.allclose(flow.log_abs_det_jacobian(x, y2), fresh.call_and_ladj(x)[1])


@pytest.mark.parametrize("kind", ["planar", "stacked_planar", "radial", "stacked_radial"])
def test_caches_follow_in_place_changes_of_samples(kind):
    torch.manual_seed(0)
    flow = _flow_factories()[kind]().double().requires_grad_(False)
    x = torch.randn(5, 2, dtype=torch.float64)
    y = flow(x)
    y.mul_(2.0)  # the sample changed in place: inv(y) must invert the new values
    assert torch.allclose(flow(flow.inv(y)), y)
    x2 = torch.randn(5, 2, dtype=torch.float64)
    y2 = flow(x2)
    x2.add_(1.0)
    assert torch.allclose(flow(x2), flow.call_and_ladj(x2.clone())[0])
    assert torch.allclose(flow.log_abs_det_jacobian(x2, y2), flow.call_and_ladj(x2.clone())[1])


def _cache_probe_flows():
    from pyro_nfvi import helpers

    flows = {k: f() for k, f in _flow_factories().items()}
    flows["sylvester"] = helpers.sylvester(2)
    flows["stacked_sylvester"] = helpers.sylvester_flow(2, 3)
    for f in flows.values():
        randomize_(f.double(), 0.8, seed=1)
    return flows


def _log_prob_grads(flow, data):
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(2, dtype=data.dtype), 1.0).to_event(1), [flow])
    params = list(flow.parameters())
    return torch.autograd.grad(q.log_prob(data).sum(), params)


@pytest.mark.parametrize("kind", list(_cache_probe_flows()))
@pytest.mark.parametrize("first", ["no_grad", "backward"])
def test_cached_inverse_of_data_keeps_gradients(kind, first):
    """log_prob(data) twice at the same parameters (a validation pass under no_grad, then
    a training step; or two backward passes) gives the gradients of fresh data: the
    cache never hands out an inverse without a graph, or one whose graph a backward may
    have freed."""
    flow = _cache_probe_flows()[kind]
    data = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5
    ref = _log_prob_grads(flow, data.clone())
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(2, dtype=data.dtype), 1.0).to_event(1), [flow])
    if first == "no_grad":
        with torch.no_grad():
            q.log_prob(data)
    else:
        q.log_prob(data).sum().backward()
    got = _log_prob_grads(flow, data)
    assert all(torch.allclose(g, r, atol=1e-10) for g, r in zip(got, ref))
    assert max(r.abs().max() for r in ref) > 1e-2  # the check has something to compare


@pytest.mark.parametrize("kind", list(_cache_probe_flows()))
def test_sample_without_grad_then_log_prob_with_grad(kind):
    """q.sample() runs without a graph; a later log_prob of that sample with gradients on
    (forward KL, score-function estimators) differentiates through the inverse, as for a
    fresh copy of the sample (torch's identity cache would return the graph-less pair)."""
    flow = _cache_probe_flows()[kind]
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1), [flow])
    torch.manual_seed(0)
    y = q.sample((6,))
    got = _log_prob_grads(flow, y)  # first: the sample's pair is still the cached one
    ref = _log_prob_grads(flow, y.clone())
    assert all(torch.allclose(g, r, atol=1e-10) for g, r in zip(got, ref))


@pytest.mark.parametrize("kind", list(_cache_probe_flows()))
def test_cache_still_spares_the_inverse_where_it_is_safe(kind):
    """rsample then log_prob (one graph), and a repeated log_prob without gradients, use
    the cached pair: no inverse is computed."""
    flow = _cache_probe_flows()[kind]
    calls = []
    inverse = flow._inverse
    flow._inverse = lambda y: calls.append(1) or inverse(y)
    if hasattr(flow, "inverse_and_ladj"):
        inverse_and_ladj = flow.inverse_and_ladj
        flow.inverse_and_ladj = lambda y: calls.append(1) or inverse_and_ladj(y)
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1), [flow])
    y = q.rsample((4,))
    q.log_prob(y).sum().backward()
    assert calls == []
    data = torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        q.log_prob(data)
        q.log_prob(data)
    assert calls == [1]


def test_context_batch_mismatch_is_a_value_error():
    flows = _all_flows()  # contexts of batch shape (3,)
    for name in ("cond_planar", "cond_radial", "cond_stacked_planar", "cond_stacked_radial"):
        flow = flows[name]
        for call in (flow, flow.inv, lambda v: flow.call_and_ladj(v)):
            with pytest.raises(ValueError, match=r"\(7, 2\).*\(3,\)"):
                call(torch.randn(7, 2, dtype=torch.float64))
        assert flow(torch.randn(3, 2, dtype=torch.float64)).shape == (3, 2)
        assert flow(torch.randn(4, 3, 2, dtype=torch.float64)).shape == (4, 3, 2)


# --- item 9 (transform part): orientation sign, torch.jit.trace_module ---------------------

@pytest.mark.filterwarnings("ignore")
def test_trace_module_holding_flows():
    flows = _all_flows(torch.float32)
    for name, flow in flows.items():
        assert flow.sign == 1 and flow.inv.sign == 1, name

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = flows["stacked_planar"].requires_grad_(False)
            self.b = flows["radial"].requires_grad_(False)
            self.c = flows["planar"].requires_grad_(False)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    m = Holder()
    x = torch.randn(4, 2)
    traced = torch.jit.trace_module(m, {"forward": x})
    x2 = torch.randn(6, 2)
    assert torch.allclose(traced(x2), m(x2), atol=1e-5)


# --- item 10: the large-D planar kernel path (products on torch threads) -------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", [1, 5])
def test_fused_planar_large_d_gradients_match_plain_loop(dtype, N):
    from pyro_nfvi.transforms import StackedPlanar, _fused
    from pyro_nfvi.transforms.planar import stacked_planar_packed

    D = 2 * _fused._PLANAR_BASIS_MIN_D  # the basis-product path
    torch.manual_seed(0)
    flow = StackedPlanar(D, 6).to(dtype)
    with torch.no_grad():
        flow.theta.mul_(2.0)
        flow.theta[2, D : 2 * D] = 0.0  # a layer with w = 0 (the eps² floor branch)
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    gy = torch.randn(N, D, dtype=dtype)

    def grads(fn):
        y, ladj = fn(x, flow.theta)
        return torch.autograd.grad((y * gy).sum() + (3 * ladj).sum(), (x, flow.theta))

    fused = grads(_fused.planar_stack_kernel)
    _fused._PLAIN_DEPTH += 1  # force the plain autograd loop
    try:
        plain = grads(stacked_planar_packed)
    finally:
        _fused._PLAIN_DEPTH -= 1
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, **tol)
