"""The fused Sylvester stack (transforms/_fused_sylvester.py) against the plain autograd
loop: outputs, log-dets, gradients w.r.t. the input and every raw parameter, double
backward, and the fused score push against ∇ log q through the exact inverse."""

import pyro.distributions as dist
import pytest
import torch

from pyro_nfvi import helpers
from pyro_nfvi.transforms import ConditionedStackedSylvester
from pyro_nfvi.transforms import _fused_sylvester as fs
from pyro_nfvi.transforms._fused import FUSED_NUMPY, FUSED_TORCH, PLAIN
from pyro_nfvi.transforms.sylvester import stacked_sylvester_plain
from _helpers import randomize_

D = 5
VARIANTS = {
    "orthogonal_M1": dict(bottleneck=1),
    "orthogonal_M2": dict(bottleneck=2),
    "orthogonal_MD": dict(bottleneck=D),
    "householder": dict(kind="householder", num_householder=3),
    "triangular": dict(kind="triangular"),
}


def _flow(variant, K=4, scale=1.0, seed=0):
    return randomize_(helpers.sylvester_flow(D, K, **VARIANTS[variant]), scale, seed=seed).double()


def _inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, D, generator=gen, dtype=torch.float64) * 2
    gy = torch.randn(3, 7, D, generator=gen, dtype=torch.float64)
    gl = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    return x, gy, gl


def _value_and_grads(fn, x, params, gy, gl):
    x = x.clone().requires_grad_()
    params = tuple(p.detach().clone().requires_grad_() if p is not None else None for p in params)
    y, ladj = fn(x, params)
    leaves = [x] + [p for p in params if p is not None]
    grads = torch.autograd.grad((y * gy).sum() + (ladj * gl).sum(), leaves)
    return y.detach(), ladj.detach(), grads


@pytest.mark.parametrize("route", [FUSED_NUMPY, FUSED_TORCH])
@pytest.mark.parametrize("variant", list(VARIANTS) + ["orthogonal_MD_transposed_solve"])
def test_fused_matches_plain_values_and_gradients(variant, route, monkeypatch):
    if variant.endswith("_transposed_solve"):  # NumPy's solves as x^T = b^T a^{-T} (M >= 8)
        monkeypatch.setattr(fs, "_TRANSPOSED_SOLVE_MIN_RHS", 1)
        variant = variant[: -len("_transposed_solve")]
    flow = _flow(variant)
    params = flow._params_tuple()
    x, gy, gl = _inputs()
    ref = _value_and_grads(stacked_sylvester_plain, x, params, gy, gl)
    got = _value_and_grads(lambda x, p: fs.sylvester_stack_kernel(x, p, stacked_sylvester_plain, route), x, params, gy, gl)
    assert torch.allclose(got[0], ref[0], atol=1e-9, rtol=0)
    assert torch.allclose(got[1], ref[1], atol=1e-9, rtol=0)
    assert len(got[2]) == len(ref[2])
    for g, r in zip(got[2], ref[2]):
        assert torch.allclose(g, r, atol=1e-9, rtol=1e-9), (g - r).abs().max()


@pytest.mark.parametrize("variant", ["orthogonal_M2", "triangular"])
def test_module_takes_the_kernel_and_gradcheck(variant):
    """StackedSylvester routes through the kernel (unbatched parameters), batched
    parameters through the plain loop; the kernel's gradient passes gradcheck."""
    flow = _flow(variant, K=3)
    x = torch.randn(4, D, dtype=torch.float64)
    assert fs.sylvester_route(x, flow._params_tuple()) == FUSED_NUMPY
    batched = tuple(p.expand(2, *p.shape) if p is not None else None for p in flow._params_tuple())
    assert fs.sylvester_route(x, batched) == PLAIN
    y1, l1 = flow.call_and_ladj(x)
    y2, l2 = ConditionedStackedSylvester(batched).call_and_ladj(x[:, None].expand(4, 2, D))
    assert torch.allclose(y1, y2[:, 1], atol=1e-12) and torch.allclose(l1, l2[:, 0], atol=1e-12)
    params = tuple(p.detach().clone().requires_grad_() for p in flow._params_tuple() if p is not None)
    if len(params) == 3:
        params += (None,)

    def f(x, *ps):
        return fs.sylvester_stack_kernel(x, tuple(ps), stacked_sylvester_plain, FUSED_NUMPY)

    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(),) + params)


