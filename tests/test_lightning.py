"""PyroLightningModule under DDP: 2 CPU processes (gloo on 127.0.0.1), float64.

The 2-rank runs are started with ``torch.multiprocessing.spawn`` and the environment a
launcher (torchrun, Lightning's own) sets, so Lightning's ``strategy="ddp"`` treats them
as externally created processes. Each rank writes what it saw to ``rank{r}.pt``.
"""

from __future__ import annotations

import copy
import importlib
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.nn import PyroModule

# first: the package imports Lightning past PyPI torchvision's CPU-torch import error
# (this module is also imported by the DDP workers, which do not run conftest.py)
import pyro_nfvi.lightning  # noqa: F401,I001
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import pyro_nfvi
from pyro_nfvi import AutoPlanarFlow
from pyro_nfvi.amortized import AmortizedFlow, AutoAmortizedFlow
from pyro_nfvi.lightning import PyroLightningModule

N, P, D, C = 24, 3, 2, 6  # rows, data dim, local latent dim, encoder features
B = 4  # rows per rank and step: 24 / (2 * 4) = 3 steps per epoch
WORLD = 2


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, D, generator=g, dtype=torch.float64)
    x = z @ torch.randn(D, P, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        N, P, generator=g, dtype=torch.float64
    )
    # the local base noise of every row, drawn once: a rank's rows carry their own noise,
    # so the ranks' draws concatenate to the single-process draw of the global batch
    eps = torch.randn(N, D, generator=g, dtype=torch.float64)
    return TensorDataset(torch.arange(N), x, eps)


