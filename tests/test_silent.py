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
