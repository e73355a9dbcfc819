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


def write_fake_mnist(root, num_train=120, num_test=40, seed=0):
    """Write small random MNIST-format IDX files under ``root/MNIST/raw/`` (the layout
    torchvision reads), so data-loading code runs without the real data; returns root."""
    import struct
    from pathlib import Path

    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, n, 28, 28) + images.numpy().tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + labels.numpy().tobytes())
    return root


def assert_checkpoint_restores(make_guide, model, args, train, path, first):
    """Pyro's param-store checkpoint recipe: train ``make_guide(model)`` with
    ``train(guide)``, save the store to ``path``; clear, load, build a new guide, call it
    (``first == "call"``) or not, and check its medians equal the fitted guide's and the
    store's values the saved ones."""
    import pyro

    pyro.clear_param_store()
    guide = make_guide(model)
    train(guide)
    ref = guide.median(*args)
    saved = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.get_param_store().load(path)
    restored = make_guide(model)
    if first == "call":
        restored(*args)
    med = restored.median(*args)
    for name in ref:
        torch.testing.assert_close(med[name], ref[name])
    for k, v in pyro.get_param_store().items():
        torch.testing.assert_close(v.detach(), saved[k])
