"""``python -m pyro_nfvi``: fit planar (or radial) flows to the 2-D targets U1–U4 by
reverse KL, print a table of KL(q‖p) ± standard error, ESS and time, and write one PNG
(one row per target: true density | fitted density | samples).

Examples::

    python -m pyro_nfvi                                  # planar, K = 32, U1..U4
    python -m pyro_nfvi --flow radial --out radial.png
    python -m pyro_nfvi --targets U1 U3 --num-flows 16 --steps 2000 --seed 1

``python -m pyro_nfvi tune``: search K, the family (planar/radial) and the learning rate
per target with Optuna (:func:`pyro_nfvi.tune.tune_density`; needs the ``[tune]`` extra),
print the best configuration and its KL per target and write a figure of the search::

    python -m pyro_nfvi tune --targets U1 U2 U3 U4 --trials 20 --timeout 120 --out search.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

import torch

from .targets import TARGETS, get_target

DEFAULT_STEPS = 12000


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _at_least_two(text: str) -> int:
    value = _positive_int(text)
    if value < 2:  # the standard error and ESS need two draws
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {value}")
    return value


def _target_name(text: str) -> str:
    key = text.upper()
    if key not in TARGETS:
        raise argparse.ArgumentTypeError(
            f"unknown target {text!r} (choose from {', '.join(sorted(TARGETS))})"
        )
    return key


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pyro_nfvi",
        description="Fit normalizing flows to the 2-D energies U1-U4 of Rezende & Mohamed "
        "(2015) by reverse KL and report KL(q||p) in nats.",
    )
    p.add_argument("--flow", choices=["planar", "radial"], default="planar",
                   help="flow family (default: planar)")
    p.add_argument("--num-flows", "-K", type=_positive_int, default=32,
                   help="number of flow layers K (default: 32)")
    p.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                   help=f"optimisation steps per target (default: {DEFAULT_STEPS})")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="samples per step (default: fit_density's default)")
    p.add_argument("--targets", nargs="+", type=_target_name, default=sorted(TARGETS),
                   metavar="U", help="targets to fit (default: U1 U2 U3 U4)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--num-samples", type=_at_least_two, default=20000,
                   help="Monte-Carlo samples for KL/ESS, >= 2 (default: 20000)")
    p.add_argument("--out", default=None,
                   help="figure path (default: pyro_nfvi_<flow><K>.png in the current "
                   "directory); a directory means <dir>/flows.png, a name without extension "
                   "gets .png; any format matplotlib writes (png, pdf, svg, ...)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch intra-op threads per fit (default: 1; small batches run "
                   "fastest on one)")
    p.add_argument("--jobs", "-j", type=_positive_int, default=None,
                   help="targets fitted in parallel processes (default: min(#targets, "
                   "#CPUs)); results do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def resolve_out(out: Optional[str], flow: str, num_flows: int) -> str:
    """The figure path that will be written, checked before any fitting: a directory
    means ``<dir>/flows.png``, a name without extension gets ``.png``; the extension must
    be a format matplotlib writes and the directory must exist and be writable.

    :raises ValueError: naming ``--out`` and what is wrong.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    if out is None:
        path = f"pyro_nfvi_{flow}{num_flows}.png"
    elif os.path.isdir(out) or out.endswith(("/", os.sep)):
        path = os.path.join(out, "flows.png")
    elif not os.path.splitext(out)[1]:
        path = out + ".png"
    else:
        path = out
    ext = os.path.splitext(path)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise ValueError(
            f"--out {out!r}: unsupported extension '.{ext}' (supported: "
            f"{', '.join(sorted(formats))})"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out!r}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (
        os.path.exists(path) and not os.access(path, os.W_OK)
    ):
        raise ValueError(f"--out {out!r}: {path} is not writable")
    if os.path.isdir(path):
        raise ValueError(f"--out {out!r}: {path} is a directory")
    return path


def _make_flow(kind: str, num_flows: int):
    from .helpers import planar_flow, radial_flow

    return (planar_flow if kind == "planar" else radial_flow)(2, num_flows)


def _fit_one(job: dict) -> dict:
    """Fit one target (runs in a worker process when ``--jobs`` > 1); returns plain data
    (state dicts, metrics) so that the parent can rebuild the fitted distribution."""
    from .diagnostics import evaluate_density
    from .infer import fit_density

    torch.set_num_threads(job["threads"])
    target = get_target(job["target"])
    torch.manual_seed(job["seed"])
    flow = _make_flow(job["flow"], job["num_flows"])
    kw = {} if job["batch_size"] is None else {"batch_size": job["batch_size"]}
    fit = fit_density(flow, target, num_steps=job["steps"], progress=job["progress"],
                      seed=job["seed"] + 1, **kw)
    with torch.no_grad():
        m = evaluate_density(fit.q, target, num_samples=job["num_samples"], seed=job["seed"] + 2)
    m.update(target=job["target"], flow=job["flow"], K=job["num_flows"], seconds=fit.seconds)
    return {
        "metrics": m,
        "flow_state": {k: v.detach().clone() for k, v in flow.state_dict().items()},
        "affine_state": None if fit.affine is None else
        {k: v.detach().clone() for k, v in fit.affine.state_dict().items()},
        "losses": fit.losses,
    }


