"""Why the amortized flows did not help: encoders trained against one frozen decoder.

With the decoder fixed, -ln p(x) is fixed and the test -ELBO measures q(z|x) alone: a
family that contains the Gaussian (every ``AmortizedFlow`` with zero flow outputs is the
Gaussian encoder) can only do better if its optimisation works. The script trains one
Gaussian VAE (``--decoder-epochs``, seed 0), freezes its decoder, then trains fresh
encoders for each ``K:head_scale`` configuration (same seeds, Adam lr 1e-3, batch 100,
dynamic binarisation, no warm-up) and prints the test -ELBO after every epoch, mean +- se
over seeds. ``head_scale`` is :class:`pyro_nfvi.amortized.AmortizedFlow`'s multiplier of
the flow-parameter outputs (1 = the flow head steps as fast as the Gaussian's location,
the package's behaviour before the fix; 0.1 = the default).

    python benchmarks/vae_mnist_frozen.py                # ~25 min on 2 cores (--jobs 2)
    python benchmarks/vae_mnist_frozen.py --quick        # < 2 min

Models and data as in ``benchmarks/vae_mnist.py`` (784-400-40 encoder and decoder, ReLU,
Bernoulli). Results go to ``--out`` (one JSON per run; rerunning skips finished runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import pyro.distributions as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vae_mnist import LATENT, VAE  # noqa: E402

from pyro_nfvi.datasets import binarize, default_data_root, load_mnist  # noqa: E402

DEFAULT_CONFIGS = ["0:1", "16:1", "64:1", "4:0.1", "16:0.1", "64:0.1", "16:0.03", "16:0.3"]


def neg_elbo(vae: VAE, x: torch.Tensor, beta: float = 1.0, samples: int = 1) -> torch.Tensor:
    """Per-image -ELBO (with the KL term scaled by ``beta``), ``samples`` draws of z."""
    q = vae.posterior(x)
    z = q.rsample((samples,))
    prior = dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1).log_prob(z)
    lik = dist.Bernoulli(logits=vae.decoder(z)).to_event(1).log_prob(x)
    return -(lik - beta * (q.log_prob(z) - prior)).mean(0)


def train(vae: VAE, params, data: dict, epochs: int, seed: int, warmup_steps: int = 0) -> list:
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    x_train, x_test = data["train"], data["test"]
    history, step = [], 0
    for epoch in range(epochs):
        t0 = time.time()
        batches = binarize(x_train[torch.randperm(len(x_train), generator=gen)], generator=gen)
        for xb in batches.split(100):
            beta = min(1.0, 0.01 + step / warmup_steps) if warmup_steps else 1.0
            loss = neg_elbo(vae, xb, beta).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        with torch.no_grad():
            torch.manual_seed(123)  # the same test draws for every run
            test = torch.cat([neg_elbo(vae, x, samples=8) for x in x_test.split(500)])
        history.append({"epoch": epoch + 1, "test_neg_elbo": test.mean().item(),
                        "mc_se": test.std().item() / math.sqrt(len(test) * 8),
                        "seconds": time.time() - t0})
    return history


def load(args) -> dict:
    x_train, x_test = load_mnist(args.data_root)
    return {"train": x_train[: args.train_size], "test": binarize(x_test[: args.test_size], seed=0)}


def decoder_path(args) -> Path:
    return Path(args.out) / "decoder.pt"


def fit_decoder(args) -> None:
    torch.manual_seed(0)
    vae = VAE("planar", 0)
    steps = args.train_size // 100
    train(vae, vae.parameters(), load(args), args.decoder_epochs, seed=0, warmup_steps=2 * steps)
    torch.save(vae.decoder.state_dict(), decoder_path(args))


def run_one(args, config: str, seed: int) -> None:
    path = Path(args.out) / f"K{config.replace(':', '_hs')}-s{seed}.json"
    if path.exists():
        return
    torch.set_num_threads(1)
    K, head_scale = int(config.split(":")[0]), float(config.split(":")[1])
    torch.manual_seed(seed)  # the same q(z|x) at step 0 for every head_scale
    vae = VAE("planar", K, head_scale=head_scale)
    vae.decoder.load_state_dict(torch.load(decoder_path(args)))
    vae.decoder.requires_grad_(False)
    params = list(vae.encoder.parameters()) + list(vae.q.parameters())
    history = train(vae, params, load(args), args.epochs, seed)
    path.write_text(json.dumps({"K": K, "head_scale": head_scale, "seed": seed,
                                "history": history}, indent=1))


def report(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("K*.json"))]
    print(f"\nfrozen decoder (Gaussian VAE, {args.decoder_epochs} epochs); encoders trained "
          f"{args.epochs} epochs on {args.train_size} images; test -ELBO on {args.test_size} "
          "test images (8 draws each), nats, mean +- se over seeds\n")
    print("| K | head_scale | seeds | " + " | ".join(f"epoch {e}" for e in range(1, args.epochs + 1)) + " |")
    print("|---|---|---|" + "---|" * args.epochs)
    keys = sorted({(r["K"], r["head_scale"]) for r in rows}, key=lambda k: (k[1] != 1.0 and k[0] != 0, k[0], -k[1]))
    for K, hs in keys:
        rs = [r for r in rows if r["K"] == K and r["head_scale"] == hs]
        cells = []
        for e in range(args.epochs):
            v = torch.tensor([r["history"][e]["test_neg_elbo"] for r in rs if len(r["history"]) > e])
            se = v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
            cells.append(f"{v.mean().item():.2f} +- {se:.2f}")
        print(f"| {K} | {'-' if K == 0 else hs} | {len(rs)} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="K:head_scale pairs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=6, help="encoder epochs")
    p.add_argument("--decoder-epochs", type=int, default=8)
    p.add_argument("--train-size", type=int, default=50_000)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="benchmarks/results/vae_mnist_frozen")
    p.add_argument("--quick", action="store_true", help="5000 images, 2 epochs, 1 seed")
    p.add_argument("--report", action="store_true")
    p.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.epochs, args.decoder_epochs = 5000, 500, 2, 3
        args.seeds, args.configs = args.seeds[:1], ["0:1", "16:1", "16:0.1"]
        if args.out == p.get_default("out"):
            args.out = "benchmarks/results/vae_mnist_frozen_quick"
    args.data_root = args.data_root or str(default_data_root())
    if args.report:
        return report(args)
    if args.run:
        return run_one(args, args.run[0], int(args.run[1]))
    load_mnist(args.data_root)  # a missing root fails here, before any work
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not decoder_path(args).exists():
        fit_decoder(args)
    base = [sys.executable, __file__] + (argv if argv is not None else sys.argv[1:])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending = [(c, s) for s in args.seeds for c in args.configs]
    running = []
    while pending or running:
        while pending and len(running) < args.jobs:
            c, s = pending.pop(0)
            running.append(subprocess.Popen(base + ["--run", c, str(s)], env=env))
        time.sleep(1)
        for proc in [r for r in running if r.poll() is not None]:
            running.remove(proc)
            if proc.returncode:
                print(f"a run failed: {proc.args[-2:]}", flush=True)
    report(args)


if __name__ == "__main__":
    main()
