"""Two-dimensional benchmark energies U1–U4 of Rezende & Mohamed (2015), Table 1.

Each target is an unnormalised density ``p̃(z) = exp(-U(z) - W(z))`` on ``R^2`` where
``U`` is the energy of the paper and ``W(z) = Σᵢ (relu(|zᵢ| − 4) / 0.2)²`` is a soft
wall that makes every target proper (U2–U4 have infinite mass along ``z1`` otherwise).
The log normaliser ``log Z`` is computed once, lazily, by float64 grid integration, so
that ``KL(q‖p) = E_q[log q − log p̃] + log Z`` can be reported in nats.

Example::

    >>> import torch
    >>> from pyro_nfvi.targets import get_target
    >>> t = get_target("U1")
    >>> round(t.log_Z, 3)
    1.878
    >>> t.log_prob_unnormalized(torch.zeros(3, 2)).shape
    torch.Size([3])
    >>> t.sample(5, seed=0).shape
    torch.Size([5, 2])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch

__all__ = [
    "Target",
    "log_density_fn",
    "TARGETS",
    "get_target",
    "wall",
    "U1",
    "U2",
    "U3",
    "U4",
    "grid_log_Z",
]

#: Position and width of the soft wall added to every target.
WALL_AT = 4.0
WALL_WIDTH = 0.2
#: Half-width of the square used to integrate log Z (the wall penalty there is
#: ((6 - 4) / 0.2)^2 = 100 nats, so the mass outside is far below float64 round-off).
INTEGRATION_HALF_WIDTH = 6.0
#: Default number of grid points per axis used for log Z.
LOG_Z_GRID = 2001


def _w1(z1: torch.Tensor) -> torch.Tensor:
    return torch.sin(2.0 * math.pi * z1 / 4.0)


def _w2(z1: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.exp(-0.5 * ((z1 - 1.0) / 0.6) ** 2)


def _w3(z1: torch.Tensor) -> torch.Tensor:
    return 3.0 * torch.sigmoid((z1 - 1.0) / 0.3)


def U1(z: torch.Tensor) -> torch.Tensor:
    """Energy U1 (ring with two lobes), without the wall."""
    z1 = z[..., 0]
    r = torch.linalg.vector_norm(z, dim=-1)
    a = -0.5 * ((z1 - 2.0) / 0.6) ** 2
    b = -0.5 * ((z1 + 2.0) / 0.6) ** 2
    return 0.5 * ((r - 2.0) / 0.4) ** 2 - torch.logaddexp(a, b)


def U2(z: torch.Tensor) -> torch.Tensor:
    """Energy U2 (one sine-shaped ridge), without the wall."""
    z1, z2 = z[..., 0], z[..., 1]
    return 0.5 * ((z2 - _w1(z1)) / 0.4) ** 2


def U3(z: torch.Tensor) -> torch.Tensor:
    """Energy U3 (two sine ridges that split apart around z1 = 1), without the wall."""
    z1, z2 = z[..., 0], z[..., 1]
    d = z2 - _w1(z1)
    a = -0.5 * (d / 0.35) ** 2
    b = -0.5 * ((d + _w2(z1)) / 0.35) ** 2
    return -torch.logaddexp(a, b)


def U4(z: torch.Tensor) -> torch.Tensor:
    """Energy U4 (a sine ridge and a sigmoid-shifted copy), without the wall."""
    z1, z2 = z[..., 0], z[..., 1]
    d = z2 - _w1(z1)
    a = -0.5 * (d / 0.4) ** 2
    b = -0.5 * ((d + _w3(z1)) / 0.35) ** 2
    return -torch.logaddexp(a, b)


def wall(z: torch.Tensor) -> torch.Tensor:
    """Soft wall ``Σᵢ (relu(|zᵢ| − 4) / 0.2)²`` (summed over the last dim)."""
    return (torch.relu(z.abs() - WALL_AT) / WALL_WIDTH).pow(2).sum(-1)


def _grid(
    n: int,
    box: Tuple[Tuple[float, float], Tuple[float, float]],
    dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    xs = torch.linspace(box[0][0], box[0][1], n, dtype=dtype)
    ys = torch.linspace(box[1][0], box[1][1], n, dtype=dtype)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")
    return X, Y


def _simpson_weights(n: int, h: float, dtype: torch.dtype) -> torch.Tensor:
    if n < 3 or n % 2 == 0:
        raise ValueError("Simpson's rule needs an odd number (>= 3) of grid points")
    w = torch.ones(n, dtype=dtype)
    w[1:-1:2] = 4.0
    w[2:-1:2] = 2.0
    return w * (h / 3.0)


def grid_log_Z(
    log_prob_fn: Callable[[torch.Tensor], torch.Tensor],
    n: int = LOG_Z_GRID,
    half_width: float = INTEGRATION_HALF_WIDTH,
    chunk: int = 401,
) -> float:
    """log ∫ exp(log_prob_fn(z)) dz over ``[-half_width, half_width]²`` by 2-D
    Simpson's rule on an ``n × n`` float64 grid (``n`` odd), evaluated in row chunks.

    Example::

        >>> import torch
        >>> f = lambda z: -0.5 * (z ** 2).sum(-1)
        >>> abs(grid_log_Z(f, n=401) - math.log(2 * math.pi)) < 1e-8
        True
    """
    h = 2.0 * half_width / (n - 1)
    w = _simpson_weights(n, h, torch.float64)
    xs = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    # log-sum-exp over chunks of rows (z2 fixed per row) to stay within memory.
    partial = []
    for start in range(0, n, chunk):
        ys = xs[start : start + chunk]
        z = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)
        lp = log_prob_fn(z)  # (rows, n)
        lw = lp + w.log()[None, :] + w[start : start + chunk].log()[:, None]
        partial.append(torch.logsumexp(lw.reshape(-1), 0))
    return float(torch.logsumexp(torch.stack(partial), 0))


def log_density_fn(target: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``z -> log p̃(z)`` of a target: its ``log_prob_unnormalized`` (a :class:`Target`),
    else its ``log_prob`` (a distribution), else the target itself if callable; the one
    rule every consumer of a target (``fit_density``, the diagnostics, the plots) uses.

    >>> import torch
    >>> log_density_fn(get_target("U1"))(torch.zeros(1, 2)).shape
    torch.Size([1])
    >>> log_density_fn(lambda z: -z.square().sum(-1))(torch.ones(2))
    tensor(-2.)

    The function returned checks that the density has one value per point (shape
    ``z.shape[:-1]``): a target summed over the batch, or a distribution without
    ``.to_event(1)``, would otherwise change what a fit optimises without an error.

    :raises TypeError: if ``target`` is none of these.
    """
    fn = None
    for attr in ("log_prob_unnormalized", "log_prob"):
        if callable(getattr(target, attr, None)):
            fn = getattr(target, attr)
            break
    if fn is None and callable(target):
        fn = target
    if fn is None:
        raise TypeError(
            "target must be a Target (log_prob_unnormalized), a distribution (log_prob) or a "
            f"callable z -> log p~(z), got {type(target).__name__}"
        )

    def log_p(z: torch.Tensor) -> torch.Tensor:
        lp = fn(z)
        if not isinstance(lp, torch.Tensor) or lp.shape != z.shape[:-1]:
            got = tuple(lp.shape) if isinstance(lp, torch.Tensor) else type(lp).__name__
            raise ValueError(
                f"target: the log density of points of shape {tuple(z.shape)} must have shape "
                f"{tuple(z.shape[:-1])} (one value per point, summed over the last dimension "
                f"only; a distribution needs .to_event(1)), got {got}"
            )
        return lp

    return log_p


