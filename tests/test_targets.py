import math

import pytest
import torch

from pyro_nfvi.targets import REFERENCE_LOG_Z, TARGETS, U1, U2, U3, U4, get_target, grid_log_Z, wall

NAMES = ["U1", "U2", "U3", "U4"]


def _trapezoid_log_Z(f, n, half_width):
    """Independent check: trapezoid rule on a different (finer, wider) float64 grid."""
    xs = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    h = xs[1] - xs[0]
    lw1 = torch.zeros(n, dtype=torch.float64)
    lw1[[0, -1]] = math.log(0.5)
    total = []
    for rows in torch.arange(n).split(500):
        z = torch.stack(torch.broadcast_tensors(xs[None, :], xs[rows][:, None]), -1)
        total.append(torch.logsumexp((f(z) + lw1[None, :] + lw1[rows][:, None]).reshape(-1), 0))
    return float(torch.logsumexp(torch.stack(total), 0) + 2 * torch.log(h))


@pytest.mark.parametrize("name", NAMES)
def test_log_Z_matches_finer_grid_and_reference(name):
    t = get_target(name)
    fine = _trapezoid_log_Z(t.log_prob_unnormalized, n=2401, half_width=6.5)
    assert abs(t.log_Z - fine) < 1e-4
    assert abs(t.log_Z - REFERENCE_LOG_Z[name]) < 1e-3


def test_grid_log_Z_gaussian_exact():
    s = 0.7
    f = lambda z: -0.5 * (z ** 2).sum(-1) / s ** 2
    assert abs(grid_log_Z(f, n=801) - math.log(2 * math.pi * s ** 2)) < 1e-9


@pytest.mark.parametrize("name", NAMES)
def test_normalised_density_integrates_to_one(name):
    t = get_target(name)
    X, Y, dens = t.density_grid(n=601, box=((-6, 6), (-6, 6)))
    h = 12 / 600
    assert abs(float(dens.sum()) * h * h - 1.0) < 1e-3


def test_energies_match_paper_formulas():
    z = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-1.5, 2.5]], dtype=torch.float64)
    z1, z2 = z[:, 0], z[:, 1]
    w1 = torch.sin(2 * math.pi * z1 / 4)
    w2 = 3 * torch.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 / (1 + torch.exp(-(z1 - 1) / 0.3))
    u1 = 0.5 * ((z.norm(dim=-1) - 2) / 0.4) ** 2 - torch.log(
        torch.exp(-0.5 * ((z1 - 2) / 0.6) ** 2) + torch.exp(-0.5 * ((z1 + 2) / 0.6) ** 2))
    u2 = 0.5 * ((z2 - w1) / 0.4) ** 2
    u3 = -torch.log(torch.exp(-0.5 * ((z2 - w1) / 0.35) ** 2)
                    + torch.exp(-0.5 * ((z2 - w1 + w2) / 0.35) ** 2))
    u4 = -torch.log(torch.exp(-0.5 * ((z2 - w1) / 0.4) ** 2)
                    + torch.exp(-0.5 * ((z2 - w1 + w3) / 0.35) ** 2))
    for f, ref in [(U1, u1), (U2, u2), (U3, u3), (U4, u4)]:
        assert torch.allclose(f(z), ref, atol=1e-12)
    # inside the box the wall is zero
    assert torch.equal(wall(z), torch.zeros(3, dtype=torch.float64))


def test_wall_and_stability():
    t = get_target("U2")
    z = torch.tensor([[4.0, 0.0], [4.2, 0.0], [-4.2, 4.4]])
    assert torch.allclose(wall(z), torch.tensor([0.0, 1.0, 1.0 + 4.0]))
    far = torch.tensor([[100.0, -100.0], [30.0, 30.0]])
    for name in NAMES:
        lp = get_target(name).log_prob_unnormalized(far)
        assert torch.isfinite(lp).all() and (lp < -1000).all()
    # logsumexp keeps U3 finite far from both ridges
    assert torch.isfinite(U3(torch.tensor([[0.0, 50.0]]))).all()


def test_batching_and_shape_errors():
    t = get_target("u4")  # case-insensitive
    assert t.log_prob_unnormalized(torch.zeros(3, 4, 2)).shape == (3, 4)
    assert t.log_prob_unnormalized(torch.zeros(2)).shape == ()
    with pytest.raises(ValueError):
        t.log_prob_unnormalized(torch.zeros(3, 3))
    with pytest.raises(KeyError):
        get_target("U9")
    assert set(TARGETS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_reference_samples_match_density(name):
    t = get_target(name)
    z = t.sample(20000, seed=1)
    assert z.shape == (20000, 2) and z.dtype == torch.float32
    assert torch.equal(z, t.sample(20000, seed=1))
    # moments vs grid moments
    X, Y, dens = t.density_grid(n=801, box=((-6, 6), (-6, 6)))
    w = dens / dens.sum()
    m = torch.stack([(w * X).sum(), (w * Y).sum()])
    v = torch.stack([(w * X ** 2).sum(), (w * Y ** 2).sum()]) - m ** 2
    se = (v / 20000).sqrt()
    assert ((z.double().mean(0) - m).abs() < 5 * se + 1e-3).all()
    assert ((z.double().var(0) - v).abs() / v < 0.05).all()
    # mean log density of samples equals -entropy computed on the grid
    lp = t.log_prob(z.double())
    H = -(w * t.log_prob(torch.stack([X, Y], -1))).sum()
    assert abs(float(lp.mean()) + float(H)) < 5 * float(lp.std()) / math.sqrt(20000) + 5e-3
