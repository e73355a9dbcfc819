r"""Amortized flow posteriors for local latent variables (Rezende & Mohamed 2015, §4, §6.3).

A variational auto-encoder's posterior in "Variational Inference with Normalizing Flows"
is an *inference network* followed by ``K`` flows whose parameters that network emits:

.. math::

    (\mu, \sigma, \theta_1, \dots, \theta_K) = g_\phi(x), \qquad
    z_0 \sim \mathcal{N}(\mu, \operatorname{diag}\sigma^2), \qquad
    z_K = f_{\theta_K} \circ \dots \circ f_{\theta_1}(z_0),

    \log q_\phi(z_K \mid x) = \log \mathcal{N}(z_0; \mu, \sigma^2)
        - \sum_{k=1}^K \log\left|\det \frac{\partial f_{\theta_k}}{\partial z_{k-1}}\right| .

This module provides

* :class:`AmortizedFlow` (alias :data:`ConditionalFlowPosterior`): an ``nn.Module`` that
  maps a context (encoder features) to that distribution, for ``pyro.sample`` in any
  hand-written guide. All of :math:`\mu, \sigma, \theta_{1..K}` come from ONE call of one
  network. ``num_flows=0`` is the plain Gaussian encoder (the usual VAE).
* :class:`AutoAmortizedFlow`: an autoguide for models with global latents and per-datum
  local latents inside a (possibly subsampled) ``pyro.plate``. Global latents get a flow
  autoguide (:class:`~pyro_nfvi.guides.AutoPlanarFlow` by default), local latents get an
  :class:`AmortizedFlow` fed by a user-given encoder of the plate's data.

Because the planar and radial layers of this package have exact inverses,
``log_prob`` of *any* value is exact (not only of the values just sampled), e.g. for
importance-sampling estimates of :math:`\log p(x)` or for checking a posterior.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import biject_to

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.guides import AutoGuide
from pyro.infer.autoguide.utils import _product

from ._validation import ArgumentError, check_context, check_hidden_dims, check_int, check_positive
from .guides.flow import _JacobianDelta
from .guides.posterior import _FlowPosterior, eval_mode
from .transforms.planar import ConditionedStackedPlanar
from .transforms.radial import ConditionedStackedRadial
from .transforms.sylvester import ConditionedStackedSylvester, _unpack_triu

__all__ = ["AmortizedFlow", "ConditionalFlowPosterior", "AutoAmortizedFlow"]

_FLOWS = ("planar", "radial", "sylvester")


def _softplus_inverse(s: float) -> float:
    r""":math:`\log(e^s - 1)` written as :math:`s + \log(1 - e^{-s})`: no overflow for large
    ``s`` (``math.expm1`` overflows past 709) and exact for tiny ``s`` (about ``log s``)."""
    return s + math.log(-math.expm1(-s))


def _scale_shift(init_scale: float) -> float:
    r"""The shift :math:`\rho_0` of the scale output, or :class:`ArgumentError` when
    ``softplus(rho_0)`` is not a normal finite number of the default dtype (a scale of 0
    or inf would give an infinite or NaN ``log_prob``)."""
    shift = _softplus_inverse(init_scale)
    dtype = torch.get_default_dtype()
    scale = F.softplus(torch.tensor(shift, dtype=dtype)).item()
    finfo = torch.finfo(dtype)
    if not finfo.tiny <= scale <= finfo.max:
        raise ArgumentError(
            f"init_scale must be between {finfo.tiny:.3g} and {finfo.max:.3g} (a normal "
            f"number of the default dtype {dtype}), got {init_scale!r}"
        )
    return shift


def _check_options(
    num_flows, flow, hidden_dims, init_scale, head_scale
) -> Tuple[int, str, List[int], float, float]:
    """The checked posterior options of :class:`AmortizedFlow` (also checked by
    :class:`AutoAmortizedFlow` at construction, before any model run)."""
    num_flows = check_int(num_flows, "num_flows", 0)
    if flow not in _FLOWS:
        raise ValueError(f"flow must be one of {_FLOWS}, got {flow!r}")
    hidden_dims = check_hidden_dims(hidden_dims)
    init_scale = check_positive(init_scale, "init_scale")
    _scale_shift(init_scale)
    return num_flows, flow, hidden_dims, init_scale, check_positive(head_scale, "head_scale")


class AmortizedFlow(nn.Module):
    r"""An amortized normalizing-flow posterior: context :math:`\mapsto q(z \mid
    \text{context})`, a Gaussian followed by ``num_flows`` planar or radial layers whose
    parameters are all emitted, with the Gaussian's location and scale, by ONE call of one
    network (Rezende & Mohamed 2015, §4):

    .. math::

        (\mu, \rho, \theta) = \mathrm{net}(c), \quad
        \sigma = \operatorname{softplus}(\rho + \rho_0), \quad
        z_0 \sim \mathcal{N}(\mu, \operatorname{diag}\sigma^2), \quad
        z = f_{\theta_K} \circ \dots \circ f_{\theta_1}(z_0),

    with :math:`\rho_0 = \log(e^{s_0} - 1)` so that :math:`\sigma \approx s_0 =`
    ``init_scale`` when the network's raw output is near zero. For planar layers
    :math:`\theta_k = (b_k, u_k, w_k)` (:math:`K + 2KD` outputs; :math:`w_k` is the output
    plus a fixed random unit vector, so that it starts away from 0), for radial layers
    :math:`\theta_k = (z_{0,k}, \alpha'_k, \beta'_k)` (:math:`KD + 2K` outputs), for
    Sylvester layers (``kind="orthogonal"``, bottleneck :math:`M = D`) :math:`\theta_k =
    (b_k, R_k, \tilde R_k, U_k)` (:math:`KD + KD(D+1) + KD^2` outputs; a zero output is the
    identity layer); the
    invertibility constraints are applied inside the layers. ``net`` is an MLP with
    ``hidden_dims`` hidden ReLU layers; the default ``hidden_dims=()`` is a linear head on
    the context, as in the paper, where the inference network's last layer emits all
    parameters (put the feature extraction in the encoder that computes the context).
    The flow parameters are ``head_scale`` times the network's raw outputs, which start
    at PyTorch's default initialisation (so each layer starts as a mild, nearly linear
    map). Adam moves every weight by about its learning rate whatever the gradient's
    scale, so ``head_scale`` is the flow head's step relative to the Gaussian's location
    and scale. At ``head_scale=1`` all ``K`` layers move as fast as the location at every
    step and their composed noise makes :math:`q(z \mid x)` worse as ``K`` grows (on
    binarised MNIST with a frozen decoder, 6 epochs, 2 seeds: test -ELBO 104.41 with the
    Gaussian encoder; 104.36 and 105.20 with 16 and 64 planar layers at ``head_scale=1``;
    103.80, 102.95 and 102.49 with 4, 16 and 64 layers at the default 0.1;
    ``benchmarks/vae_mnist_frozen.py``).

    ``forward(context)`` returns a distribution with ``batch_shape = context.shape[:-1]``
    and ``event_shape = (latent_dim,)`` (the event dim is the latent dim, so use it in a
    plate directly, no ``.to_event`` needed): a
    :class:`~pyro.distributions.TransformedDistribution` of
    ``Normal(0, 1).to_event(1)`` by ``AffineTransform(loc, scale, event_dim=1)`` and then
    a :class:`~pyro_nfvi.transforms.ConditionedStackedPlanar` (or ``...Radial``) when
    ``num_flows >= 1``, and ``Normal(loc, scale).to_event(1)`` itself when
    ``num_flows == 0`` (the plain Gaussian encoder, the VAE baseline). It has ``rsample``
    (reparameterised), and ``log_prob`` of any value (the layers' inverses are exact);
    values with extra leading sample dims broadcast against the context's batch shape.

    Example (a VAE guide)::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro_nfvi.amortized import AmortizedFlow
        >>> encoder = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
        >>> q_net = AmortizedFlow(latent_dim=2, context_dim=32, num_flows=8)
        >>> def guide(x):
        ...     pyro.module("encoder", encoder)
        ...     pyro.module("q_net", q_net)
        ...     with pyro.plate("data", x.shape[0]):
        ...         return pyro.sample("z", q_net(encoder(x)))
        >>> x = torch.rand(5, 64)
        >>> guide(x).shape
        torch.Size([5, 2])
        >>> q = q_net(encoder(x))
        >>> q.batch_shape, q.event_shape
        (torch.Size([5]), torch.Size([2]))
        >>> q.log_prob(torch.zeros(3, 5, 2)).shape        # any value, exact
        torch.Size([3, 5])

    :param latent_dim: dimension ``D`` of ``z``.
    :param context_dim: size ``C`` of the context's last dim.
    :param num_flows: number of flow layers ``K >= 0``; 0 gives a Gaussian.
    :param flow: ``"planar"`` (default), ``"radial"`` or ``"sylvester"``.
    :param hidden_dims: hidden layer sizes of the parameter network (default: none,
        a linear map of the context).
    :param init_scale: the Gaussian scale when the network's scale output is zero. Its
        shift :math:`\rho_0` is stored in the state dict (as ``scale_shift``), so a saved
        posterior reloads with the scale it was trained with.
    :param bool stl: sticking-the-landing gradients (Roeder, Wu & Duvenaud 2017): the
        ``log_prob`` of a sample drawn by ``rsample`` is exact but its gradient keeps only
        the path term, dropping the zero-mean score term whose variance grows with the
        number of layers. Default ``False`` (the plain reparameterised gradient).
    :param head_scale: multiplier of the network's flow-parameter outputs: the flow
        head's optimiser step relative to the location's (see above). Default 0.1.
        Stored in the state dict, so a saved posterior reloads with the scale it was
        trained with.
    """

    def __init__(
        self,
        latent_dim: int,
        context_dim: int,
        num_flows: int = 8,
        flow: str = "planar",
        hidden_dims: Sequence[int] = (),
        init_scale: float = 1.0,
        stl: bool = False,
        head_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if not isinstance(stl, bool):
            raise ArgumentError(f"stl must be True or False, got {stl!r}")
        self.stl = stl
        self.latent_dim = check_int(latent_dim, "latent_dim", 1)
        self.context_dim = check_int(context_dim, "context_dim", 1)
        self.num_flows, self.flow, hidden_dims, init_scale, head_scale = _check_options(
            num_flows, flow, hidden_dims, init_scale, head_scale
        )
        # a buffer, not a float: the trained weights mean nothing without it
        self.register_buffer("head_scale", torch.tensor(head_scale))
        # a buffer too: the trained scale outputs are relative to this shift
        self.register_buffer("scale_shift", torch.tensor(_scale_shift(init_scale)))

        D, K = self.latent_dim, self.num_flows
        if K == 0:
            self.param_dims: Tuple[int, ...] = (D, D)
        elif flow == "sylvester":  # orthogonal Q, bottleneck M = D
            tri = D * (D + 1) // 2
            self.param_dims = (D, D, K * D, K * tri, K * tri, K * D * D)  # loc, scale, b, R, R~, U
        elif flow == "planar":
            self.param_dims = (D, D, K, K * D, K * D)  # loc, scale, bias, u, w
        else:
            self.param_dims = (D, D, K * D, K, K)  # loc, scale, x0, alpha', beta'
        layers: List[nn.Module] = []
        sizes = [self.context_dim] + hidden_dims
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], sum(self.param_dims)))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():  # flow parameters start at 0.1 x the default: mild layers
            layers[-1].weight[2 * D :] *= 0.1 / head_scale
            layers[-1].bias[2 * D :] *= 0.1 / head_scale
        if flow == "planar" and K > 0:
            # w = head output + a fixed unit vector per layer: each layer starts with a
            # unit-slope tanh along a random direction instead of w ~ 0 (a translation);
            # a local generator keeps the user's random stream alone
            gen = torch.Generator().manual_seed(0)
            w0 = torch.randn(K, D, generator=gen)
            self.register_buffer("_w_offset", w0 / w0.norm(dim=-1, keepdim=True), persistent=False)

    @property
    def init_scale(self) -> float:
        """The Gaussian scale at a zero scale output, ``softplus(scale_shift)`` (the loaded
        one after ``load_state_dict``)."""
        return F.softplus(self.scale_shift).item()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the shift was stored were trained with the shift of the
        # init_scale the module is rebuilt with: keep them loadable with that one
        state_dict.setdefault(prefix + "scale_shift", self.scale_shift.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"latent_dim={self.latent_dim}, context_dim={self.context_dim}, "
            f"num_flows={self.num_flows}, flow={self.flow!r}, head_scale={self.head_scale.item():g}"
        )

    def params(self, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, tuple]:
        """All parameters from one network call: ``(loc (..., D), scale (..., D),
        flow_params)`` where ``flow_params`` is ``(bias (..., K, 1), u (..., K, D),
        w (..., K, D))`` (planar, raw ``u``: the layers constrain it), ``(x0 (..., K, D),
        alpha' (..., K, 1), beta' (..., K, 1))`` (radial), ``(b (..., K, D), R (..., K, D, D),
        R_tilde (..., K, D, D), U (..., K, D, D))`` (sylvester, raw), or ``()`` when ``K = 0``."""
        check_context(context, self.context_dim)
        D, K = self.latent_dim, self.num_flows
        out = self.net(context)
        loc, scale = out[..., :D], F.softplus(out[..., D : 2 * D] + self.scale_shift)
        if K == 0:
            return loc, scale, ()
        # the flow block scaled once, then split per parameter
        out = (out[..., 2 * D :] * self.head_scale).split(self.param_dims[2:], dim=-1)
        if self.flow == "sylvester":
            b, r, rt, u = out
            # the layers' bounded parameterisation makes raw zeros the identity layer
            R = _unpack_triu(r.unflatten(-1, (K, -1)), D)
            Rt = _unpack_triu(rt.unflatten(-1, (K, -1)), D)
            return loc, scale, (b.unflatten(-1, (K, D)), R, Rt, u.unflatten(-1, (K, D, D)))
        if self.flow == "planar":
            bias, u, w = out
            u, w = u.unflatten(-1, (K, D)), w.unflatten(-1, (K, D)) + self._w_offset.to(w.dtype)
            return loc, scale, (bias.unsqueeze(-1), u, w)
        x0, alpha_prime, beta_prime = out
        return loc, scale, (x0.unflatten(-1, (K, D)), alpha_prime.unsqueeze(-1), beta_prime.unsqueeze(-1))

    def get_transform(self, context: torch.Tensor) -> Optional[dist.transforms.Transform]:
        """The conditioned K-layer flow for this context (``None`` when ``K = 0``)."""
        return self._transform(self.params(context)[2])

    def _transform(self, flow_params):
        if not flow_params:
            return None
        if self.flow == "sylvester":
            return ConditionedStackedSylvester(flow_params)
        if self.flow == "planar":
            return ConditionedStackedPlanar(flow_params)
        return ConditionedStackedRadial(flow_params)

    def forward(self, context: torch.Tensor) -> dist.TorchDistribution:
        """The posterior :math:`q(z \\mid \\text{context})`: batch shape
        ``context.shape[:-1]``, event shape ``(latent_dim,)``."""
        loc, scale, flow_params = self.params(context)
        transform = self._transform(flow_params)
        if transform is None and not self.stl:
            return dist.Normal(loc, scale).to_event(1)
        # z0 = loc + scale * eps, then the layers (the paper's order; layers acting on eps
        # before the affine map trained worse on MNIST: validation -ELBO 130.9-150.4 vs
        # 117.6 after 3 epochs at K = 64). log q of a fresh sample comes from the forward
        # pass (no inverse); with stl=True its gradient is the sticking-the-landing one.
        base = dist.Normal(torch.zeros_like(loc), torch.ones_like(scale)).to_event(1)
        affine = dist.transforms.AffineTransform(loc, scale, event_dim=1)
        q = _FlowPosterior(base, [affine] if transform is None else [affine, transform])
        q._standard_base, q._stl = True, self.stl
        return q


#: Alias of :class:`AmortizedFlow`.
ConditionalFlowPosterior = AmortizedFlow


class AutoAmortizedFlow(AutoGuide):
    r"""Autoguide for models with global latents and per-datum local latents in a plate:
    global sites get a flow autoguide, the named local sites get an :class:`AmortizedFlow`
    fed by ``encoder`` applied to the plate's (subsampled) data rows:

    .. math::

        q(\beta, z_{1:N} \mid x) = q_{\text{flow}}(\beta)\,
            \prod_{i \in \text{batch}} q_\phi(z_i \mid \mathrm{encoder}(x_i)).

    All local sites of one datum are concatenated (in unconstrained space, as in
    :class:`~pyro.infer.autoguide.AutoContinuous`) into one vector that one amortized flow
    models jointly; constrained local sites (e.g. positive) are mapped by
    ``biject_to(support)`` with the Jacobian accounted for.

    **Contract.**

    * ``plate``: the name of a vectorized ``pyro.plate`` of the model. Every latent site
      inside it must be listed in ``local_sites`` (and local sites must be in no other
      plate), with one value per row of the plate (batch shape of the plate, event shape
      free). Latent sites outside the plate are global.
    * ``data_fn(*args, **kwargs)`` is called with the model's arguments at every guide
      call and returns the plate's data: a tensor (or anything ``encoder`` accepts that
      supports ``.index_select(0, idx)`` and ``.shape``) whose dim 0 is the plate's rows,
      either all ``N`` rows (the guide selects the subsample) or exactly the subsampled
      rows (used as they are). ``encoder`` maps that ``(B, ...)`` batch to features
      ``(B, C)``; ``C`` is found on the first call.
    * Subsampling: write the model's plate with ``subsample_size=B`` and index the data
      with the indices it yields (``with pyro.plate("data", N, subsample_size=B) as idx:
      ... obs=x[idx]``). The guide opens the same plate first, so the indices are drawn in
      the guide and replayed into the model; the encoder sees exactly the rows of the
      model's minibatch. If the model chooses indices itself (``subsample=idx``), pass
      ``create_plates`` returning the same ``pyro.plate(..., subsample=idx)`` for the
      guide (as for any Pyro autoguide).

    Parameters (the encoder's, the amortized head's, the global guide's) are created on
    the first call, as for every Pyro autoguide: call ``guide(*args, **kwargs)`` once
    before ``load_state_dict``. After training, ``guide.posterior(guide.encoder(rows))``
    is the amortized posterior (an :class:`AmortizedFlow` distribution over the packed
    unconstrained local latents, one per row) of any data rows, seen or not.

    Example::

        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> from pyro_nfvi.amortized import AutoAmortizedFlow
        >>> def model(x):                       # x: (N, 3)
        ...     s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("data", x.shape[0], subsample_size=16) as idx:
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        ...         loc = z @ torch.ones(2, 3)
        ...         pyro.sample("x", dist.Normal(loc, s).to_event(1), obs=x[idx])
        >>> x = torch.randn(100, 3)
        >>> encoder = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh())
        >>> guide = AutoAmortizedFlow(model, plate="data", local_sites=["z"],
        ...                           encoder=encoder, data_fn=lambda x: x, num_flows=4)
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
        >>> loss = svi.step(x)
        >>> sorted(guide(x)), guide(x)["z"].shape
        (['s', 'z'], torch.Size([16, 2]))

    :param model: the Pyro model.
    :param plate: name of the model's plate over data rows.
    :param local_sites: name(s) of the latent sites inside ``plate``.
    :param encoder: ``nn.Module`` mapping the plate's data rows ``(B, ...)`` to features
        ``(B, C)``; trained with the guide (registered with Pyro).
    :param data_fn: maps the model's ``*args, **kwargs`` to the plate's data (see above).
    :param num_flows: flow layers of the amortized posterior (0: Gaussian encoder).
    :param flow: ``"planar"``, ``"radial"`` or ``"sylvester"`` (see :class:`AmortizedFlow`).
    :param hidden_dims: hidden layers of the amortized head (see :class:`AmortizedFlow`).
    :param init_scale: initial scale of the local Gaussian (see :class:`AmortizedFlow`).
    :param head_scale: step of the amortized flow head (see :class:`AmortizedFlow`).
    :param global_guide: a function ``model -> AutoGuide`` that builds the guide of the
        global sites from the model with the local sites hidden
        (``poutine.block(model, hide=local_sites)``); default
        ``AutoPlanarFlow(m, num_flows=8)``. Not called if the model has no global latents.
    :param create_plates: as in :class:`~pyro.infer.autoguide.AutoGuide`.
    """

    def __init__(
        self,
        model: Callable,
        *,
        plate: str,
        local_sites: Union[str, Sequence[str]],
        encoder: nn.Module,
        data_fn: Callable[..., torch.Tensor],
        num_flows: int = 8,
        flow: str = "planar",
        hidden_dims: Sequence[int] = (),
        init_scale: float = 1.0,
        head_scale: float = 0.1,
        global_guide: Optional[Callable[[Callable], AutoGuide]] = None,
        create_plates: Optional[Callable] = None,
    ) -> None:
        if not isinstance(plate, str):
            raise TypeError(f"plate must be the name (str) of a pyro.plate, got {plate!r}")
        if isinstance(local_sites, str):
            local_sites = [local_sites]
        local_sites = list(local_sites)
        if not local_sites or not all(isinstance(s, str) for s in local_sites):
            raise ValueError(f"local_sites must be a non-empty list of site names, got {local_sites!r}")
        if len(set(local_sites)) != len(local_sites):
            raise ValueError(f"local_sites has duplicates: {local_sites!r}")
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        if not callable(data_fn):
            raise TypeError(f"data_fn must be callable (model args -> plate data), got {data_fn!r}")
        if global_guide is not None and not callable(global_guide):
            raise TypeError("global_guide must be a function model -> AutoGuide")
        # validate the posterior's options now, not on the first call, without building
        # one: its initialisation would draw from the user's random stream
        _check_options(num_flows, flow, hidden_dims, init_scale, head_scale)
        super().__init__(model, create_plates=create_plates)
        self.plate_name = plate
        self.local_sites = local_sites
        self.encoder = encoder
        self.data_fn = data_fn
        self._posterior_kwargs = dict(
            num_flows=num_flows,
            flow=flow,
            hidden_dims=tuple(hidden_dims),
            init_scale=init_scale,
            head_scale=head_scale,
        )
        self._global_guide_fn = global_guide
        self.global_guide = None
        self.posterior = None

    # ------------------------------------------------------------------ setup
    def _setup_prototype(self, *args, **kwargs) -> None:
        try:
            self._setup_impl(*args, **kwargs)
        except Exception:
            self.prototype_trace = None  # retry from scratch on the next call
            raise

    def _error_missing(self, name: str, args, kwargs) -> ValueError:
        full = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
        latent = [n for n, s in self.prototype_trace.iter_stochastic_nodes()]
        if name in full.nodes and full.nodes[name]["type"] == "sample" and full.nodes[name]["is_observed"]:
            return ValueError(
                f"local site '{name}' is observed in the model; local_sites must be latent "
                f"sample sites inside plate '{self.plate_name}' (latent sites: {latent})"
            )
        return ValueError(
            f"local site '{name}' is not a latent sample site of the model "
            f"(latent sites: {latent})"
        )

    def _setup_impl(self, *args, **kwargs) -> None:
        super()._setup_prototype(*args, **kwargs)
        name = type(self).__name__
        trace = self.prototype_trace
        latent = {n: s for n, s in trace.iter_stochastic_nodes()}
        plates = sorted({f.name for s in latent.values() for f in s["cond_indep_stack"]})
        for site_name in self.local_sites:
            if site_name not in latent:
                raise self._error_missing(site_name, args, kwargs)
        if self.plate_name not in self._prototype_frames:
            raise ValueError(
                f"{name}: no latent site of the model is inside a plate named "
                f"'{self.plate_name}' (plates with latent sites: {plates})"
            )
        frame = self._prototype_frames[self.plate_name]
        self._frame = frame
        self._local_shapes: Dict[str, torch.Size] = {}
        for site_name, site in latent.items():
            shape = self._local_event_shape(site_name, site, frame)
            if shape is not None:
                self._local_shapes[site_name] = shape
        self.local_dim = sum(_product(s) for s in self._local_shapes.values())
        self._build_posterior(latent[self.local_sites[0]]["value"].dtype, args, kwargs)
        if len(latent) > len(self.local_sites):
            self._build_global_guide()

    def _local_event_shape(self, site_name: str, site: dict, frame) -> Optional[torch.Size]:
        """The unconstrained event shape of a local site (after checking it is one: inside
        the plate alone, continuous, one value per row), ``None`` for a global site."""
        name = type(self).__name__
        names = [f.name for f in site["cond_indep_stack"]]
        if site_name not in self.local_sites:
            if self.plate_name in names:
                raise ValueError(
                    f"latent site '{site_name}' is inside plate '{self.plate_name}' but is "
                    f"not in local_sites {self.local_sites}; declare it local (global sites "
                    "cannot be subsampled)"
                )
            return None
        if self.plate_name not in names:
            raise ValueError(
                f"local site '{site_name}' is not inside plate '{self.plate_name}' "
                f"(its plates: {names})"
            )
        if len(names) > 1:
            raise ValueError(
                f"local site '{site_name}' is inside plates {names}; {name} supports local "
                f"sites inside plate '{self.plate_name}' only (use the event shape instead "
                "of nested plates)"
            )
        fn = site["fn"]
        if fn.support.is_discrete:
            raise ValueError(
                f"local site '{site_name}' is discrete ({type(fn).__name__}); {name} "
                "needs continuous latent sites"
            )
        batch_shape = fn.batch_shape
        expected = (frame.size,) + (1,) * (-frame.dim - 1)
        if len(batch_shape) < -frame.dim or tuple(batch_shape[frame.dim:]) != expected or any(
            d != 1 for d in batch_shape[: len(batch_shape) + frame.dim]
        ):
            raise ValueError(
                f"local site '{site_name}' has batch shape {tuple(batch_shape)}; expected one "
                f"value per row of plate '{self.plate_name}' (batch shape {expected}, "
                "dims right of the plate in the event shape: use .to_event())"
            )
        # the bijection's domain event dim, not fn.event_dim: it may change rank
        # (LKJCholesky: 3 unconstrained numbers -> a 3 x 3 factor)
        transform = biject_to(fn.support)
        unconstrained = transform.inv(site["value"])
        return unconstrained.shape[unconstrained.dim() - transform.domain.event_dim :]

    def _build_posterior(self, dtype: torch.dtype, args, kwargs) -> None:
        """The amortized posterior, its head sized by the encoder's features of the
        plate's data."""
        data = self._plate_data(self._frame.size, None, args, kwargs)
        # a probe: in eval mode, so that it updates no running statistics (BatchNorm) on
        # rows the model did not use
        with eval_mode(self.encoder), torch.no_grad():
            features = self.encoder(data)
        self._check_features(features, data)
        self.posterior = AmortizedFlow(
            self.local_dim, features.shape[-1], **self._posterior_kwargs
        ).to(device=features.device, dtype=dtype)

    def _build_global_guide(self) -> None:
        """The guide of the global sites: the model with the local sites hidden."""
        blocked = poutine.block(self.model, hide=list(self.local_sites))
        if self._global_guide_fn is None:
            from .guides import AutoPlanarFlow

            self.global_guide = AutoPlanarFlow(blocked, num_flows=8)
        else:
            self.global_guide = self._global_guide_fn(blocked)
            if not isinstance(self.global_guide, AutoGuide):
                raise TypeError(
                    "global_guide(model) must return an AutoGuide, got "
                    f"{type(self.global_guide).__name__}"
                )

    def _plate_data(self, batch: int, indices, args, kwargs):
        data = self.data_fn(*args, **kwargs)
        shape = getattr(data, "shape", None)
        if shape is None or len(shape) < 1:
            raise ValueError(
                f"data_fn must return the data of plate '{self.plate_name}' with its rows in "
                f"dim 0, got {type(data).__name__} of shape {shape}"
            )
        full = self._frame.full_size or self._frame.size
        if shape[0] == batch:
            return data
        if shape[0] == full and indices is not None:
            return data.index_select(0, indices.to(getattr(data, "device", "cpu")))
        if shape[0] == full:  # setup, prototype subsample unknown
            return data[:batch]
        raise ValueError(
            f"data_fn returned data with {shape[0]} rows in dim 0, but plate "
            f"'{self.plate_name}' has {full} rows (subsample of {batch})"
        )

    def _check_features(self, features, data) -> None:
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] != data.shape[0]:
            raise ValueError(
                f"encoder must map the {data.shape[0]} rows of plate '{self.plate_name}' to "
                f"features of shape ({data.shape[0]}, C), got "
                f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}"
            )

    def _check_prototype(self, part_trace) -> None:
        # called by the global guide (whose master this guide is) on its own prototype
        for site_name, part_site in part_trace.iter_stochastic_nodes():
            site = self.prototype_trace.nodes[site_name]
            if part_site["value"].shape != site["value"].shape:
                raise ValueError(
                    f"global site '{site_name}' changed shape between model runs: "
                    f"{tuple(site['value'].shape)} vs {tuple(part_site['value'].shape)}"
                )

    # ---------------------------------------------------------------- forward
    def get_posterior(self, *args, **kwargs):
        raise NotImplementedError(
            "AutoAmortizedFlow has one posterior per data row: use guide.posterior(features)"
        )

    def forward(self, *args, **kwargs) -> Dict[str, torch.Tensor]:
        """Sample the global sites (global guide), then the local sites of the plate's
        current subsample; returns a dict site name -> value."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        result: Dict[str, torch.Tensor] = {}
        # plates first: the global guide (a child AutoGuide) uses this guide's plates
        plate = self._create_plates(*args, **kwargs)[self.plate_name]
        if self.global_guide is not None:
            result.update(self.global_guide(*args, **kwargs))
        frame = self._frame
        with plate as indices:
            batch = indices.shape[0] if isinstance(indices, torch.Tensor) else plate.subsample_size
            data = self._plate_data(batch, indices, args, kwargs)
            features = self.encoder(data)
            self._check_features(features, data)
            features = features.reshape((batch,) + (1,) * (-frame.dim - 1) + features.shape[-1:])
            latent = pyro.sample(
                f"_{self._pyro_name}_latent_{self.plate_name}",
                self.posterior(features),
                infer={"is_auxiliary": True},
            )
            pos = 0
            for site_name in self.local_sites:
                site = self.prototype_trace.nodes[site_name]
                shape = self._local_shapes[site_name]
                size = _product(shape)
                unconstrained = latent[..., pos : pos + size].reshape(latent.shape[:-1] + shape)
                pos += size
                transform = biject_to(site["fn"].support)
                value = transform(unconstrained)
                event_dim = site["fn"].event_dim
                log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
                log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + event_dim)
                # its KL keeps the log-Jacobian (Pyro's Delta KL drops it), so that
                # TraceMeanField_ELBO scores the guide as Trace_ELBO does
                result[site_name] = pyro.sample(
                    site_name, _JacobianDelta(value, log_density=log_density, event_dim=event_dim)
                )
        return result
