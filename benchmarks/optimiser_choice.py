"""Plain ``Adam`` against ``ClippedAdam`` for flow guides and ``AutoMultivariateNormal``.

Each guide trains on a posterior-suite model with a plain Pyro loop (``Trace_ELBO``, one
particle, learning rate 0.01, ``--steps`` steps), once with ``pyro.optim.Adam`` and once
with ``pyro.optim.ClippedAdam`` (gradient norm clipped at 10, Pyro's default), from the
same seeds; the ELBO of the result is estimated by :func:`pyro_nfvi.diagnostics.evaluate_guide`
(500 draws). Prints one line per (model, guide, optimiser): the ELBO per seed and the
first step's loss.

    python benchmarks/optimiser_choice.py                        # stochastic volatility
    python benchmarks/optimiser_choice.py --models stoch_vol eight_schools --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite_models import MODELS, get_model  # noqa: E402

import pyro_nfvi  # noqa: E402
from pyro_nfvi.diagnostics import evaluate_guide  # noqa: E402

GUIDES = {"AutoMultivariateNormal": AutoMultivariateNormal, "AutoPlanarFlow": pyro_nfvi.AutoPlanarFlow}
OPTIMS = {"Adam": pyro.optim.Adam, "ClippedAdam": pyro.optim.ClippedAdam}


def run(model, args, guide_cls, optim_cls, seed: int, steps: int):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = guide_cls(model)
    svi = SVI(model, guide, optim_cls({"lr": 0.01}), Trace_ELBO())
    first = svi.step(*args)
    for _ in range(steps - 1):
        svi.step(*args)
    return evaluate_guide(model, guide, *args, num_samples=500)["elbo"], first


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["stoch_vol"], choices=list(MODELS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    opts = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    print(f"ELBO after {opts.steps} steps (Trace_ELBO, 1 particle, lr 0.01), seeds {opts.seeds}")
    for name in opts.models:
        spec = get_model(name)
        args = spec.make_args()
        for g, guide_cls in GUIDES.items():
            for o, optim_cls in OPTIMS.items():
                results = [run(spec.model, args, guide_cls, optim_cls, s, opts.steps) for s in opts.seeds]
                elbos = " ".join(f"{e:10.4g}" for e, _ in results)
                firsts = " ".join(f"{f:.3g}" for _, f in results)
                print(f"{name:14s} {g:24s} {o:12s} ELBO {elbos}   first loss {firsts}", flush=True)


if __name__ == "__main__":
    main()
