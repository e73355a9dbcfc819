"""Per-step cost of the default flow guides against Pyro's built-in guides, side by side.

Each guide trains on each model of the posterior suite with the SAME loss (``Trace_ELBO``
with ``--particles`` vectorised particles, the package's default) and optimiser; the
script prints ms per SVI step and the ratio to ``AutoMultivariateNormal`` measured in the
same process (interleaved rounds, median), so machine load cancels out of the ratios.
Each model's guides start from the same seed; a guide that fails on a model (e.g. its
first steps reach NaN) is reported as ``failed``, with the error, and the others are timed.

    python benchmarks/bench_guide_cost.py                 # all suite models
    python benchmarks/bench_guide_cost.py --models eight_schools --steps 50
    python benchmarks/bench_guide_cost.py --clock cpu --rounds 5   # on a loaded machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite_models import MODELS, get_model  # noqa: E402

import pyro_nfvi  # noqa: E402
from pyro_nfvi.diagnostics import plate_nesting  # noqa: E402
from pyro_nfvi.infer import DEFAULT_NUM_PARTICLES  # noqa: E402

GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoIAFNormal": AutoIAFNormal,
    "AutoPlanarFlow": pyro_nfvi.AutoPlanarFlow,
    "AutoSylvesterFlow": pyro_nfvi.AutoSylvesterFlow,
}


def make_svi(model, guide_cls, args, particles: int, nesting: int):
    guide = guide_cls(model)
    loss = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1,
                      max_plate_nesting=nesting)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.01}), loss)
    for _ in range(5):  # setup and warm-up
        svi.step(*args)
    return svi


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--steps", type=int, default=100, help="steps per timing round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--particles", type=int, default=DEFAULT_NUM_PARTICLES)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this thread's CPU time (less affected by other load "
                   "on the machine; torch runs one thread here)")
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    clock = time.thread_time if opts.clock == "cpu" else time.perf_counter
    print(f"ms per SVI step ({opts.clock} clock), {opts.particles} vectorised particles, median "
          f"of {opts.rounds} interleaved rounds of {opts.steps} steps; ratio to "
          "AutoMultivariateNormal")
    print(f"{'model':14s} " + " ".join(f"{g:>24s}" for g in GUIDES))
    for name in opts.models:
        spec = get_model(name)
        args = spec.make_args()
        pyro.clear_param_store()  # the guides' parameter names differ (class names)
        # a fixed seed: the prior draw that finds the plate nesting (stochastic volatility's
        # can overflow) and the guides' initialisations are the same in every run
        pyro.set_rng_seed(0)
        nesting = plate_nesting(pyro.poutine.trace(spec.model).get_trace(*args))
        svis, failed = {}, {}
        for g, cls in GUIDES.items():
            try:
                svis[g] = make_svi(spec.model, cls, args, opts.particles, nesting)
            except ValueError as e:  # e.g. a guide whose first steps reach NaN: say so, go on
                failed[g] = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
        times = {g: [] for g in svis}
        for _ in range(opts.rounds):
            for g, svi in list(svis.items()):
                t0 = clock()
                try:
                    for _ in range(opts.steps):
                        svi.step(*args)
                except ValueError as e:
                    failed[g] = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
                    del svis[g], times[g]
                    continue
                times[g].append(1e3 * (clock() - t0) / opts.steps)
        ms = {g: statistics.median(v) for g, v in times.items()}
        ref = ms.get("AutoMultivariateNormal", float("nan"))
        print(f"{name:14s} " + " ".join(
            f"{ms[g]:10.2f} ms ({ms[g] / ref:4.2f}x)" if g in ms else f"{'failed':>24s}"
            for g in GUIDES), flush=True)
        for g, why in failed.items():
            print(f"  {g} failed on {name}: {why}", flush=True)


if __name__ == "__main__":
    main()