class Model(PyroModule):
    """Global mu (R^D) and s > 0, local z_i in a plate of N rows subsampled by idx."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(D, P)

    def forward(self, idx, x, eps=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", N, subsample=idx):
            z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), s).to_event(1), obs=x)


class HandGuide(PyroModule):
    """AutoPlanarFlow for (mu, s); AmortizedFlow for z, pushed from the given noise."""

    def __init__(self, model):
        super().__init__()
        self.global_guide = AutoPlanarFlow(poutine.block(model, hide=["z"]), num_flows=3)
        self.encoder = nn.Sequential(nn.Linear(P, C), nn.Tanh())
        self.q = AmortizedFlow(D, C, num_flows=3)

    def forward(self, idx, x, eps):
        self.global_guide(idx, x, eps)
        with pyro.plate("data", N, subsample=idx):
            q = self.q(self.encoder(x))
            base, flow = q.base_dist, q.transforms[0]
            z0 = base.mean + base.stddev * eps  # the reparameterised draw of q.rsample
            z = flow(z0)
            log_q = base.log_prob(z0) - flow.log_abs_det_jacobian(z0, z)
            pyro.sample("z", dist.Delta(z, log_density=log_q, event_dim=1))


def build(guide_kind: str = "hand", seed_per_rank: bool = False, example_rows: int = B):
    torch.manual_seed(0)
    data = make_data()
    model = Model()
    if guide_kind == "hand":
        guide = HandGuide(model)
    else:
        guide = AutoAmortizedFlow(
            model,
            plate="data",
            local_sites=["z"],
            encoder=nn.Sequential(nn.Linear(P, C), nn.Tanh()),
            data_fn=lambda idx, x, eps=None: x,
            create_plates=lambda idx, x, eps=None: pyro.plate("data", N, subsample=idx),
            num_flows=3,
            global_guide=lambda m: AutoPlanarFlow(m, num_flows=3),
        )
    module = PyroLightningModule(
        model, guide, example_batch=data[:example_rows], lr=0.03, seed=1, seed_per_rank=seed_per_rank
    )
    return module, data


def _named(module, what):
    out = {}
    for name, p in module.named_parameters():
        t = p.grad if what == "grad" else p
        out[name] = None if t is None else t.detach().clone()
    return out


class Recorder(Callback):
    """Per step: the batch indices, the all-reduced gradients, the parameters after the
    optimiser step, and the global flow's cached inverse of one fixed tensor next to a
    cache-free recomputation."""

    def __init__(self, path=None):
        self.path = path
        self.steps = []
        self.z_fixed = torch.tensor([[0.3, -1.2, 0.7]], dtype=torch.float64)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"idx": batch[0].clone()})

    def on_after_backward(self, trainer, pl_module):
        self.steps[-1]["grads"] = _named(pl_module, "grad")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rec = self.steps[-1]
        rec["params"] = _named(pl_module, "param")
        rec["loss"] = outputs["loss"].detach().clone()
        flow = pl_module.guide.global_guide.transform
        fresh = copy.deepcopy(flow)  # no cache
        with torch.no_grad():
            x = flow.inv(self.z_fixed)  # same tensor object every step: a cache hit if stale
            rec["inv"] = (x.clone(), fresh.inv(self.z_fixed.clone()).clone())
            rec["ladj"] = (
                flow.log_abs_det_jacobian(x, self.z_fixed).clone(),
                fresh.log_abs_det_jacobian(x.clone(), self.z_fixed.clone()).clone(),
            )
        # the global flow runs through the hand-written (fused) kernel under DDP
        y = flow.call_and_ladj(self.z_fixed.clone().requires_grad_())[0]
        rec["flow_node"] = type(y.grad_fn).__name__
        # saved every step: a killed run keeps what it did before the kill
        torch.save({"steps": self.steps, "world": trainer.world_size}, self.path)


class KillAtEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os._exit(3)  # a hard kill: no teardown, no further checkpoint


def _worker(rank, port, out_dir, guide_kind, seed_per_rank, max_epochs, kill_epoch, ckpt_path):
    # what torchrun / Lightning's launcher set for each process
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    module, data = build(guide_kind, seed_per_rank)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    recorder = Recorder(path)
    callbacks = [
        recorder,
        ModelCheckpoint(dirpath=os.path.join(out_dir, "ckpt"), save_top_k=-1, every_n_epochs=1),
    ]
    if kill_epoch is not None:
        callbacks.append(KillAtEpoch(kill_epoch))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        precision="64-true",
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    loader = DataLoader(data, batch_size=B, shuffle=True)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    torch.save(
        {"steps": recorder.steps, "final": _named(module, "param"), "world": trainer.world_size}, path
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out_dir, guide_kind="hand", seed_per_rank=False, max_epochs=2, kill_epoch=None, ckpt_path=None):
    os.makedirs(out_dir, exist_ok=True)
    args = (_free_port(), str(out_dir), guide_kind, seed_per_rank, max_epochs, kill_epoch, ckpt_path)
    if kill_epoch is None:
        mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    else:
        with pytest.raises(mp.ProcessExitedException, match="exit code 3"):
            mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def _assert_same_params(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def _single_process_reference(steps):
    """The same training on one process: step k's batch is the concatenation of the
    ranks' step-k batches, with the same global noise seed (noise_seed(k, 0))."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    try:
        module, data = build("hand")  # the ranks' initial parameters
        # the autoguide re-traces its model, drawing random numbers, when the argument
        # shapes change: let it see the global batch's shape outside the steps' RNG stream
        module.initialize(data[: WORLD * B])
        optim = module.configure_optimizers()
        grads, params = [], []
        for k, per_rank in enumerate(steps):
            idx = torch.cat([s["idx"] for s in per_rank])
            torch.manual_seed(module.noise_seed(k, 0))
            optim.zero_grad()
            module(*data[idx]).backward()
            grads.append(_named(module, "grad"))
            optim.step()
            params.append(_named(module, "param"))
        return grads, params
    finally:
        torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """A 2-rank run killed (os._exit) at the start of epoch 1, after its epoch-0
    checkpoint, and a 2-rank run resumed from that checkpoint; and the uninterrupted
    single-process run of the same 6 steps."""
    root = tmp_path_factory.mktemp("ddp")
    killed = _spawn(root / "killed", kill_epoch=1)
    ckpts = sorted(os.listdir(root / "killed" / "ckpt"))
    assert ckpts == ["epoch=0-step=3.ckpt"], ckpts  # written before the kill, nothing after
    resumed = _spawn(root / "resumed", ckpt_path=str(root / "killed" / "ckpt" / ckpts[0]))
    # per step, the records of both ranks
    steps = list(zip(*[k["steps"] for k in killed])) + list(zip(*[r["steps"] for r in resumed]))
    ref_grads, ref_params = _single_process_reference(steps)
    return killed, resumed, steps, ref_grads, ref_params


