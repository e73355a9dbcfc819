"""The cheaper guide step (issue 19) computes what the plain route computes.

* Sticking the landing: the fused planar/radial kernels push the score in the same pass as
  the sample (``call_ladj_and_push``); the ELBO's value and gradients equal those of the
  plain autograd loop, whose push is the layer-by-layer reference (float64, 1e-10), and the
  guide's surrogate equals the reference :func:`~pyro_nfvi.guides.stl.stl_log_q` also where
  a part pushes through :func:`~pyro_nfvi.guides.stl.push_score_through` (Sylvester) or
  cannot push at all (autograd through the inverse).
* The placement runs the model's prior inside Pyro's ``InitMessenger``: the init strategy
  is not run at the sites it places (nor does it draw from the global random stream), and
  still at any other site.
* :class:`~pyro_nfvi.guides.prototype.SiteLayout` gives the views of Pyro's
  ``_unpack_latent``.
"""

import pickle

import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pyro.poutine as poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median

from pyro_nfvi._compat import split_init_messenger
from pyro_nfvi.guides import AutoNormalizingFlow, AutoPlanarFlow, AutoRadialFlow, AutoSylvesterFlow
from pyro_nfvi.guides.placement import _PlaceLatents, place_latents
from pyro_nfvi.guides.posterior import elementary_parts
from pyro_nfvi.guides.prototype import SiteLayout
from pyro_nfvi.guides.stl import stl_log_q
from pyro_nfvi.helpers import planar_flow
from pyro_nfvi.transforms import Planar, Radial, _fused, _fused_sylvester


def _model():
    """A hierarchical site in a plate (placed relative to its prior), a positive site."""
    a = pyro.sample("a", dist.Normal(0.0, 1.5))
    s = pyro.sample("s", dist.LogNormal(0.0, 0.5))
    with pyro.plate("p", 3):
        b = pyro.sample("b", dist.Normal(a, s))
        pyro.sample("obs", dist.Normal(b, 0.7), obs=torch.tensor([0.5, -1.0, 2.0]))


