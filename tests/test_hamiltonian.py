"""Hamiltonian flows: exact log-det and inverse of the phase-space map, gradients
through ∇U, errors, and the density-fitting pieces (lift, phase-space target)."""

import math

import pyro.distributions as dist
import pytest
import torch

from pyro_nfvi._validation import ArgumentError
from pyro_nfvi import helpers
from pyro_nfvi.infer import fit_density
from pyro_nfvi.targets import get_target
from pyro_nfvi.testing import check_transform
from pyro_nfvi.transforms import Hamiltonian, PhaseSpaceLift, PhaseSpaceTarget

from _helpers import randomize_


def _potential(z):
    # non-quadratic, coupled, gradient of at most linear growth (finite at |z| = 1e4)
    c = torch.linspace(0.5, 1.5, z.shape[-1], dtype=z.dtype)
    return 0.5 * (c * z * z).sum(-1) + torch.sin(z.sum(-1)) + torch.nn.functional.softplus(2 * z).sum(-1)


def _randomized(h, seed=0):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        h.step_logit.copy_(torch.randn(h.step_logit.shape, generator=g))
        h.log_mass.copy_(0.5 * torch.randn(h.log_mass.shape, generator=g))
        if h.beta0_logit is not None:
            h.beta0_logit.fill_(-1.0)
    return h


@pytest.mark.parametrize("tempering", [True, False])
@pytest.mark.parametrize("D,K", [(1, 1), (3, 4)])
def test_check_transform(D, K, tempering):
    h = _randomized(Hamiltonian(D, _potential, num_steps=K, step_size=0.3, tempering=tempering))
    errs = check_transform(h, input_dim=2 * D, x_scale=1.5)
    assert errs["logdet_err"] < 1e-10 and errs["inverse_err"] < 1e-10


def test_float64_logdet_and_round_trip():
    D, K = 3, 5
    h = _randomized(Hamiltonian(D, _potential, num_steps=K, step_size=0.4), seed=1).double()
    x = torch.randn(6, 2 * D, dtype=torch.float64) * 2
    y, ladj = h.call_and_ladj(x)
    for i in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda v: h.call_and_ladj(v)[0], x[i])
        sign, logabsdet = torch.linalg.slogdet(J)
        assert sign == 1 and abs(float(ladj[i].detach() - logabsdet)) < 1e-10
    # tempering log-det = (D/2) log β0 (β_K = 1), and ≠ 0 here
    assert abs(float(ladj[0] - 0.5 * D * h.beta0.log())) < 1e-12 and float(ladj[0]) < -0.1
    assert float((h._inverse(y) - x).abs().max()) < 1e-10
    y_new = torch.randn(6, 2 * D, dtype=torch.float64) * 2
    assert float((h._call(h._inverse(y_new)) - y_new).abs().max()) < 1e-10


def test_bounded_force_keeps_logdet_and_inverse_exact():
    # with max_force the momentum kicks use c sqrt(M) tanh(grad U / (c sqrt M)): still shears,
    # so log-det = tempering only and the inverse is exact, in a regime where the bound binds
    D, K, c = 3, 4, 0.3
    h = _randomized(Hamiltonian(D, _potential, num_steps=K, step_size=0.4, max_force=c), seed=2).double()
    x = torch.randn(5, 2 * D, dtype=torch.float64) * 3
    g = h.grad_potential(x[..., :D])
    assert bool((g.abs() > c * h.mass.sqrt()).any())  # the bound binds here
    y, ladj = h.call_and_ladj(x)
    for i in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda v: h.call_and_ladj(v)[0], x[i])
        sign, logabsdet = torch.linalg.slogdet(J)
        assert sign == 1 and abs(float(ladj[i].detach() - logabsdet)) < 1e-10
    assert float((h._inverse(y) - x).abs().max()) < 1e-10
    # and the map differs from the unbounded one (the option is not ignored)
    free = Hamiltonian(D, _potential, num_steps=K, step_size=0.4).double()
    free.load_state_dict(h.state_dict())
    assert float((free._call(x) - y).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="max_force"):
        Hamiltonian(D, _potential, max_force=-1.0)


def test_volume_preserving_without_tempering():
    h = _randomized(Hamiltonian(2, _potential, num_steps=3, tempering=False)).double()
    x = torch.randn(4, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: h.call_and_ladj(v)[0], x)
    assert abs(float(torch.linalg.slogdet(J)[1])) < 1e-12
    assert float(h.call_and_ladj(x)[1]) == 0.0


