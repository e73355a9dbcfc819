"""The README's two-site example (``AutoPlanarFlow``, 2000 steps, 8 vectorised particles,
the default schedule) with the normal and the Student-t base, over seeds: PSIS k̂, the
ELBO and the IWAE bound of 4000 draws (``importance_sample``), mean ± se.

Usage (from the repository root)::

    python benchmarks/readme_tails.py --seeds 0 1 2 3 4 5 6 7
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO

from pyro_nfvi import AutoPlanarFlow, importance_sample
from pyro_nfvi.infer import default_optim


def model(x):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(loc, scale), obs=x)


def run(base: str, seed: int, num_steps: int = 2000) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x = torch.randn(50) * 2 + 1  # the README's data, drawn from the seed
    guide = AutoPlanarFlow(model, base=base)
    svi = SVI(model, guide, default_optim(num_steps),
              Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1))
    for _ in range(num_steps):
        svi.step(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = importance_sample(model, guide, x)
    df = guide.base_df.detach().tolist() if base == "studentt" else None
    return {"khat": float(post.khat), "elbo": post.elbo, "iwae": post.log_evidence,
            "warned": any("Importance" in type(w.message).__name__ for w in caught), "df": df}


def _pm(values):
    v = torch.tensor(values, dtype=torch.float64)
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return f"{float(v.mean()):.3f} ± {se:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = {"normal": [], "studentt": []}
    for seed in args.seeds:
        for base in rows:
            r = run(base, seed, args.steps)
            rows[base].append(r)
            print(f"seed {seed} base {base}: k {r['khat']:.3f} elbo {r['elbo']:.3f} "
                  f"iwae {r['iwae']:.3f} warning {r['warned']} df {r['df']}", flush=True)
    print("\n| base | seeds | k̂ | ELBO | IWAE | runs warned |\n|---|---|---|---|---|---|")
    for base, rs in rows.items():
        print(f"| {base} | {len(rs)} | {_pm([r['khat'] for r in rs])} | {_pm([r['elbo'] for r in rs])} | "
              f"{_pm([r['iwae'] for r in rs])} | {sum(r['warned'] for r in rs)}/{len(rs)} |")
    paired = [a["elbo"] - b["elbo"] for a, b in zip(rows["studentt"], rows["normal"])]
    print(f"\npaired ELBO difference (studentt - normal, same seed and data): {_pm(paired)}")
    return 0


if __name__ == "__main__":
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    sys.exit(main())
