import doctest
from functools import partial

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as pyro_T
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormalizingFlow as PyroAutoNormalizingFlow

import pyro_nfvi
from _helpers import assert_stack_matches_composition, randomize_
from pyro_nfvi import helpers
from pyro_nfvi.testing import check_transform
from pyro_nfvi.transforms.planar import planar_log_det, planar_u_hat
from pyro_nfvi.transforms._math import PLANAR_U_SHIFT
from pyro_nfvi.transforms import (
    ConditionedPlanar,
    ConditionedRadial,
    ConditionedStackedPlanar,
    ConditionedStackedRadial,
    Planar,
    Radial,
    StackedPlanar,
    StackedRadial,
)

DIMS = [1, 2, 5, 10]

UNCONDITIONAL = {
    "planar": helpers.planar,
    "radial": helpers.radial,
    "planar_flow": partial(helpers.planar_flow, num_flows=4),
    "radial_flow": partial(helpers.radial_flow, num_flows=4),
}
CONDITIONAL = {
    "conditional_planar": helpers.conditional_planar,
    "conditional_radial": helpers.conditional_radial,
    "conditional_planar_flow": partial(helpers.conditional_planar_flow, num_flows=3),
    "conditional_radial_flow": partial(helpers.conditional_radial_flow, num_flows=3),
}


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("name", list(UNCONDITIONAL))
@pytest.mark.parametrize("scale", [None, 1.0, 3.0])
def test_check_transform_unconditional(name, D, scale):
    t = UNCONDITIONAL[name](D)
    if scale is not None:
        randomize_(t, scale, seed=D)
    errs = check_transform(t, D)
    assert errs["logdet_err"] < 1e-10 and errs["inverse_err"] < 1e-10


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("name", list(CONDITIONAL))
def test_check_transform_conditional(name, D):
    torch.manual_seed(D)
    t = CONDITIONAL[name](D, 3, hidden_dims=[8])
    # non-tiny hypernetwork outputs that differ per context row
    randomize_(t, 1.0, seed=D)
    context = torch.randn(4, 3)
    errs = check_transform(t, D, context=context)
    assert errs["logdet_err"] < 1e-10 and errs["inverse_err"] < 1e-10
    # a single (unbatched) context broadcasts over every input batch shape
    check_transform(t, D, context=torch.randn(3), batch_shapes=[(), (5,)])


@pytest.mark.parametrize("name", list(UNCONDITIONAL))
def test_check_transform_float32(name):
    t = randomize_(UNCONDITIONAL[name](3), 1.0)
    errs = check_transform(t, 3, dtype=torch.float32)
    assert errs["inverse_err"] < 1e-4


def test_check_transform_catches_a_wrong_log_det():
    class Broken(ConditionedPlanar):
        def call_and_ladj(self, x):
            y, ladj = super().call_and_ladj(x)
            return y, ladj * 1.001

    t = Broken((torch.tensor([0.3]), torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0])))
    with pytest.raises(AssertionError, match="slogdet"):
        check_transform(t, 2)


def _planar_with(wu, D=3, dtype=torch.float64, seed=0):
    """A planar layer with q = 1 + w.u_hat = softplus(wu) exactly and ||w|| ~ 1.5."""
    gen = torch.Generator().manual_seed(seed)
    t = Planar(D).to(dtype)
    w = torch.randn(D, generator=gen, dtype=dtype)
    w = 1.5 * w / w.norm()
    v = torch.randn(D, generator=gen, dtype=dtype)
    v = v - (v @ w) / (w @ w) * w  # orthogonal part, random size
    with torch.no_grad():
        t.w.copy_(w)
        # the constraint reads softplus(w.u + c), c = PLANAR_U_SHIFT: shift so that it
        # sees wu, i.e. q = 1 + w.u_hat = softplus(wu)
        t.u.copy_(v + (wu - PLANAR_U_SHIFT) / (w @ w) * w)
        t.bias.fill_(0.7)
    return t