def test_ddp_gradient_equals_single_process(ddp_runs):
    killed, resumed, steps, ref_grads, ref_params = ddp_runs
    assert [r["world"] for r in killed + resumed] == [2, 2, 2, 2]
    assert len(steps) == 6
    # the ranks saw disjoint shards that cover the data in each epoch
    for epoch in range(2):
        seen = torch.cat([s["idx"] for per_rank in steps[3 * epoch : 3 * epoch + 3] for s in per_rank])
        assert sorted(seen.tolist()) == list(range(N))
    for k, per_rank in enumerate(steps):
        for rank_rec in per_rank:
            assert rank_rec["grads"].keys() == ref_grads[k].keys()
            for name, g in ref_grads[k].items():
                assert g is not None and g.abs().max() > 0, name  # every parameter trains
                torch.testing.assert_close(rank_rec["grads"][name], g, rtol=0, atol=1e-10, msg=name)
        # identical on both ranks, bit for bit, and equal to the one-process run
        _assert_same_params(per_rank[0]["params"], per_rank[1]["params"])
        _assert_same_params(per_rank[0]["params"], ref_params[k], atol=1e-10)
    # the ranks' losses differ (different rows): the checks above are not vacuous
    assert not torch.equal(steps[0][0]["loss"], steps[0][1]["loss"])


def test_ddp_no_stale_flow_cache(ddp_runs):
    _, _, steps, _, _ = ddp_runs
    for rank in range(WORLD):
        recs = [per_rank[rank] for per_rank in steps]
        for rec in recs:
            torch.testing.assert_close(rec["inv"][0], rec["inv"][1], rtol=0, atol=1e-12)
            torch.testing.assert_close(rec["ladj"][0], rec["ladj"][1], rtol=0, atol=1e-12)
        # the parameters moved, so a stale cache would have shown
        assert not torch.allclose(recs[0]["inv"][1], recs[2]["inv"][1])
        assert all("Fused" in rec["flow_node"] for rec in recs), recs[0]["flow_node"]