def test_double_backward_matches_plain():
    """create_graph=True (Hessians, gradient penalties): the kernel's backward recomputes
    the plain loop, so second derivatives are exact, not zero."""
    flow = _flow("orthogonal_M2")
    x = torch.randn(6, D, dtype=torch.float64)

    def hvp(fn):
        xr = x.clone().requires_grad_()
        y, ladj = fn(xr, flow._params_tuple())
        (g,) = torch.autograd.grad(ladj.sum() + (y**2).sum(), xr, create_graph=True)
        return torch.autograd.grad((g * torch.linspace(-1, 1, D, dtype=x.dtype)).sum(), xr)[0]

    ref = hvp(stacked_sylvester_plain)
    got = hvp(lambda x, p: fs.sylvester_stack_kernel(x, p, stacked_sylvester_plain, FUSED_NUMPY))
    assert ref.abs().max() > 1e-3 and torch.allclose(got, ref, atol=1e-9)


def _score_by_autograd(flow, y):
    q = dist.TransformedDistribution(dist.Normal(torch.zeros(D, dtype=y.dtype), 1.0).to_event(1), [flow])
    y = y.detach().clone().requires_grad_()
    return torch.autograd.grad(q.log_prob(y).sum(), y)[0]


@pytest.mark.parametrize("route", [FUSED_NUMPY, FUSED_TORCH])
@pytest.mark.parametrize("variant", list(VARIANTS) + ["orthogonal_M20", "orthogonal_M20_transposed_solve"])
def test_fused_push_score_matches_the_exact_inverse(variant, route, monkeypatch):
    if variant.startswith("orthogonal_M20"):  # M above the substitution loop: one batched solve
        monkeypatch.setattr(fs, "_PUSH_LOOP_MAX_M", 1)
        if variant.endswith("_transposed_solve"):  # ... solved as x^T = b^T a^{-T}
            monkeypatch.setattr(fs, "_TRANSPOSED_SOLVE_MIN_RHS", 1)
        variant = "orthogonal_MD"
    flow = _flow(variant, scale=1.0, seed=7)
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, score = fs.sylvester_stack_push_score(x, -x, flow._params_tuple(), route)
    assert not score.requires_grad
    assert torch.allclose(y, flow.call_and_ladj(x)[0], atol=1e-12)
    assert torch.allclose(score, _score_by_autograd(flow, y.clone()), atol=1e-9, rtol=1e-9)
    # and the module method takes the kernel
    y2, score2 = flow.push_score(x, -x)
    assert torch.allclose(score2, score, atol=1e-12)


@pytest.mark.parametrize("route", [FUSED_NUMPY, FUSED_TORCH])
@pytest.mark.parametrize("systems", ["loop", "all_layers", "per_layer"])
@pytest.mark.parametrize("variant", ["orthogonal_MD", "triangular"])
def test_forward_pass_push_matches_the_exact_inverse(variant, systems, route, monkeypatch):
    """The score pushed from the forward pass's saved quantities (what the guide's step
    runs): by substitution (M <= 8), or by triangular solves whose systems are built for
    all layers at once or layer by layer (large K N M^2)."""
    if systems != "loop":
        monkeypatch.setattr(fs, "_PUSH_LOOP_MAX_M", 1)
    if systems == "per_layer":
        monkeypatch.setattr(fs, "_PUSH_BATCHED_MAX", 0)
    flow = _flow(variant, scale=1.0, seed=3)
    x = torch.randn(2, 15, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y, ladj, score = fs.sylvester_stack_push_kernel(x, flow._params_tuple(), stacked_sylvester_plain,
                                                    -x, route)
    assert torch.allclose(y, flow.call_and_ladj(x)[0], atol=1e-12)
    assert torch.allclose(score, _score_by_autograd(flow, y.detach().clone()), atol=1e-9, rtol=1e-9)


def test_float32_kernel_close_to_float64_plain():
    flow = _flow("orthogonal_M2")
    x = torch.randn(50, D, dtype=torch.float64)
    y64, l64 = stacked_sylvester_plain(x, flow._params_tuple())
    f32 = flow.float()
    y32, l32 = f32.call_and_ladj(x.float())
    assert torch.allclose(y32.double(), y64, atol=1e-4) and torch.allclose(l32.double(), l64, atol=1e-4)
