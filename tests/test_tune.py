"""Tests of the Optuna search (pyro_nfvi.tune, issue 23): failures, pruning, reproducibility,
independent validation draws, argument checks, the optional import and the CLI."""

import math
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_nfvi.diagnostics import evaluate_guide
from pyro_nfvi.tune import final_seed, train_seed, tune, tune_density, validation_seed

optuna = pytest.importorskip("optuna")  # the [tune] extra; the test extra installs it

DATA = torch.tensor([[2.9, 3.2], [3.4, 2.7], [3.1, 3.0], [2.6, 3.3], [3.0, 2.8],
                     [3.3, 3.1], [2.8, 2.9], [3.2, 3.4]])


def model(x):
    # posterior N(~3, 1/9) far from the prior's median 0: a guide that does not move is bad
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=x)


FAST = dict(families=("planar",), num_flows=(2, 3), num_steps=30, num_particles=2,
            validation_particles=64, report_every=10)


def _enqueued_study(lrs, direction="maximize", family="planar"):
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s", direction=direction)
    for lr in lrs:
        study.enqueue_trial({"family": family, "num_flows": 2, "lr": lr})
    return dict(storage=storage, study_name="s")


def test_nan_trial_is_failed_and_search_goes_on():
    # trial 0: lr = 1e4 overflows the guide at once; the others are ordinary
    kw = dict(FAST, lr=(1e-3, 1e4), num_trials=3)
    result = tune(model, DATA, **kw, **_enqueued_study([1e4, 3e-2, 3e-2]))
    states = [t.state.name for t in result.study.trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]
    assert "FloatingPointError" in result.study.trials[0].user_attrs["fail_reason"]
    assert result.num_failed == 1 and result.num_complete == 2
    assert result.best_params["lr"] == pytest.approx(3e-2) and math.isfinite(result.score)


def test_all_trials_failing_raises_with_reason():
    kw = dict(FAST, lr=1e4, num_trials=2)
    with pytest.raises(RuntimeError, match="no trial of the search completed.*FloatingPointError"):
        tune(model, DATA, **kw)


def test_model_bug_stops_the_search():
    def broken(x):
        pyro.sample("mu", dist.Normal(0.0, -1.0))  # invalid scale: fails at step 0

    with pytest.raises(ValueError, match="scale"):
        tune(broken, DATA, **dict(FAST, num_trials=3))


def test_best_guide_reproduces_its_score_from_the_seed():
    result = tune(model, DATA, **dict(FAST, num_trials=3, lr=(1e-2, 5e-2)), seed=3)
    best = result.study.best_trial
    assert best.user_attrs["seed"] == train_seed(3, best.number)
    # the returned guide is the best trial's: its IWAE on the scoring draws is the score
    with pyro.get_param_store().scope(), torch.random.fork_rng():
        torch.manual_seed(final_seed(3))
        iwae = evaluate_guide(model, result.guide, DATA, num_samples=64)["iwae"]
    assert iwae == pytest.approx(result.score, abs=1e-6)
    # and retraining from the trial's seed gives the same guide and score
    guide2, score2 = result.refit()
    assert guide2 is not result.guide
    assert score2 == pytest.approx(result.score, abs=1e-6)
    # another search seed gives other trials
    other = tune(model, DATA, **dict(FAST, num_trials=1, lr=(1e-2, 5e-2)), seed=4)
    assert other.study.trials[0].user_attrs["seed"] != result.study.trials[0].user_attrs["seed"]


def test_validation_streams_are_separate_from_training():
    # the seeds come from different spawn keys of one SeedSequence
    trains = {train_seed(0, n) for n in range(50)}
    vals = {validation_seed(0, k) for k in range(50)} | {final_seed(0)}
    assert len(trains) == 50 and len(vals) == 51 and not trains & vals
    assert train_seed(0, 0) != train_seed(1, 0)


