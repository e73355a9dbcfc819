"""Regression tests of issue 21, items 2-4: a saved guide can be used, ``median`` /
``quantiles`` are reproducible and leave the user's random stream alone, and a Sylvester
bottleneck larger than the latent dimension is an error, not silently capped."""

import io

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_nfvi.guides import AutoPlanarFlow

# ------------------------------------------------------------------------- models
SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools():
    """Centred: ``theta``'s prior depends on ``mu`` and ``tau`` (a hierarchical site)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, SCHOOLS_SIGMA), obs=SCHOOLS_Y)


def plain(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=data)


PLAIN_DATA = 3.0 + torch.randn(30, generator=torch.Generator().manual_seed(1))


def _fit(model, guide, *args, steps=30):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(steps):
        svi.step(*args)
    return guide


def _round_trip(guide):
    f = io.BytesIO()
    torch.save(guide, f)
    f.seek(0)
    loaded = torch.load(f, weights_only=False)
    # a fresh session: the loaded guide must use its own parameters, not the store's
    pyro.clear_param_store()
    return loaded


def _predict(model, guide, *args):
    torch.manual_seed(7)
    return Predictive(model, guide=guide, num_samples=20)(*args)


# ------------------------------------------------------- item 2: saved guides
@pytest.mark.parametrize("model, args", [(eight_schools, ()), (plain, (PLAIN_DATA,))],
                         ids=["eight-schools-centred", "plain"])
def test_saved_guide_works_when_called_and_in_predictive(model, args):
    guide = _fit(model, AutoPlanarFlow(model, num_flows=4), *args)
    if model is eight_schools:
        assert guide.hierarchical_sites  # the case that re-runs the model
    expected = _predict(model, guide, *args)
    loaded = _round_trip(guide)
    got = _predict(model, loaded, *args)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    torch.manual_seed(3)
    a = loaded(*args)
    torch.manual_seed(3)
    b = guide(*args)  # saving must not have broken the live guide either
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_saved_guide_of_an_unpicklable_model_says_how_to_reattach():
    def local_model():  # a closure: pickle cannot store it by reference
        eight_schools()

    guide = _fit(local_model, AutoPlanarFlow(local_model, num_flows=4))
    expected = _predict(local_model, guide)
    loaded = _round_trip(guide)  # loads; only the model is missing
    with pytest.raises(RuntimeError, match=r"guide\.model = "):
        loaded()
    with pytest.raises(RuntimeError, match=r"guide\.model = "):
        Predictive(local_model, guide=loaded, num_samples=3)()
    loaded.model = local_model
    got = _predict(local_model, loaded)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
