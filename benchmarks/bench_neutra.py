"""NeuTra (flow-preconditioned NUTS) with the default flow guide against Pyro's built-ins.

For each model and seed: plain NUTS on the (centred) model; Pyro's NeuTra recipe
(``NeuTraReparam(guide.requires_grad_(False)).reparam(model)``, then NUTS) with
``AutoIAFNormal(model)`` (Pyro's default IAF); and the same recipe with
``AutoPlanarFlow(model)`` (this package's defaults, hierarchical placement included,
``neutra_planar``); and the same fitted planar guide with this package's
:class:`~pyro_nfvi.guides.NeuTraReparam` (``neutra_planar_ours``: the placement done inside
the model's run, not by a second run of the prior per gradient). Both guides are fitted with
:func:`pyro_nfvi.infer.fit` and the same number of steps (once per seed).
One chain per run; on the draws of the model's sites (all coordinates):

* ``div``: divergent transitions after warm-up;
* ``minESS``: the smallest effective sample size over coordinates;
* ``ESS/s``: ``minESS`` per second of MCMC (warm-up + sampling), and ``ESS/s+fit``
  counting the guide's fit too;
* ``rhat``: the largest split-R-hat over coordinates;
* ``zerr``: the largest ``|mean - reference mean| / reference sd`` over coordinates (the
  references of ``benchmarks/references``), a check that the draws are right.

Mean ± standard error over seeds; ratios against plain NUTS measured in the same run.
Everything on one thread; times are CPU seconds of this process (``time.process_time``),
so that other load on a shared machine does not enter the ESS rates.

    python benchmarks/bench_neutra.py                      # eight schools, funnel, 3 seeds
    python benchmarks/bench_neutra.py --models eight_schools --seeds 1 > es1.txt   # in parallel
    python benchmarks/bench_neutra.py --combine es0.txt es1.txt es2.txt            # one table

The defaults (400 fit steps, 100 warm-up + 150 draws, ``max_tree_depth=7``) keep the
whole run near 5 CPU minutes; the ESS of 150 draws is noisy, hence the seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoIAFNormal
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from suite_models import get_model  # noqa: E402

from pyro_nfvi.diagnostics import plate_nesting  # noqa: E402
from pyro_nfvi.guides import AutoPlanarFlow  # noqa: E402
from pyro_nfvi.guides import NeuTraReparam as OurNeuTraReparam  # noqa: E402
from pyro_nfvi.infer import fit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("nuts", "neutra_iaf", "neutra_planar", "neutra_planar_ours")
GUIDES = {"iaf": AutoIAFNormal, "planar": AutoPlanarFlow}


def _flat(draws, sites, n):
    return torch.cat([draws[s].reshape(n, -1) for s in sites], dim=-1).double()


def _fitted(name: str, guide_name: str, seed: int, opts):
    spec = get_model(name)
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    guide = GUIDES[guide_name](spec.model)
    t0 = time.process_time()
    fit(spec.model, guide, *spec.args, num_steps=opts.fit_steps, progress=False)
    return guide.requires_grad_(False), time.process_time() - t0


def run_one(name: str, method: str, seed: int, opts, fitted: dict) -> dict:
    spec = get_model(name)
    model, args = spec.model, spec.args
    fit_s = 0.0
    mcmc_model = model
    if method != "nuts":
        guide_name = "iaf" if method == "neutra_iaf" else "planar"
        if guide_name not in fitted:  # one fit per guide and seed, shared by both recipes
            fitted[guide_name] = _fitted(name, guide_name, seed, opts)
        guide, fit_s = fitted[guide_name]
        neutra = (OurNeuTraReparam(guide, *args) if method == "neutra_planar_ours"
                  else NeuTraReparam(guide))
        mcmc_model = neutra.reparam(model)
    pyro.set_rng_seed(seed)
    kernel = NUTS(mcmc_model, max_tree_depth=opts.max_tree_depth)
    mcmc = MCMC(kernel, num_samples=opts.num_samples, warmup_steps=opts.warmup,
                disable_progbar=True)
    t0 = time.process_time()
    mcmc.run(*args)
    mcmc_s = time.process_time() - t0
    samples = mcmc.get_samples()
    n = opts.num_samples
    if method == "nuts":
        draws = samples
    else:
        (latent,) = [v for k, v in samples.items() if k.endswith("_shared_latent")]
        nesting = plate_nesting(pyro.poutine.trace(model).get_trace(*args))
        with torch.no_grad():  # the batch of draws to the left of the model's plates
            shape = (n,) + (1,) * nesting + latent.shape[-1:]
            draws = neutra.transform_sample(latent.reshape(shape))
    x = _flat(draws, spec.latent_sites, n)
    ess = effective_sample_size(x.unsqueeze(0))
    rhat = split_gelman_rubin(x.unsqueeze(0))
    with open(os.path.join(HERE, "references", f"{name}.json")) as f:
        ref = json.load(f)
    zerr = ((x.mean(0) - torch.tensor(ref["mean"], dtype=torch.float64)).abs()
            / torch.tensor(ref["sd"], dtype=torch.float64)).max()
    div = int(sum(len(v) for v in mcmc.diagnostics()["divergences"].values()))
    min_ess = float(ess.min())
    return dict(model=name, method=method, seed=seed, div=div, minESS=min_ess,
                ess_s=min_ess / mcmc_s, ess_s_fit=min_ess / (mcmc_s + fit_s),
                rhat=float(rhat.max()), zerr=float(zerr), mcmc_s=mcmc_s, fit_s=fit_s)


COLS = ("div", "minESS", "ess_s", "ess_s_fit", "rhat", "zerr", "mcmc_s", "fit_s")


def _ms(vals):
    m = statistics.fmean(vals)
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
    return m, se


def parse_rows(text: str) -> list:
    """The per-run rows printed by this script (lines ``  model=... seed=... div=...``), so
    that runs made in separate processes (e.g. one per seed) can be tabulated together."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("  model="):
            continue
        row = {}
        for item in line.split():
            key, value = item.split("=", 1)
            row[key] = value if key in ("model", "method") else (
                int(value) if key in ("seed", "div") else float(value))
        rows.append(row)
    return rows


