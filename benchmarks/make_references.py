"""Reference posteriors of the suite's models (long NUTS runs, or exact draws).

One command regenerates all of them (about 15 CPU-minutes in all, one thread)::

    nice -n 5 python benchmarks/make_references.py            # every model
    python benchmarks/make_references.py --model eight_schools  # one model

For each model of :data:`suite_models.MODELS` it runs Pyro's ``MCMC(NUTS(...))`` on the
model's non-centred version (``spec.nuts_model``; the centred sites are recorded there as
``pyro.deterministic`` sites and read back here), ``--chains`` chains one after another with
seeds ``seed, seed+1, ...``, prints split-r̂ and the effective sample size (Pyro's
``pyro.ops.stats.split_gelman_rubin`` / ``effective_sample_size``, chains grouped) per site and
the number of divergences, and writes

* ``references/<name>.json``: per coordinate of the flattened centred sites (constrained
  space, order of ``spec.latent_sites``): ``mean``, ``sd``, quantiles at ``q_levels``,
  ``ess``, ``r_hat``, the Monte-Carlo standard error of the mean ``mcse_mean`` (sd/√ess),
  and the run's settings;
* ``references/<name>_draws.npz``: ``draws``, about 1000 thinned draws (float32, shape
  ``(n, D)``) and ``coords``, the coordinate names.

Models written without observations (funnel, banana) get exact references: ``--exact-draws``
direct draws for the quantiles and the stored draws, closed-form means and sds, ``log_Z = 0``.

Use :func:`load_reference` to read a reference back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from suite_models import MODELS, SuiteModel, get_model  # noqa: E402

REFERENCE_DIR = HERE / "references"
Q_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
NUM_STORED_DRAWS = 1000

__all__ = ["load_reference", "flatten_sites", "coord_names", "REFERENCE_DIR", "Q_LEVELS"]


def flatten_sites(values: Dict[str, torch.Tensor], sites: Sequence[str], num: int) -> torch.Tensor:
    """Concatenate ``values[site].reshape(num, -1)`` over ``sites`` into ``(num, D)`` (float64).

    Plate dimensions of size 1 that vectorised particles add (e.g. ``(num, 1, 10)``) flatten
    away, so guide draws and reference draws line up coordinate by coordinate."""
    return torch.cat([values[s].detach().reshape(num, -1).double() for s in sites], dim=-1)


def coord_names(shapes: Dict[str, List[int]], sites: Sequence[str]) -> List[str]:
    """``["mu", "theta[0]", ...]``: one name per flattened coordinate."""
    names = []
    for s in sites:
        n = int(np.prod(shapes[s])) if shapes[s] else 1
        names += [s] if not shapes[s] else [f"{s}[{i}]" for i in range(n)]
    return names


def _site_shapes(spec: SuiteModel) -> Dict[str, List[int]]:
    # event-and-plate shape of every latent site in one unbatched prior trace
    with poutine.block(), torch.no_grad():
        tr = poutine.trace(spec.model).get_trace(*spec.args)
    return {s: list(tr.nodes[s]["value"].shape) for s in spec.latent_sites}


def _to_centred(spec: SuiteModel, samples: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map NUTS draws of ``spec.nuts_model`` to the centred sites (read off the
    ``pyro.deterministic`` sites of a conditioned trace, one draw at a time)."""
    if spec.nuts_model is None:
        return {s: samples[s] for s in spec.latent_sites}
    n = next(iter(samples.values())).shape[0]
    out: Dict[str, List[torch.Tensor]] = {s: [] for s in spec.latent_sites}
    with poutine.block(), torch.no_grad():
        for i in range(n):
            cond = poutine.condition(spec.nuts_model, data={k: v[i] for k, v in samples.items()})
            tr = poutine.trace(cond).get_trace(*spec.args)
            for s in spec.latent_sites:
                out[s].append(tr.nodes[s]["value"])
    return {s: torch.stack(v) for s, v in out.items()}