def _randomized(guide, seed=0):
    """Flow and affine parameters far from their initial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.transform.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)
        if guide.full_rank:
            D = guide.latent_dim
            guide.scale_tril = torch.eye(D) + 0.3 * torch.randn(D, D, generator=gen).tril(-1)
    return guide


def _loss_and_grads(guide, route, particles):
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1,
                      max_plate_nesting=1)
    params = [p for p in guide.parameters() if p.requires_grad]
    pyro.set_rng_seed(3)
    with _fused.forced_route(route):
        loss = elbo.differentiable_loss(_model, guide)
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("particles", [1, 4])
@pytest.mark.parametrize("base", ["normal", "studentt"])
@pytest.mark.parametrize("full_rank", [True, False])
@pytest.mark.parametrize("cls", [AutoPlanarFlow, AutoRadialFlow, AutoSylvesterFlow])
def test_elbo_gradients_of_every_kernel_route_equal_the_plain_route(float64, cls, full_rank,
                                                                    base, particles):
    guide = cls(_model, num_flows=3 if cls is AutoSylvesterFlow else 5, full_rank=full_rank,
                base=base)
    guide()
    _randomized(guide)
    assert guide.stl and guide.hierarchical_sites  # STL on, a placed site
    ref_loss, ref_grads = _loss_and_grads(guide, _fused.PLAIN, particles)
    for route in _fused.KERNEL_ROUTES:
        loss, grads = _loss_and_grads(guide, route, particles)
        assert abs(float((loss - ref_loss).detach())) <= 1e-10 * (1 + abs(float(ref_loss.detach())))
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-10, atol=1e-10), (route, (g - r).abs().max())


@pytest.mark.parametrize("cls", [AutoPlanarFlow, AutoRadialFlow, AutoSylvesterFlow])
def test_kernel_route_pushes_the_score_in_the_forward_pass(cls, monkeypatch):
    """One kernel call per guide step does both: no standalone push kernel runs."""
    guide = cls(_model, num_flows=3)
    guide()
    calls = []
    monkeypatch.setattr(_fused, "_push", lambda *a: calls.append("push"))
    monkeypatch.setattr(_fused_sylvester, "_push_layer", lambda *a: calls.append("push"))
    guide()
    assert calls == []


def _stl_reference(post, eps):
    """The surrogate ``log q`` of the code before the fused push: a forward pass through the
    parts, then :func:`stl_log_q` pushing the score from ``eps`` again."""
    parts = elementary_parts(post.transforms)
    x, log_q = eps, post.base_dist.log_prob(eps)
    for t in parts:
        y = t(x)
        log_q = log_q - t.log_abs_det_jacobian(x, y)
        x = y
    log_prob = lambda z: dist.TransformedDistribution.log_prob(post, z)  # noqa: E731
    return x, stl_log_q(parts, eps, x, log_q, log_prob, post._base_score(eps))


@pytest.mark.parametrize("make", [
    lambda: AutoPlanarFlow(_model, num_flows=3),
    lambda: AutoRadialFlow(_model, num_flows=3, full_rank=False),
    lambda: AutoSylvesterFlow(_model, num_flows=2),
    # Pyro's Householder has an inverse but no push_score: autograd through the inverses
    lambda: AutoNormalizingFlow(_model, lambda d: [planar_flow(d, 2), T.Householder(d)]),
    # ... as the first part: no fused push after it either
    lambda: AutoNormalizingFlow(_model, lambda d: [T.Householder(d), planar_flow(d, 2)]),
    # single layers: push_score_through (push_score, no fused call)
    lambda: AutoNormalizingFlow(_model, lambda d: [Planar(d), Radial(d)]),
], ids=["planar", "radial-diagonal", "sylvester", "no-push-part", "no-push-first",
        "single-layers"])
def test_surrogate_equals_the_reference_stl(float64, make):
    guide = make()
    guide()
    with torch.no_grad():
        for p in guide.transform.parameters():
            p.add_(0.3 * torch.randn_like(p))
    params = [p for p in guide.parameters() if p.requires_grad]
    post = guide.get_posterior()
    eps = torch.randn(6, guide.latent_dim)
    log_q0 = post.base_dist.log_prob(eps)
    z = post._push(eps, log_q0)
    surrogate = post.log_prob(z)
    z_ref, ref = _stl_reference(post, eps)
    assert torch.allclose(z, z_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(surrogate, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(surrogate.sum(), params, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.allclose(g, w, rtol=1e-10, atol=1e-10), (g - w).abs().max()


# -------------------------------------------------------------------- placement run
def _funnel():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("i", 4):
        pyro.sample("x", dist.Normal(0.0, torch.exp(v / 2)))


def test_split_init_messenger():
    guide = AutoPlanarFlow(_funnel, init_loc_fn=init_to_median)
    init_fn, inner = split_init_messenger(guide.model)
    assert init_fn is init_to_median and inner is _funnel
    assert split_init_messenger(_funnel) == (None, _funnel)
    other = poutine.scale(_funnel, scale=2.0)  # another handler: left as it is
    assert split_init_messenger(other) == (None, other)
    # a saved guide's model comes back from pickle without the wrapper's `func` slot
    wrapped = pickle.loads(pickle.dumps(InitMessenger(init_to_median)(abs)))
    assert split_init_messenger(wrapped) == (init_to_median, abs)


def test_placement_skips_the_init_strategy_and_leaves_the_random_stream():
    seen = []

    def init_fn(site):
        seen.append(site["name"])
        return init_to_median(site)  # draws prior samples from the global stream

    guide = AutoPlanarFlow(_funnel, init_loc_fn=init_fn)
    guide()
    layout = SiteLayout.of(guide)
    xs = layout.split(torch.randn(guide.latent_dim))
    centering = guide._centerings()
    seen.clear()
    state = torch.get_rng_state()
    placed = place_latents(guide.model, xs, centering, layout.fns, (), {})
    assert seen == []
    assert torch.equal(torch.get_rng_state(), state)
    # the values are those of the run under the wrapper (which the strategy overwrote)
    placer = _PlaceLatents(xs, centering, layout.fns)
    try:
        poutine.block(placer(guide.model))()
    except Exception:  # noqa: BLE001 -- _LatentsOnly, raised once every site is placed
        pass
    assert seen == ["v", "x"]
    for name, (value, log_density) in placed.items():
        assert torch.equal(value, placer.placed[name][0])
        # a real site's log-density may be the number 0.0 (the identity bijection)
        assert torch.equal(torch.as_tensor(log_density), torch.as_tensor(placer.placed[name][1]))


def test_placement_keeps_the_init_strategy_for_sites_it_does_not_place():
    seen = []

    def init_fn(site):
        seen.append(site["name"])
        return torch.tensor(1.0) if site["name"] == "v" else init_to_median(site)

    guide = AutoPlanarFlow(_funnel, init_loc_fn=init_fn, centered=0.0)
    guide()
    x = torch.randn(4)
    seen.clear()
    placed = place_latents(guide.model, {"x": x}, {"x": None}, SiteLayout.of(guide).fns, (), {})
    assert seen == ["v"]  # v (not placed here) took the strategy's value 1.0
    assert torch.allclose(placed["x"][0], torch.exp(torch.tensor(0.5)) * x)


def test_placement_restores_validation():
    guide = AutoPlanarFlow(_funnel)
    assert pyro.infer.util.is_validation_enabled()
    guide()
    assert pyro.infer.util.is_validation_enabled()
    assert torch.distributions.Distribution._validate_args


# ---------------------------------------------------------------------- site layout
def _layout_model():
    pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("w", dist.Dirichlet(torch.ones(4)))  # unconstrained shape (3,)
    with pyro.plate("p", 2):
        pyro.sample("c", dist.LogNormal(0.0, 1.0).expand([3]).to_event(1))


@pytest.mark.parametrize("batch", [(), (5, 1), (4, 1, 1)])  # particles left of the plate
def test_site_layout_gives_the_views_of_unpack_latent(batch):
    guide = AutoPlanarFlow(_layout_model, num_flows=2)
    guide()
    latent = torch.randn(batch + (guide.latent_dim,))
    layout = SiteLayout.of(guide)
    assert SiteLayout.of(guide) is layout  # built once
    got = layout.split(latent)
    want = {site["name"]: v for site, v in guide._unpack_latent(latent)}
    assert list(got) == list(want) == ["a", "w", "c"]
    for name in want:
        assert got[name].shape == want[name].shape
        assert torch.equal(got[name], want[name])
    guide.prototype_trace = guide.prototype_trace.copy()  # a new trace: rebuilt
    assert SiteLayout.of(guide) is not layout
