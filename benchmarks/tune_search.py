"""Does the Optuna search (``pyro_nfvi.tune``, issue 23) pay for itself?

Usage (from the repository root; needs ``pip install "pyro_nfvi[tune]"``)::

    python benchmarks/tune_search.py                 # both parts, small budgets (~12 min, shared 2 cores)
    python benchmarks/tune_search.py --part density --seeds 0 1 2 --density-steps 3000
    python benchmarks/tune_search.py --part guide --guide-steps 1000 --trials 20 --compare-unpruned
    python benchmarks/tune_search.py --quick         # smoke run

**(a) Energies U1-U4, same total wall time.** Per target and seed: the default
``fit_density`` (planar, K = 32, lr = 0.01; ``--density-steps`` steps instead of the
12000 of the package default, to fit the run in minutes on a shared machine) is timed, and
``tune_density`` gets the same wall time as its ``timeout`` (trials of a fifth of the steps;
the trial running at the timeout finishes, so the search's actual time is printed too).
Compared: ``KL(q‖p) ± se`` on 20000 fresh draws (a seed the search never used) of the default
fit and of the best trial's fit; then the chosen configuration refitted for the default's
number of steps (not the same wall time: it shows whether the configuration itself beats
K = 32, lr = 0.01 when the search cost is not counted).

**(b) Posterior-suite models** (eight schools, logistic regression, banana). The default
guide ``AutoPlanarFlow(model)`` (K = 16) fitted by ``fit`` (lr 0.01 → 0.001) against the best
guide of ``tune`` over planar/radial/Sylvester, K in [2, 32], lr in [1e-3, 3e-2], with the
same ``--guide-steps`` per trial. Compared: held-out IWAE ± se (``--eval-samples`` draws
from a seed the search never used). Pruning: trials pruned, optimisation steps run, and the
time saved (the steps each pruned trial did not run, at its measured time per step); with
``--compare-unpruned`` the search also runs without pruning (``NopPruner``, same seed), to
time it and to see whether the best score suffered.

Timings are wall-clock on whatever machine runs this; compare them only within one run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import pyro
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyro_nfvi.diagnostics import evaluate_density, evaluate_guide  # noqa: E402
from pyro_nfvi.guides import AutoPlanarFlow  # noqa: E402
from pyro_nfvi.helpers import planar_flow, radial_flow  # noqa: E402
from pyro_nfvi.infer import fit, fit_density  # noqa: E402
from pyro_nfvi.targets import get_target  # noqa: E402
from pyro_nfvi.tune import tune, tune_density  # noqa: E402

EVAL_SEED = 987_654  # held-out draws: not a seed the searches derive


def density_part(targets, seeds, steps, eval_samples, trial_steps):
    print(f"\n(a) U1-U4: default fit_density (planar K=32, lr=0.01, {steps} steps) vs "
          f"tune_density ({trial_steps} steps per trial) with the same wall time")
    header = (f"{'target':<6} {'seed':>4}  {'default KL ± se':>17} {'s':>5}  "
              f"{'tuned KL ± se':>17} {'s':>5} {'trials c/p/f':>12}  {'chosen':<22} "
              f"{'chosen, ' + str(steps) + ' steps':>18}")
    print(header)
    print("-" * len(header))
    rows = []
    for name in targets:
        target = get_target(name)
        for seed in seeds:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                flow = planar_flow(2, 32)
                t0 = time.perf_counter()
                d = fit_density(flow, target, num_steps=steps, progress=False, seed=seed)
                t_default = time.perf_counter() - t0
                with torch.no_grad():
                    md = evaluate_density(d.q, target, num_samples=eval_samples, seed=EVAL_SEED)
            t0 = time.perf_counter()
            # another search seed per target (as the CLI does): other first candidates
            res = tune_density(target, num_steps=trial_steps, num_trials=None,
                               timeout=t_default, seed=seed + 1000 * targets.index(name))
            t_tune = time.perf_counter() - t0
            with torch.no_grad():
                mt = evaluate_density(res.guide.q, target, num_samples=eval_samples,
                                      seed=EVAL_SEED)
            bp = res.best_params
            with torch.random.fork_rng():  # the chosen configuration with the full steps
                torch.manual_seed(seed)
                make = planar_flow if bp["family"] == "planar" else radial_flow
                r = fit_density(make(2, bp["num_flows"]), target, num_steps=steps,
                                lr=bp["lr"], progress=False, seed=seed)
                with torch.no_grad():
                    mr = evaluate_density(r.q, target, num_samples=eval_samples, seed=EVAL_SEED)
            chosen = f"{bp['family']} K={bp['num_flows']} lr={bp['lr']:.3g}"
            print(f"{name:<6} {seed:>4}  {md['kl']:>8.4f} ± {md['kl_se']:<6.4f} {t_default:>5.0f}  "
                  f"{mt['kl']:>8.4f} ± {mt['kl_se']:<6.4f} {t_tune:>5.0f} "
                  f"{res.num_complete:>6}/{res.num_pruned}/{res.num_failed:<3}  {chosen:<22} "
                  f"{mr['kl']:>9.4f} ± {mr['kl_se']:<6.4f}", flush=True)
            rows.append((name, seed, md, mt, mr))
    wins = sum(mt["kl"] <= md["kl"] for _, _, md, mt, _ in rows)
    wins_cfg = sum(mr["kl"] <= md["kl"] for _, _, md, _, mr in rows)
    print(f"tuned KL <= default KL at the same wall time: {wins} of {len(rows)}; "
          f"chosen configuration refitted with the default's steps: {wins_cfg} of {len(rows)}")
    return rows


def guide_part(names, steps, trials, val_particles, eval_samples, seed, compare_unpruned):
    from benchmarks.suite_models import get_model

    import optuna

    print(f"\n(b) posterior suite: default AutoPlanarFlow (K=16, lr 0.01) vs tune() "
          f"({trials} trials of {steps} steps), held-out IWAE from {eval_samples} draws")
    header = (f"{'model':<14} {'default IWAE ± se':>19}  {'tuned IWAE ± se':>19}  "
              f"{'chosen':<27} {'pruned':>6} {'steps run':>10} {'search s':>8} {'saved s':>7}"
              + (f" {'no pruning: s, best':>20}" if compare_unpruned else ""))
    print(header)
    print("-" * len(header))
    for name in names:
        spec = get_model(name)
        args = spec.args
        with pyro.get_param_store().scope(), torch.random.fork_rng():
            torch.manual_seed(seed)
            guide = AutoPlanarFlow(spec.model)
            fit(spec.model, guide, *args, num_steps=steps, progress=False)
            torch.manual_seed(EVAL_SEED)
            md = evaluate_guide(spec.model, guide, *args, num_samples=eval_samples)
        kw = dict(families=("planar", "radial", "sylvester"), num_flows=(2, 32),
                  lr=(1e-3, 3e-2), num_steps=steps, num_trials=trials,
                  validation_particles=val_particles, seed=seed)
        t0 = time.perf_counter()
        res = tune(spec.model, *args, **kw)
        t_pruned = time.perf_counter() - t0
        # time saved: each pruned trial's steps not run, at that trial's own rate
        saved = sum(t.user_attrs["seconds"] / t.user_attrs["steps"] * (steps - t.user_attrs["steps"])
                    for t in res.study.trials if t.state.name == "PRUNED")
        extra = ""
        if compare_unpruned:
            t0 = time.perf_counter()
            res_np = tune(spec.model, *args, **kw, pruner=optuna.pruners.NopPruner())
            extra = f" {time.perf_counter() - t0:>10.0f}, {res_np.score:<8.3f}"
        with pyro.get_param_store().scope(), torch.random.fork_rng():
            torch.manual_seed(EVAL_SEED)
            mt = evaluate_guide(spec.model, res.guide, *args, num_samples=eval_samples)
        bp = res.best_params
        chosen = f"{bp['family']} K={bp['num_flows']} lr={bp['lr']:.3g}"
        print(f"{name:<14} {md['iwae']:>9.3f} ± {md['iwae_se']:<7.3f}  "
              f"{mt['iwae']:>9.3f} ± {mt['iwae_se']:<7.3f}  {chosen:<27} "
              f"{res.num_pruned:>3}/{len(res.study.trials):<2} "
              f"{res.steps_run:>4}/{trials * steps:<5} {t_pruned:>8.0f} {saved:>7.0f}{extra}",
              flush=True)
    print("pruned = pruned/all trials; steps run = run/possible; saved s = the steps pruned "
          "trials did not run, at each trial's measured time per step")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["density", "guide", "both"], default="both")
    p.add_argument("--targets", nargs="+", default=["U1", "U2", "U3", "U4"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--density-steps", type=int, default=800)
    p.add_argument("--models", nargs="+", default=["eight_schools", "logistic", "banana"])
    p.add_argument("--guide-steps", type=int, default=200)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--val-particles", type=int, default=300)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compare-unpruned", action="store_true",
                   help="also run each guide search without pruning (NopPruner)")
    p.add_argument("--quick", action="store_true", help="smoke run with tiny budgets")
    a = p.parse_args(argv)
    if a.quick:
        a.targets, a.seeds, a.density_steps = ["U1"], [0], 60
        a.models, a.guide_steps, a.trials, a.val_particles = ["banana"], 30, 5, 100
    torch.set_num_threads(a.threads)
    # first calls pay one-off set-up costs; keep them out of the timed default fit
    fit_density(planar_flow(2, 2), get_target("U1"), num_steps=3, progress=False, seed=0)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {a.threads} thread(s)")
    if a.part in ("density", "both"):
        density_part(a.targets, a.seeds, a.density_steps, 20000, max(a.density_steps // 5, 10))
    if a.part in ("guide", "both"):
        guide_part(a.models, a.guide_steps, a.trials, a.val_particles, a.eval_samples,
                   a.seeds[0], a.compare_unpruned)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