def test_validation_draws_do_not_touch_training_draws():
    seen = {"train": [], "val": []}

    def recording_model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        seen["train" if torch.is_grad_enabled() else "val"].append(mu.detach().reshape(-1, 2))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=x)

    common = dict(FAST, num_trials=1, lr=3e-2, pruner=optuna.pruners.NopPruner())
    # with validation every 5 steps ...
    a = tune(recording_model, DATA, **dict(common, report_every=5))
    train_a = torch.cat(seen["train"][1:])  # [0]: the guide's setup trace
    val_a = torch.cat(seen["val"])
    assert len(a.study.trials[0].intermediate_values) == 5  # steps 5..25
    # ... and without any validation during training: the same training draws
    seen["train"].clear(), seen["val"].clear()
    b = tune(recording_model, DATA, **dict(common, report_every=30))
    assert not b.study.trials[0].intermediate_values
    assert torch.equal(torch.cat(seen["train"][1:]), train_a)
    assert b.score == pytest.approx(a.score, abs=1e-9)
    # and no validation draw is one of the training draws
    assert not (val_a[:, None, :] == train_a[None, :, :]).all(-1).any()


def test_caller_rng_and_param_store_left_alone():
    pyro.param("mine", torch.tensor(1.5))
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    tune(model, DATA, **dict(FAST, num_trials=1))
    assert torch.equal(torch.rand(3), expected)
    assert list(pyro.get_param_store().keys()) == ["mine"]


def test_pruning_stops_clearly_bad_trials():
    # four good trials, then three that barely move (lr 1e-5): the median pruner stops them
    kw = dict(FAST, lr=(1e-5, 1e-1), num_trials=7, num_steps=60, report_every=10)
    result = tune(model, DATA, **kw, **_enqueued_study([1e-1] * 4 + [1e-5] * 3))
    pruned = [t for t in result.study.trials if t.state.name == "PRUNED"]
    assert len(pruned) >= 2 and all(t.params["lr"] == 1e-5 for t in pruned)
    assert all(t.user_attrs["steps"] < 60 for t in pruned)
    assert result.num_pruned == len(pruned)
    assert result.steps_run < 7 * 60
    assert result.best_params["lr"] == pytest.approx(1e-1)


def test_storage_continues_a_study(tmp_path):
    # the mechanism parallel processes use: one study shared through a storage URL
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    kw = dict(FAST, num_trials=2, storage=url, study_name="shared")
    first = tune(model, DATA, **kw)
    second = tune(model, DATA, **kw)
    assert [t.number for t in second.study.trials] == [0, 1, 2, 3]
    assert [t.user_attrs["seed"] for t in second.study.trials] == [
        train_seed(0, n) for n in range(4)]
    # the continued study does not repeat the first suggestions
    params = [tuple(t.params.items()) for t in second.study.trials]
    assert params[2:] != params[:2]
    assert second.score >= first.score


def test_tune_density_reproducible_and_scores_kl():
    result = tune_density("U2", num_flows=(2, 4), num_steps=40, num_trials=3,
                          validation_samples=500, batch_size=64, seed=1)
    assert set(result.best_params) == {"family", "num_flows", "lr"}
    assert 0 < result.score < 5  # a KL in nats
    assert result.study.direction.name == "MINIMIZE"
    fit2, score2 = result.refit()
    assert score2 == pytest.approx(result.score, abs=1e-6)
    assert fit2.losses == pytest.approx(result.guide.losses)


def test_package_root_exports_callable_module():
    import pyro_nfvi

    assert pyro_nfvi.tune_density is tune_density
    result = pyro_nfvi.tune(model, DATA, **dict(FAST, num_trials=1))
    assert result.num_complete == 1


