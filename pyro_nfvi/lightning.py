r"""Stochastic variational inference with PyTorch Lightning: one process, many processes,
many machines (DistributedDataParallel).

Install the optional extra first: ``pip install "pyro_nfvi[lightning]"``. The core
package never imports this module.

:class:`PyroLightningModule` follows the pattern of Pyro's ``examples/svi_lightning.py``:
the ELBO is a ``torch.nn.Module`` (``Trace_ELBO()(model, guide)`` returns an
:class:`~pyro.infer.elbo.ELBOModule` whose forward pass is the differentiable loss
:math:`-\widehat{\mathrm{ELBO}}`), the guide's parameters are created before
DistributedDataParallel (DDP) wraps the module, and Lightning does the rest: it shards a
``DataLoader`` with a :class:`~torch.utils.data.distributed.DistributedSampler`, all-reduces
the gradients and checkpoints the parameters.

**Scaling a subsampled plate across ranks.** Write the model for *one rank's minibatch*
with the plate's full size, exactly as for single-process subsampling::

    with pyro.plate("data", num_data, subsample=idx):   # idx: this rank's B row indices
        ...

Pyro scales the plate's log-densities by :math:`N / B`, so each rank's loss is an unbiased
estimate of the *full-data* negative ELBO from its own minibatch :math:`\mathcal{B}_r`:

.. math::

    L_r = -\mathbb{E}_q\Big[\log p(\theta) - \log q(\theta)
          + \frac{N}{B} \sum_{i \in \mathcal{B}_r} \big(\log p(x_i, z_i \mid \theta)
          - \log q(z_i \mid x_i)\big)\Big].

DDP *averages* the ranks' gradients, so with world size :math:`W` the update uses

.. math::

    \frac{1}{W}\sum_{r=1}^{W} \nabla L_r
    = -\nabla\,\mathbb{E}_q\Big[\log p(\theta) - \log q(\theta)
      + \frac{N}{W B} \sum_{i \in \mathcal{B}_1 \cup \dots \cup \mathcal{B}_W} \dots\Big],

the gradient of the estimate from the global batch of :math:`W B` rows: the likelihood is
scaled to the full data once, not once per rank, and the global terms are counted once.
Do **not** divide the plate's scale by :math:`W` yourself (the update would be
:math:`W` times too small for the local terms), and do not pass the per-rank shard size
as the plate's size. ``tests/test_lightning.py`` checks that the all-reduced gradient of
2 ranks equals the single-process gradient of the concatenated batch to 1e-10.

Get the row indices from the data, e.g.
``TensorDataset(torch.arange(N), x)`` (batches ``(idx, x_rows)``): the sampler shards the
indices with the rows, which guides with one parameter per row (Pyro's ``AutoNormal`` on
a subsampled plate) need. A model that draws its own subsample
(``subsample_size=B`` with the whole data set on every rank) is also correct (each rank's
loss is still a full-data estimate), but every rank then holds all rows and nothing is
sharded.

**Parameters live in the modules.** DDP all-reduces the gradients of the module's own
``nn.Parameter`` objects, so every tensor the loss trains must be a parameter of ``model``
or ``guide`` (a :class:`~pyro.nn.PyroModule` attribute, an autoguide's parameter, or a
registered submodule), not only an entry of Pyro's global param store. At construction
the module runs the loss once on ``example_batch`` (autoguides create their parameters
lazily on their first call, and DDP must see them before it wraps the module) and checks
that every tensor behind a ``pyro.param`` site belongs to ``model`` or ``guide`` and that
every trainable parameter of theirs receives a gradient: DDP's ``find_unused_parameters``
is never needed, and a parameter that DDP would not all-reduce is reported by name
instead of silently diverging across ranks. Pyro's own Lightning example also calls
``pyro.settings.set(module_local_params=True)`` before building model and guide, which
keeps parameters out of the global store altogether; both modes work here.

**Caches.** The flows of this package cache a forward pass keyed on the parameters'
version counters; DDP's initial broadcast and every optimiser step modify the parameters
in place (bumping the counters) while the all-reduce only touches gradients, so no rank
ever reads a log-density computed with old parameters.

Example (one process here; ``devices=N, strategy="ddp"`` or ``torchrun`` for more)::

    >>> import torch, pyro, pyro.distributions as dist
    >>> # first: it imports Lightning past the import error of PyPI's torchvision next to
    >>> # a CPU torch (Lightning imports torchvision when it is installed)
    >>> from pyro_nfvi.lightning import PyroLightningModule
    >>> import lightning.pytorch as pl
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from pyro.nn import PyroModule
    >>> from pyro_nfvi import AutoPlanarFlow
    >>> N = 64
    >>> class Model(PyroModule):
    ...     def forward(self, idx, x):
    ...         loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    ...         with pyro.plate("data", N, subsample=idx):
    ...             pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)
    >>> x = torch.randn(N) + 3.0
    >>> data = TensorDataset(torch.arange(N), x)
    >>> model = Model()
    >>> guide = AutoPlanarFlow(model, num_flows=4)
    >>> module = PyroLightningModule(model, guide, example_batch=data[:16], lr=0.05, seed=0)
    >>> trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False,
    ...                      enable_checkpointing=False, enable_progress_bar=False,
    ...                      enable_model_summary=False)
    >>> trainer.fit(module, DataLoader(data, batch_size=16, shuffle=True),
    ...             DataLoader(data, batch_size=32))
    >>> sorted(trainer.callback_metrics)
    ['train_loss', 'val_loss']
    >>> sorted(guide.median(*data[:16], num_samples=100))
    ['loc']

References:

* [1] Pyro, ``examples/svi_lightning.py``, https://github.com/pyro-ppl/pyro
* [2] S. Li et al. (2020), "PyTorch Distributed: Experiences on Accelerating Data
  Parallel Training", VLDB. https://arxiv.org/abs/2006.15704
* [3] M. D. Hoffman, D. M. Blei, C. Wang, J. Paisley (2013), "Stochastic Variational
  Inference", JMLR (the N/B scaling of a subsampled likelihood).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import torch

from ._compat import import_lightning_pytorch
from ._rng import fork_rng
from ._validation import check_int, check_positive

try:
    pl = import_lightning_pytorch()
except ImportError as e:  # pragma: no cover - exercised by a test that hides lightning
    raise ImportError(
        "pyro_nfvi.lightning needs PyTorch Lightning (lightning>=2.0): "
        'pip install "pyro_nfvi[lightning]"'
    ) from e

from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.poutine.messenger import Messenger

__all__ = ["PyroLightningModule", "batch_to_args"]


def batch_to_args(batch: Any) -> Tuple[tuple, dict]:
    """The default map from a ``DataLoader`` batch to the model's ``(args, kwargs)``:
    a tuple or list is unpacked as positional arguments, a dict as keyword arguments, and
    anything else (e.g. a single tensor) is the one positional argument."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