def run_nuts(
    spec: SuiteModel,
    num_chains: int = 4,
    num_samples: int = 1000,
    warmup_steps: int = 500,
    seed: int = 0,
    target_accept_prob: float = 0.9,
) -> Dict[str, Any]:
    """``num_chains`` sequential NUTS chains; returns centred draws ``(chains, n, D)``,
    per-coordinate r̂/ESS, divergences and seconds."""
    model = spec.nuts_model if spec.nuts_model is not None else spec.model
    chains = []
    divergences = 0
    t0 = time.time()
    for c in range(num_chains):
        pyro.set_rng_seed(seed + c)
        # jit halves the per-iteration cost of these small models (eight schools: 12.5 s -> 6.3 s)
        kernel = NUTS(model, full_mass=spec.full_mass, target_accept_prob=target_accept_prob,
                      jit_compile=True, ignore_jit_warnings=True)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                    num_chains=1, disable_progbar=True)
        mcmc.run(*spec.args)
        divergences += int(sum(len(v) for v in mcmc.diagnostics()["divergences"].values()))
        centred = _to_centred(spec, mcmc.get_samples())
        chains.append(flatten_sites(centred, spec.latent_sites, num_samples))
        print(f"  chain {c}: {time.time() - t0:.0f}s", flush=True)
    draws = torch.stack(chains)  # (C, N, D)
    return {
        "draws": draws,
        "ess": effective_sample_size(draws, chain_dim=0, sample_dim=1),
        "r_hat": split_gelman_rubin(draws, chain_dim=0, sample_dim=1),
        "divergences": divergences,
        "seconds": time.time() - t0,
        "settings": {"method": "nuts", "num_chains": num_chains, "num_samples": num_samples,
                     "warmup_steps": warmup_steps, "seed": seed, "full_mass": spec.full_mass,
                     "target_accept_prob": target_accept_prob, "jit_compile": True,
                     "nuts_model": getattr(spec.nuts_model, "__name__", None)},
    }


def run_exact(spec: SuiteModel, num_draws: int = 200000, seed: int = 0) -> Dict[str, Any]:
    """Direct draws for models without observations (ESS = number of draws, r̂ = 1)."""
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    values = spec.exact_sampler(num_draws, g)
    draws = flatten_sites(values, spec.latent_sites, num_draws)[None]
    D = draws.shape[-1]
    return {
        "draws": draws,
        "ess": torch.full((D,), float(num_draws), dtype=torch.float64),
        "r_hat": torch.ones(D, dtype=torch.float64),
        "divergences": 0,
        "seconds": time.time() - t0,
        "settings": {"method": "exact", "num_draws": num_draws, "seed": seed},
    }


def summarise(spec: SuiteModel, run: Dict[str, Any]) -> Dict[str, Any]:
    draws = run["draws"].reshape(-1, run["draws"].shape[-1])
    mean, sd = draws.mean(0), draws.std(0)
    moments = "monte_carlo"
    if spec.exact_moments is not None:
        mean, sd = spec.exact_moments()
        moments = "closed_form"
    shapes = _site_shapes(spec)
    ess = run["ess"]
    mcse = sd / ess.clamp(min=1.0).sqrt()
    if spec.exact_moments is not None:
        mcse = torch.zeros_like(mcse)
    q = torch.quantile(draws.float(), torch.tensor(Q_LEVELS), dim=0).double()
    return {
        "name": spec.name,
        "description": spec.description,
        "latent_sites": list(spec.latent_sites),
        "site_shapes": shapes,
        "coords": coord_names(shapes, spec.latent_sites),
        "mean": mean.tolist(),
        "sd": sd.tolist(),
        "q_levels": list(Q_LEVELS),
        "quantiles": q.tolist(),
        "ess": ess.tolist(),
        "r_hat": run["r_hat"].tolist(),
        "mcse_mean": mcse.tolist(),
        "moments": moments,
        "log_Z": spec.log_Z,
        "divergences": run["divergences"],
        "seconds": round(run["seconds"], 1),
        "num_draws_total": int(draws.shape[0]),
        "settings": run["settings"],
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__},
    }


def _print_diagnostics(summary: Dict[str, Any]) -> None:
    ess, rhat, coords = summary["ess"], summary["r_hat"], summary["coords"]
    print(f"  {'site':<10} {'min ESS':>9} {'max r_hat':>10}")
    start = 0
    for s in summary["latent_sites"]:
        n = int(np.prod(summary["site_shapes"][s])) if summary["site_shapes"][s] else 1
        e, r = ess[start:start + n], rhat[start:start + n]
        print(f"  {s:<10} {min(e):9.0f} {max(r):10.4f}")
        start += n
    worst = max(m / s for m, s in zip(summary["mcse_mean"], summary["sd"]))
    print(f"  divergences {summary['divergences']}, {summary['seconds']:.0f}s, "
          f"max mcse(mean)/sd = {worst:.4f} over {len(coords)} coordinates", flush=True)


