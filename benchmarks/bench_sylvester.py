"""Speed of pyro_nfvi's Sylvester stack against our planar stack and Pyro's Sylvester.

One reverse-KL training step (rsample + log q + log p + backward + Adam) of a flow
distribution N(0, I) -> K = 16 layers, batch 256, for D in {10, 50, 200}:

- ours: :func:`pyro_nfvi.helpers.sylvester_flow` with ``kind="orthogonal"`` and bottleneck
  M in {1, 8, D}, plus ``kind="householder"`` (H = 8 reflections, M = D) and
  ``kind="triangular"`` (M = D);
- planar: :func:`pyro_nfvi.helpers.planar_flow` (fused kernel), same K;
- pyro: K of Pyro's ``Sylvester(D, count_transforms=8)`` (Householder Q with 8
  reflections, M = D) in a ``ComposeTransformModule``.

First the issue-19 ratios from one interleaved timing: the fused Sylvester stack at M = 1
against the fused planar stack (D = 10), and at D = 50, M = 8 the plain autograd loop (the
stack before the fused kernel, ``_fused_sylvester.USE_KERNEL = False``) and Pyro's
Sylvester against the fused stack. Then the grid.

Ratios are ``other ms / ours ms`` from the same process (> 1: ours is faster). Timings
interleave the contenders in rounds and report the median. Torch runs single-threaded
(``--threads`` to change).

``--energies N`` instead fits K = 32 layers (Sylvester with D = M = 2, and planar) to
the 2-D energies U1-U4 by :func:`pyro_nfvi.infer.fit_density` for ``N`` steps, two seeds,
and prints KL(q||p) +- its Monte-Carlo standard error (a short budget: the fit_density
defaults use 12000 steps).

Usage::

    python benchmarks/bench_sylvester.py                 # the full speed grid
    python benchmarks/bench_sylvester.py --quick         # tiny sizes (smoke test)
    python benchmarks/bench_sylvester.py --energies 2000 # KL on U1-U4, short budget
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pyro.distributions.transforms as T
import torch
from pyro.distributions.torch_transform import ComposeTransformModule

from pyro_nfvi import helpers
from pyro_nfvi.transforms import _fused_sylvester

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import reverse_kl_step, time_interleaved  # noqa: E402  one home each

PYRO_REFLECTIONS = 8


def contenders(D: int, K: int, Ms):
    """``{label: flow}``: ours for each (kind, M), then planar and Pyro."""
    flows = {}
    for M in Ms:
        flows[("orthogonal", M)] = helpers.sylvester_flow(D, K, bottleneck=M)
    H = min(D, PYRO_REFLECTIONS)
    flows[("householder", D)] = helpers.sylvester_flow(D, K, kind="householder", num_householder=H)
    flows[("triangular", D)] = helpers.sylvester_flow(D, K, kind="triangular")
    planar = helpers.planar_flow(D, K)
    pyro = ComposeTransformModule([T.Sylvester(D, count_transforms=H) for _ in range(K)])
    return flows, planar, pyro


def run(dims, Ms_of, K: int, B: int, rounds: int, min_time: float) -> list:
    rows = []
    print(f"reverse-KL step, K = {K} layers, batch {B}; ms per step (median of {rounds} rounds)")
    header = f"{'D':>4} {'M':>4} {'kind':<12} {'ours ms':>9} {'planar ms':>10} {'pyro ms':>9} {'pyro/ours':>10} {'planar/ours':>12}"
    print(header)
    print("-" * len(header))
    for D in dims:
        flows, planar, pyro = contenders(D, K, Ms_of(D))
        steps = {key: reverse_kl_step(f, D, B) for key, f in flows.items()}
        steps["planar"] = reverse_kl_step(planar, D, B)
        steps["pyro"] = reverse_kl_step(pyro, D, B)
        ms = time_interleaved(steps, rounds, min_time)
        for (kind, M) in flows:
            ours = ms[(kind, M)]
            row = dict(D=D, M=M, kind=kind, ours=ours, planar=ms["planar"], pyro=ms["pyro"])
            rows.append(row)
            print(
                f"{D:>4} {M:>4} {kind:<12} {ours:>9.2f} {ms['planar']:>10.2f} {ms['pyro']:>9.2f} "
                f"{ms['pyro'] / ours:>10.2f} {ms['planar'] / ours:>12.2f}",
                flush=True,
            )
    print(
        f"pyro = {K} x pyro.distributions.transforms.Sylvester(D, count_transforms=min(D, "
        f"{PYRO_REFLECTIONS})) (M = D); householder = ours with the same reflections."
    )
    return rows


def _plain(step):
    """``step`` with the Sylvester kernel switched off: the plain autograd loop, i.e. the
    Sylvester stack as it was before the fused kernel."""

    def run():
        _fused_sylvester.USE_KERNEL = False
        try:
            step()
        finally:
            _fused_sylvester.USE_KERNEL = True

    return run


def issue_ratios(D_small: int, D_big: int, M_big: int, K: int, B: int, rounds: int, min_time: float) -> dict:
    """The issue-19 ratios, all from one interleaved timing: fused Sylvester at M = 1 vs
    the fused planar stack (D_small), and at (D_big, M_big) the plain loop ("today's"
    stack) and Pyro's Sylvester vs the fused stack."""
    H = min(D_big, PYRO_REFLECTIONS)
    steps = {
        "syl_m1": reverse_kl_step(helpers.sylvester_flow(D_small, K, bottleneck=1), D_small, B),
        "planar": reverse_kl_step(helpers.planar_flow(D_small, K), D_small, B),
        "syl_big": reverse_kl_step(helpers.sylvester_flow(D_big, K, bottleneck=M_big), D_big, B),
        "plain_big": _plain(reverse_kl_step(helpers.sylvester_flow(D_big, K, bottleneck=M_big), D_big, B)),
        "pyro_big": reverse_kl_step(
            ComposeTransformModule([T.Sylvester(D_big, count_transforms=H) for _ in range(K)]), D_big, B
        ),
    }
    ms = time_interleaved(steps, rounds, min_time)
    r = dict(
        m1_vs_planar=ms["syl_m1"] / ms["planar"],
        plain_vs_fused=ms["plain_big"] / ms["syl_big"],
        pyro_vs_fused=ms["pyro_big"] / ms["syl_big"],
    )
    print(f"reverse-KL step, K = {K}, batch {B}, ms (median of {rounds} rounds): " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    print(f"fused sylvester (M = 1) / fused planar, D = {D_small}: {r['m1_vs_planar']:.2f}x time (target <= 1.5)")
    print(f"plain-loop sylvester / fused sylvester, D = {D_big}, M = {M_big}: {r['plain_vs_fused']:.2f}x speed-up (target >= 3)")
    print(f"pyro Sylvester (H = {H}, M = D) / fused sylvester (M = {M_big}), D = {D_big}: {r['pyro_vs_fused']:.2f}x speed-up")
    return r


def energies(num_steps: int, seeds=(0, 1), K: int = 32, num_samples: int = 20000) -> list:
    """KL(q||p) on U1-U4 after ``num_steps`` of :func:`~pyro_nfvi.infer.fit_density`."""
    from pyro_nfvi.diagnostics import kl_divergence
    from pyro_nfvi.infer import fit_density
    from pyro_nfvi.targets import get_target

    def make(name):
        if name == "sylvester":
            flow = helpers.sylvester_flow(2, K, bottleneck=2)
        else:
            flow = helpers.planar_flow(2, K)
        flow.reset_parameters(near_identity=True)
        return flow

    rows = []
    print(f"KL(q||p) in nats after {num_steps} fit_density steps, K = {K}, seeds {list(seeds)}")
    print(f"{'target':<7} {'flow':<10} " + " ".join(f"{'seed ' + str(s):>16}" for s in seeds) + f" {'s/fit':>7}")
    for target in ("U1", "U2", "U3", "U4"):
        for name in ("sylvester", "planar"):
            cells, secs = [], []
            for seed in seeds:
                fit = fit_density(make(name), get_target(target), num_steps=num_steps, progress=False, seed=seed)
                with torch.no_grad():
                    kl, se = kl_divergence(fit.q, get_target(target), num_samples, seed=seed)
                cells.append(f"{kl:.3f} +- {se:.3f}")
                secs.append(fit.seconds)
                rows.append(dict(target=target, flow=name, seed=seed, kl=kl, se=se, seconds=fit.seconds))
            print(f"{target:<7} {name:<10} " + " ".join(f"{c:>16}" for c in cells) + f" {statistics.mean(secs):>7.1f}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per round and contender")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--energies", type=int, default=0, metavar="STEPS", help="fit U1-U4 instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.energies:
        energies(args.energies)
    elif args.quick:
        issue_ratios(3, 4, 2, K=2, B=8, rounds=args.rounds, min_time=0.01)
        run([3], lambda D: [1, D], K=2, B=8, rounds=args.rounds, min_time=0.01)
    else:
        issue_ratios(10, 50, 8, K=16, B=256, rounds=args.rounds, min_time=args.min_time)
        run([10, 50, 200], lambda D: sorted({1, 8, D}), K=16, B=256, rounds=args.rounds, min_time=args.min_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())
