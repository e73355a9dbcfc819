import matplotlib

matplotlib.use("Agg")

import pyro.distributions as dist  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pyro_nfvi.plotting import (  # noqa: E402
    density_on_grid,
    plot_density,
    plot_density_grid,
    plot_loss,
)
from pyro_nfvi.targets import get_target  # noqa: E402


def _flow_q():
    from pyro_nfvi.helpers import planar_flow

    torch.manual_seed(0)
    flow = planar_flow(2, 4)
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    return dist.TransformedDistribution(base, [flow])


def test_plot_density_grid_returns_figure(tmp_path):
    targets = [get_target("U1"), get_target("U3")]
    qs = [_flow_q(), dist.Normal(torch.zeros(2), 1.0).to_event(1)]
    fig = plot_density_grid(targets, qs, grid_size=40, num_samples=200,
                            metrics=[{"kl": 0.1, "ess": 0.5}, None])
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "U1: target density" and "KL=0.100" in titles[1]
    assert all(ax.get_xlabel() for ax in fig.axes)
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000


def test_density_on_grid_uses_exact_flow_density():
    q = _flow_q()
    X, Y, dens = density_on_grid(q, box=((-6, 6), (-6, 6)), n=241)
    h = 12 / 240
    assert abs(float(dens.sum()) * h * h - 1.0) < 1e-2  # a normalised density
    assert dens.shape == (241, 241)


def test_plot_density_single_and_errors():
    fig = plot_density(get_target("U2"), dist.Normal(torch.zeros(2), 1.0).to_event(1),
                       name="sine", grid_size=30, num_samples=50)
    assert fig.axes[0].get_title() == "sine: target density"
    with pytest.raises(ValueError):
        plot_density_grid([get_target("U1")], [], grid_size=10)


def test_plot_loss():
    fig = plot_loss([5.0, 4.0, 3.0, 2.5, 2.4, 2.3], smooth=2)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss" and ax.get_title()
    assert len(ax.lines) == 2
    fig2 = plot_loss({"a": [1.0, 2.0], "b": [2.0, 1.0]}, title="two")
    assert len(fig2.axes[0].lines) == 2 and fig2.axes[0].get_title() == "two"