def test_parameter_gradients_flow_through_grad_U():
    """d y / d(step logits, mass, β0) by autograd equals central finite differences: it
    would not if ∇U were taken without create_graph (then ∇U would act as a constant)."""
    h = _randomized(Hamiltonian(2, _potential, num_steps=3, step_size=0.3), seed=2).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    w = torch.randn(2, 4, dtype=torch.float64)

    def f():
        return (h.call_and_ladj(x)[0] * w).sum()

    params = [h.step_logit, h.log_mass, h.beta0_logit]
    grads = torch.autograd.grad(f(), params)
    for p, g in zip(params, grads):
        fd = torch.zeros_like(p)
        flat = p.data.view(-1)
        for j in range(flat.numel()):
            old = float(flat[j])
            flat[j] = old + 1e-6
            up = float(f())
            flat[j] = old - 1e-6
            down = float(f())
            flat[j] = old
            fd.view(-1)[j] = (up - down) / 2e-6
        assert torch.allclose(g, fd, atol=1e-6, rtol=1e-6)


def test_no_grad_mode_gives_same_values():
    h = _randomized(Hamiltonian(2, _potential, num_steps=3))
    x = torch.randn(5, 4)
    y = h.call_and_ladj(x)[0]
    with torch.no_grad():
        y0 = h.call_and_ladj(x)[0]
    assert not y0.requires_grad and torch.allclose(y, y0)


def test_cache_is_not_stale_after_parameter_change():
    h = Hamiltonian(2, _potential, num_steps=2)
    x = torch.randn(3, 4)
    y1 = h(x)
    with torch.no_grad():
        h.step_logit.add_(1.0)
    assert not torch.allclose(h(x), y1)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="step_size"):
        Hamiltonian(2, _potential, step_size=2.0, max_step_size=1.0)
    with pytest.raises(ValueError, match="num_steps"):
        Hamiltonian(2, _potential, num_steps=0)
    with pytest.raises(TypeError, match="potential"):
        Hamiltonian(2, potential=3.0)
    for kwargs, name in [(dict(step_size="0.1"), "step_size"), (dict(max_step_size=None), "max_step_size"),
                         (dict(init_mass=torch.ones(3)), "init_mass"), (dict(init_mass="heavy"), "init_mass"),
                         (dict(init_mass=-1.0), "init_mass"), (dict(init_beta0=1.0), "init_beta0"),
                         (dict(max_force="big"), "max_force")]:
        with pytest.raises(ArgumentError, match=name):
            Hamiltonian(2, _potential, **kwargs)
    with pytest.raises(ValueError, match="x must have shape"):
        Hamiltonian(2, _potential)(torch.zeros(3, 3))
    # U does not depend on z: no gradient
    h = Hamiltonian(2, lambda z: torch.zeros(z.shape[:-1], requires_grad=True))
    with pytest.raises(ValueError, match="potential does not depend on z"):
        h(torch.zeros(3, 4))
    # U computed outside autograd
    h = Hamiltonian(2, lambda z: z.detach().square().sum(-1))
    with pytest.raises(ValueError, match="potential must return a tensor differentiable"):
        h(torch.zeros(3, 4))
    h = Hamiltonian(2, lambda z: z.square().sum())  # a scalar is allowed
    assert h(torch.zeros(3, 4)).shape == (3, 4)
    h = Hamiltonian(2, lambda z: z.square())
    with pytest.raises(ValueError, match="potential must return shape"):
        h(torch.zeros(3, 4))


def test_non_finite_gradient_raises_naming_step_and_coordinate():
    # ∇U = 1/z is infinite at z = 0: the first step sees it, names z[1]
    h = Hamiltonian(2, lambda z: z[..., 0] ** 2 + torch.log(z[..., 1].abs()), num_steps=3)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(FloatingPointError, match=r"leapfrog step 1 \(of 3\) at z\[1\]"):
        h(x)
    h.coordinate_names = ["site 'a'", "site 'b'"]
    with pytest.raises(FloatingPointError, match="site 'b'"):
        h(x)