def write_reference(spec: SuiteModel, run: Dict[str, Any], out_dir: Path = REFERENCE_DIR) -> Dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(spec, run)
    with open(out_dir / f"{spec.name}.json", "w") as f:
        json.dump(summary, f, indent=1)
    draws = run["draws"].reshape(-1, run["draws"].shape[-1])
    # thin evenly (chains interleaved) to about NUM_STORED_DRAWS
    idx = torch.linspace(0, draws.shape[0] - 1, min(NUM_STORED_DRAWS, draws.shape[0])).round().long()
    np.savez_compressed(out_dir / f"{spec.name}_draws.npz", draws=draws[idx].float().numpy(),
                        coords=np.array(summary["coords"]))
    return summary


def load_reference(name: str, ref_dir: Optional[Path] = None, draws: bool = False) -> Dict[str, Any]:
    """Read ``references/<name>.json`` (lists become float64 tensors: ``mean``, ``sd``,
    ``quantiles``, ``ess``, ``r_hat``, ``mcse_mean``); with ``draws=True`` also ``draws``,
    a ``(n, D)`` tensor from ``<name>_draws.npz``.

    :raises FileNotFoundError: naming the command that makes the missing reference.
    """
    ref_dir = REFERENCE_DIR if ref_dir is None else Path(ref_dir)
    path = ref_dir / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no reference for {name!r} at {path}; run `python benchmarks/make_references.py --model {name}`")
    with open(path) as f:
        ref = json.load(f)
    for k in ("mean", "sd", "quantiles", "ess", "r_hat", "mcse_mean"):
        ref[k] = torch.tensor(ref[k], dtype=torch.float64)
    if draws:
        ref["draws"] = torch.from_numpy(np.load(ref_dir / f"{name}_draws.npz")["draws"]).double()
    return ref


# draws per chain etc. chosen so that mcse(mean) <= ~0.02 sd within the CPU budget
# (CPU ms per NUTS iteration measured here, jit: eight schools 10, logistic 12, stoch_vol 62,
# hier_scales 80, horseshoe with half-Cauchy scales 220 before the a*sqrt(b) form)
NUTS_SETTINGS: Dict[str, Dict[str, int]] = {
    "eight_schools": {"num_chains": 4, "num_samples": 1000, "warmup_steps": 500},
    "logistic": {"num_chains": 4, "num_samples": 1000, "warmup_steps": 500},
    # the three costly ones fit the budget only with fewer draws (mcse(mean) ~0.03-0.05 sd)
    # horseshoe: ~1 s wall per iteration here even in the a*sqrt(b) form (deep trees)
    "horseshoe": {"num_chains": 2, "num_samples": 300, "warmup_steps": 200},
    "hier_scales": {"num_chains": 4, "num_samples": 500, "warmup_steps": 300},
    "stoch_vol": {"num_chains": 4, "num_samples": 500, "warmup_steps": 300},
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="*", default=None, help=f"subset of {sorted(MODELS)}")
    p.add_argument("--chains", type=int, default=None, help="NUTS chains (default per model)")
    p.add_argument("--samples", type=int, default=None, help="NUTS draws per chain")
    p.add_argument("--warmup", type=int, default=None, help="NUTS warm-up steps per chain")
    p.add_argument("--exact-draws", type=int, default=200000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=REFERENCE_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    names = args.model or list(MODELS)
    for name in names:
        spec = get_model(name)
        print(f"{name}: {spec.description}", flush=True)
        if spec.exact_sampler is not None:
            run = run_exact(spec, args.exact_draws, args.seed)
        else:
            kw = dict(NUTS_SETTINGS.get(name, {"num_chains": 4, "num_samples": 1000, "warmup_steps": 500}))
            for key, val in (("num_chains", args.chains), ("num_samples", args.samples),
                             ("warmup_steps", args.warmup)):
                if val is not None:
                    kw[key] = val
            run = run_nuts(spec, seed=args.seed, **kw)
        summary = write_reference(spec, run, args.out_dir)
        _print_diagnostics(summary)
    return 0


if __name__ == "__main__":
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    sys.exit(main())
