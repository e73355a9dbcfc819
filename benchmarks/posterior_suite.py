"""Posterior benchmark suite: every guide on every model of :mod:`suite_models`, against the
NUTS (or exact) references of :mod:`make_references`.

Usage (from the repository root)::

    nice -n 5 python benchmarks/posterior_suite.py --steps 3000 --out results.json
    python benchmarks/posterior_suite.py --models eight_schools funnel --guides AutoNormal AutoPlanarFlow
    python benchmarks/posterior_suite.py --quick            # smoke run: 50 steps, 1 seed

Every guide gets the same budget: the same optimiser, learning-rate schedule, number of steps
and number of vectorised particles. By default they are the package's :func:`pyro_nfvi.fit`
defaults, found by introspection (:func:`resolve_settings`): a dict
``pyro_nfvi.infer.FIT_DEFAULTS`` if the package exposes one (keys ``lr``, ``lr_end``,
``num_particles``, ``num_steps``, ``clip_norm``), else module constants
``pyro_nfvi.infer.DEFAULT_LR`` etc., else the defaults of ``fit``'s own keyword arguments of
those names; what is not found falls back to ClippedAdam with the learning rate
decaying geometrically from 0.01 to 0.001 over the run, 1 particle, ``Trace_ELBO``. Flags
override each one. This package's guides (instances of
:class:`pyro_nfvi.guides.AutoNormalizingFlow`) are trained by ``pyro_nfvi.fit`` — with its
own defaults when nothing was overridden and the settings came from the package, else with
the resolved optimiser and ELBO passed explicitly; Pyro's guides by a plain ``SVI`` loop with
the same settings.

Columns (mean ± standard error over seeds), all from ``--eval-samples`` (4000) draws of the
fitted guide with log weights ``log w = log p(x, z) − log q(z)``:

* ``ELBO``: mean of ``log w``; ``IWAE``: ``log mean exp(log w)`` (the K = 4000 bound);
* ``k̂``: PSIS tail index (:func:`pyro_nfvi.diagnostics.psis_khat`; < 0.7 usable);
* ``mean err``: ``max_j |E_q z_j − E_ref z_j| / sd_ref_j`` and ``sd err``:
  ``max_j |sd_q,j / sd_ref,j − 1|``, over the flattened coordinates of all latent sites in
  their constrained space;
* ``s/fit`` and ``ms/step``: wall-clock training time.

Adding a guide is one line in :data:`GUIDES` (name → constructor taking the model).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import pyro
import pyro.distributions.transforms as T
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide import AutoNormalizingFlow as PyroAutoNormalizingFlow
from pyro.infer.importance import vectorized_importance_weights

import pyro_nfvi
from pyro_nfvi import guides as nfvi_guides
from pyro_nfvi.diagnostics import ess_fraction, log_mean_exp, psis_khat

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from make_references import flatten_sites, load_reference  # noqa: E402
from suite_models import MODELS, get_model  # noqa: E402

#: number of layers of Pyro's planar flow guide: the same K as ``AutoPlanarFlow``'s default
NUM_FLOWS: int = inspect.signature(nfvi_guides.AutoPlanarFlow).parameters["num_flows"].default

#: name -> constructor ``model -> guide``. This package's guides (``AutoNormalizingFlow``
#: subclasses) are trained by ``pyro_nfvi.fit``; the others by a plain SVI loop.
GUIDES: Dict[str, Callable[[Callable], Any]] = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "PyroPlanar": lambda m: PyroAutoNormalizingFlow(m, functools.partial(T.iterated, NUM_FLOWS, T.planar)),
    "AutoIAFNormal": AutoIAFNormal,
    # Pyro 1.9 has no AutoBNAFNormal (NumPyro does): the same guide built from Pyro's parts,
    # one block neural autoregressive flow (De Cao et al. 2019), NumPyro's default hidden_factors
    "PyroBNAF": lambda m: PyroAutoNormalizingFlow(
        m, functools.partial(T.block_autoregressive, hidden_factors=[8, 8])),
    "AutoPlanarFlow": nfvi_guides.AutoPlanarFlow,
    "AutoRadialFlow": nfvi_guides.AutoRadialFlow,
}
if hasattr(nfvi_guides, "AutoSylvesterFlow"):  # added by another engineer
    GUIDES["AutoSylvesterFlow"] = nfvi_guides.AutoSylvesterFlow
if "base" in inspect.signature(nfvi_guides.AutoNormalizingFlow).parameters:
    # the heavy-tailed base: Student-t coordinates with learnable degrees of freedom
    GUIDES["AutoPlanarFlow-t"] = functools.partial(nfvi_guides.AutoPlanarFlow, base="studentt")
    if "AutoSylvesterFlow" in GUIDES:
        GUIDES["AutoSylvesterFlow-t"] = functools.partial(nfvi_guides.AutoSylvesterFlow, base="studentt")
if hasattr(pyro_nfvi, "AutoHamiltonianFlow"):  # AutoPlanarFlow + 4 leapfrog steps
    GUIDES["AutoHamiltonianFlow"] = functools.partial(pyro_nfvi.AutoHamiltonianFlow, num_steps=4)

FALLBACK_SETTINGS: Dict[str, Any] = {
    "num_steps": 1000, "lr": 0.01, "lr_end": 0.001, "num_particles": 1, "clip_norm": 10.0,
}


def resolve_settings(overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The training settings shared by all guides.

    Looked up in order: ``pyro_nfvi.infer.FIT_DEFAULTS`` (a dict), the constants
    ``pyro_nfvi.infer.DEFAULT_<KEY>`` (e.g. ``DEFAULT_LR``), the defaults of
    ``pyro_nfvi.fit``'s keyword arguments of the same names (``num_steps``, ``lr``,
    ``lr_end``, ``num_particles``, ``clip_norm``), :data:`FALLBACK_SETTINGS`; then
    ``overrides`` (non-``None`` values). The result says where each value came from
    (``sources``) and whether ``fit``'s own defaults can be used as they are
    (``use_fit_defaults``: every training setting came from the package, none overridden).
    """
    exposed = getattr(pyro_nfvi.infer, "FIT_DEFAULTS", None)
    params = inspect.signature(pyro_nfvi.fit).parameters
    settings: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for key, fallback in FALLBACK_SETTINGS.items():
        constant = getattr(pyro_nfvi.infer, "DEFAULT_" + key.upper(), None)
        if isinstance(exposed, dict) and exposed.get(key) is not None:
            settings[key], sources[key] = exposed[key], "pyro_nfvi.infer.FIT_DEFAULTS"
        elif constant is not None:
            settings[key], sources[key] = constant, f"pyro_nfvi.infer.DEFAULT_{key.upper()}"
        elif key in params and params[key].default not in (inspect.Parameter.empty, None):
            settings[key], sources[key] = params[key].default, "signature of pyro_nfvi.fit"
        else:
            settings[key], sources[key] = fallback, "fallback"
    for key, val in (overrides or {}).items():
        if val is not None:
            settings[key], sources[key] = val, "flag"
    # clip_norm: ClippedAdam's own default (10) unless a flag sets it
    training = ("lr", "lr_end", "num_particles")
    settings["use_fit_defaults"] = sources["clip_norm"] != "flag" and all(
        sources[k] not in ("fallback", "flag") for k in training)
    settings["sources"] = sources
    return settings