class _ParamCollector(Messenger):
    """Records the leaf tensors behind every ``pyro.param`` site (public handler API)."""

    def __init__(self) -> None:
        super().__init__()
        self.params: Dict[str, torch.Tensor] = {}

    def _pyro_post_param(self, msg) -> None:
        value = msg["value"]
        unconstrained = getattr(value, "unconstrained", None)
        if callable(unconstrained):  # constrained PyroParam: its leaf is the unconstrained one
            leaf = unconstrained()
            if leaf is not None:
                value = leaf
        if isinstance(value, torch.Tensor) and value.requires_grad:
            self.params.setdefault(msg["name"], value)


class PyroLightningModule(pl.LightningModule):
    r"""A :class:`lightning.pytorch.LightningModule` that trains any Pyro guide (this
    package's :class:`~pyro_nfvi.guides.AutoPlanarFlow`,
    :class:`~pyro_nfvi.amortized.AutoAmortizedFlow`, hand-written guides built on
    :class:`~pyro_nfvi.amortized.AmortizedFlow`, or Pyro's own autoguides) by minimising
    :math:`-\mathrm{ELBO}` with a torch optimiser, on one process or many (DDP).

    ``training_step`` evaluates ``loss_fn(*args, **kwargs)`` with ``(args, kwargs) =
    batch_to_args(batch)``, where ``loss_fn = elbo(model, guide)`` is Pyro's
    :class:`~pyro.infer.elbo.ELBOModule`; ``validation_step`` logs the same loss as
    ``val_loss`` (averaged over ranks). See the module docstring for how a subsampled plate
    must be scaled so that the DDP average is the estimate from the global batch.

    :param model: the Pyro model, an ``nn.Module`` (e.g. a :class:`~pyro.nn.PyroModule`)
        so that its parameters are trained and synchronised.
    :param guide: the guide, an ``nn.Module`` (every Pyro autoguide is one).
    :param elbo: an :class:`~pyro.infer.ELBO` (default ``Trace_ELBO()``).
    :param example_batch: one batch as the ``DataLoader`` yields it (or the dataset's
        slice ``data[:B]``). The loss is run on it once here, so that lazily created guide
        parameters exist before DDP wraps the module and before a checkpoint is loaded, and
        the parameter checks run. ``None`` only if model and guide already own all their
        parameters (e.g. you ran the guide yourself).
    :param lr: learning rate of the default optimiser, ``torch.optim.Adam``.
    :param optimizer: optional ``params -> torch.optim.Optimizer`` replacing the default.
    :param seed: if given, the torch RNG is reseeded before every training step with a
        seed derived from ``(seed, global_step, rank)`` (:meth:`noise_seed`): the Monte
        Carlo noise then depends only on the step, so a run resumed from a checkpoint
        repeats the uninterrupted run exactly, and ranks draw independent noise even when
        ``seed_everything`` gave every rank the same RNG state.
    :param seed_per_rank: with ``seed``: ``True`` (default) derives a different seed per
        rank (independent noise, a lower-variance averaged gradient); ``False`` gives all
        ranks the same noise stream (used to compare DDP with one process exactly).
    :param batch_to_args: ``batch -> (args, kwargs)`` for the model and guide (default
        :func:`batch_to_args`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        guide: torch.nn.Module,
        elbo: Optional[ELBO] = None,
        *,
        example_batch: Any = None,
        lr: float = 1e-3,
        optimizer: Optional[Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]] = None,
        seed: Optional[int] = None,
        seed_per_rank: bool = True,
        batch_to_args: Callable[[Any], Tuple[tuple, dict]] = batch_to_args,
    ) -> None:
        super().__init__()
        for name, value in (("model", model), ("guide", guide)):
            if not isinstance(value, torch.nn.Module):
                raise TypeError(
                    f"{name} must be a torch.nn.Module (e.g. a pyro.nn.PyroModule or an "
                    f"autoguide) so that DDP can synchronise its parameters, got "
                    f"{type(value).__name__}"
                )
        if elbo is None:
            elbo = Trace_ELBO()
        if not isinstance(elbo, ELBO):
            raise TypeError(f"elbo must be a pyro.infer.ELBO, got {type(elbo).__name__}")
        lr = check_positive(lr, "lr")
        if optimizer is not None and not callable(optimizer):
            raise TypeError("optimizer must be a function params -> torch.optim.Optimizer")
        if seed is not None:
            seed = check_int(seed, "seed", minimum=0)
        if not callable(batch_to_args):
            raise TypeError("batch_to_args must be a function batch -> (args, kwargs)")
        self.loss_fn: ELBOModule = elbo(model, guide)
        self.lr = float(lr)
        self.optimizer_fn = optimizer
        self.seed = seed
        self.seed_per_rank = bool(seed_per_rank)
        self.batch_to_args = batch_to_args
        if example_batch is not None:
            self.initialize(example_batch)

    # The ELBOModule owns model and guide: exposing them as properties (not attributes)
    # keeps each parameter under one state_dict key.
    @property
    def model(self) -> torch.nn.Module:
        return self.loss_fn.model

    @property
    def guide(self) -> torch.nn.Module:
        return self.loss_fn.guide

    # ------------------------------------------------------------------ setup
    def _loss(self, batch: Any) -> torch.Tensor:
        args, kwargs = self.batch_to_args(batch)
        return self.loss_fn(*args, **kwargs)

    def initialize(self, example_batch: Any) -> torch.Tensor:
        """Run the loss once on ``example_batch`` (creating lazily built guide parameters)
        and check the parameters: every tensor behind a ``pyro.param`` site must be a
        parameter of ``model`` or ``guide``, and every trainable parameter of theirs must
        get a gradient. Raises ``ValueError`` naming the offending parameter. Returns the
        loss. Called by ``__init__`` when ``example_batch`` is given."""
        collector = _ParamCollector()
        with fork_rng(range(torch.cuda.device_count())):  # no effect on the caller's random streams
            # the first call creates lazy parameters (a PyroParam may pass through a
            # temporary tensor on its creating call); the second is the one checked
            with torch.no_grad():
                self._loss(example_batch)
            with collector:
                loss = self._loss(example_batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"the loss on example_batch must be a scalar tensor, got {loss!r}")
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        owned = {id(p) for _, p in named}
        foreign = [n for n, p in collector.params.items() if id(p) not in owned]
        if foreign:
            raise ValueError(
                f"parameters {foreign} are used by the ELBO but are not parameters of the "
                "model or guide modules: DDP would not all-reduce their gradients and the "
                "optimiser would not update them. Make them attributes of a PyroModule "
                "(PyroParam / nn.Parameter) or register their nn.Module as a submodule."
            )
        if not named:
            raise ValueError("model and guide have no trainable parameters")
        if not loss.requires_grad:
            raise ValueError("the loss on example_batch does not depend on any parameter")
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        unused = [n for (n, _), g in zip(named, grads) if g is None]
        if unused:
            raise ValueError(
                f"parameters {unused} get no gradient from the loss on example_batch: DDP "
                "would need find_unused_parameters=True and they would never train. Remove "
                "them, freeze them (requires_grad_(False)), or use them in the loss."
            )
        return loss.detach()

    def noise_seed(self, step: int, rank: int = 0) -> int:
        """The torch seed used before training step ``step`` on rank ``rank`` (requires
        ``seed``): a hash of ``(seed, step, rank)`` (``rank`` ignored when
        ``seed_per_rank=False``) by NumPy's ``SeedSequence``."""
        if self.seed is None:
            raise ValueError("noise_seed needs the module's seed (PyroLightningModule(seed=...))")
        words = [self.seed, int(step), int(rank) if self.seed_per_rank else 0]
        return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)

    # --------------------------------------------------------------- lightning
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The differentiable loss :math:`-\\widehat{\\mathrm{ELBO}}` on ``(args, kwargs)``."""
        return self.loss_fn(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.seed is not None:
            torch.manual_seed(self.noise_seed(self.global_step, self.global_rank))
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, sync_dist=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_fn is not None:
            return self.optimizer_fn(self.parameters())
        return torch.optim.Adam(self.parameters(), lr=self.lr)