@pytest.mark.parametrize("wu", [-50.0, -5.0, -1.0, -0.2, 0.0, 2.0, 10.0, 10.99])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_planar_round_trip_large_inputs(wu, dtype, tol):
    """_inverse(_call(x)) == x, cache bypassed, for |x| up to 100, w.u_hat in (-1, 10]."""
    t = _planar_with(wu, dtype=dtype)
    _, q = planar_u_hat(t.u.detach(), t.w.detach())  # q = 1 + w.u_hat, exact
    assert 0 < float(q) <= 11
    torch.manual_seed(1)
    x = (torch.rand(2000, 3, dtype=torch.float64) * 2 - 1).to(dtype) * 100
    with torch.no_grad():
        x_back = t._inverse(t._call(x))
    err = (x_back - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1)
    # Conditioning: the layer contracts direction w by f'(a) = t^2 + q (1 - t^2), so a
    # stored (rounded) y pins x down only to ~eps / f'(a). In float32 that bites where
    # q << 1 and a ~ 0; there the bound scales with 1 / f'(a).
    a = (x.double() @ t.w.detach().double() + float(t.bias.detach())).unsqueeze(-1)
    slope = planar_log_det(torch.tanh(a), q.double()).exp().squeeze(-1)
    bound = torch.where(slope > 0.1, torch.full_like(slope, tol), tol * 0.1 / slope)
    assert (err.double() <= bound).all(), float((err.double() / bound).max())
    if dtype == torch.float64 or wu >= -1:
        assert err.max() < tol


def test_radial_round_trip_large_inputs():
    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-5)]:
        t = randomize_(Radial(3), 3.0, seed=5).to(dtype)
        x = (torch.rand(2000, 3, dtype=torch.float64) * 2 - 1).to(dtype) * 100
        x_back = t._inverse(t._call(x))
        assert ((x_back - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1)).max() < tol


@pytest.mark.parametrize("cls", ["planar", "radial"])
def test_same_map_as_pyro_builtin(cls):
    """Independent reference: Pyro's own layer with the same parameters."""
    D = 4
    ours = randomize_(UNCONDITIONAL[cls](D), 1.5, seed=3).double()
    theirs = (pyro_T.Planar(D) if cls == "planar" else pyro_T.Radial(D)).double()
    theirs.load_state_dict(ours.state_dict())
    if cls == "planar":  # ours reads softplus(w.u + c): Pyro's u is ours + c w / |w|^2
        with torch.no_grad():
            theirs.u.add_(PLANAR_U_SHIFT * ours.w / (ours.w @ ours.w))
    x = torch.randn(50, D, dtype=torch.float64) * 3
    y_ours, y_theirs = ours(x), theirs(x)
    assert torch.allclose(y_ours, y_theirs, atol=1e-12)
    assert torch.allclose(
        ours.log_abs_det_jacobian(x, y_ours), theirs.log_abs_det_jacobian(x, y_theirs), atol=1e-10
    )


@pytest.mark.parametrize("kind", ["planar", "radial"])
def test_log_prob_of_never_sampled_data(kind):
    flow = UNCONDITIONAL[kind](2)
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    data = torch.tensor([[0.3, -2.0], [4.0, 1.0]])
    lp = q.log_prob(data)
    assert lp.shape == (2,) and torch.isfinite(lp).all()
    # change of variables by hand: log N(f^-1(y)) - log|det J(f^-1(y))|
    x = flow._inverse(data)
    expected = dist.Normal(0.0, 1.0).log_prob(x).sum(-1) - flow.call_and_ladj(x)[1]
    assert torch.allclose(lp, expected, atol=1e-6)
    # Pyro's built-in cannot do this (pyro#2718)
    builtin = dist.TransformedDistribution(
        dist.Normal(torch.zeros(2), 1.0).to_event(1), [pyro_T.Planar(2)]
    )
    with pytest.raises(KeyError):
        builtin.log_prob(data)


@pytest.mark.parametrize(
    "conditioned, names",
    [
        (ConditionedStackedPlanar, ["bias", "u", "w"]),
        (ConditionedStackedRadial, ["x0", "alpha_prime", "beta_prime"]),
    ],
)
def test_gradcheck_log_prob_through_inverse(conditioned, names):
    """Maximum likelihood needs d log q(data) / d params through the inverse."""
    gen = torch.Generator().manual_seed(2)
    shapes = {"bias": (2, 1), "u": (2, 2), "w": (2, 2), "x0": (2, 2), "alpha_prime": (2, 1), "beta_prime": (2, 1)}
    params = tuple(
        torch.randn(shapes[n], generator=gen, dtype=torch.float64).requires_grad_() for n in names
    )
    data = torch.randn(6, 2, generator=gen, dtype=torch.float64) * 2

    def nll(*ps):
        t = conditioned(ps)
        x = t._inverse(data)
        return -(dist.Normal(0.0, 1.0).log_prob(x).sum(-1) - t.call_and_ladj(x)[1]).sum()

    assert torch.autograd.gradcheck(nll, params)
    y = data.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda y: conditioned(params)._inverse(y), (y,))


