"""Smoke tests of the benchmark scripts: they run and print their tables (no timing
assertions; the ratios are for humans to read)."""

import importlib.util
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_speed_quick_runs(capsys):
    bench = _load("bench_speed")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--no-compile", "--rounds", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for line in ("planar   32   256   2", "radial   32   256   2", "ours AutoPlanarFlow(32)"):
        assert line in out
    # the cost ledger: one line per default feature switched off, and the remainder
    ledger = out.split("cost ledger")[1].split("== targets")[0]
    for feature in ("stl=False", "full_rank=False", "centered=1.0", "over AutoNormal",
                    "one more parameter in Pyro"):
        assert feature in ledger
    assert ledger.count(" ms\n") == 6
    assert "nan" not in out


def test_bench_speed_regression_section_runs(capsys):
    bench = _load("bench_speed")
    bench.bench_svi_regression(rounds=1)
    out = capsys.readouterr().out
    assert out.count("pyro/ours") == 4 and "nan" not in out


def test_bench_guide_cost_runs(capsys):
    bench = _load("bench_guide_cost")
    threads = torch.get_num_threads()
    try:
        bench.main(["--models", "funnel", "--steps", "1", "--rounds", "1", "--particles", "2"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "funnel" in out and "AutoPlanarFlow" in out and "(1.00x)" in out


def test_optimiser_choice_runs(capsys):
    bench = _load("optimiser_choice")
    threads = torch.get_num_threads()
    try:
        bench.main(["--models", "banana", "--seeds", "0", "--steps", "3"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.count("banana") == 4 and "ClippedAdam" in out
    assert not re.search(r"\bnan\b", out)
