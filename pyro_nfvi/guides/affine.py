"""The full-rank affine layer of the flow guides, :math:`z = \mu + \mathrm{diag}(s)\,T x`."""

from __future__ import annotations

import torch
from torch.distributions import constraints
from torch.distributions.transforms import Transform


def _solve_rows(b: torch.Tensor, a: torch.Tensor, upper: bool) -> torch.Tensor:
    """``X`` with ``X a = b`` for the rows of ``b`` (``(..., D)``, a single row too): one
    triangular solve on the whole batch."""
    if b.dim() == 1:
        return torch.linalg.solve_triangular(a, b.unsqueeze(0), upper=upper, left=False).squeeze(0)
    return torch.linalg.solve_triangular(a, b, upper=upper, left=False)


class ScaledUnitLowerAffine(Transform):
    r"""
    The bijection :math:`z = \mu + L x` with :math:`L = \mathrm{diag}(s)\,T`, a positive
    scale :math:`s` and a *unit* lower-triangular :math:`T` (the parameterisation of
    :class:`~pyro.infer.autoguide.AutoMultivariateNormal` and of the flow guides'
    ``full_rank`` base), so that

    .. math::

        \log|\det L| = \sum_i \log s_i, \qquad
        \nabla_z \log q = L^{-\top} \nabla_x \log q = (T^{-\top} \nabla_x \log q) / s .

    The same map as Pyro's ``LowerCholeskyAffine(loc, scale[..., None] * scale_tril)``
    with fewer operations per guide step: one matrix product of the batch by
    :math:`T^\top` (not a broadcast batched product), no :math:`D \times D` scaled copy of
    :math:`T`, and the log-determinant from :math:`s` alone. ``unit_tril`` must have a unit
    diagonal (the guide's ``scale_tril`` parameter, constrained by Pyro's
    ``unit_lower_cholesky``).

    Example::

        >>> import torch
        >>> T = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
        >>> t = ScaledUnitLowerAffine(torch.zeros(2), torch.tensor([2.0, 3.0]), T)
        >>> z = t(torch.ones(2))
        >>> z.tolist(), torch.allclose(t.inv(z), torch.ones(2))
        ([2.0, 4.5], True)
        >>> round(t.log_abs_det_jacobian(torch.ones(2), z).item(), 4)  # log 6
        1.7918
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, unit_tril: torch.Tensor,
                 cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.loc, self.scale, self.unit_tril = loc, scale, unit_tril

    @property
    def scale_tril(self) -> torch.Tensor:
        """:math:`L = \\mathrm{diag}(s)\\,T` (formed on request only)."""
        return self.scale[..., None] * self.unit_tril

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc + self.scale * (x @ self.unit_tril.mT)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        # x = T^{-1} r for each row r, i.e. X T^T = R: one solve on the batch
        return _solve_rows((y - self.loc) / self.scale, self.unit_tril.mT, upper=True)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.log(self.scale).sum(-1).expand(x.shape[:-1])

    def pushed_score(self, score: torch.Tensor) -> torch.Tensor:
        """The score :math:`\\nabla \\log` density pushed from ``x`` to ``z`` (named apart from
        the flows' ``push_score(x, score)``, which also returns ``z``):
        :math:`(T^{-\\top} s_x) / s` for each row ``s_x``, i.e. ``Y T = S_x``."""
        return _solve_rows(score, self.unit_tril, upper=False) / self.scale

    def with_cache(self, cache_size: int = 1) -> "ScaledUnitLowerAffine":
        if self._cache_size == cache_size:
            return self
        return ScaledUnitLowerAffine(self.loc, self.scale, self.unit_tril, cache_size=cache_size)