class Target:
    """An unnormalised 2-D density ``exp(-U(z) - wall(z))`` with a known ``log Z``.

    :param name: short name, e.g. ``"U1"``.
    :param energy: the energy ``U`` (without the wall), batched over leading dims.
    :param box: ``((x0, x1), (y0, y1))`` plotting box (wall included).
    :param description: a one-line description.

    Example::

        >>> import torch
        >>> t = get_target("U2")
        >>> lp = t.log_prob(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # normalised
        >>> bool((lp < 0).all())
        True
    """

    def __init__(
        self,
        name: str,
        energy: Callable[[torch.Tensor], torch.Tensor],
        box: Tuple[Tuple[float, float], Tuple[float, float]] = ((-4.5, 4.5), (-4.5, 4.5)),
        description: str = "",
    ) -> None:
        self.name = name
        self.energy = energy
        self.box = box
        self.description = description
        self._log_Z: Optional[float] = None
        self._sampling_cache: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None

    def __repr__(self) -> str:
        return f"Target({self.name!r})"

    def U(self, z: torch.Tensor) -> torch.Tensor:
        """Total energy ``U(z) + wall(z)``."""
        return self.energy(z) + wall(z)

    def log_prob_unnormalized(self, z: torch.Tensor) -> torch.Tensor:
        """``log p̃(z) = −U(z) − wall(z)`` for ``z`` of shape ``(..., 2)``."""
        if z.shape[-1] != 2:
            raise ValueError(f"expected z[..., 2], got shape {tuple(z.shape)}")
        return -self.U(z)

    __call__ = log_prob_unnormalized

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised log density ``log p̃(z) − log Z``."""
        return self.log_prob_unnormalized(z) - self.log_Z

    def compute_log_Z(
        self, n: int = LOG_Z_GRID, half_width: float = INTEGRATION_HALF_WIDTH
    ) -> float:
        """log Z by Simpson integration on an ``n × n`` float64 grid (not cached)."""
        return grid_log_Z(self.log_prob_unnormalized, n=n, half_width=half_width)

    @property
    def log_Z(self) -> float:
        """log normaliser (computed on first use by a 2001² Simpson grid, cached)."""
        if self._log_Z is None:
            self._log_Z = self.compute_log_Z()
        return self._log_Z

    def density_grid(
        self, n: int = 200, box: Optional[Tuple[Tuple[float, float], Tuple[float, float]]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised density on an ``n × n`` grid over ``box`` (default ``self.box``).

        :returns: ``(X, Y, density)``, each of shape ``(n, n)`` (``X`` varies along columns).
        """
        box = self.box if box is None else box
        X, Y = _grid(n, box)
        z = torch.stack([X, Y], dim=-1)
        return X, Y, self.log_prob(z).exp()

    def sample(
        self,
        n: int,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        grid: int = 1201,
    ) -> torch.Tensor:
        """Reference samples by inverse-CDF sampling of a fine grid (cell chosen with
        probability ∝ its density, then a uniform jitter within the cell).

        :returns: float32 tensor of shape ``(n, 2)``.
        """
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        if self._sampling_cache is None or self._sampling_cache[0].numel() != grid * grid:
            hw = 5.0
            h = 2 * hw / grid
            centers = -hw + h * (torch.arange(grid, dtype=torch.float64) + 0.5)
            X, Y = torch.meshgrid(centers, centers, indexing="xy")
            lp = self.log_prob_unnormalized(torch.stack([X, Y], -1)).reshape(-1)
            probs = torch.softmax(lp, 0)
            cdf = torch.cumsum(probs, 0)
            cdf = cdf / cdf[-1]
            self._sampling_cache = (cdf, centers, h)
        cdf, centers, h = self._sampling_cache
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        idx = torch.searchsorted(cdf, u).clamp_(max=cdf.numel() - 1)
        g = centers.numel()
        iy, ix = idx // g, idx % g
        jitter = (torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5) * h
        z = torch.stack([centers[ix], centers[iy]], -1) + jitter
        return z.float()


TARGETS: Dict[str, Target] = {
    "U1": Target("U1", U1, description="ring with two lobes (bimodal)"),
    "U2": Target("U2", U2, description="sine ridge"),
    "U3": Target("U3", U3, description="two sine ridges splitting around z1 = 1"),
    "U4": Target("U4", U4, description="sine ridge and a sigmoid-shifted copy"),
}

#: log Z(U1..U4) from a 6001² grid, for cross-checks.
REFERENCE_LOG_Z: Dict[str, float] = {"U1": 1.8775, "U2": 2.1254, "U3": 2.6851, "U4": 2.7401}


def get_target(name: str) -> Target:
    """Look up a target by name (``"U1"`` … ``"U4"``, case-insensitive)."""
    key = name.upper()
    if key not in TARGETS:
        raise KeyError(f"unknown target {name!r}; choose from {sorted(TARGETS)}")
    return TARGETS[key]
