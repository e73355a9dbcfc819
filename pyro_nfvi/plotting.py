"""Matplotlib plots for 2-D densities and training curves.

Every function returns a :class:`matplotlib.figure.Figure` (created with
``matplotlib.figure.Figure``, so no GUI backend or global pyplot state is needed);
save it with ``fig.savefig(path)``.

Example::

    >>> import torch, pyro.distributions as dist
    >>> from pyro_nfvi.targets import get_target
    >>> from pyro_nfvi.plotting import plot_density_grid, plot_loss
    >>> q = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    >>> fig = plot_density_grid([get_target("U1")], [q], grid_size=50, num_samples=100)
    >>> fig.axes[0].get_title()
    'U1: target density'
    >>> plot_loss([3.0, 2.0, 1.5]).axes[0].get_xlabel()
    'step'
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .targets import log_density_fn

__all__ = ["plot_density_grid", "plot_density", "plot_loss", "density_on_grid"]

Box = Tuple[Tuple[float, float], Tuple[float, float]]
DEFAULT_BOX: Box = ((-4.5, 4.5), (-4.5, 4.5))


def _grid_points(box: Box, n: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs = torch.linspace(box[0][0], box[0][1], n, dtype=torch.float64)
    ys = torch.linspace(box[1][0], box[1][1], n, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")
    return X, Y, torch.stack([X, Y], dim=-1).reshape(-1, 2)


def _dtype_of(obj: Any) -> torch.dtype:
    """float64 for plain callables (targets); a distribution's own dtype otherwise."""
    if not hasattr(obj, "log_prob"):
        return torch.float64
    d = getattr(obj, "base_dist", obj)
    try:
        return d.mean.dtype
    except Exception:
        return torch.float32


