"""``python -m pyro_nfvi``: fit planar (or radial) flows to the 2-D targets U1–U4 by
reverse KL, print a table of KL(q‖p) ± standard error, ESS and time, and write one PNG
(one row per target: true density | fitted density | samples).

Examples::

    python -m pyro_nfvi                                  # planar, K = 32, U1..U4
    python -m pyro_nfvi --flow radial --out radial.png
    python -m pyro_nfvi --targets U1 U3 --num-flows 16 --steps 2000 --seed 1
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


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    """Run the demo; returns one result dict per target (also printed as a table)."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