def make_optim(settings: Dict[str, Any]) -> pyro.optim.PyroOptim:
    """ClippedAdam with the learning rate decaying geometrically from ``lr`` to ``lr_end``
    over ``num_steps`` steps (``lrd`` is applied once per step)."""
    lrd = (settings["lr_end"] / settings["lr"]) ** (1.0 / settings["num_steps"])
    return pyro.optim.ClippedAdam({"lr": settings["lr"], "lrd": lrd, "clip_norm": settings["clip_norm"]})


def make_loss(settings: Dict[str, Any]) -> pyro.infer.ELBO:
    p = int(settings["num_particles"])
    return Trace_ELBO(num_particles=p, vectorize_particles=p > 1)


def train(model: Callable, guide: Any, args: tuple, settings: Dict[str, Any]) -> List[float]:
    """Train ``guide`` in place (see the module docstring for which loop) and return losses."""
    n = int(settings["num_steps"])
    if isinstance(guide, (nfvi_guides.AutoNormalizingFlow, getattr(pyro_nfvi, "AutoHamiltonianFlow", ()))):
        if settings["use_fit_defaults"]:
            return pyro_nfvi.fit(model, guide, *args, num_steps=n, progress=False)
        return pyro_nfvi.fit(model, guide, *args, num_steps=n, progress=False,
                             optim=make_optim(settings), loss=make_loss(settings))
    svi = SVI(model, guide, make_optim(settings), make_loss(settings))
    losses = []
    for step in range(n):
        loss = float(svi.step(*args))
        if not math.isfinite(loss):
            raise FloatingPointError(f"SVI loss is {loss} at step {step}")
        losses.append(loss)
    return losses