@pytest.mark.parametrize("kw, match", [
    (dict(families=("planar", "maf")), "unknown family 'maf'"),
    (dict(families=()), "families must not be empty"),
    (dict(num_flows=(0, 4)), "num_flows must be >= 1"),
    (dict(num_flows=(8, 2)), "num_flows must have low <= high"),
    (dict(num_flows=(2.5, 4)), "num_flows must be ints"),
    (dict(lr=(0.0, 1e-2)), "lr must be finite and > 0"),
    (dict(lr=(1e-2, 1e-3)), "lr must have low <= high"),
    (dict(lr="fast"), "lr must be a number or a"),
    (dict(num_steps=0), "num_steps"),
    (dict(num_trials=None, timeout=None), "give num_trials or timeout"),
    (dict(timeout=-1), "timeout must be None or a number of seconds > 0"),
    (dict(report_every=0), "report_every"),
    (dict(num_steps=10, report_every=20), "report_every must be <= num_steps"),
    (dict(validation_particles=1), "validation_particles"),
    (dict(n_jobs=2), "n_jobs > 1 .* storage"),
    (dict(seed=-1), "seed"),
    (dict(pruner="median"), "pruner must be None or an optuna pruner"),
    (dict(guide_kwargs="full_rank"), "guide_kwargs must be None or a dict"),
    (dict(callbacks=3), "callbacks must be None or a sequence of callables"),
    (dict(callbacks=[3]), "callbacks must be None or a sequence of callables"),
])
def test_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        tune(model, DATA, **kw)


def test_density_argument_errors():
    with pytest.raises(ValueError, match="unknown family 'sylvester'"):
        tune_density("U1", families=("sylvester",))
    with pytest.raises(ValueError, match="tune_density sets callback, flow itself"):
        tune_density("U1", callback=print, flow=None)
    with pytest.raises(ValueError, match="pruner must be None or an optuna pruner"):
        tune_density("U1", pruner="median")
    with pytest.raises(ValueError, match="validation_samples"):
        tune_density("U1", validation_samples=1)
    with pytest.raises(KeyError, match="unknown target 'U9'"):
        tune_density("U9")


def test_missing_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` sees when absent
    with pytest.raises(ImportError, match=r'pip install "pyro_nfvi\[tune\]"'):
        tune(model, DATA, **dict(FAST, num_trials=1))
    with pytest.raises(ImportError, match=r"pyro_nfvi\[tune\]"):
        tune_density("U1", num_trials=1)


def test_core_import_does_not_import_optuna():
    code = ("import sys, pyro_nfvi, pyro_nfvi.tune; pyro_nfvi.tune_density; "
            "assert 'optuna' not in sys.modules, 'optuna imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_cli_tune_smoke(tmp_path, capsys):
    from pyro_nfvi.__main__ import main

    out = tmp_path / "search.png"
    rows = main(["tune", "--targets", "U1", "--trials", "2", "--steps", "30",
                 "--batch-size", "64", "--num-samples", "500", "--out", str(out),
                 "--no-progress"])
    text = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 1000
    assert "KL (nats)" in text and "U1" in text and str(out) in text
    assert len(rows) == 1 and rows[0]["complete"] + rows[0]["pruned"] + rows[0]["failed"] == 2
    assert rows[0]["family"] in ("planar", "radial") and 2 <= rows[0]["num_flows"] <= 64


@pytest.mark.parametrize("argv", [["--trials", "0"], ["--num-flows", "8", "2"],
                                  ["--lr", "0", "0.1"], ["--flows", "sylvester"],
                                  ["--timeout", "-5"]])
def test_cli_tune_bad_arguments_exit_2(argv, capsys):
    from pyro_nfvi.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["tune", *argv])
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_doctests():
    import doctest

    import pyro_nfvi.tune as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


def _picklable_model():
    from benchmarks.suite_models import get_model

    return get_model("banana")


@pytest.mark.slow  # spawns processes; test_storage_continues_a_study covers the storage path
def test_parallel_workers_share_the_study(tmp_path):
    spec = _picklable_model()
    url = f"sqlite:///{tmp_path / 'par.db'}"
    result = tune(spec.model, *spec.args, **dict(FAST, num_trials=2), storage=url,
                  study_name="par", n_jobs=2)
    assert len(result.study.trials) == 4
    assert sorted(t.user_attrs["seed"] for t in result.study.trials) == sorted(
        train_seed(0, n) for n in range(4))
    assert math.isfinite(result.score)