@pytest.mark.parametrize("kind", ["planar", "radial"])
def test_maximum_likelihood_training(kind):
    """Forward KL on data: a flow learns a skewed 2-D density, beating the base."""
    torch.manual_seed(0)
    n = 500
    z1 = torch.randn(n)
    data = torch.stack([z1, 0.5 * torch.randn(n) + 0.8 * z1**2 - 1], -1)
    flow = UNCONDITIONAL[kind + "_flow"](2)
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [flow])
    nll0 = -q.log_prob(data).mean().item()
    opt = torch.optim.Adam(flow.parameters(), lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        loss = -q.log_prob(data).mean()  # same tensor every step: caches must notice
        loss.backward()
        opt.step()
    nll = -q.log_prob(data).mean().item()
    # the best Gaussian fit has NLL = 0.5 log det(2 pi e Sigma)
    cov = torch.cov(data.T)
    gauss_nll = 0.5 * torch.logdet(2 * torch.pi * torch.e * cov).item()
    assert nll < nll0 - 0.3
    assert nll < gauss_nll


@pytest.mark.parametrize("K", [1, 5])
def test_stack_equals_composition_of_single_layers(K):
    torch.manual_seed(0)
    D = 3
    for stack, single, names in [
        (StackedPlanar(D, K), Planar, ["bias", "u", "w"]),
        (StackedRadial(D, K), Radial, ["x0", "alpha_prime", "beta_prime"]),
    ]:
        stack = randomize_(stack, 1.5).double()
        layers = []
        for k in range(K):
            layer = single(D).double()
            layer.load_state_dict({n: getattr(stack, n)[k].reshape(getattr(layer, n).shape) for n in names})
            layers.append(layer)
        assert_stack_matches_composition(stack, layers, D)


def test_stack_state_dict_round_trip():
    a, b = helpers.planar_flow(2, 8), helpers.planar_flow(2, 8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 2)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", list(CONDITIONAL))
def test_conditional_rows_match_single_contexts(name):
    torch.manual_seed(0)
    D, M = 2, 3
    t = randomize_(CONDITIONAL[name](D, M, hidden_dims=[8]), 1.0)
    ctx = torch.randn(4, M)
    x = torch.randn(4, D)
    y = t.condition(ctx)(x)
    for i in range(4):
        assert torch.allclose(y[i], t.condition(ctx[i])(x[i]), atol=1e-6)
    # contexts broadcast against sample shapes: (S, 4, D) inputs with a (4, M) context
    xs = torch.randn(5, 4, D)
    ys = t.condition(ctx)(xs)
    assert ys.shape == (5, 4, D)
    assert torch.allclose(ys[2, 1], t.condition(ctx[1])(xs[2, 1]), atol=1e-6)
    # ConditionalTransformedDistribution: log_prob of arbitrary points, per-row context
    base = dist.Normal(torch.zeros(D), 1.0).to_event(1)
    cd = dist.ConditionalTransformedDistribution(base, [t])
    lp = cd.condition(ctx).log_prob(xs)
    assert lp.shape == (5, 4) and torch.isfinite(lp).all()
    lp1 = cd.condition(ctx[3]).log_prob(xs[:, 3])
    assert torch.allclose(lp[:, 3], lp1, atol=1e-5)
    assert cd.condition(ctx).sample((7, 4)).shape == (7, 4, D)


def test_conditional_training_step_after_condition():
    """A conditioned transform reads the hypernetwork lazily: it stays valid across steps."""
    t = helpers.conditional_planar(2, 3)
    ctx, x = torch.randn(10, 3), torch.randn(10, 2)
    cond = t.condition(ctx)
    opt = torch.optim.SGD(t.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        cond.call_and_ladj(x)[1].sum().backward()
        opt.step()


EDGE_CASES = {
    "planar w=0": lambda: ConditionedPlanar(
        (torch.tensor([0.5]), torch.tensor([1.0, -2.0]), torch.zeros(2, requires_grad=True))
    ),
    "planar w.u=-50": lambda: _planar_with(-50.0, D=2, dtype=torch.float32),
    "planar huge w": lambda: ConditionedPlanar(
        (torch.tensor([0.0]), torch.tensor([1.0, 1.0]), torch.tensor([1e3, -1e3]))
    ),
    # float64: the inverse's true slope alpha/s ~ 1e22 overflows float32 intermediates
    "radial beta->-alpha": lambda: ConditionedRadial(
        (torch.zeros(2).double(), torch.tensor([2.0]).double(), torch.tensor([-50.0]).double().requires_grad_())
    ),
    "radial beta->-alpha f32": lambda: ConditionedRadial(
        (torch.zeros(2), torch.tensor([2.0]), torch.tensor([-15.0], requires_grad=True))
    ),
    "radial alpha->0": lambda: ConditionedRadial(
        (torch.zeros(2), torch.tensor([-30.0]), torch.tensor([3.0]))
    ),
    "radial default": lambda: Radial(2),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("where", ["origin", "x0", "far"])
def test_no_nan_at_the_edges(case, where):
    t = EDGE_CASES[case]()
    params = t._params() if callable(t._params) else t._params
    dtype = params[1].dtype
    if where == "origin":
        x = torch.zeros(3, 2, dtype=dtype)
    elif where == "x0":
        x = (params[0] if isinstance(t, ConditionedRadial) else torch.zeros(2)).detach().expand(3, 2).clone()
    else:
        x = torch.tensor([[1e4, -1e4], [1e4, 1e4], [-1e4, 0.0]], dtype=dtype)
    x.requires_grad_()
    y, ladj = t.call_and_ladj(x)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    leaves = [x] + [p for p in (t.parameters() if isinstance(t, torch.nn.Module) else []) if p.requires_grad]
    grads = torch.autograd.grad(y.sum() + ladj.sum(), leaves, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    yi = y.detach().clone().requires_grad_()
    xi = t._inverse(yi)
    assert torch.isfinite(xi).all()
    (g,) = torch.autograd.grad(xi.sum(), [yi])
    assert torch.isfinite(g).all()


def test_planar_w_zero_is_a_translation():
    b, u = torch.tensor([0.5]), torch.tensor([1.0, -2.0])
    t = ConditionedPlanar((b, u, torch.zeros(2)))
    x = torch.randn(4, 2)
    y, ladj = t.call_and_ladj(x)
    assert torch.allclose(y, x + u * torch.tanh(b))
    assert torch.allclose(ladj, torch.zeros(4))
    assert torch.allclose(t._inverse(y), x, atol=1e-6)


def test_inside_pyro_autonormalizingflow_and_iterated():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(a, 0.5), obs=torch.tensor(0.3))
        pyro.sample("c", dist.LogNormal(0.0, 1.0))

    for make in (helpers.planar, helpers.radial):
        pyro.clear_param_store()
        guide = PyroAutoNormalizingFlow(model, partial(pyro_T.iterated, 3, make))
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        losses = [svi.step() for _ in range(30)]
        assert all(torch.isfinite(torch.tensor(losses)))
        assert guide()["c"] > 0


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: helpers.planar(0), ValueError, "input_dim"),
        (lambda: helpers.radial(-2), ValueError, "input_dim"),
        (lambda: helpers.planar(2.0), TypeError, "input_dim"),
        (lambda: helpers.planar_flow(2, 0), ValueError, "num_flows"),
        (lambda: helpers.conditional_planar(2, 0), ValueError, "context_dim"),
        (lambda: helpers.conditional_radial(2, 3, hidden_dims=[10, 0]), ValueError, "hidden_dims"),
        (lambda: helpers.conditional_planar(2, 3, hidden_dims=[10, 2.5]), ValueError, "hidden_dims"),
        (lambda: helpers.conditional_planar(2, 3, hidden_dims=10), ValueError, "hidden_dims"),
        (lambda: helpers.planar(3)(torch.zeros(4, 2)), ValueError, r"x must have shape \(\.\.\., 3\)"),
        (lambda: helpers.radial(3).inv(torch.zeros(2)), ValueError, r"y must have shape \(\.\.\., 3\)"),
        (lambda: helpers.planar_flow(2, 3)(torch.zeros(5)), ValueError, "x must have shape"),
        (lambda: helpers.conditional_radial(2, 3).condition(torch.zeros(4, 2)), ValueError, "context"),
        (lambda: helpers.conditional_planar_flow(2, 3, 4).condition(torch.zeros(5)), ValueError, r"\(\.\.\., 3\)"),
        (lambda: helpers.planar(2)([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input_fails_fast(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "module", [pyro_nfvi.helpers, pyro_nfvi.testing, pyro_nfvi.transforms.planar, pyro_nfvi.transforms.radial]
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _raw_params(kind, K, D, scale, gen):
    if kind == "planar":
        b = torch.randn(K, 1, generator=gen, dtype=torch.float64) * scale
        u = torch.randn(K, D, generator=gen, dtype=torch.float64) * scale
        w = torch.randn(K, D, generator=gen, dtype=torch.float64) * scale
        w[0] = 0.0  # edge: a translation layer
        u[1] = -50.0 * w[1] / (w[1] @ w[1])  # edge: w.u = -50
        return b, u, w
    x0 = torch.randn(K, D, generator=gen, dtype=torch.float64) * scale
    ap = torch.randn(K, 1, generator=gen, dtype=torch.float64) * scale
    bp = torch.randn(K, 1, generator=gen, dtype=torch.float64) * scale
    return x0, ap, bp


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("kind", ["planar", "radial"])
@pytest.mark.parametrize("D, N", [(1, 9), (3, 9), (3, 1), (20, 5)])
def test_fused_stack_matches_plain_autograd_path(kind, D, N, backend, monkeypatch):
    """The hand-written forward/backward (unbatched params) equals the plain loop
    (batched params), values and gradients, and passes gradcheck; on CPU it runs in
    NumPy, elsewhere in torch: both are checked."""
    from pyro_nfvi.transforms import _fused

    monkeypatch.setattr(_fused, "USE_NUMPY", backend == "numpy")
    cls = ConditionedStackedPlanar if kind == "planar" else ConditionedStackedRadial
    gen = torch.Generator().manual_seed(D)
    K = 6
    params = [p.requires_grad_() for p in _raw_params(kind, K, D, 1.5, gen)]
    x = (torch.randn(N, D, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    y_f, l_f = cls(tuple(params)).call_and_ladj(x)
    y_p, l_p = cls(tuple(p.unsqueeze(0) for p in params)).call_and_ladj(x)
    assert torch.allclose(y_f, y_p.squeeze(0), atol=1e-12)
    assert torch.allclose(l_f, l_p.squeeze(0), atol=1e-12)
    gy, gl = torch.randn_like(y_f), torch.randn_like(l_f)
    g_f = torch.autograd.grad((y_f * gy).sum() + (l_f * gl).sum(), [x] + params)
    g_p = torch.autograd.grad((y_p.squeeze(0) * gy).sum() + (l_p.squeeze(0) * gl).sum(), [x] + params)
    for a, b in zip(g_f, g_p):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)

    def f(x, *ps):
        y, ladj = cls(ps).call_and_ladj(x)
        return y, ladj

    inputs = (x.detach().clone().requires_grad_(),) + tuple(p.detach().clone().requires_grad_() for p in params)
    if kind == "planar":  # gradcheck away from the w = 0 kink of the eps-floor
        inputs[3].data[0] = 0.3
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("make", [helpers.planar_flow, helpers.radial_flow])
@pytest.mark.parametrize("N", [1, 300])
def test_fused_numpy_and_torch_kernels_agree_in_float32(make, N, monkeypatch):
    """The NumPy kernel (CPU) and the torch kernel (other devices) give the same float32
    values and gradients, for a long stack and for one row (the SVI case)."""
    from pyro_nfvi.transforms import _fused

    torch.manual_seed(N)
    flow = make(4, 32)
    x = torch.randn(N, 4) * 2
    results = []
    for use_numpy in (True, False):
        monkeypatch.setattr(_fused, "USE_NUMPY", use_numpy)
        flow.zero_grad()
        y, ladj = flow.call_and_ladj(x)
        (y.square().sum() + ladj.sum()).backward()
        results.append((y.detach(), ladj.detach(), flow.theta.grad.clone()))
    for a, b in zip(*results):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("make", [helpers.planar_flow, helpers.radial_flow])
def test_near_identity_init(make):
    flow = make(3, 16)
    x = torch.randn(100, 3) * 2
    assert (flow(x) - x).abs().max() > 0.1  # Pyro's default init is not the identity
    flow.reset_parameters(near_identity=True)
    y, ladj = flow.call_and_ladj(x)
    assert (y - x).abs().max() < 0.2 and ladj.abs().max() < 0.2
    assert torch.allclose(flow._inverse(y), x, atol=1e-4)


@pytest.mark.parametrize("make", [helpers.planar_flow, helpers.radial_flow])
def test_stacks_work_under_torch_func_and_forward_ad(make):
    """vmap/jacrev and forward-mode AD take the plain autograd loop (the hand-written
    kernel has no batching rule or jvp) and agree with reverse-mode Jacobians."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    flow = make(3, 5).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    ref = torch.stack([torch.autograd.functional.jacobian(flow, row) for row in x])
    jac = torch.func.vmap(torch.func.jacrev(flow))(x)
    assert torch.allclose(jac, ref, atol=1e-12)
    v = torch.randn_like(x)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(flow(fwAD.make_dual(x, v))).tangent
    assert torch.allclose(tangent, torch.einsum("nij,nj->ni", ref, v), atol=1e-12)


@pytest.mark.parametrize("make", [helpers.planar_flow, helpers.radial_flow])
def test_fused_backward_detects_in_place_parameter_change(make):
    """The kernel keeps views of its inputs; changing them between forward and backward
    must raise autograd's usual error, not silently use the new values."""
    flow = make(2, 4)
    y, ladj = flow.call_and_ladj(torch.randn(3, 2))
    with torch.no_grad():
        flow.theta.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        (y.sum() + ladj.sum()).backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("N", [1, 7])
def test_planar_numpy_recurrences_match_the_torch_loops(dtype, order, N):
    """The three scalar recurrences of the planar kernel in NumPy (each row holds its
    layer's own term until that layer's step, one dot per step against a unit-diagonal
    row; one row: NumPy scalars) equal the plain torch loops of the same formulas, for
    C- and F-ordered inputs (the kernel's arrays are often transposed views)."""
    import numpy as np

    from pyro_nfvi.transforms import _fused

    K = 32
    gen = torch.Generator().manual_seed(N + K)
    m = torch.randn(K, K, generator=gen, dtype=torch.float64).tril(-1) * 0.3
    a, c, s, alpha, beta, us = (torch.randn(K, N, generator=gen, dtype=torch.float64) * 1.5
                                for _ in range(6))
    s = s.abs()

    def as_np(t):
        return np.asarray(t.to(dtype).numpy(), order=order)

    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch_loops = {
        "forward": _fused._planar_recurrence(torch, a, m),
        "adjoint": _fused._planar_recurrence_grad(torch, c, s, m),
        "score": _fused._planar_score_recurrence(torch, alpha, beta, us, m),
    }
    numpy_loops = {
        "forward": _fused._planar_recurrence(np, as_np(a), as_np(m)),
        "adjoint": _fused._planar_recurrence_grad(np, as_np(c), as_np(s), as_np(m)),
        "score": _fused._planar_score_recurrence(np, as_np(alpha), as_np(beta), as_np(us), as_np(m)),
    }
    for name, ref in torch_loops.items():
        got = numpy_loops[name]
        assert got.shape == (K, N) and got.dtype == as_np(a).dtype, name
        assert torch.allclose(torch.from_numpy(got).double(), ref, rtol=tol, atol=tol), name


@pytest.mark.parametrize("K", [5, 70])
@pytest.mark.parametrize("shape", [(1, 3), (3,), (0, 3), (2, 4, 3)])
def test_fused_planar_batch_shapes_and_long_stacks(K, shape):
    """Short and long stacks, one row and many; empty and
    multi-dim batches are flattened inside the kernel. All equal the plain loop (float64)."""
    gen = torch.Generator().manual_seed(K)
    theta = torch.randn(K, 7, generator=gen, dtype=torch.float64).requires_grad_()
    x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    plain = ConditionedStackedPlanar((theta[None, :, 6:], theta[None, :, :3], theta[None, :, 3:6]))
    fused = ConditionedStackedPlanar((theta[:, 6:], theta[:, :3], theta[:, 3:6]))
    (y, ladj), (y_ref, ladj_ref) = fused.call_and_ladj(x), plain.call_and_ladj(x)
    assert y.shape == shape and ladj.shape == shape[:-1]
    assert torch.allclose(y, y_ref, atol=1e-12) and torch.allclose(ladj, ladj_ref, atol=1e-12)
    if x.numel():
        g = torch.autograd.grad(y.sum() + ladj.sum(), [x, theta])
        g_ref = torch.autograd.grad(y_ref.sum() + ladj_ref.sum(), [x, theta])
        for a, b in zip(g, g_ref):
            assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.parametrize("route", ["fused-numpy", "fused-torch"])
@pytest.mark.parametrize(
    "kind, D, N",
    [("planar", 3, 1), ("planar", 3, 7), ("planar", 256, 3), ("radial", 3, 7), ("radial", 16, 3)],
)
def test_every_kernel_route_matches_autograd(route, kind, D, N):
    """Every route of ``_fused.KERNEL_ROUTES`` (each with the layouts its thresholds pick:
    planar's basis products from D = 256, radial's views from D = 16) equals the plain
    autograd loop in value and in the gradient of x and of the packed parameters: an edit
    of the shared math that the hand-written backward does not follow fails here."""
    from pyro_nfvi.transforms import _fused
    from pyro_nfvi.transforms.planar import stacked_planar_packed
    from pyro_nfvi.transforms.radial import stacked_radial_packed

    assert set(_fused.KERNEL_ROUTES) == {"fused-numpy", "fused-torch"}  # update the parametrisation
    assert (_fused._PLANAR_BASIS_MIN_D, _fused._RADIAL_COPY_BELOW_D) == (256, 16)  # and the sizes
    gen = torch.Generator().manual_seed(D + N)
    K = 4
    P = 2 * D + 1 if kind == "planar" else D + 2
    theta = (torch.randn(K, P, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    x = (torch.randn(N, D, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    kernel = _fused.planar_stack_kernel if kind == "planar" else _fused.radial_stack_kernel
    plain = stacked_planar_packed if kind == "planar" else stacked_radial_packed
    assert _fused.stack_route(x, theta) == "fused-numpy"  # CPU float64, unbatched
    y_k, l_k = kernel(x, theta, route)
    _fused._PLAIN_DEPTH += 1  # the plain loop
    try:
        assert _fused.stack_route(x, theta) == "plain"
        y_p, l_p = plain(x, theta)
    finally:
        _fused._PLAIN_DEPTH -= 1
    assert torch.allclose(y_k, y_p, rtol=1e-12, atol=1e-12)
    assert torch.allclose(l_k, l_p, rtol=1e-12, atol=1e-12)
    gy = torch.randn(y_k.shape, generator=gen, dtype=torch.float64)
    gl = torch.randn(l_k.shape, generator=gen, dtype=torch.float64)
    g_k = torch.autograd.grad((y_k * gy).sum() + (l_k * gl).sum(), (x, theta))
    g_p = torch.autograd.grad((y_p * gy).sum() + (l_p * gl).sum(), (x, theta))
    for a, b in zip(g_k, g_p):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_stack_route_picks_plain_where_no_kernel_applies():
    from pyro_nfvi.transforms import _fused

    x, theta = torch.randn(3, 2), torch.randn(4, 5)
    assert _fused.stack_route(x, theta) == "fused-numpy"
    assert _fused.stack_route(x, theta.expand(2, 4, 5)) == "plain"  # batched parameters
    assert _fused.stack_route(x, theta[:1]) == "plain"  # one layer
    assert _fused.stack_route(x.double(), theta) == "plain"  # dtype mismatch
    assert _fused.stack_route(x.half(), theta.half()) == "fused-torch"
    with pytest.raises(ValueError, match="route"):
        _fused.planar_stack_kernel(x, theta, "plain")


def test_run_compiled_falls_back_only_when_compile_is_unavailable(monkeypatch):
    """A compile-unavailable error (here inductor's missing C++ compiler) warns once and
    runs eagerly from then on; any other error inside the compiled call propagates."""
    from pyro_nfvi._compat import compile_unavailable_errors
    from pyro_nfvi.transforms import _fused

    unavailable = [e for e in compile_unavailable_errors() if e.__name__ == "InvalidCxxCompiler"]
    assert unavailable, compile_unavailable_errors()

    def raising(err):
        def compiled(*args):
            raise err
        return lambda fn: compiled

    flow = helpers.planar_flow(2, 3, compile=True)
    x = torch.randn(5, 2)
    monkeypatch.setattr(_fused, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", raising(unavailable[0]()))
    with pytest.warns(RuntimeWarning, match="unavailable"):
        y, ladj = flow.call_and_ladj(x)
    assert flow.compile is False
    flow.compile = False
    y_ref, ladj_ref = flow.call_and_ladj(x)
    assert torch.equal(y, y_ref) and torch.equal(ladj, ladj_ref)

    flow.compile = True
    monkeypatch.setattr(_fused, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", raising(ZeroDivisionError("a bug, not a missing compiler")))
    with pytest.raises(ZeroDivisionError):
        flow.call_and_ladj(x)
    assert flow.compile is True


@pytest.mark.parametrize("w_norm", [1e-3, 1e-6, 0.0])
@pytest.mark.parametrize("D", [1, 3])
def test_planar_step_stays_bounded_as_w_goes_to_zero(w_norm, D):
    """With R&M's constraint (c = 0), u_hat -> (log 2 - 1) w / |w|^2 as w -> 0: a 1-D
    guide whose w crossed zero moved its draws by 1e3 (u = 0.31, w = 2.4e-4 gave a shift
    of -155 and a global scale of 1e-7). Here the step y - x stays within 1.4 |u|,
    forward and inverse agree, and the fused stack matches the single layer."""
    gen = torch.Generator().manual_seed(D)
    u = torch.randn(D, generator=gen, dtype=torch.float64) * 0.3
    w_dir = torch.randn(D, generator=gen, dtype=torch.float64)
    w = w_norm * w_dir / w_dir.norm()
    bias = torch.tensor([0.8], dtype=torch.float64)
    layer = ConditionedPlanar((bias, u, w))
    x = torch.randn(200, D, generator=gen, dtype=torch.float64) * 3
    y, ladj = layer.call_and_ladj(x)
    assert (y - x).norm(dim=-1).max() <= 1.4 * u.norm() + 1e-12
    assert torch.isfinite(ladj).all() and ladj.abs().max() < 1e-2
    assert (layer._inverse(y) - x).abs().max() < 1e-10
    stack = StackedPlanar(D, 1).double()
    with torch.no_grad():
        stack.theta.copy_(torch.cat([u, w, bias])[None])
    y_s, ladj_s = stack.call_and_ladj(x)
    assert (y_s - y).abs().max() < 1e-12 and (ladj_s - ladj).abs().max() < 1e-12


# ------------------------------------------------------------------ caches and copies
@pytest.mark.parametrize("make", [lambda: helpers.planar(3), lambda: helpers.radial(3),
                                  lambda: helpers.sylvester(3), lambda: helpers.planar_flow(3, 2),
                                  lambda: helpers.sylvester_flow(3, 2)])
def test_a_used_flow_deep_copies_and_checks(make):
    import copy

    t = make()
    t(torch.randn(5, 3))  # grad mode on: the cached pair holds non-leaf tensors
    c = copy.deepcopy(t)
    x = torch.randn(4, 3)
    torch.testing.assert_close(c(x), t(x))
    assert check_transform(t, 3)["logdet_err"] < 1e-8


@pytest.mark.parametrize("family", ["planar", "radial", "sylvester"])
def test_conditioned_cache_follows_an_in_place_change_of_the_context(family):
    cf = getattr(helpers, f"conditional_{family}")(2, 3)
    ctx = torch.randn(4, 3)
    t = cf.condition(ctx)
    x = torch.randn(4, 2)
    y = t(x)
    ctx.add_(3.0)
    assert not torch.allclose(t(x), y)
    torch.testing.assert_close(t(x), t(x.clone()), rtol=0, atol=0)


def test_sylvester_checks_inputs_as_planar_does():
    t = helpers.conditional_sylvester(2, 3).condition(torch.randn(4, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        t(torch.randn(5, 2))
    for f in (helpers.sylvester(3).double(), helpers.sylvester_flow(3, 2).double()):
        for x in (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3)):
            y, ladj = f.call_and_ladj(x)
            assert y.dtype == torch.float64 and ladj.dtype == torch.float64
            torch.testing.assert_close(y, f.call_and_ladj(x.double())[0])