def _max_plate_nesting(model: Callable, args: tuple) -> int:
    with poutine.block(), torch.no_grad():
        tr = poutine.trace(model).get_trace(*args)
    dims = [-f.dim for site in tr.nodes.values() if site["type"] == "sample"
            for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
    return max(dims, default=0)


@torch.no_grad()
def guide_draws(model: Callable, guide: Any, args: tuple, sites: Sequence[str],
                num_samples: int, chunk: int = 1000) -> Dict[str, torch.Tensor]:
    """``log_w`` (``(n,)``) and the flattened constrained draws ``z`` (``(n, D)``) of the
    latent ``sites``, from the same ``num_samples`` guide draws (vectorised, in chunks)."""
    mpn = _max_plate_nesting(model, args)
    lws, zs = [], []
    left = num_samples
    while left > 0:
        m = min(chunk, left)
        with poutine.block():
            lw, _, gtr = vectorized_importance_weights(model, guide, *args, num_samples=m,
                                                       max_plate_nesting=mpn)
        lws.append(lw.detach().double().reshape(m))
        zs.append(flatten_sites({s: gtr.nodes[s]["value"] for s in sites}, sites, m))
        left -= m
    return {"log_w": torch.cat(lws), "z": torch.cat(zs)}


def metrics(log_w: torch.Tensor, z: torch.Tensor, ref: Dict[str, Any]) -> Dict[str, Any]:
    """The suite's columns from log weights and draws against a reference (see module doc)."""
    if z.shape[-1] != ref["mean"].shape[0]:
        raise ValueError(f"guide draws have {z.shape[-1]} coordinates, the reference {ref['mean'].shape[0]}")
    finite = torch.isfinite(log_w)
    iwae, _ = log_mean_exp(log_w[finite]) if finite.any() else (float("nan"), None)
    mean_err = (z.mean(0) - ref["mean"]).abs() / ref["sd"]
    sd_err = (z.std(0) / ref["sd"] - 1).abs()
    coords = ref.get("coords") or [str(i) for i in range(z.shape[-1])]
    return {
        "elbo": float(log_w.mean()),
        "elbo_mc_se": float(log_w.std() / math.sqrt(log_w.numel())),
        "iwae": float(iwae),
        "k_hat": psis_khat(log_w[finite]) if finite.sum() > 20 else float("inf"),
        "ess_frac": ess_fraction(log_w[finite]) if finite.any() else 0.0,
        "mean_err": float(mean_err.max()),
        "mean_err_coord": coords[int(mean_err.argmax())],
        "sd_err": float(sd_err.max()),
        "sd_err_coord": coords[int(sd_err.argmax())],
        "num_nonfinite": int((~finite).sum()),
    }


def run_one(model_name: str, guide_name: str, seed: int, settings: Dict[str, Any],
            eval_samples: int = 4000, ref: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Fit one guide on one model with one seed and evaluate it; errors are recorded
    (``error`` key), not raised, so one failing guide does not stop the suite."""
    spec = get_model(model_name)
    ref = load_reference(model_name) if ref is None else ref
    row: Dict[str, Any] = {"model": model_name, "guide": guide_name, "seed": seed,
                           "num_steps": int(settings["num_steps"])}
    try:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = GUIDES[guide_name](spec.model)
        t0 = time.perf_counter()
        losses = train(spec.model, guide, spec.args, settings)
        seconds = time.perf_counter() - t0
        pyro.set_rng_seed(10_000 + seed)
        draws = guide_draws(spec.model, guide, spec.args, spec.latent_sites, eval_samples)
        row.update(metrics(draws["log_w"], draws["z"], ref))
        row.update({"seconds": seconds, "ms_per_step": 1000 * seconds / len(losses),
                    "final_loss": sum(losses[-100:]) / len(losses[-100:])})
    except Exception as e:  # noqa: BLE001 - recorded in the table
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=3)
    return row


COLUMNS = ("elbo", "iwae", "k_hat", "mean_err", "sd_err", "seconds", "ms_per_step")


def aggregate(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and standard error over seeds per (model, guide), for each of :data:`COLUMNS`."""
    out = []
    keys = list(dict.fromkeys((r["model"], r["guide"]) for r in rows))
    for model, guide in keys:
        rs = [r for r in rows if r["model"] == model and r["guide"] == guide]
        ok = [r for r in rs if "error" not in r]
        agg: Dict[str, Any] = {"model": model, "guide": guide, "num_seeds": len(ok),
                               "errors": [r["error"] for r in rs if "error" in r]}
        for c in COLUMNS:
            vals = torch.tensor([r[c] for r in ok], dtype=torch.float64)
            agg[c] = float(vals.mean()) if len(vals) else float("nan")
            agg[c + "_se"] = float(vals.std() / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
        out.append(agg)
    return out


def _pm(mean: float, se: float, fmt: str) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:{fmt}}" + ("" if math.isnan(se) else f" ± {se:{fmt}}")


def markdown_table(summary: List[Dict[str, Any]]) -> str:
    """The aggregated results as a markdown table (one row per model × guide)."""
    lines = ["| model | guide | ELBO | IWAE | k̂ | mean err | sd err | s/fit | ms/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in summary:
        if a["num_seeds"] == 0:
            err = a["errors"][0] if a["errors"] else "no runs"
            lines.append(f"| {a['model']} | {a['guide']} | failed: {err[:60]} | | | | | | |")
            continue
        lines.append(
            f"| {a['model']} | {a['guide']} | {_pm(a['elbo'], a['elbo_se'], '.2f')} | "
            f"{_pm(a['iwae'], a['iwae_se'], '.2f')} | {_pm(a['k_hat'], a['k_hat_se'], '.2f')} | "
            f"{_pm(a['mean_err'], a['mean_err_se'], '.2f')} | {_pm(a['sd_err'], a['sd_err_se'], '.2f')} | "
            f"{a['seconds']:.1f} | {a['ms_per_step']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Posterior benchmark suite against NUTS references.")
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"subset of {list(MODELS)}")
    p.add_argument("--guides", nargs="+", default=list(GUIDES), help=f"subset of {list(GUIDES)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="SVI steps (default: fit's default)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate")
    p.add_argument("--lr-end", type=float, default=None, help="final learning rate (geometric decay)")
    p.add_argument("--num-particles", type=int, default=None, help="vectorised ELBO particles")
    p.add_argument("--clip-norm", type=float, default=None, help="ClippedAdam gradient clipping")
    p.add_argument("--eval-samples", type=int, default=4000)
    p.add_argument("--out", type=Path, default=None, help="JSON output (written after every fit)")
    p.add_argument("--quick", action="store_true", help="smoke run: 50 steps, seed 0, 200 eval draws")
    p.add_argument("--studentt-init-df", type=float, default=None,
                   help="initial degrees of freedom of the *-t guides' Student-t base")
    args = p.parse_args(argv)
    if args.studentt_init_df is not None:
        import pyro_nfvi.guides.flow as flow_module

        flow_module.STUDENTT_INIT_DF = args.studentt_init_df
        print("Student-t base: initial df", args.studentt_init_df, flush=True)
    for name in args.models:
        get_model(name)
    unknown = [g for g in args.guides if g not in GUIDES]
    if unknown:
        raise ValueError(f"unknown guides {unknown}; expected some of {list(GUIDES)}")
    if args.quick:
        args.steps = args.steps or 50
        args.seeds = [0]
        args.eval_samples = min(args.eval_samples, 200)
    torch.set_num_threads(1)
    settings = resolve_settings({"num_steps": args.steps, "lr": args.lr, "lr_end": args.lr_end,
                                 "num_particles": args.num_particles, "clip_norm": args.clip_norm})
    print("settings:", json.dumps({k: v for k, v in settings.items()}), flush=True)
    rows: List[Dict[str, Any]] = []
    for model_name in args.models:
        try:
            ref = load_reference(model_name)
        except FileNotFoundError as e:  # one missing reference skips one model
            print(f"skipping {model_name}: {e}", flush=True)
            continue
        for guide_name in args.guides:
            for seed in args.seeds:
                row = run_one(model_name, guide_name, seed, settings, args.eval_samples, ref)
                rows.append(row)
                msg = row.get("error") or (f"elbo {row['elbo']:.2f} k {row['k_hat']:.2f} "
                                           f"mean_err {row['mean_err']:.2f} {row['seconds']:.0f}s")
                print(f"{model_name} {guide_name} seed {seed}: {msg}", flush=True)
                if args.out is not None:
                    with open(args.out, "w") as f:
                        json.dump({"settings": settings, "rows": rows, "summary": aggregate(rows)},
                                  f, indent=1)
        print(markdown_table([a for a in aggregate(rows) if a["model"] == model_name]), flush=True)
    print("\n" + markdown_table(aggregate(rows)))
    return 0


if __name__ == "__main__":
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    sys.exit(main())