def _rebuild_q(job: dict, result: dict):
    import pyro.distributions as dist

    from .infer import AffineBase

    flow = _make_flow(job["flow"], job["num_flows"])
    flow.load_state_dict(result["flow_state"])
    transforms = [flow]
    if result["affine_state"] is not None:
        affine = AffineBase(2)
        affine.load_state_dict(result["affine_state"])
        transforms.append(affine.transform())
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    return dist.TransformedDistribution(base, transforms)


def _fit_parallel(jobs: List[dict], n_workers: int) -> List[dict]:
    """Fit the jobs in ``n_workers`` spawned processes. On Ctrl-C (or any error) the
    workers are terminated at once rather than left to finish their fits."""
    import importlib
    import multiprocessing as mp

    # under ``python -m`` this file runs as ``__main__``, which spawned workers cannot
    # import by that name: hand them the function of the importable module instead
    worker = importlib.import_module("pyro_nfvi.__main__")._fit_one
    pool = mp.get_context("spawn").Pool(n_workers)
    try:
        results: List[Optional[dict]] = [None] * len(jobs)
        pending = {i: pool.apply_async(worker, (job,)) for i, job in enumerate(jobs)}
        while pending:
            for i, res in list(pending.items()):
                # short waits keep the parent responsive to Ctrl-C
                res.wait(0.2)
                if res.ready():
                    r = results[i] = res.get()
                    del pending[i]
                    m = r["metrics"]
                    print(f"  {m['target']} done: KL = {m['kl']:.4f} ({m['seconds']:.0f} s)",
                          flush=True)
        pool.close()
    except BaseException:
        pool.terminate()  # kills the workers now (KeyboardInterrupt included)
        raise
    finally:
        pool.join()
    return results


def _lr(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a learning rate > 0, got {text!r}")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a learning rate > 0, got {value}")
    return value


