"""VAE + planar flows on binarised 8x8 digits (the trend of Rezende & Mohamed 2015, Table 2).

Trains the same VAE (same steps, learning rate, seed, architecture) with an amortized
posterior of K planar flows for each K, then reports on a held-out split the test -ELBO
and an importance-sampled -ln p(x) (nats per image, lower is better).

    python benchmarks/vae_digits.py        # K = 0 2 8 16 32, 10000 steps, latent dim 2 (~4 min)
    python benchmarks/vae_digits.py --ks 0 16 --steps 3000 --latent-dim 4 --seed 1

No data is downloaded: scikit-learn's bundled ``load_digits`` (1797 images), binarised
with pixel > 7.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn as nn

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam

from pyro_nfvi.amortized import AmortizedFlow


def load_data(num_test: int = 297, seed: int = 0, dtype=torch.float32):
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data > 7, dtype=dtype)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = x[perm]
    return x[num_test:], x[:num_test]


class VAE(nn.Module):
    """Decoder p(x|z) (Bernoulli, MLP) and encoder features; posterior head AmortizedFlow."""

    def __init__(self, latent_dim: int, hidden: int, num_flows: int, data_dim: int = 64):
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.Tanh(), nn.Linear(hidden, data_dim)
        )
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.Tanh())
        self.q = AmortizedFlow(latent_dim, hidden, num_flows=num_flows)

    def model(self, x, batch_size=None, beta=1.0):
        pyro.module("decoder", self.decoder)
        D = self.latent_dim
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            with poutine.scale(scale=beta):
                z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x[idx])

    def guide(self, x, batch_size=None, beta=1.0):
        pyro.module("encoder", self.encoder)
        pyro.module("q", self.q)
        with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
            with poutine.scale(scale=beta):
                pyro.sample("z", self.q(self.encoder(x[idx])))

    @torch.no_grad()
    def log_weights(self, x, num_samples: int):
        """log p(x, z_s) - log q(z_s | x) for z_s ~ q(.|x): shape (num_samples, N)."""
        q = self.q(self.encoder(x))
        z = q.sample((num_samples,))
        log_q = q.log_prob(z)
        prior = dist.Normal(torch.zeros_like(z), 1.0).to_event(1).log_prob(z)
        lik = dist.Bernoulli(logits=self.decoder(z)).to_event(1).log_prob(x)
        return prior + lik - log_q

    @torch.no_grad()
    def evaluate(self, x, num_samples: int = 500, chunk: int = 100):
        """(test -ELBO, IS estimate of -ln p(x)) in nats per image, averaged over x."""
        elbo, nll = [], []
        for xb in x.split(chunk):
            lw = self.log_weights(xb, num_samples)
            elbo.append(lw.mean(0))
            nll.append(-(lw.logsumexp(0) - math.log(num_samples)))
        return -torch.cat(elbo).mean().item(), torch.cat(nll).mean().item()


def train(num_flows, x_train, *, latent_dim=4, hidden=64, steps=3000, batch_size=100,
          lr=3e-3, warmup=0, seed=0, log_every=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(latent_dim, hidden, num_flows)
    svi = SVI(vae.model, vae.guide, ClippedAdam({"lr": lr, "clip_norm": 10.0}), Trace_ELBO())
    losses = []
    for step in range(steps):
        beta = min(1.0, 0.01 + step / warmup) if warmup else 1.0
        losses.append(svi.step(x_train, batch_size, beta) / len(x_train))
        if log_every and (step + 1) % log_every == 0:
            print(f"  K={num_flows} step {step + 1}: loss/img {np.mean(losses[-log_every:]):.3f}", flush=True)
    return vae, losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[0, 2, 8, 16, 32])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--latent-dim", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x_train, x_test = load_data()
    print(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}")
    rows = []
    for K in args.ks:
        t0 = time.time()
        vae, losses = train(K, x_train, latent_dim=args.latent_dim, hidden=args.hidden,
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            warmup=args.warmup, seed=args.seed, log_every=args.steps // 5)
        torch.manual_seed(1)
        neg_elbo, nll = vae.evaluate(x_test, args.samples)
        rows.append((K, neg_elbo, nll, time.time() - t0))
        print(f"K={K:3d}  test -ELBO {neg_elbo:.3f}  -ln p(x) {nll:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    print("\n  K   -ELBO   -ln p(x)")
    for K, e, n, _ in rows:
        print(f"{K:3d}  {e:7.3f}  {n:7.3f}")


if __name__ == "__main__":
    main()
