"""Helpers shared by the transform tests (one home each)."""

import torch
from pyro.distributions.torch_transform import ComposeTransformModule


def randomize_(module, scale, seed=0):
    """Set every parameter of ``module`` to N(0, scale²) draws (in place), far from any
    initialisation; returns the module."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


def assert_stack_matches_composition(stack, layers, D, inv_atol=1e-12):
    """A K-layer stack equals ``ComposeTransformModule(layers)`` in map, log-det and the
    inverse of points that were never sampled (float64)."""
    composed = ComposeTransformModule(layers)
    x = torch.randn(20, D, dtype=torch.float64) * 3
    y_s, ladj_s = stack.call_and_ladj(x)
    y_c = composed(x)
    assert torch.allclose(y_s, y_c, atol=1e-12, rtol=0)
    assert torch.allclose(ladj_s, composed.log_abs_det_jacobian(x, y_c), atol=1e-12, rtol=0)
    y_new = torch.randn(20, D, dtype=torch.float64) * 3
    assert torch.allclose(stack._inverse(y_new), composed.inv(y_new), atol=inv_atol, rtol=0)