def print_table(rows: list) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    seeds = sorted({r["seed"] for r in rows})
    print(f"\nmean ± se over seeds {seeds} (ESS/s: per CPU second of MCMC; "
          "ESS/s+fit: counting the guide's fit; ESS/s ÷ NUTS: per-seed ratio)\n")
    print("| model | method | n | " + " | ".join(COLS) + " | ESS/s ÷ NUTS |")
    print("|" + "---|" * (len(COLS) + 4))
    for name in models:
        base = {r["seed"]: r["ess_s"] for r in rows if r["model"] == name and r["method"] == "nuts"}
        for method in methods:
            rs = [r for r in rows if r["model"] == name and r["method"] == method]
            if not rs:
                continue
            cells = []
            for c in COLS:
                m, se = _ms([r[c] for r in rs])
                cells.append(f"{m:.3g} ± {se:.2g}")
            ratio = "—"
            if base and method != "nuts":
                m, se = _ms([r["ess_s"] / base[r["seed"]] for r in rs if r["seed"] in base])
                ratio = f"{m:.3g} ± {se:.2g}"
            print(f"| {name} | {method} | {len(rs)} | " + " | ".join(cells) + f" | {ratio} |")


def grad_cost(name: str, num_evals: int, seed: int = 0) -> dict:
    """CPU ms per evaluation of the potential energy and its gradient (what each NUTS
    leapfrog step costs) under each method, at the initial point, guides fitted 20 steps
    (the cost does not depend on the fit)."""
    from pyro.infer.mcmc.util import initialize_model

    spec = get_model(name)
    out = {}
    for method in METHODS:
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
        mcmc_model = spec.model
        if method != "nuts":
            guide = GUIDES["iaf" if method == "neutra_iaf" else "planar"](spec.model)
            fit(spec.model, guide, *spec.args, num_steps=20, progress=False)
            guide.requires_grad_(False)
            neutra = (OurNeuTraReparam(guide, *spec.args) if method == "neutra_planar_ours"
                      else NeuTraReparam(guide))
            mcmc_model = neutra.reparam(spec.model)
        init, potential, _, _ = initialize_model(mcmc_model, spec.args)
        for rep in range(2):  # warm-up round, then the timed one
            t0 = time.process_time()
            for _ in range(num_evals):
                z = {k: v.detach().requires_grad_() for k, v in init.items()}
                torch.autograd.grad(potential(z), list(z.values()))
        out[method] = 1e3 * (time.process_time() - t0) / num_evals
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["eight_schools", "funnel"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fit-steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=150)
    p.add_argument("--max-tree-depth", type=int, default=7)
    p.add_argument("--json", help="also write the per-run rows here")
    p.add_argument("--combine", nargs="+", metavar="FILE",
                   help="only tabulate the rows printed by earlier runs into these files")
    p.add_argument("--grad-cost", type=int, metavar="N",
                   help="only time N potential+gradient evaluations per method and model")
    opts = p.parse_args(argv)
    if opts.grad_cost:
        torch.set_num_threads(1)
        print(f"CPU ms per potential + gradient evaluation ({opts.grad_cost} evaluations; "
              "ratio to neutra_iaf in the same run)")
        for name in opts.models:
            cost = grad_cost(name, opts.grad_cost)
            print(f"  {name}: " + ", ".join(
                f"{m} {c:.2f} ms ({c / cost['neutra_iaf']:.2f}x)" for m, c in cost.items()))
        return 0
    if opts.combine:
        rows = []
        for path in opts.combine:
            with open(path) as f:
                rows += parse_rows(f.read())
        print_table(rows)
        return 0
    torch.set_num_threads(1)
    print(f"NeuTra benchmark: 1 chain, {opts.warmup} warm-up + {opts.num_samples} draws, "
          f"max_tree_depth {opts.max_tree_depth}, guides fitted {opts.fit_steps} steps "
          f"(pyro_nfvi.infer.fit defaults otherwise), seeds {opts.seeds}; "
          f"torch {torch.__version__}, pyro {pyro.__version__}", flush=True)
    rows = []
    t_all = time.perf_counter()
    for name in opts.models:
        for seed in opts.seeds:
            fitted: dict = {}
            for method in opts.methods:
                row = run_one(name, method, seed, opts, fitted)
                rows.append(row)
                print("  " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items()), flush=True)
    print_table(rows)
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