def test_ddp_checkpoint_kill_resume(ddp_runs):
    killed, resumed, _, _, ref_params = ddp_runs
    assert [len(r["steps"]) for r in killed + resumed] == [3, 3, 3, 3]
    assert all("final" not in r for r in killed)  # the kill cut the run short
    # resumed (epoch 1 only) = uninterrupted run of 6 steps
    _assert_same_params(resumed[0]["final"], resumed[1]["final"])
    _assert_same_params(resumed[0]["final"], ref_params[-1], atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("guide_kind, seed_per_rank", [("hand", False), ("auto", True)])
def test_ddp_resume_equals_uninterrupted_ddp(tmp_path, guide_kind, seed_per_rank):
    """Also AutoAmortizedFlow (its own rsample noise, independent per rank): kill ->
    resume equals the uninterrupted 2-rank run bit for bit; ranks stay identical."""
    kw = dict(guide_kind=guide_kind, seed_per_rank=seed_per_rank)
    full = _spawn(tmp_path / "full", **kw)
    _spawn(tmp_path / "killed", kill_epoch=1, **kw)
    ckpt = tmp_path / "killed" / "ckpt" / "epoch=0-step=3.ckpt"
    resumed = _spawn(tmp_path / "resumed", ckpt_path=str(ckpt), **kw)
    for step in zip(*[r["steps"] for r in full]):
        _assert_same_params(step[0]["params"], step[1]["params"])
        assert all(g is not None for g in step[0]["grads"].values())
    for r_full, r_res in zip(full, resumed):
        for s_full, s_res in zip(r_full["steps"][3:], r_res["steps"]):
            assert torch.equal(s_full["idx"], s_res["idx"])
        _assert_same_params(r_full["final"], r_res["final"])


# ---------------------------------------------------------------- one process, no DDP


def test_initialize_reports_unused_parameter(float64):
    pyro.clear_param_store()
    data = make_data()

    class Unused(HandGuide):
        def __init__(self, model):
            super().__init__(model)
            self.extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    model = Model()
    guide = Unused(model)
    with pytest.raises(ValueError, match=r"extra.*find_unused_parameters"):
        PyroLightningModule(model, guide, example_batch=data[:4])


def test_initialize_reports_foreign_parameter(float64):
    pyro.clear_param_store()
    data = make_data()
    model = Model()

    class Foreign(nn.Module):  # a plain module that keeps a parameter in Pyro's store
        def forward(self, idx, x, eps):
            loc = pyro.param("foreign_loc", torch.zeros(D, dtype=torch.float64))
            pyro.sample("mu", dist.Delta(loc).to_event(1))
            pyro.sample("s", dist.Delta(torch.tensor(1.0, dtype=torch.float64)))
            with pyro.plate("data", N, subsample=idx):
                pyro.sample("z", dist.Normal(torch.zeros(len(idx), D, dtype=torch.float64), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"foreign_loc.*not parameters of the model or guide"):
        PyroLightningModule(model, Foreign(), example_batch=data[:4])


def test_bad_arguments():
    model = Model()
    with pytest.raises(TypeError, match="guide must be a torch.nn.Module"):
        PyroLightningModule(model, lambda *a: None)
    with pytest.raises(ValueError, match="lr must be"):
        PyroLightningModule(model, HandGuide(model), lr=0.0)
    with pytest.raises(ValueError, match="lr must be"):
        PyroLightningModule(model, HandGuide(model), lr=float("inf"))
    with pytest.raises(ValueError, match="seed"):
        PyroLightningModule(model, HandGuide(model), seed=-1)


def test_noise_seed_per_rank_and_step():
    model = Model()
    m = PyroLightningModule(model, HandGuide(model), seed=5)
    seeds = {m.noise_seed(step, rank) for step in range(3) for rank in range(2)}
    assert len(seeds) == 6
    shared = PyroLightningModule(model, HandGuide(model), seed=5, seed_per_rank=False)
    assert shared.noise_seed(2, 0) == shared.noise_seed(2, 1) != shared.noise_seed(3, 0)


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "pyro_nfvi.lightning")
    with pytest.raises(ImportError, match=r'pip install "pyro_nfvi\[lightning\]"'):
        importlib.import_module("pyro_nfvi.lightning")


def test_core_package_does_not_import_lightning():
    code = "import sys, pyro_nfvi, pyro_nfvi.amortized; print(sorted(m for m in sys.modules if 'lightning' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_docstring_example_trains_on_one_process():
    import doctest

    import pyro_nfvi.lightning

    pyro.clear_param_store()
    result = doctest.testmod(pyro_nfvi.lightning, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("guide_kind", ["hand", "auto"])
def test_module_local_params_mode(float64, guide_kind):
    """Pyro's Lightning example sets module_local_params=True: the checks pass, the
    parameters train, and nothing lands in the global param store."""
    pyro.clear_param_store()
    with pyro.settings.context(module_local_params=True):
        module, data = build(guide_kind)
        optim = module.configure_optimizers()
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        for k in range(2):
            optim.zero_grad()
            module(*data[4 * k : 4 * k + 4]).backward()
            optim.step()
        assert all(not torch.equal(before[n], p) for n, p in module.named_parameters())
    assert len(pyro.get_param_store()) == 0


@pytest.mark.slow
def test_ddp_digits_benchmark_smoke():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "benchmarks", "ddp_digits.py"), "--epochs", "1",
           "--eval-samples", "10", "--num-flows", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout.split(" N  steps")[1].splitlines()[1:3]
    assert [int(line.split()[0]) for line in table] == [1, 2]
    assert [int(line.split()[1]) for line in table] == [30, 15]  # 1500 rows, 50 per rank and step


# ------------------------------------------------- two nodes on one machine (torchrun)
# The README's "Launching on several nodes" command, run as written with 2 nodes of 1
# process each on 127.0.0.1: two torchrun agents (node ranks 0 and 1) started side by side.
_TORCHRUN_SCRIPT = '''
import os, sys
sys.path[:0] = [{tests_dir!r}, {package_root!r}]  # the pyro_nfvi the test process imports
import torch
import pyro_nfvi.lightning  # imports Lightning the way the package does
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
import test_lightning as T

out_dir, max_epochs, ckpt = sys.argv[1], int(sys.argv[2]), (sys.argv[3] or None)
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
module, data = T.build("hand")
rank = int(os.environ["RANK"])
recorder = T.Recorder(os.path.join(out_dir, f"rank{{rank}}.pt"))
trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp",
                     precision="64-true", max_epochs=max_epochs, logger=False,
                     callbacks=[recorder, ModelCheckpoint(dirpath=os.path.join(out_dir, "ckpt"),
                                                          save_top_k=-1, every_n_epochs=1)],
                     enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=out_dir)
trainer.fit(module, DataLoader(data, batch_size=T.B, shuffle=True), ckpt_path=ckpt)
torch.save({{"steps": recorder.steps, "final": T._named(module, "param"),
            "world": trainer.world_size, "node_rank": trainer.node_rank,
            "global_rank": trainer.global_rank}}, os.path.join(out_dir, f"rank{{rank}}.pt"))
'''


def _torchrun_two_nodes(script, out_dir, max_epochs, ckpt_path=None, timeout=300):
    """Start ``torchrun --nnodes 2 --nproc_per_node 1 --node_rank r`` for r = 0, 1 (the
    README's command with 127.0.0.1 as ``<node0>``) and wait for both."""
    os.makedirs(out_dir, exist_ok=True)
    port = _free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = []
    for node_rank in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(script), str(out_dir), str(max_epochs), ckpt_path or ""]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for node_rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node_rank} exited with {p.returncode}:\n{out[-3000:]}"
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.slow
def test_torchrun_two_nodes_agree_and_resume(tmp_path):
    """README's multi-node launch as two nodes on one machine: both nodes finish, ranks
    hold the same parameters after every step, and a run resumed from the first run's
    epoch-0 checkpoint ends where the one-process run of all 6 steps ends."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "train.py"
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(pyro_nfvi.__file__)))
    script.write_text(_TORCHRUN_SCRIPT.format(tests_dir=tests_dir, package_root=package_root))
    first = _torchrun_two_nodes(script, tmp_path / "first", max_epochs=1)
    assert [(r["world"], r["node_rank"], r["global_rank"]) for r in first] == [(2, 0, 0), (2, 1, 1)]
    ckpts = sorted(os.listdir(tmp_path / "first" / "ckpt"))
    assert ckpts == ["epoch=0-step=3.ckpt"], ckpts
    resumed = _torchrun_two_nodes(script, tmp_path / "resumed", max_epochs=2,
                                  ckpt_path=str(tmp_path / "first" / "ckpt" / ckpts[0]))
    assert [(r["world"], r["node_rank"]) for r in resumed] == [(2, 0), (2, 1)]
    steps = list(zip(*[r["steps"] for r in first])) + list(zip(*[r["steps"] for r in resumed]))
    assert [len(r["steps"]) for r in first + resumed] == [3, 3, 3, 3]
    for per_rank in steps:  # the nodes saw different rows but hold the same parameters
        assert not torch.equal(per_rank[0]["idx"], per_rank[1]["idx"])
        _assert_same_params(per_rank[0]["params"], per_rank[1]["params"])
    _assert_same_params(first[0]["final"], first[1]["final"])
    _assert_same_params(resumed[0]["final"], resumed[1]["final"])
    # the resumed run continues from the checkpoint, not from scratch: it ends where the
    # uninterrupted one-process run of the same 6 global batches ends
    _, ref_params = _single_process_reference(steps)
    _assert_same_params(first[0]["final"], ref_params[2], atol=1e-10)
    _assert_same_params(resumed[0]["final"], ref_params[-1], atol=1e-10)
