"""The MNIST benchmark scripts on tiny fake IDX files: clear error for a missing root
before any work, and a resumable run that writes results and prints the table."""

import importlib.util
import json
from pathlib import Path

import pytest

from _helpers import write_fake_mnist

pytest.importorskip("torchvision")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vae_mnist_missing_root_fails_before_any_work(tmp_path):
    vae_mnist = _load("vae_mnist")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"root=.*nowhere.*train-images-idx3-ubyte"):
        vae_mnist.main(["--data-root", str(tmp_path / "nowhere"), "--out", str(out)])
    assert not out.exists()


def test_vae_mnist_runs_resumes_and_reports(tmp_path, capsys):
    vae_mnist = _load("vae_mnist")
    write_fake_mnist(tmp_path, num_train=260, num_test=20, seed=1)
    args = ["--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--models", "gaussian",
            "planar-4", "--seeds", "0", "--epochs", "2", "--train-size", "200", "--val-size", "50",
            "--test-size", "20", "--samples", "30", "--batch-size", "50"]
    vae_mnist.main(args)
    table = capsys.readouterr().out
    assert "| gaussian | 1 |" in table and "| planar-4 | 1 |" in table
    res = json.loads((tmp_path / "out" / "planar-4-s0.json").read_text())
    assert res["num_flows"] == 4 and res["epochs"] == 2 and len(res["history"]) == 2
    assert res["nll"] <= res["neg_elbo"] + 1e-3  # IS bound is tighter than the ELBO
    # a finished run is read back, not retrained
    (tmp_path / "out" / "planar-4-s0.ckpt").unlink()
    vae_mnist.main(args)
    assert json.loads((tmp_path / "out" / "planar-4-s0.json").read_text()) == res


def test_vae_mnist_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    vae_mnist = _load("vae_mnist")
    write_fake_mnist(tmp_path, num_train=260, num_test=20, seed=1)

    def args(out):
        return ["--data-root", str(tmp_path), "--out", str(tmp_path / out), "--models", "planar-4",
                "--seeds", "0", "--epochs", "3", "--train-size", "200", "--val-size", "50",
                "--test-size", "20", "--samples", "30", "--batch-size", "50"]

    vae_mnist.main(args("whole"))
    real_save, calls = vae_mnist.torch.save, []

    def save_then_die(*a, **k):  # the process dies right after epoch 1's checkpoint
        real_save(*a, **k)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(vae_mnist.torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        vae_mnist.main(args("killed"))
    assert not (tmp_path / "killed" / "planar-4-s0.json").exists()
    vae_mnist.main(args("killed"))  # the same command continues from epoch 2
    assert len(calls) == 3  # epochs 2 and 3 only: not retrained from scratch
    whole = json.loads((tmp_path / "whole" / "planar-4-s0.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "planar-4-s0.json").read_text())
    for key in ("nll", "neg_elbo", "best_val_neg_elbo"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-5)
    assert [h["val_neg_elbo"] for h in resumed["history"]] == pytest.approx(
        [h["val_neg_elbo"] for h in whole["history"]], abs=1e-5)