def test_lift_and_density_log_prob_through_inverse():
    """The joint density of the final point from the forward pass equals the one computed
    through the exact inverses (a point scored as data), in float64."""
    h = _randomized(helpers.hamiltonian(2, _potential, num_steps=3, step_size=0.3))
    lift = randomize_(PhaseSpaceLift(h, helpers.planar_flow(2, 2)), 0.5, seed=3)
    h, lift = h.double(), lift.double()
    errs = check_transform(lift, input_dim=4)
    assert errs["logdet_err"] < 1e-10
    base = dist.Normal(torch.zeros(4, dtype=torch.float64), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [lift, h])
    y = q.rsample((5,))
    lp_fwd = q.log_prob(y)
    lp_inv = q.log_prob(y.detach().clone())  # no cache: through the inverses
    assert torch.allclose(lp_fwd, lp_inv, atol=1e-10)


def test_phase_space_target():
    t = get_target("U2")
    h = Hamiltonian(2, lambda z: -t.log_prob_unnormalized(z))
    with torch.no_grad():
        h.log_mass.copy_(torch.tensor([0.3, -0.2]))
    pt = PhaseSpaceTarget(t, h)
    x = torch.randn(7, 4)
    ref = t.log_prob_unnormalized(x[:, :2]) + dist.Normal(0.0, h.mass.sqrt()).log_prob(x[:, 2:]).sum(-1)
    assert torch.allclose(pt.log_prob_unnormalized(x), ref, atol=1e-6)
    assert pt.log_Z == t.log_Z
    # initial momentum N(0, M / β0)
    assert torch.allclose(h.momentum_dist().base_dist.scale, (h.mass / h.beta0).sqrt())


def test_fit_density_improves_the_auxiliary_bound():
    """fit_density on the phase-space problem: the auxiliary KL (an upper bound on the KL of
    the z-marginal) drops well below that of the initial flow on U2."""
    from pyro_nfvi.diagnostics import kl_divergence

    t = get_target("U2")
    torch.manual_seed(0)
    h = Hamiltonian(2, lambda z: -t.log_prob_unnormalized(z), num_steps=2)
    lift = PhaseSpaceLift(h)
    target = PhaseSpaceTarget(t, h)
    base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
    q0 = dist.TransformedDistribution(base, [lift, h])
    kl0, _ = kl_divergence(q0, target, 2000, seed=1)
    fit = fit_density([lift, h], target, num_steps=300, batch_size=128, dim=4, affine=False,
                      progress=False, seed=0)
    kl1, se1 = kl_divergence(fit.q, target, 2000, seed=1)
    assert math.isfinite(kl1) and kl1 < 0.5 * kl0 and kl1 > -4 * se1


# ------------------------------------------------------------------ the cache follows the potential
def test_cache_follows_a_replaced_potential_and_its_parameters():
    h = Hamiltonian(2, lambda z: 0.5 * (z ** 2).sum(-1), num_steps=3, step_size=0.5).double()
    x = torch.randn(4, 4, dtype=torch.float64)
    y = h(x)
    h.potential = lambda z: 2.0 * (z ** 2).sum(-1)  # replaced: the cached pair is stale
    assert not torch.allclose(h(x), y)
    torch.testing.assert_close(h(x), h(x.clone()), rtol=0, atol=0)
    # a learnable parameter in the potential's closure, changed in place (an optimiser step)
    scale = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
    h = Hamiltonian(2, lambda z: 0.5 * scale * (z ** 2).sum(-1), num_steps=3, step_size=0.5).double()
    y = h(x)
    with torch.no_grad():
        scale.fill_(5.0)
    torch.testing.assert_close(h(h.inv(y)), y, rtol=0, atol=1e-12)  # the inverse is recomputed
    # an nn.Module potential
    lin = torch.nn.Linear(2, 1).double()
    h = Hamiltonian(2, lambda z: lin(z).squeeze(-1) + 0.5 * (z ** 2).sum(-1), num_steps=2).double()
    y = h(x)
    with torch.no_grad():
        lin.weight.add_(1.0)
    torch.testing.assert_close(h(x), h(x.clone()), rtol=0, atol=0)


def test_phase_space_lift_cache_follows_its_parameters():
    h = Hamiltonian(2, lambda z: 0.5 * (z ** 2).sum(-1), num_steps=2).double()
    lift = PhaseSpaceLift(h).double()
    e = torch.randn(3, 4, dtype=torch.float64)
    z = lift(e)
    with torch.no_grad():
        lift.loc.add_(1.0)
        h.log_mass.add_(0.3)
    torch.testing.assert_close(lift(e), lift(e.clone()), rtol=0, atol=0)
    torch.testing.assert_close(lift(lift.inv(z)), z, rtol=0, atol=1e-12)
