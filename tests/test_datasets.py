"""The binarised-MNIST loader: torchvision's reader on IDX files, clear errors, no download."""

import pytest
import torch

from pyro_nfvi import datasets
from _helpers import write_fake_mnist


def test_load_mnist_reads_idx_files_through_torchvision(tmp_path):
    write_fake_mnist(tmp_path, num_train=30, num_test=10, seed=3)
    x_train, x_test = datasets.load_mnist(tmp_path)
    assert x_train.shape == (30, 784) and x_test.shape == (10, 784)
    assert x_train.dtype == torch.float32
    # the same pixels as the raw bytes, scaled to [0, 1]
    raw = (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").read_bytes()[16:]
    expected = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(30, 784).float() / 255
    assert torch.equal(x_train, expected)


def test_missing_root_names_the_argument_and_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"root=.*t10k-images-idx3-ubyte.*download=True"):
        datasets.load_mnist(tmp_path / "nowhere")


def test_default_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_NFVI_DATA", str(tmp_path))
    assert datasets.default_data_root() == tmp_path
    write_fake_mnist(tmp_path, num_train=5, num_test=5)
    assert datasets.load_mnist()[0].shape == (5, 784)


def test_binarize_is_stochastic_with_the_grey_level_as_probability():
    x = torch.full((20000, 1), 0.3)
    b = datasets.binarize(x, seed=0)
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert abs(b.mean().item() - 0.3) < 0.015
    assert torch.equal(b, datasets.binarize(x, seed=0))        # fixed test binarisation
    assert not torch.equal(b, datasets.binarize(x, seed=1))
    state = torch.get_rng_state()
    datasets.binarize(x, seed=5)                               # the global stream is untouched
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="seed or generator"):
        datasets.binarize(x, seed=0, generator=torch.Generator())
