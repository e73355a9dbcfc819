"""Regression tests for issue 13: no silent wrong answers.

Each test names the item of the issue it covers.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_nfvi.infer import fit


# --- item 1: fit() checks loss and gradients before the optimiser step ---------------------

def _nan_model_and_guide():
    # the data decide the failure (tensors, so that JitTrace_ELBO sees them too):
    # obs = inf gives an infinite loss; g = 1 gives a finite loss with a NaN gradient
    def model(obs, g):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=obs)
        # sqrt(1 - g) in value; for g = 1 the gradient is inf * 0 = NaN
        pyro.factor("f", torch.sqrt(g * (z - z) + (1 - g)))

    def guide(obs, g):
        loc = pyro.param("loc", torch.tensor(0.3))
        scale = pyro.param("scale", torch.tensor(0.5), constraint=dist.constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale))

    good = (torch.tensor(1.0), torch.tensor(0.0))
    bad = {"loss": (torch.tensor(float("inf")), torch.tensor(0.0)),
           "grad": (torch.tensor(1.0), torch.tensor(1.0))}
    return model, guide, good, bad


@pytest.mark.parametrize("mode", ["loss", "grad"])
@pytest.mark.parametrize(
    "make_loss, make_optim",
    [
        (Trace_ELBO, lambda: pyro.optim.Adam({"lr": 0.05})),
        (TraceMeanField_ELBO, lambda: pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99})),
        (lambda: JitTrace_ELBO(ignore_jit_warnings=True), lambda: pyro.optim.SGD({"lr": 0.01})),
        (lambda: Trace_ELBO(num_particles=3, vectorize_particles=True),
         lambda: pyro.optim.Adam({"lr": 0.05})),
    ],
)
def test_fit_nan_leaves_guide_at_last_good_step(mode, make_loss, make_optim):
    model, guide, good, bad = _nan_model_and_guide()
    loss, optim = make_loss(), make_optim()
    fit(model, guide, *good, num_steps=3, optim=optim, loss=loss, progress=False)
    store = pyro.get_param_store()
    before = {k: v.detach().clone() for k, v in store.items()}
    with pytest.raises(FloatingPointError) as err:
        fit(model, guide, *bad[mode], num_steps=5, optim=optim, loss=loss, progress=False)
    msg = str(err.value)
    assert "step 0" in msg and "last good step" in msg
    if mode == "grad":
        assert "'loc'" in msg  # names the parameter whose gradient is not finite
    for k, v in store.items():
        assert torch.equal(v.detach(), before[k]), k
    # resumable: no NaN anywhere, and no stale gradient accumulated
    losses = fit(model, guide, *good, num_steps=3, optim=optim, loss=loss, progress=False)
    assert all(math.isfinite(v) for v in losses)
    for k, v in store.items():
        assert torch.isfinite(v).all() and not torch.equal(v.detach(), before[k]), k
