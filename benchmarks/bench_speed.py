"""Speed of pyro_nfvi's K-layer flows against Pyro's built-ins, measured in one run.

Part 1: one reverse-KL training step (rsample + log q + log p + backward + Adam) of a
flow distribution N(0, I) -> K layers, for Pyro's built-in ``Planar``/``Radial`` composed K
times, our stack in eager mode, and our stack with ``compile=True``; ratios are
``pyro ms / ours ms`` from the same process.

Part 2: one SVI step (Trace_ELBO, 1 particle, Adam) on a 2-D model for
``pyro_nfvi.guides.AutoPlanarFlow(num_flows=32)`` (defaults: sticking-the-landing,
full-rank affine base, hierarchical placement), the same with each of those switched off
and with all three off (a cost ledger: what each default costs per step), Pyro's
``AutoNormalizingFlow(partial(iterated, 32, planar))`` and ``AutoNormal``.

Part 3 (full run only): the same guides plus radial ones on a logistic regression
(12 latents, 200 observations), with 1 and 16 vectorised particles: there the model's own
cost is a larger share of the step, so the ratios are smaller.

Part 4 (full run only): a model-dominated SVI step with D = 20000 latents (a
Normal-Normal plate), AutoPlanarFlow(16) and AutoRadialFlow(16) against
AutoDiagonalNormal.

Last, the ratios issue 19 sets targets for (SVI step with defaults against Pyro's flow
guide and AutoNormal; reverse-KL step K = 32, B = 256, D = 2 against Pyro), from this run.

Timings interleave the contenders in rounds and report the median, so background load
hits them alike. Both sides run with the same number of torch threads (default 1).

Usage::

    python benchmarks/bench_speed.py               # full grid (compile warm-ups: a few minutes)
    python benchmarks/bench_speed.py --quick       # K=32, B=256, D=2 only
    python benchmarks/bench_speed.py --no-compile  # eager only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from functools import partial

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from torch.distributions import constraints
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide import AutoNormalizingFlow as PyroAutoNormalizingFlow

from pyro_nfvi import helpers


def reverse_kl_step(flow: torch.nn.Module, D: int, B: int):
    base = dist.Normal(torch.zeros(D), 1.0).to_event(1)
    q = dist.TransformedDistribution(base, [flow])
    target = dist.Normal(torch.full((D,), 0.5), 2.0).to_event(1)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        z = q.rsample((B,))
        loss = (q.log_prob(z) - target.log_prob(z)).mean()
        loss.backward()
        opt.step()

    return step


# The clock of :func:`time_interleaved`: wall time by default; ``--clock cpu`` counts this
# thread's CPU time only (``time.thread_time``), which background load inflates far less
# (waits for a core are not counted; cache and frequency effects still are). Valid with
# one torch thread, the default here, and NumPy's small calls, which are single-threaded.
CLOCK = time.perf_counter


def time_interleaved(steps: dict, rounds: int = 5, min_time: float = 0.15) -> dict:
    """Median ms/step of each callable, measured in interleaved rounds (on :data:`CLOCK`)."""
    clock = CLOCK
    reps = {}
    for name, step in steps.items():
        step()
        step()  # warm-up (compilation happens here)
        t0, n = clock(), 0
        while n < 2 or clock() - t0 < min_time / 3:
            step()
            n += 1
        reps[name] = max(2, int(min_time / ((clock() - t0) / n)))
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = clock()
            for _ in range(reps[name]):
                step()
            samples[name].append((clock() - t0) / reps[name] * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def bench_flows(grid, use_compile: bool, rounds: int) -> dict:
    """Prints one line per configuration; returns ``{(kind, K, B, D): ms dict}``."""
    results = {}
    print(f"\n== reverse-KL step, ms/step (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    header = f"{'flow':7s} {'K':>3s} {'B':>5s} {'D':>3s} {'pyro':>8s} {'eager':>8s} {'x eager':>8s}"
    if use_compile:
        header += f" {'compiled':>9s} {'x comp':>7s} {'warmup s':>8s}"
    print(header)
    for kind in ("planar", "radial"):
        builtin = T.Planar if kind == "planar" else T.Radial
        ours = helpers.planar_flow if kind == "planar" else helpers.radial_flow
        for K, B, D in grid:
            torch.manual_seed(0)
            steps = {
                "pyro": reverse_kl_step(ComposeTransformModule([builtin(D) for _ in range(K)]), D, B),
                "eager": reverse_kl_step(ours(D, K), D, B),
            }
            warm = float("nan")
            if use_compile:
                # a fresh compile per configuration: torch.compile recompiles for every
                # new parameter shape and gives up (runs eager) after its recompile limit
                torch._dynamo.reset()
                steps["compiled"] = reverse_kl_step(ours(D, K, compile=True), D, B)
                t0 = time.perf_counter()
                steps["compiled"]()
                warm = time.perf_counter() - t0
            ms = time_interleaved(steps, rounds=rounds)
            results[kind, K, B, D] = ms
            line = (
                f"{kind:7s} {K:3d} {B:5d} {D:3d} {ms['pyro']:8.3f} {ms['eager']:8.3f} "
                f"{ms['pyro'] / ms['eager']:7.1f}x"
            )
            if use_compile:
                line += f" {ms['compiled']:9.3f} {ms['pyro'] / ms['compiled']:6.1f}x {warm:8.1f}"
            print(line, flush=True)
    return results


def bench_stack_vs_single(rounds: int):
    """The fused stack must not be slower than composing our own single layers."""
    from pyro_nfvi.transforms import Planar, Radial

    print("\n== our stack vs K of our single layers composed (eager), ms/step, B=256")
    print(f"{'flow':7s} {'K':>3s} {'D':>3s} {'single':>8s} {'stack':>8s} {'single/stack':>12s}")
    for kind, single, stack in (
        ("planar", Planar, helpers.planar_flow),
        ("radial", Radial, helpers.radial_flow),
    ):
        for K, D in ((1, 2), (1, 50), (8, 50), (32, 50)):
            torch.manual_seed(0)
            ms = time_interleaved(
                {
                    "single": reverse_kl_step(ComposeTransformModule([single(D) for _ in range(K)]), D, 256),
                    "stack": reverse_kl_step(stack(D, K), D, 256),
                },
                rounds=rounds,
            )
            print(f"{kind:7s} {K:3d} {D:3d} {ms['single']:8.3f} {ms['stack']:8.3f} {ms['single'] / ms['stack']:11.1f}x", flush=True)


def svi_model():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(a, 1.0))
    pyro.sample("obs", dist.Normal(a + b, 0.5), obs=torch.tensor(1.0))


def svi_step(guide):
    svi = SVI(svi_model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step()
    return svi.step


DEFAULTS = "ours AutoPlanarFlow(32)"  # the guide's defaults: STL on, full rank, placement
# The default features, each switched off (``centered=1.0``: no hierarchical placement),
# then all at once: the ledger of what the default step pays for.
_OFF = {"sticking the landing": {"stl": False}, "full-rank affine": {"full_rank": False},
        "hierarchical placement": {"centered": 1.0}}
_OFF["all three"] = {k: v for o in _OFF.values() for k, v in o.items()}
#: step label -> (feature switched off, the guide's options)
LEDGER = {f"ours AutoPlanarFlow(32, {', '.join(f'{k}={v}' for k, v in o.items())})": (feature, o)
          for feature, o in _OFF.items()}
LEDGER_ALL_OFF = list(LEDGER)[-1]


def _parameters_guide(k: int):
    """A guide of ``svi_model`` whose only work is ``k`` constrained parameters (each its
    own ``pyro.param`` statement, constraint and Adam optimiser, as every Pyro guide's):
    the step of ``k = 5`` minus that of ``k = 1``, over 4, is what one more parameter
    costs in Pyro's SVI, whatever the guide does with it."""
    def guide():
        total = 0.0
        for i in range(k):
            total = total + pyro.param(f"bench_speed_{k}_{i}", torch.ones(1),
                                       constraint=constraints.positive).sum()
        pyro.sample("a", dist.Normal(0.01 * total, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))
    return guide


PARAMETER_STEPS = {k: f"bare guide with {k} parameter{'s' if k > 1 else ''}" for k in (1, 5)}


def bench_svi(use_compile: bool, rounds: int) -> dict:
    """Prints ms/step of each guide; returns the ms dict."""
    from pyro_nfvi.guides import AutoPlanarFlow

    print("\n== SVI step on a 2-D model, ms/step")
    pyro.clear_param_store()
    steps = {}
    normal, default = AutoNormal(svi_model), AutoPlanarFlow(svi_model, num_flows=32)
    steps["AutoNormal"] = svi_step(normal)
    steps["pyro AutoNormalizingFlow(32 planar)"] = svi_step(
        PyroAutoNormalizingFlow(svi_model, partial(T.iterated, 32, T.planar))
    )
    steps[DEFAULTS] = svi_step(default)
    # the cost ledger: each default feature switched off alone, then all three (these
    # AutoPlanarFlow variants share their parameters' names in Pyro's store, with the same
    # shapes: each step does the work it does alone)
    for label, (_, options) in LEDGER.items():
        steps[label] = svi_step(AutoPlanarFlow(svi_model, num_flows=32, **options))
    for k, label in PARAMETER_STEPS.items():
        steps[label] = svi_step(_parameters_guide(k))
    if use_compile:
        torch._dynamo.reset()
        steps["ours AutoPlanarFlow(32, compile)"] = svi_step(
            AutoPlanarFlow(svi_model, num_flows=32, compile=True)
        )
    ms = time_interleaved(steps, rounds=rounds)
    ref = ms["pyro AutoNormalizingFlow(32 planar)"]
    for name, v in ms.items():
        print(
            f"{name:52s} {v:8.3f} ms   pyro-flow/this {ref / v:5.1f}x   "
            f"this/AutoNormal {v / ms['AutoNormal']:4.2f}x"
        )
    print_ledger(ms, {"the default guide": default, "AutoNormal": normal})
    return ms


def print_ledger(ms: dict, guides: dict) -> None:
    """What each default feature of the guide costs in this run: the step with it
    switched off, subtracted from the default step (ms), and what is left over
    AutoNormal once all three are off (the 32-layer kernel and the affine base)."""
    print("\ncost ledger, ms per step from this run (default minus the feature off):")
    for label, (feature, options) in LEDGER.items():
        name = f"{feature} ({', '.join(f'{k}={v}' for k, v in options.items())})"
        print(f"  {name:66s} {ms[DEFAULTS] - ms[label]:+7.3f} ms")
    bare = ms[LEDGER_ALL_OFF]
    print(f"  {'left with all three off, over AutoNormal':66s} {bare - ms['AutoNormal']:+7.3f} ms")
    one, five = (ms[label] for label in PARAMETER_STEPS.values())
    print(f"  {'for scale: one more parameter in Pyro (param, constraint, Adam)':66s} "
          f"{(five - one) / 4:+7.3f} ms")
    counts = "; ".join(f"{name} {len(list(g.parameters()))}" for name, g in guides.items())
    print(f"  (parameters on this model: {counts})")


def print_targets(flows: dict, svi: dict) -> None:
    """The ratios issue 19 sets targets for, all from this run (one process)."""
    print("\n== targets (issue 19): ratios from this run, one process")
    if svi:
        pyro_flow, normal = svi["pyro AutoNormalizingFlow(32 planar)"], svi["AutoNormal"]
        r = pyro_flow / svi[DEFAULTS]
        print(f"SVI step, 2-D model, AutoPlanarFlow(32) defaults (STL on): pyro AutoNormalizingFlow(32 planar) / ours = {r:5.1f}x  (target >= 10x)")
        r = svi[DEFAULTS] / normal
        print(f"SVI step, 2-D model, AutoPlanarFlow(32) defaults (STL on): ours / AutoNormal = {r:5.2f}x  (target <= 1.5x)")
        print(f"  (for scale: AutoNormal's own step is {pyro_flow / normal:.1f}x faster than Pyro's "
              f"flow guide here, so >= 10x would need ours <= {pyro_flow / normal / 10:.2f}x AutoNormal)")
    ms = flows.get(("planar", 32, 256, 2))
    if ms:
        r = ms["pyro"] / ms["eager"]
        print(f"reverse-KL step, planar_flow(2, 32), B = 256: pyro / ours = {r:5.1f}x  (target >= 15x)")


def bench_svi_regression(rounds: int):
    from pyro_nfvi.guides import AutoPlanarFlow, AutoRadialFlow

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 10, generator=gen)
    y = (X @ torch.randn(10, generator=gen) > 0).float()

    def model(X, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([10]).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 5.0))
        pyro.sample("sd", dist.HalfNormal(1.0))
        with pyro.plate("data", len(y)):
            logits = torch.einsum("...d,nd->...n", w, X) + b[..., None]
            pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y)

    print("\n== SVI step, logistic regression (12 latents, 200 points), ms/step")
    for particles in (1, 16):
        pyro.clear_param_store()
        elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)
        guides = {
            "AutoNormal": AutoNormal(model),
            "pyro AutoNormalizingFlow(32 planar)": PyroAutoNormalizingFlow(model, partial(T.iterated, 32, T.planar)),
            "ours AutoPlanarFlow(32)": AutoPlanarFlow(model, num_flows=32),
            "pyro AutoNormalizingFlow(32 radial)": PyroAutoNormalizingFlow(model, partial(T.iterated, 32, T.radial)),
            "ours AutoRadialFlow(32)": AutoRadialFlow(model, num_flows=32),
        }
        steps = {}
        for name, guide in guides.items():
            svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
            svi.step(X, y)
            steps[name] = partial(svi.step, X, y)
        ms = time_interleaved(steps, rounds=rounds)
        for kind in ("planar", "radial"):
            ref, ours = ms[f"pyro AutoNormalizingFlow(32 {kind})"], ms[f"ours Auto{kind.title()}Flow(32)"]
            print(
                f"{particles:2d} particle(s) {kind}: pyro {ref:7.3f}  ours {ours:7.3f}  "
                f"pyro/ours {ref / ours:4.1f}x  ours/AutoNormal {ours / ms['AutoNormal']:4.2f}x"
            )


