"""The digits VAE with an amortized planar-flow posterior, trained with PyTorch Lightning
on 1 and on 2 CPU processes (DistributedDataParallel, gloo): throughput, held-out -ELBO,
wall time.

    python benchmarks/ddp_digits.py                       # N = 1 and 2 processes
    python benchmarks/ddp_digits.py --devices 1 2 --epochs 30 --num-flows 16

Model: z ~ N(0, I_L), x | z ~ Bernoulli(decoder(z)) on scikit-learn's bundled 8x8 digits
(binarised with pixel > 7; 1500 train / 297 held-out images, no download). Guide:
:class:`pyro_nfvi.amortized.AutoAmortizedFlow` (encoder MLP -> Gaussian + K planar layers),
trained by :class:`pyro_nfvi.lightning.PyroLightningModule` with
``Trainer(accelerator="cpu", devices=N, strategy="ddp")``. Each rank gets ``--batch-size``
rows per step from Lightning's DistributedSampler and scales its likelihood by
1500 / batch (a full-data estimate); DDP averages the ranks' gradients, so N processes
take steps on a global batch N times larger, and an epoch has N times fewer steps (same
learning rate for every N). Each configuration runs in its own process tree (Lightning's
"ddp" launcher re-executes this script for ranks >= 1); rank 0 reports:

* examples/s: training examples processed per second of training (all ranks together);
* held-out -ELBO: nats per image on the 297 held-out images, 200 posterior draws each;
* wall time: the whole process tree, start-up and evaluation included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time

import torch
import torch.nn as nn

NUM_TEST = 297


def load_data(seed: int = 0):
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data > 7, dtype=torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = x[perm]
    return x[NUM_TEST:], x[:NUM_TEST]


def worker(args) -> None:
    torch.set_num_threads(1)
    # pyro_nfvi.lightning first: it imports Lightning past the error that PyPI's (CUDA)
    # torchvision raises next to a CPU torch, which Lightning's own import would hit
    from pyro_nfvi.lightning import PyroLightningModule  # noqa: I001
    import lightning.pytorch as pl
    import pyro
    import pyro.distributions as dist
    from pyro.nn import PyroModule
    from torch.utils.data import DataLoader, TensorDataset

    from pyro_nfvi.amortized import AutoAmortizedFlow

    t_start = time.perf_counter()
    pl.seed_everything(args.seed, verbose=False)
    x_train, x_test = load_data()
    num_data, data_dim, L = len(x_train), x_train.shape[1], args.latent_dim

    class VAE(PyroModule):
        def __init__(self):
            super().__init__()
            self.decoder = nn.Sequential(
                nn.Linear(L, args.hidden), nn.Tanh(), nn.Linear(args.hidden, data_dim)
            )

        def forward(self, idx, x):
            with pyro.plate("data", num_data, subsample=idx):  # scale num_data / len(idx)
                z = pyro.sample("z", dist.Normal(x.new_zeros(L), 1.0).to_event(1))
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    model = VAE()
    guide = AutoAmortizedFlow(
        model,
        plate="data",
        local_sites=["z"],
        encoder=nn.Sequential(nn.Linear(data_dim, args.hidden), nn.Tanh()),
        data_fn=lambda idx, x: x,
        create_plates=lambda idx, x: pyro.plate("data", num_data, subsample=idx),
        num_flows=args.num_flows,
    )
    data = TensorDataset(torch.arange(num_data), x_train)
    module = PyroLightningModule(
        model, guide, example_batch=data[: args.batch_size], lr=args.lr, seed=args.seed
    )

    class Timer(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.t0

    timer = Timer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",
        max_epochs=args.epochs,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    trainer.fit(module, loader)
    if trainer.global_rank != 0:
        return

    # held-out -ELBO per image: E_q[log p(z) + log p(x | z) - log q(z | x)]
    torch.manual_seed(12345)
    with torch.no_grad():
        q = guide.posterior(guide.encoder(x_test))
        z = q.rsample((args.eval_samples,))
        log_q = q.log_prob(z)
        log_prior = dist.Normal(0.0, 1.0).expand([L]).to_event(1).log_prob(z)
        log_lik = dist.Bernoulli(logits=model.decoder(z)).to_event(1).log_prob(x_test)
        neg_elbo = -(log_prior + log_lik - log_q).mean().item()
    result = {
        "devices": args.devices,
        "steps": trainer.global_step,
        "train_s": timer.seconds,
        "examples_per_s": args.epochs * num_data / timer.seconds,
        "neg_elbo": neg_elbo,
        "process_s": time.perf_counter() - t_start,
    }
    print("RESULT " + json.dumps(result), flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2], help="process counts to run")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=50, help="rows per rank and step")
    p.add_argument("--num-flows", type=int, default=8)
    p.add_argument("--latent-dim", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.devices = args.devices[0]
        worker(args)
        return

    rows = []
    for n in args.devices:
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            OPENBLAS_NUM_THREADS="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            GLOO_SOCKET_IFNAME="lo",
        )
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--devices", str(n)]
        for name in ("epochs", "batch_size", "num_flows", "latent_dim", "hidden", "lr", "eval_samples", "seed"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
            raise SystemExit(f"the run with {n} process(es) failed (exit code {out.returncode})")
        r = json.loads(lines[-1][len("RESULT "):])
        r["wall_s"] = wall
        rows.append(r)
        print(
            f"N={n}: {r['steps']} steps, {r['examples_per_s']:.0f} examples/s, "
            f"held-out -ELBO {r['neg_elbo']:.3f}, wall {wall:.1f} s",
            flush=True,
        )

    base = rows[0]["examples_per_s"]
    print(
        f"\nDigits VAE, AutoAmortizedFlow (K={args.num_flows} planar, latent {args.latent_dim}), "
        f"{args.epochs} epochs, {args.batch_size} rows per rank and step"
    )
    print(" N  steps  examples/s  speed-up  held-out -ELBO  train s  wall s")
    for r in rows:
        print(
            f"{r['devices']:2d}  {r['steps']:5d}  {r['examples_per_s']:10.0f}  "
            f"{r['examples_per_s'] / base:8.2f}  {r['neg_elbo']:14.3f}  {r['train_s']:7.1f}  {r['wall_s']:6.1f}"
        )
    if not all(math.isfinite(r["neg_elbo"]) for r in rows):
        raise SystemExit("non-finite held-out -ELBO")


if __name__ == "__main__":
    main()
