"""Hamiltonian flow vs planar K = 32 on the 2-D energies U1–U4, at equal (CPU) time.

Both are fitted by :func:`pyro_nfvi.infer.fit_density` (reverse KL, β-annealing, cosine
learning rate); each gets the same training time per target: a short pilot run measures
the CPU seconds per step of each method in this process (one thread), and the step count
of each is set to ``--seconds`` / (CPU seconds per step), so both finish their full
schedules in the same CPU time (on a shared, loaded machine wall time measures the other
jobs more than this one; both are printed).

* planar: ``planar_flow(2, 32)`` + fit_density's affine layer (as ``python -m pyro_nfvi``);
* Hamiltonian: ``q0`` = ``--q0-flows`` planar layers + an affine layer on ``z``, the initial
  momentum ``N(0, M/β0)`` (:class:`~pyro_nfvi.transforms.PhaseSpaceLift`), then
  ``--leapfrog`` learnable leapfrog/tempering steps under the target's own potential
  (:class:`~pyro_nfvi.transforms.Hamiltonian`), fitted on the phase space against
  :class:`~pyro_nfvi.transforms.PhaseSpaceTarget`.

KL columns (nats, ± Monte-Carlo standard error, :func:`pyro_nfvi.diagnostics.evaluate_density`
as ``python -m pyro_nfvi``): for planar the exact ``KL(q‖p)``; for the Hamiltonian flow
the KL on the phase space, ``KL(q(z_K, ω_K) ‖ p(z) N(ω; 0, M))``, which is an *upper bound*
on the KL of its ``z``-marginal (the auxiliary bound's gap), so the comparison is
conservative for the Hamiltonian flow.

Usage::

    python benchmarks/bench_hamiltonian_2d.py                 # U1..U4, 60 CPU s each per method
    python benchmarks/bench_hamiltonian_2d.py --seconds 20 --targets U2 --leapfrog 2
"""

from __future__ import annotations

import argparse
import contextlib
import time

import pyro.distributions as dist
import torch

from pyro_nfvi.diagnostics import evaluate_density
from pyro_nfvi.helpers import planar_flow
from pyro_nfvi.infer import fit_density
from pyro_nfvi.targets import get_target
from pyro_nfvi.transforms import Hamiltonian, PhaseSpaceLift, PhaseSpaceTarget

BATCH = 512


def _logaddexp(a, b):
    return torch.logsumexp(torch.stack(torch.broadcast_tensors(a, b)), 0)


@contextlib.contextmanager
def _stable_logaddexp():
    """torch.logaddexp's double backward is NaN where exp(a - b) underflows (U1, U3, U4 use
    it); the leapfrog steps differentiate ∇U, so the potential is evaluated with a
    logsumexp instead (the same function; the bound still scores the target itself)."""
    original = torch.logaddexp
    torch.logaddexp = _logaddexp
    try:
        yield
    finally:
        torch.logaddexp = original


def potential(target):
    def U(z):
        with _stable_logaddexp():
            return -target.log_prob_unnormalized(z)
    return U


def make_planar(target):
    return planar_flow(2, 32), target, dict(dim=2, affine=True)


def make_hamiltonian(target, leapfrog: int, q0_flows: int):
    h = Hamiltonian(2, potential(target), num_steps=leapfrog,
                    step_size=0.2, max_step_size=1.0)
    z_flow = planar_flow(2, q0_flows) if q0_flows else None
    if z_flow is not None:
        z_flow.reset_parameters(near_identity=True)
    lift = PhaseSpaceLift(h, z_flow)
    return [lift, h], PhaseSpaceTarget(target, h), dict(dim=4, affine=False)


def _fit(build, steps: int, seed: int):
    """fit_density with the process's CPU time around it (one thread: on a shared, loaded
    machine CPU time measures the work done, wall time mostly the other jobs)."""
    flow, tgt, kw = build()
    cpu = time.process_time()
    fit = fit_density(flow, tgt, num_steps=steps, batch_size=BATCH, progress=False, seed=seed, **kw)
    return fit, tgt, time.process_time() - cpu


def run(name: str, build, seconds: float, seed: int, num_samples: int) -> dict:
    _fit(build, 5, seed)  # warm-up
    cpu_per_step = _fit(build, 30, seed)[2] / 30
    steps = max(50, int(seconds / cpu_per_step))
    fit, tgt, cpu = _fit(build, steps, seed)
    m = evaluate_density(fit.q, tgt, num_samples=num_samples, seed=seed + 1)
    m.update(method=name, steps=steps, cpu=cpu, seconds=fit.seconds, ms_per_step=1000 * cpu / steps)
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", nargs="+", default=["U1", "U2", "U3", "U4"])
    p.add_argument("--seconds", type=float, default=60.0, help="training time per target and method")
    p.add_argument("--leapfrog", type=int, default=4, help="leapfrog steps K of the Hamiltonian flow")
    p.add_argument("--q0-flows", type=int, default=8, help="planar layers of q0 (0: Gaussian q0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.targets:
        target = get_target(name)
        for method, build in (
            ("planar", lambda: make_planar(target)),
            ("hamiltonian", lambda: make_hamiltonian(target, args.leapfrog, args.q0_flows)),
        ):
            m = run(method, build, args.seconds, args.seed, args.num_samples)
            m["target"] = name
            rows.append(m)
            print(f"  {name} {method}: KL = {m['kl']:.4f} ± {m['kl_se']:.4f} "
                  f"({m['steps']} steps, {m['cpu']:.0f} s CPU, {m['seconds']:.0f} s wall)", flush=True)
    ham = f"hamiltonian (q0: {args.q0_flows} planar + affine, K = {args.leapfrog} leapfrog)"
    print(f"\nequal time per target: {args.seconds:.0f} s of CPU (1 thread) per method; planar = planar_flow(2, 32) "
          f"+ affine;\n{ham}; KL of hamiltonian = phase-space KL (upper bound on its z-marginal KL)\n")
    header = f"{'target':<7}{'method':<13}{'KL (nats) ± se':>18}  {'ESS %':>6}  {'k-hat':>6}  {'steps':>6}  {'CPU s':>6}  {'wall s':>6}  {'ms/step':>8}"
    print(header)
    print("-" * len(header))
    for m in rows:
        print(f"{m['target']:<7}{m['method']:<13}{m['kl']:>9.4f} ± {m['kl_se']:<6.4f}  {100 * m['ess']:>6.1f}"
              f"  {m['k_hat']:>6.2f}  {m['steps']:>6d}  {m['cpu']:>6.0f}  {m['seconds']:>6.0f}  {m['ms_per_step']:>8.1f}")
    return rows


if __name__ == "__main__":
    main()