def bench_svi_large_d(rounds: int, dim: int = 20000, num_flows: int = 16):
    """A model-dominated SVI step with ``dim`` latent dimensions (a Normal-Normal plate):
    the flow guides against AutoDiagonalNormal, the guide a flow adds to. At this size
    the guide's cost is its passes over the (K, D) parameters (forward, backward, Adam);
    products run on torch's threads (``torch.set_num_threads``), not NumPy's BLAS pool."""
    from pyro.infer.autoguide import AutoDiagonalNormal

    from pyro_nfvi.guides import AutoPlanarFlow, AutoRadialFlow

    data = torch.randn(dim, generator=torch.Generator().manual_seed(0))

    def model(data):
        with pyro.plate("d", dim):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    print(f"\n== SVI step, Normal-Normal plate with D = {dim} latents, {num_flows} layers, ms/step")
    pyro.clear_param_store()
    guides = {
        "AutoDiagonalNormal": AutoDiagonalNormal(model),
        f"AutoPlanarFlow({num_flows})": AutoPlanarFlow(model, num_flows=num_flows),
        f"AutoRadialFlow({num_flows})": AutoRadialFlow(model, num_flows=num_flows),
    }
    steps = {}
    for name, guide in guides.items():
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        svi.step(data)
        steps[name] = partial(svi.step, data)
    ms = time_interleaved(steps, rounds=rounds)
    for name, v in ms.items():
        print(f"{name:24s} {v:8.2f} ms   this/AutoDiagonalNormal {v / ms['AutoDiagonalNormal']:4.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only K=32, B=256, D=2")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile path")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: these ops are tiny, and a second thread "
        "only adds OpenMP wake-ups, which stall badly when another process holds a core)",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this thread's CPU time (less affected by a loaded machine)",
    )
    p.add_argument("--skip-svi", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"clock: {args.clock}")
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.quick:
        grid = [(32, 256, 2)]
    else:
        grid = [(K, B, D) for D in (2, 50) for B in (256, 4096) for K in (2, 8, 32)]
    flows = bench_flows(grid, not args.no_compile, args.rounds)
    if not args.quick:
        bench_stack_vs_single(args.rounds)
    svi = {}
    if not args.skip_svi:
        svi = bench_svi(not args.no_compile, args.rounds)
        if not args.quick:
            bench_svi_regression(args.rounds)
            bench_svi_large_d(args.rounds)
    print_targets(flows, svi)
    return 0


if __name__ == "__main__":
    sys.exit(main())