def build_tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pyro_nfvi tune",
        description="Search the number of flows K, the family and the learning rate that "
        "reach the lowest KL(q||p) on U1-U4 with Optuna (TPE sampler, median pruning on the "
        "KL of fresh draws during training). Needs the [tune] extra: "
        'pip install "pyro_nfvi[tune]".',
    )
    p.add_argument("--targets", nargs="+", type=_target_name, default=sorted(TARGETS),
                   metavar="U", help="targets to search (default: U1 U2 U3 U4)")
    p.add_argument("--trials", type=_positive_int, default=20,
                   help="trials per target (default: 20)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per target after which no new trial starts (default: none)")
    p.add_argument("--steps", type=_positive_int, default=2000,
                   help="fit_density steps per trial (default: 2000)")
    p.add_argument("--flows", nargs="+", choices=["planar", "radial"],
                   default=["planar", "radial"], help="families searched (default: both)")
    p.add_argument("--num-flows", "-K", nargs=2, type=_positive_int, default=[2, 64],
                   metavar=("LOW", "HIGH"), help="range of K (default: 2 64)")
    p.add_argument("--lr", nargs=2, type=_lr, default=[1e-3, 3e-2], metavar=("LOW", "HIGH"),
                   help="range of the learning rate (default: 0.001 0.03)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="samples per step (default: fit_density's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--num-samples", type=_at_least_two, default=20000,
                   help="fresh draws for the final KL of each best fit (default: 20000)")
    p.add_argument("--out", default=None,
                   help="figure path (default: pyro_nfvi_tune.png; rules as for the main "
                   "command's --out)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch intra-op threads (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def tune_main(argv: Sequence[str]) -> List[dict]:
    """``python -m pyro_nfvi tune``: one search per target; returns a row per target."""
    parser = build_tune_parser()
    args = parser.parse_args(argv)
    try:  # every check before any search
        if args.timeout is not None and not args.timeout > 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
        if args.num_flows[0] > args.num_flows[1] or args.lr[0] > args.lr[1]:
            raise ValueError("--num-flows and --lr take LOW HIGH with LOW <= HIGH")
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        out = resolve_out("pyro_nfvi_tune.png" if args.out is None else args.out, "tune", 0)
        from . import tune as tune_module

        tune_module._import_optuna()
    except (ValueError, ImportError) as e:
        parser.error(str(e))
    from .diagnostics import evaluate_density
    from .infer import tqdm

    torch.set_num_threads(args.threads)
    kw = {} if args.batch_size is None else {"batch_size": args.batch_size}
    total = len(args.targets) * args.trials
    results, rows = {}, []
    t_all = time.perf_counter()
    with tqdm(total=total, disable=args.no_progress, desc="trials") as bar:
        for name in args.targets:
            bar.set_description(f"{name} trials")
            t0 = time.perf_counter()

            def tick(study, trial):
                bar.update(1)
                bar.set_postfix(state=trial.state.name.lower(), refresh=False)

            res = tune_module.tune_density(
                get_target(name), families=args.flows, num_flows=tuple(args.num_flows),
                lr=tuple(args.lr), num_steps=args.steps, num_trials=args.trials,
                timeout=args.timeout, seed=args.seed + 1000 * sorted(TARGETS).index(name),
                callbacks=[tick], **kw)
            # trials left out by --timeout: the bar still ends at its total
            bar.update(args.trials - len(res.study.trials))
            with torch.no_grad():  # on draws independent of the search's validation draws
                m = evaluate_density(res.guide.q, get_target(name), num_samples=args.num_samples,
                                     seed=args.seed + 7)
            results[name] = res
            rows.append(dict(target=name, **res.best_params, kl=m["kl"], kl_se=m["kl_se"],
                             complete=res.num_complete, pruned=res.num_pruned,
                             failed=res.num_failed, seconds=time.perf_counter() - t0))
    header = (f"{'target':<7}{'family':<8}{'K':>4}  {'lr':>8}  {'KL (nats) ± se':>18}"
              f"  {'done/pruned/failed':>18}  {'seconds':>7}")
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['target']:<7}{r['family']:<8}{r['num_flows']:>4}  {r['lr']:>8.2g}  "
              f"{r['kl']:>9.4f} ± {r['kl_se']:<6.4f}  "
              f"{r['complete']:>6}/{r['pruned']}/{r['failed']:<7}  {r['seconds']:>7.1f}")
    fig = tune_module.plot_search(results, title=f"search: {args.trials} trials of "
                                  f"{args.steps} steps per target")
    fig.savefig(out, dpi=80, format=os.path.splitext(out)[1][1:].lower())
    print(f"\ntotal {time.perf_counter() - t_all:.1f} s wall; figure written to "
          f"{os.path.abspath(out)}")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    """Run the demo; returns one result dict per target (also printed as a table).
    ``main(["tune", ...])`` runs the search instead (:func:`tune_main`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tune"]:
        return tune_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:  # every check before any fitting
        out = resolve_out(args.out, args.flow, args.num_flows)
    except ValueError as e:
        parser.error(str(e))
    from .plotting import plot_density_grid  # Figure-based: needs no GUI backend

    jobs = [
        dict(target=name, flow=args.flow, num_flows=args.num_flows, steps=args.steps,
             batch_size=args.batch_size, num_samples=args.num_samples,
             # a target's seed does not depend on which other targets are fitted
             seed=args.seed + 1000 * sorted(TARGETS).index(name),
             threads=args.threads, progress=not args.no_progress)
        for name in args.targets
    ]
    n_workers = args.jobs or min(len(jobs), os.cpu_count() or 1)
    n_workers = max(1, min(n_workers, len(jobs)))
    total0 = time.perf_counter()
    if n_workers == 1:
        results = [_fit_one(job) for job in jobs]
    else:
        for job in jobs:  # interleaved bars from several processes are unreadable
            job["progress"] = False
        print(f"fitting {len(jobs)} targets in {n_workers} processes ...", flush=True)
        results = _fit_parallel(jobs, n_workers)
    torch.set_num_threads(args.threads)
    rows = [r["metrics"] for r in results]
    header = (f"{'target':<7}{'flow':<8}{'K':>4}  {'KL (nats) ± se':>18}  {'ESS %':>6}"
              f"  {'k-hat':>6}  {'seconds':>7}")
    print()
    print(header)
    print("-" * len(header))
    for m in rows:
        print(f"{m['target']:<7}{m['flow']:<8}{m['K']:>4}  {m['kl']:>9.4f} ± {m['kl_se']:<6.4f}"
              f"  {100 * m['ess']:>6.1f}  {m['k_hat']:>6.2f}  {m['seconds']:>7.1f}")
    qs = [_rebuild_q(job, r) for job, r in zip(jobs, results)]
    fig = plot_density_grid([get_target(j["target"]) for j in jobs], qs, metrics=rows)
    fig.suptitle(f"{args.flow} flow, K = {args.num_flows}, {args.steps} steps")
    fig.savefig(out, dpi=80, format=os.path.splitext(out)[1][1:].lower())
    print(f"\ntotal {time.perf_counter() - total0:.1f} s wall ({n_workers} process"
          f"{'es' if n_workers > 1 else ''}); figure written to {os.path.abspath(out)}")
    return rows


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
