import os
import subprocess
import sys

import pytest

from pyro_nfvi.__main__ import build_parser, main


def test_main_tiny_run_in_process(tmp_path, capsys):
    out = tmp_path / "fig.png"
    rows = main(["--steps", "50", "--targets", "U1", "--num-flows", "2", "--out", str(out),
                 "--no-progress", "--num-samples", "2000"])
    text = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 1000
    assert "KL (nats)" in text and "U1" in text and "planar" in text and str(out) in text
    assert len(rows) == 1 and rows[0]["target"] == "U1" and rows[0]["K"] == 2
    assert rows[0]["kl"] > 0


def test_module_runs_as_script(tmp_path):
    out = tmp_path / "radial.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_nfvi", "--steps", "50", "--targets", "U1", "U3",
         "--num-flows", "2", "--flow", "radial", "--out", str(out), "--num-samples", "1000"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    lines = proc.stdout.splitlines()
    assert any(line.startswith("U1") and "radial" in line for line in lines)
    assert any(line.startswith("U3") for line in lines)


@pytest.mark.parametrize(
    "argv",
    [
        ["--num-flows", "0"],
        ["--num-flows", "-3"],
        ["--steps", "abc"],
        ["--flow", "sylvester"],
        ["--targets", "U7"],
        ["--targets"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_argument_subprocess_exit_code():
    proc = subprocess.run([sys.executable, "-m", "pyro_nfvi", "--num-flows", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "positive integer" in proc.stderr


def test_parser_defaults():
    args = build_parser().parse_args([])
    assert args.flow == "planar" and args.num_flows == 32
    assert args.targets == ["U1", "U2", "U3", "U4"]
    assert build_parser().parse_args(["--targets", "u1", "U3"]).targets == ["U1", "U3"]


@pytest.mark.slow
def test_default_run_fits_all_targets(tmp_path):
    rows = main(["--out", str(tmp_path / "full.png"), "--no-progress"])
    assert [r["target"] for r in rows] == ["U1", "U2", "U3", "U4"]
    for r in rows:
        assert r["kl"] < 0.05, r
