"""VAE with flow posteriors on binarised MNIST (Rezende & Mohamed 2015, §6.2, Table 2).

Every model is the same VAE (40 latent dims; encoder 784-400-head, decoder 40-400-784,
ReLU, Bernoulli likelihood) trained with the same budget, seed, optimiser (Adam, lr 1e-3,
batch 100), KL warm-up (beta_t = min(1, 0.01 + t / W), R&M) and early-stopping rule
(the state with the best validation -ELBO, evaluated every epoch on 10,000 held-out
training images); only the encoder's posterior q(z|x) differs: a diagonal Gaussian
(K = 0), K planar, radial or Sylvester layers from :class:`pyro_nfvi.amortized.AmortizedFlow`,
or Pyro's conditional IAF as the outside anchor. Scores on the 10,000 test images
(binarised once, seed 0): -ELBO and -ln p(x) by importance sampling with q(z|x) as the
proposal (S samples per image, the Monte-Carlo se of the mean printed), their gap, and
seconds per epoch; mean +- se over seeds. The flow encoders use ``AmortizedFlow``'s
default ``head_scale=0.1`` (the flow head steps a tenth as fast as the Gaussian's
location; why: ``benchmarks/vae_mnist_frozen.py``); the results of the same sweep before
that option (flow head at full step) are kept in ``results/vae_mnist/head_scale_1/``.

    python benchmarks/vae_mnist.py --quick                      # < 5 min on 2 cores
    python benchmarks/vae_mnist.py --jobs 2                     # the sweep (see --help)
    python benchmarks/vae_mnist.py --report                     # the table from saved runs

Runs checkpoint every epoch to ``--out``; rerunning the same command resumes a killed run.
Data: ``--data-root`` (default: ``pyro_nfvi.datasets.default_data_root()``) must hold
``MNIST/raw/`` as torchvision writes it; nothing is downloaded. Training images are
re-binarised every epoch (dynamic binarisation).
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
from typing import Dict, List

import torch
import torch.nn as nn

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pyro.poutine as poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_nfvi.amortized import AmortizedFlow
from pyro_nfvi.datasets import binarize, default_data_root, load_mnist

LATENT, HIDDEN, PIXELS = 40, 400, 784
#: name -> (family, K); "iaf" is Pyro's ConditionalAffineAutoregressive (K layers).
MODELS: Dict[str, tuple] = {
    "gaussian": ("planar", 0),
    "planar-4": ("planar", 4),
    "planar-16": ("planar", 16),
    "planar-64": ("planar", 64),
    "radial-16": ("radial", 16),
    "sylvester-4": ("sylvester", 4),
    "iaf-2": ("iaf", 2),
}
#: the papers' numbers (-ln p(x), nats) for the same families, for the table's last column
PAPER = {
    "gaussian": "R&M DLGM 89.9; vdB VAE 86.55",
    "planar-4": "",
    "planar-16": "",
    "planar-64": "R&M K=80: 85.1 (K=10 87.5)",
    "radial-16": "R&M NICE-R K=80: 87.2",
    "sylvester-4": "vdB O-SNF (K=16, M=32): 83.32",
    "iaf-2": "vdB IAF: 84.20",
}


class VAE(nn.Module):
    def __init__(self, family: str, num_flows: int, **posterior_options):
        """``posterior_options`` (e.g. ``head_scale``) go to ``AmortizedFlow``: its defaults
        unless given."""
        super().__init__()
        self.decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, PIXELS))
        self.encoder = nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.ReLU())
        if family == "iaf":
            self.q = AmortizedFlow(LATENT, HIDDEN, num_flows=0, **posterior_options)
            self.iaf = nn.ModuleList(
                T.conditional_affine_autoregressive(LATENT, HIDDEN, hidden_dims=[HIDDEN])
                for _ in range(num_flows)
            )
        else:
            self.q = AmortizedFlow(LATENT, HIDDEN, num_flows=num_flows, flow=family, **posterior_options)
            self.iaf = nn.ModuleList()

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        h = self.encoder(x)
        q = self.q(h)
        if not len(self.iaf):
            return q
        return dist.TransformedDistribution(q, [t.condition(h) for t in self.iaf])

    def model(self, x: torch.Tensor, beta: float = 1.0) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, beta: float = 1.0) -> None:
        pyro.module("vae_q", self)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):
                pyro.sample("z", self.posterior(x))

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """log p(x, z_s) - log q(z_s | x), z_s ~ q(.|x): shape (num_samples, N)."""
        q = self.posterior(x)
        z = q.sample((num_samples,))
        prior = dist.Normal(torch.zeros_like(z), 1.0).to_event(1).log_prob(z)
        lik = dist.Bernoulli(logits=self.decoder(z)).to_event(1).log_prob(x)
        return prior + lik - q.log_prob(z)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, num_samples: int, chunk: int = 25) -> dict:
        """-ELBO, -ln p(x) (IS), their Monte-Carlo se (of the mean over images), nats."""
        elbo, nll, var_nll = [], [], []
        for xb in x.split(chunk):
            lw = self.log_weights(xb, num_samples)
            elbo.append(lw.mean(0))
            log_p = lw.logsumexp(0) - math.log(num_samples)
            nll.append(-log_p)
            # delta method: var(log p_hat) ~ var(w) / (S mean(w)^2)
            w = (lw - lw.max(0).values).exp()
            var_nll.append(w.var(0) / (num_samples * w.mean(0) ** 2))
        n = len(x)
        return {
            "neg_elbo": -torch.cat(elbo).mean().item(),
            "neg_elbo_mc_se": torch.cat(elbo).std().item() / n**0.5 / num_samples**0.5,
            "nll": torch.cat(nll).mean().item(),
            "nll_mc_se": torch.cat(var_nll).sum().sqrt().item() / n,
        }


def _paths(out: Path, name: str, seed: int):
    return out / f"{name}-s{seed}.ckpt", out / f"{name}-s{seed}.json"


def run_one(name: str, seed: int, cfg: dict) -> dict:
    """Train (resuming from the checkpoint if there is one) and evaluate one model."""
    out = Path(cfg["out"])
    ckpt_path, res_path = _paths(out, name, seed)
    if res_path.exists():
        return json.loads(res_path.read_text())
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    x_train, x_test = load_mnist(cfg["data_root"])
    n_train = cfg["train_size"]
    x_val = binarize(x_train[-cfg["val_size"]:], seed=1).to(device)
    x_train = x_train[:n_train].to(device)
    x_test = binarize(x_test[: cfg["test_size"]], seed=0).to(device)

    family, K = MODELS[name]
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(family, K).to(device)
    optim = Adam({"lr": cfg["lr"]})
    svi = SVI(vae.model, vae.guide, optim, Trace_ELBO())
    steps_per_epoch = n_train // cfg["batch_size"]
    warmup = max(1, int(cfg["warmup"] * steps_per_epoch * cfg["epochs"]))
    state = {"epoch": 0, "step": 0, "history": [], "best": math.inf, "best_state": None,
             "train_seconds": 0.0}
    if ckpt_path.exists():  # resume: model, optimiser, loop counters and random streams
        saved = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(saved["vae"])
        optim.set_state(saved["optim"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
    gen = torch.Generator().manual_seed(seed)
    gen_state = None if not ckpt_path.exists() else saved["gen"]
    if gen_state is not None:
        gen.set_state(gen_state)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg["epochs"], initial=state["epoch"], desc=f"{name} s{seed}",
               disable=not cfg["progress"], leave=False)
    stale = 0 if not state["history"] else state.get("stale", 0)
    while state["epoch"] < cfg["epochs"] and stale < cfg["patience"]:
        t0 = time.time()
        perm = torch.randperm(n_train, generator=gen)
        xb_all = binarize(x_train[perm.to(device)], generator=None)  # dynamic binarisation
        loss = 0.0
        for i in range(steps_per_epoch):
            beta = min(1.0, 0.01 + state["step"] / warmup)
            xb = xb_all[i * cfg["batch_size"]:(i + 1) * cfg["batch_size"]]
            loss += svi.step(xb, beta) / len(xb)
            state["step"] += 1
        state["train_seconds"] += time.time() - t0
        with torch.no_grad():
            val = sum(-vae.log_weights(xv, 1).sum().item() for xv in x_val.split(500)) / len(x_val)
        state["epoch"] += 1
        state["history"].append({"epoch": state["epoch"], "train_loss": loss / steps_per_epoch,
                                 "val_neg_elbo": val, "beta": beta})
        if val < state["best"] and beta >= 1.0:
            state["best"], stale = val, 0
            state["best_state"] = {k: v.detach().cpu().clone() for k, v in vae.state_dict().items()}
        elif beta >= 1.0:
            stale += 1
        state["stale"] = stale
        torch.save({"vae": vae.state_dict(), "optim": optim.get_state(), "state": state,
                    "rng": torch.get_rng_state(), "gen": gen.get_state()}, ckpt_path)
        bar.update(1)
        bar.set_postfix(loss=f"{loss / steps_per_epoch:.2f}", val=f"{val:.2f}")
    bar.close()
    if state["best_state"] is not None:
        vae.load_state_dict(state["best_state"])
    torch.manual_seed(10_000 + seed)
    t0 = time.time()
    vae.eval()
    res = vae.evaluate(x_test, cfg["samples"])
    res.update(name=name, family=family, num_flows=K, seed=seed, epochs=state["epoch"],
               best_val_neg_elbo=state["best"], sec_per_epoch=state["train_seconds"] / max(1, state["epoch"]),
               eval_seconds=time.time() - t0, history=state["history"],
               config={k: v for k, v in cfg.items() if k not in ("progress", "out", "data_root")})
    res_path.write_text(json.dumps(res, indent=1))
    return res


def report(out: Path, names: List[str]) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not rows:
        print(f"no results in {out}")
        return
    cfg = rows[0]["config"]
    print(f"\nbinarised MNIST, {cfg['train_size']} training images, {cfg['test_size']} test images, "
          f"{cfg['samples']} IS samples per image, max {cfg['epochs']} epochs, batch "
          f"{cfg['batch_size']}, Adam lr {cfg['lr']}, warm-up over {cfg['warmup']:.0%} of the steps")
    print("nats per image, mean +- se over seeds (MC se: importance-sampling error of the mean)\n")
    print(f"| model | seeds | -ln p(x) | MC se | -ELBO | gap | s/epoch | epochs | papers' -ln p(x) |")
    print("|---|---|---|---|---|---|---|---|---|")

    def ms(v):
        t = torch.tensor(v, dtype=torch.float64)
        se = t.std().item() / len(v) ** 0.5 if len(v) > 1 else float("nan")
        return f"{t.mean().item():.2f} +- {se:.2f}" if len(v) > 1 else f"{t.mean().item():.2f}"

    for name in [n for n in MODELS if n in names or not names]:
        rs = [r for r in rows if r["name"] == name]
        if not rs:
            continue
        print(f"| {name} | {len(rs)} | {ms([r['nll'] for r in rs])} | "
              f"{max(r['nll_mc_se'] for r in rs):.3f} | {ms([r['neg_elbo'] for r in rs])} | "
              f"{ms([r['neg_elbo'] - r['nll'] for r in rs])} | "
              f"{sum(r['sec_per_epoch'] for r in rs) / len(rs):.1f} | "
              f"{sum(r['epochs'] for r in rs) / len(rs):.0f} | {PAPER.get(name, '')} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=20, help="max epochs per model")
    p.add_argument("--patience", type=int, default=5, help="stop after this many epochs without a better validation -ELBO")
    p.add_argument("--warmup", type=float, default=0.3, help="KL warm-up length, fraction of all steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--train-size", type=int, default=50_000)
    p.add_argument("--val-size", type=int, default=10_000)
    p.add_argument("--test-size", type=int, default=10_000)
    p.add_argument("--samples", type=int, default=1000, help="importance samples per test image")
    p.add_argument("--jobs", type=int, default=1, help="models trained in parallel processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="benchmarks/results/vae_mnist")
    p.add_argument("--quick", action="store_true", help="a small slice, few epochs: < 5 min")
    p.add_argument("--report", action="store_true", help="print the table from saved runs only")
    p.add_argument("--run", nargs=2, metavar=("NAME", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models = ["gaussian", "planar-4", "planar-16"] if args.models == list(MODELS) else args.models
        args.seeds, args.epochs, args.train_size, args.val_size = args.seeds[:1], 3, 3000, 500
        args.test_size, args.samples, args.patience = 300, 100, 3
        if args.out == p.get_default("out"):
            args.out = "benchmarks/results/vae_mnist_quick"
    out = Path(args.out)
    if args.report:
        report(out, args.models)
        return
    root = Path(args.data_root) if args.data_root else default_data_root()
    load_mnist(root) if args.run is None else None  # a missing root fails here, before any work
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(out=str(out), data_root=str(root), threads=args.threads, device=args.device,
               lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
               warmup=args.warmup, train_size=args.train_size, val_size=args.val_size,
               test_size=args.test_size, samples=args.samples, progress=args.jobs == 1)
    if args.run:
        run_one(args.run[0], int(args.run[1]), cfg)
        return
    jobs = [(m, s) for s in args.seeds for m in args.models]
    if args.jobs == 1:
        for m, s in jobs:
            r = run_one(m, s, cfg)
            print(f"{m} seed {s}: -ln p(x) {r['nll']:.2f}  -ELBO {r['neg_elbo']:.2f}", flush=True)
    else:  # one process per run, at most `jobs` at a time
        from tqdm.auto import tqdm

        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        base = [sys.executable, __file__] + [a for a in (argv if argv is not None else sys.argv[1:])]
        running, pending = [], list(jobs)
        bar = tqdm(total=len(jobs), desc="runs")
        while pending or running:
            while pending and len(running) < args.jobs:
                m, s = pending.pop(0)
                log = open(out / f"{m}-s{s}.log", "a")
                running.append((subprocess.Popen(base + ["--run", m, str(s)], env=env, stdout=log,
                                                 stderr=subprocess.STDOUT), m, s))
            time.sleep(2)
            for proc in [r for r in running if r[0].poll() is not None]:
                running.remove(proc)
                bar.update(1)
                if proc[0].returncode:
                    print(f"{proc[1]} seed {proc[2]} failed (see {out}/{proc[1]}-s{proc[2]}.log)", flush=True)
        bar.close()
    report(out, args.models)


if __name__ == "__main__":
    main()