@torch.no_grad()
def density_on_grid(
    log_prob: Any, box: Box = DEFAULT_BOX, n: int = 200
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluate ``exp(log_prob(z))`` on an ``n × n`` grid over ``box``.

    :param log_prob: a distribution (its ``log_prob`` is used, e.g. a flow's exact
        density through its inverse) or a callable ``z -> log density``.
    :returns: ``(X, Y, density)`` as float64 ``(n, n)`` tensors (``X`` varies along columns).
    """
    fn = log_prob.log_prob if hasattr(log_prob, "log_prob") else log_prob
    X, Y, z = _grid_points(box, n)
    dtype = _dtype_of(log_prob)
    lp = torch.cat([fn(chunk.to(dtype)).double().reshape(-1) for chunk in z.split(20000)])
    lp = torch.nan_to_num(lp, nan=-float("inf"))
    return X, Y, lp.exp().reshape(n, n)


def _imshow(ax: Axes, dens: torch.Tensor, box: Box, title: str, cmap: str = "viridis") -> None:
    ax.imshow(
        dens.numpy(),
        origin="lower",
        extent=(box[0][0], box[0][1], box[1][0], box[1][1]),
        cmap=cmap,
        aspect="equal",
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")


def _target_box(target: Any) -> Box:
    return getattr(target, "box", DEFAULT_BOX)


def _normalise(dens: torch.Tensor, box: Box) -> torch.Tensor:
    n = dens.shape[0]
    cell = (box[0][1] - box[0][0]) / (n - 1) * (box[1][1] - box[1][0]) / (n - 1)
    total = float(dens.sum()) * cell
    return dens / total if total > 0 else dens


@torch.no_grad()
def plot_density_grid(
    targets: Sequence[Any],
    flows: Sequence[Any],
    names: Optional[Sequence[str]] = None,
    grid_size: int = 200,
    num_samples: int = 2000,
    metrics: Optional[Sequence[Optional[Dict[str, float]]]] = None,
    panel_size: float = 3.0,
) -> Figure:
    """One row per target: true density | fitted flow density | flow samples.

    :param targets: targets (:class:`~pyro_nfvi.targets.Target`, or callables
        ``z -> log p̃(z)``); each target's ``box`` sets the plotting range.
    :param flows: fitted distributions, one per target (``log_prob`` evaluated on the
        grid — exact for flows with a true inverse — and ``sample`` for the scatter).
    :param names: row labels (default: ``target.name``).
    :param grid_size: grid points per axis.
    :param num_samples: points in the scatter panel.
    :param metrics: optional per-row dicts (e.g. from
        :func:`~pyro_nfvi.diagnostics.evaluate_density`); ``kl`` and ``ess`` go in titles.
    :returns: the figure.
    """
    targets = list(targets)
    flows = list(flows)
    if len(targets) != len(flows):
        raise ValueError(f"got {len(targets)} targets but {len(flows)} flows")
    if not targets:
        raise ValueError("nothing to plot")
    rows = len(targets)
    fig = Figure(figsize=(3 * panel_size, rows * panel_size), constrained_layout=True)
    axes = fig.subplots(rows, 3, squeeze=False)
    for i, (target, q) in enumerate(zip(targets, flows)):
        name = names[i] if names is not None else getattr(target, "name", f"target {i}")
        box = _target_box(target)
        _, _, p_dens = density_on_grid(log_density_fn(target), box, grid_size)
        p_dens = _normalise(p_dens, box)
        _, _, q_dens = density_on_grid(q, box, grid_size)
        vmax = float(p_dens.max())
        _imshow(axes[i, 0], p_dens, box, f"{name}: target density")
        axes[i, 0].images[0].set_clim(0.0, vmax)
        title = f"{name}: flow density"
        m = metrics[i] if metrics is not None else None
        if m:
            kl, ess = m.get("kl", float("nan")), m.get("ess", float("nan"))
            title += f"\nKL={kl:.3f}, ESS={100 * ess:.0f}%"
        _imshow(axes[i, 1], q_dens, box, title)
        axes[i, 1].images[0].set_clim(0.0, vmax)
        z = q.sample((num_samples,)).detach().double()
        ax = axes[i, 2]
        ax.scatter(z[:, 0].numpy(), z[:, 1].numpy(), s=1.0, alpha=0.4, color="C0", rasterized=True)
        ax.set_xlim(*box[0])
        ax.set_ylim(*box[1])
        ax.set_aspect("equal")
        ax.set_title(f"{name}: {num_samples} flow samples", fontsize=10)
        ax.set_xlabel("$z_1$")
        ax.set_ylabel("$z_2$")
    return fig


def plot_density(
    target: Any, q: Any, name: Optional[str] = None, **kwargs: Any
) -> Figure:
    """:func:`plot_density_grid` for a single target/flow pair."""
    return plot_density_grid([target], [q], names=None if name is None else [name], **kwargs)


def plot_loss(
    history: Union[Sequence[float], Dict[str, Sequence[float]]],
    title: str = "training loss",
    smooth: int = 0,
    logy: bool = False,
) -> Figure:
    """Loss curve(s) against step.

    :param history: a list of losses, or a dict ``label -> list`` for several curves.
    :param smooth: if > 1, also draw a moving average over this many steps.
    :param logy: logarithmic y-axis (only sensible for positive losses).
    """
    curves = history if isinstance(history, dict) else {"loss": history}
    fig = Figure(figsize=(6, 3.5), constrained_layout=True)
    ax = fig.subplots()
    for label, values in curves.items():
        v = torch.as_tensor(list(values), dtype=torch.float64)
        line, = ax.plot(v.numpy(), lw=0.8, alpha=0.5 if smooth > 1 else 1.0, label=label)
        if smooth > 1 and v.numel() >= smooth:
            kernel = torch.ones(1, 1, smooth, dtype=torch.float64) / smooth
            ma = torch.nn.functional.conv1d(v[None, None], kernel)[0, 0]
            steps = torch.arange(smooth - 1, v.numel())
            ax.plot(steps.numpy(), ma.numpy(), color=line.get_color(), lw=1.5,
                    label=f"{label} ({smooth}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    if len(curves) > 1 or smooth > 1:
        ax.legend()
    return fig
