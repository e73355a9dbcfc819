r"""Hyperparameter search for flow guides and flow densities with Optuna.

"32 planar flows after a bit of hyperparameter optimisation": the number of flows ``K``,
the family and the learning rate are searched with Optuna's TPE sampler, and bad trials
are stopped early by its median pruner on a *validation* score reported during training.

* :func:`tune` — a flow autoguide (:class:`~pyro_nfvi.guides.AutoPlanarFlow`,
  :class:`~pyro_nfvi.guides.AutoRadialFlow`, :class:`~pyro_nfvi.guides.AutoSylvesterFlow`)
  for a Pyro model, fitted with :func:`~pyro_nfvi.infer.fit`; the score is the IWAE bound
  ``log mean_s exp(log p(x, z_s) − log q(z_s))`` (nats, higher is better) on
  ``validation_particles`` fresh draws.
* :func:`tune_density` — a planar/radial flow for an unnormalised 2-D density, fitted with
  :func:`~pyro_nfvi.infer.fit_density`; the score is ``KL(q‖p)`` (nats, lower is better;
  ``−ELBO`` when the target's ``log Z`` is unknown) on fresh draws.

**Validation draws.** Training and validation use separate torch random streams: trial
``n`` trains from a seed derived from ``(seed, n)``, and every validation runs inside
:func:`torch.random.fork_rng` from a seed derived from ``(seed, report index)`` alone, so
the validation draws are independent of the training draws, they never shift the training
stream (a trial trains the same whether or not it is validated), and all trials are
compared on common random numbers. The caller's global RNG stream is left as it was.

**Failures.** A trial whose fit hits a NaN/inf (``FloatingPointError`` from ``fit``) is
recorded as ``FAIL`` with the reason in ``trial.user_attrs["fail_reason"]`` and the search
goes on; an error at the first step (a bug in the model or its arguments) stops it.

**Parallel trials.** Pyro's parameter store and torch's RNG are per process, so trials run
in parallel in *processes* that share an Optuna storage: pass ``storage`` (e.g.
``"sqlite:///tune.db"``) and ``study_name``, and either ``n_jobs > 1`` (this call starts
``n_jobs`` worker processes; the model must be picklable, i.e. defined in an importable
module) or run the same call in several shells. Each process runs ``num_trials`` trials of
the shared study; the sampler of worker ``i`` is seeded with ``seed + i``.

Optuna is an optional extra: ``pip install "pyro_nfvi[tune]"``. ``import pyro_nfvi`` and
``import pyro_nfvi.tune`` never import it; only calling :func:`tune` does. The module is
callable: ``pyro_nfvi.tune(model, ...)`` is :func:`tune`.

Example::

    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro_nfvi.tune import tune
    >>> def model(x):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("obs", dist.Normal(mu, 1.0).to_event(1), obs=x)
    >>> result = tune(model, torch.ones(5, 2), families=("planar",), num_flows=(2, 4),
    ...               num_steps=20, num_trials=2, validation_particles=50)
    >>> sorted(result.best_params), result.num_complete
    (['family', 'lr', 'num_flows'], 2)

Reference: T. Akiba, S. Sano, T. Yanase, T. Ohta, M. Koyama. Optuna: A Next-generation
Hyperparameter Optimization Framework. KDD 2019.

This module is longer than the package's other files (~770 lines): the two searches
(guides, densities) share the trial loop, pruning, seeding and :class:`TuneResult`, and
splitting them would put one workflow in three files.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyro
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule

from ._validation import ArgumentError, check_int
from ._rng import fork_rng

if TYPE_CHECKING:  # pragma: no cover
    import optuna

__all__ = ["TuneResult", "tune", "tune_density", "plot_search", "GUIDE_FAMILIES", "DENSITY_FAMILIES"]

GUIDE_FAMILIES = ("planar", "radial", "sylvester")
DENSITY_FAMILIES = ("planar", "radial")
INSTALL_HINT = 'pip install "pyro_nfvi[tune]"'


def _import_optuna():
    try:
        import optuna
    except ImportError as e:
        raise ImportError(
            "pyro_nfvi.tune needs Optuna, which is the optional extra [tune]: "
            f"{INSTALL_HINT} (or pip install optuna)"
        ) from e
    return optuna


# ----------------------------------------------------------------------------- checks
def _check_families(families: Any, allowed: Tuple[str, ...]) -> Tuple[str, ...]:
    if isinstance(families, str):
        families = (families,)
    try:
        families = tuple(families)
    except TypeError:
        raise ArgumentError(f"families must be a sequence of names from {allowed}, got {families!r}")
    if not families:
        raise ArgumentError(f"families must not be empty (choose from {allowed})")
    for f in families:
        if f not in allowed:
            raise ArgumentError(f"unknown family {f!r} in families (choose from {allowed})")
    return tuple(dict.fromkeys(families))


def _check_range(value: Any, name: str, integer: bool) -> Tuple[Any, Any]:
    """``(low, high)`` from a number (fixed) or a pair; ints >= 1 or floats in (0, inf)."""
    kind = numbers.Integral if integer else numbers.Real
    pair = (value, value) if isinstance(value, numbers.Number) else value
    try:
        low, high = pair
    except (TypeError, ValueError):
        raise ArgumentError(f"{name} must be a number or a (low, high) pair, got {value!r}")
    for v in (low, high):
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ArgumentError(f"{name} must be {'ints' if integer else 'numbers'}, got {value!r}")
        if (v < 1) if integer else not (0 < v < math.inf):
            raise ArgumentError(
                f"{name} must be {'>= 1' if integer else 'finite and > 0'}, got {value!r}"
            )
    if low > high:
        raise ArgumentError(f"{name} must have low <= high, got {value!r}")
    return (int(low), int(high)) if integer else (float(low), float(high))


def _check_common(num_steps, num_trials, timeout, report_every, n_jobs, storage, seed):
    num_steps = check_int(num_steps, "num_steps")
    if num_trials is not None:
        num_trials = check_int(num_trials, "num_trials")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0
    ):
        raise ArgumentError(f"timeout must be None or a number of seconds > 0, got {timeout!r}")
    if num_trials is None and timeout is None:
        raise ArgumentError("give num_trials or timeout (or both): the search needs a stop")
    if report_every is None:
        report_every = max(1, num_steps // 10)
    report_every = check_int(report_every, "report_every")
    if report_every > num_steps:
        raise ArgumentError(f"report_every must be <= num_steps ({num_steps}), got {report_every}")
    n_jobs = check_int(n_jobs, "n_jobs")
    if n_jobs > 1 and storage is None:
        raise ArgumentError(
            "n_jobs > 1 runs trials in n_jobs processes that share the study through an "
            "Optuna storage: pass storage (e.g. 'sqlite:///tune.db') and study_name"
        )
    check_int(seed, "seed", minimum=0)
    return num_steps, num_trials, timeout, report_every, n_jobs


def _check_optuna_extras(optuna, pruner, callbacks) -> None:
    """``pruner`` and ``callbacks`` checked before any trial (a wrong type would fail
    inside Optuna, at the first report or after the first trial)."""
    if pruner is not None and not isinstance(pruner, optuna.pruners.BasePruner):
        raise ArgumentError(f"pruner must be None or an optuna pruner (optuna.pruners.*), got {pruner!r}")
    if callbacks is not None and (
        isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Sequence)
        or not all(callable(c) for c in callbacks)
    ):
        raise ArgumentError(
            f"callbacks must be None or a sequence of callables f(study, trial), got {callbacks!r}")


# ------------------------------------------------------------------------------ seeds
def _derived_seed(seed: int, *key: int) -> int:
    """A 63-bit seed from ``seed`` and a spawn key (NumPy's ``SeedSequence``): different
    keys give statistically independent streams."""
    words = np.random.SeedSequence(seed, spawn_key=key).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def train_seed(seed: int, trial_number: int) -> int:
    """The torch seed trial ``trial_number`` trains (and initialises its guide) from."""
    return _derived_seed(seed, 0, trial_number)


def validation_seed(seed: int, report: int) -> int:
    """The torch seed of validation number ``report`` (0, 1, ...; the last one scores the
    trial). Shared by all trials (common random numbers) and never one of the training
    seeds (another spawn key of the same ``SeedSequence``)."""
    return _derived_seed(seed, 1, report)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block on its own torch stream; the caller's stream is restored after."""
    with fork_rng():
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_optuna(optuna, verbose: bool) -> Iterator[None]:
    old = optuna.logging.get_verbosity()
    if not verbose:  # failed/pruned trials are counted in the result instead
        optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)


# ----------------------------------------------------------------------------- result
@dataclass
class TuneResult:
    """What :func:`tune` / :func:`tune_density` return.

    :ivar best_params: the best trial's ``{"family", "num_flows", "lr"}``.
    :ivar score: its final validation score (IWAE in nats for :func:`tune`, higher is
        better; KL in nats for :func:`tune_density`, lower is better).
    :ivar guide: the best trial's fitted guide (:func:`tune`) or ``DensityFit``
        (:func:`tune_density`); refitted from the trial's seed when that trial ran in
        another process.
    :ivar study: the :class:`optuna.Study` (Optuna's plots and dashboard work on it).
    :ivar seconds: wall time of the search (plus the refit, if one was needed).
    """

    best_params: Dict[str, Any]
    score: float
    guide: Any
    study: "optuna.Study"
    seconds: float = 0.0
    _refit: Optional[Callable[[], Tuple[Any, float]]] = field(default=None, repr=False)

    def _count(self, state: str) -> int:
        return sum(t.state.name == state for t in self.study.trials)

    @property
    def num_complete(self) -> int:
        return self._count("COMPLETE")

    @property
    def num_pruned(self) -> int:
        return self._count("PRUNED")

    @property
    def num_failed(self) -> int:
        return self._count("FAIL")

    @property
    def steps_run(self) -> int:
        """Optimisation steps run by all trials (pruned ones stop early)."""
        return sum(int(t.user_attrs.get("steps", 0)) for t in self.study.trials)

    def refit(self) -> Tuple[Any, float]:
        """Refit the best trial from its seed; returns ``(guide_or_fit, score)``, which
        reproduce :attr:`guide` and :attr:`score`."""
        return self._refit()


# ---------------------------------------------------------------------- search driver
def _run_search(objective, direction, keep, rebuild, *, num_trials, timeout, seed, storage,
                study_name, n_jobs, pruner, progress, verbose, worker_spec,
                callbacks=None) -> TuneResult:
    optuna = _import_optuna()
    t0 = time.perf_counter()
    with _quiet_optuna(optuna, verbose):
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            direction=direction,
            pruner=pruner,
            load_if_exists=study_name is not None,
        )
        # the sampler's stream depends on the worker and on the trials already in the
        # study, so that workers of a parallel search and a continued study do not repeat
        # the suggestions of the first trials
        worker = 0 if _WORKER_INDEX is None else _WORKER_INDEX
        sampler_seed = _derived_seed(seed, 3, worker, len(study.trials)) % 2**32
        study.sampler = optuna.samplers.TPESampler(seed=sampler_seed)
        if n_jobs > 1:
            _run_workers(worker_spec, study.study_name, n_jobs, num_trials, timeout, seed)
        else:
            bar = None
            callbacks = list(callbacks or [])
            if progress:
                from .infer import tqdm

                bar = tqdm(total=num_trials, desc="trials")
                callbacks.append(lambda s, t: (bar.update(1), bar.set_postfix(
                    best=f"{s.best_value:.4g}" if any(x.state.name == "COMPLETE" for x in s.trials)
                    else "-", refresh=False)))
            try:
                study.optimize(objective, n_trials=num_trials, timeout=timeout,
                               catch=(FloatingPointError,), callbacks=callbacks)
            finally:
                if bar is not None:
                    bar.close()
    if _WORKER_INDEX is not None:
        return None  # a worker process: the parent reads the shared study
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not done:
        reasons = [t.user_attrs.get("fail_reason") for t in study.trials]
        first = next((r for r in reasons if r), "no trial finished within the budget")
        raise RuntimeError(
            f"no trial of the search completed ({len(study.trials)} trials: "
            f"{sum(t.state.name == 'PRUNED' for t in study.trials)} pruned, "
            f"{sum(t.state.name == 'FAIL' for t in study.trials)} failed); first failure: "
            f"{first}. Lower lr, or give more num_trials/timeout"
        )
    best = study.best_trial

    def refit():
        return rebuild(best.params, best.user_attrs["seed"])

    if keep.get("number") == best.number:
        fitted, score = keep["fitted"], best.value
    else:  # the best trial ran in another process: refit it from its seed
        fitted, score = refit()
    return TuneResult(best_params=dict(best.params), score=float(score), guide=fitted,
                      study=study, seconds=time.perf_counter() - t0, _refit=refit)


_WORKER_INDEX: Optional[int] = None  # set in worker processes of a parallel search only


def _worker_main(spec: dict, study_name: str, num_trials, timeout, seed: int, index: int) -> None:
    global _WORKER_INDEX
    _WORKER_INDEX = index
    torch.set_num_threads(spec["threads"])
    fn = tune if spec["kind"] == "guide" else tune_density
    fn(*spec["args"], **spec["kwargs"], num_trials=num_trials, timeout=timeout, seed=seed,
       study_name=study_name, n_jobs=1, progress=False)


def _run_workers(spec, study_name, n_jobs, num_trials, timeout, seed) -> None:
    import importlib
    import multiprocessing as mp

    # a worker imports this module by name (``__main__`` runs cannot be imported)
    worker = importlib.import_module("pyro_nfvi.tune")._worker_main
    ctx = mp.get_context("spawn")
    spec = dict(spec, threads=max(1, torch.get_num_threads() // n_jobs))
    procs = [ctx.Process(target=worker, args=(spec, study_name, num_trials, timeout, seed, i))
             for i in range(n_jobs)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n_jobs} tune worker processes failed "
                           f"(exit codes {bad}); run with n_jobs=1 to see the error")


def _suggest(trial, families, num_flows, lr) -> Dict[str, Any]:
    return {
        "family": trial.suggest_categorical("family", list(families)),
        "num_flows": trial.suggest_int("num_flows", *num_flows, log=num_flows[1] > num_flows[0]),
        "lr": trial.suggest_float("lr", *lr, log=lr[1] > lr[0]),
    }


def _default_pruner(optuna, num_steps: int, report_every: int):
    # the first reports of a flow are mostly its affine base: wait a fifth of the run
    warmup = max(report_every, num_steps // 5)
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=warmup - 1)


# -------------------------------------------------------------------------- guides
def _make_guide(model, family: str, num_flows: int, guide_kwargs: dict):
    from .guides import AutoPlanarFlow, AutoRadialFlow, AutoSylvesterFlow

    cls = {"planar": AutoPlanarFlow, "radial": AutoRadialFlow,
           "sylvester": AutoSylvesterFlow}[family]
    return cls(model, num_flows=num_flows, **guide_kwargs)


def _iwae(model, guide, args, kwargs, num_samples: int, seed: int) -> float:
    """The IWAE bound on ``num_samples`` draws (the ``iwae`` of
    :func:`~pyro_nfvi.diagnostics.evaluate_guide`, without its k-hat fit)."""
    from .diagnostics import importance_log_weights, log_mean_exp

    with _seeded(seed), torch.no_grad():
        lw = importance_log_weights(model, guide, *args, num_samples=num_samples, **kwargs)
    return log_mean_exp(lw)[0]


def _keep_if_best(keep: Dict[str, Any], trial, fitted, score: float, maximize: bool) -> None:
    """Keep the fitted object of the best trial this process has run (one at a time)."""
    if "score" in keep and (score <= keep["score"] if maximize else score >= keep["score"]):
        return
    keep.update(number=trial.number, score=score, fitted=fitted)


def _fit_guide(model, args, kwargs, params, seed, base_seed, *, num_steps, num_particles,
               guide_kwargs, validation_particles, report_every, report=None):
    """Train one configuration from ``seed`` in a private param store; ``report(step,
    score)`` gets the validation IWAE every ``report_every`` steps (it may raise to stop).
    Returns ``(guide, final score, steps run)``."""
    from .infer import default_optim, fit

    steps = [0]
    with pyro.get_param_store().scope(), _seeded(seed):
        guide = _make_guide(model, params["family"], params["num_flows"], guide_kwargs)

        def callback(step: int, loss: float) -> None:
            steps[0] = step + 1
            if report is not None and (step + 1) % report_every == 0 and step + 1 < num_steps:
                k = (step + 1) // report_every - 1
                report(step + 1, _iwae(model, guide, args, kwargs, validation_particles,
                                       validation_seed(base_seed, k)))

        try:
            with warnings.catch_warnings():
                # Pyro warns before fit raises on the NaN; the trial records the failure
                warnings.filterwarnings("ignore", message="Encountered NaN")
                fit(model, guide, *args, num_steps=num_steps, num_particles=num_particles,
                    optim=default_optim(num_steps, lr=params["lr"], lr_end=params["lr"] / 10),
                    progress=False, callback=callback, **kwargs)
        except ValueError as e:
            if steps[0] == 0:
                raise  # a bug in the model or its arguments: stop the whole search
            # e.g. Pyro's argument validation on parameters driven to inf by a large lr
            raise FloatingPointError(str(e)) from e
        score = _iwae(model, guide, args, kwargs, validation_particles, final_seed(base_seed))
    return guide, score, steps[0]


def final_seed(seed: int) -> int:
    """The torch seed of the validation that scores a finished trial (all trials)."""
    return _derived_seed(seed, 2)


def _objective_wrapper(optuna, fit_one, families, num_flows, lr, base_seed, maximize, keep,
                       name: str):
    """The Optuna objective: suggest, train with reports, record seed/steps/time/failure."""

    def objective(trial) -> float:
        params = _suggest(trial, families, num_flows, lr)
        tseed = train_seed(base_seed, trial.number)
        trial.set_user_attr("seed", tseed)

        def report(step: int, score: float) -> None:
            trial.set_user_attr("steps", step)
            if not math.isfinite(score):
                raise FloatingPointError(f"validation {name} is {score} at step {step}")
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} ({name} {score:.4g})")

        t0 = time.perf_counter()
        try:
            fitted, score, steps = fit_one(params, tseed, report)
            trial.set_user_attr("steps", steps)
            if not math.isfinite(score):
                raise FloatingPointError(f"final validation {name} is {score}")
        except FloatingPointError as e:
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}")
            raise
        finally:
            trial.set_user_attr("seconds", time.perf_counter() - t0)
        _keep_if_best(keep, trial, fitted, score, maximize)
        return score

    return objective


def tune(
    model: Callable,
    *args: Any,
    families: Sequence[str] = GUIDE_FAMILIES,
    num_flows: Union[int, Tuple[int, int]] = (2, 64),
    lr: Union[float, Tuple[float, float]] = (1e-3, 3e-2),
    num_steps: int = 1000,
    num_particles: int = 8,
    num_trials: Optional[int] = 20,
    timeout: Optional[float] = None,
    seed: int = 0,
    storage: Optional[Union[str, Any]] = None,
    study_name: Optional[str] = None,
    n_jobs: int = 1,
    validation_particles: int = 1000,
    report_every: Optional[int] = None,
    pruner: Optional[Any] = None,
    guide_kwargs: Optional[Dict[str, Any]] = None,
    progress: bool = False,
    verbose: bool = False,
    callbacks: Optional[Sequence[Callable]] = None,
    **kwargs: Any,
) -> TuneResult:
    """Search the family, number of flows and learning rate of a flow autoguide.

    Each trial builds ``Auto{Planar,Radial,Sylvester}Flow(model, num_flows,
    **guide_kwargs)`` in a private Pyro parameter store, fits it with
    :func:`~pyro_nfvi.infer.fit` (``num_steps`` steps, ``num_particles`` particles,
    ``ClippedAdam`` decaying from ``lr`` to ``lr / 10``) and reports the IWAE bound on
    ``validation_particles`` fresh draws every ``report_every`` steps to the pruner; the
    trial's score is the IWAE at the end (higher is better). See the module docstring for
    the random streams, failures and parallel trials.

    :param model: a Pyro model; ``args``/``kwargs`` are passed to it (and to the guide).
    :param families: families to search, from ``("planar", "radial", "sylvester")``.
    :param num_flows: ``(low, high)`` range of K (searched on a log scale) or a fixed int.
    :param lr: ``(low, high)`` range of the initial learning rate (log scale) or a float.
    :param num_steps: SVI steps per trial.
    :param num_particles: ELBO particles per step (as in :func:`~pyro_nfvi.infer.fit`).
    :param num_trials: trials of this call (``None``: until ``timeout``).
    :param timeout: stop starting new trials after this many seconds.
    :param seed: seeds the TPE sampler, every trial's training and the validation draws.
    :param storage: an Optuna storage or URL (e.g. ``"sqlite:///tune.db"``) to keep the
        study in or to share it between processes; ``None``: in memory.
    :param study_name: the study's name in ``storage`` (an existing one is continued).
    :param n_jobs: worker processes (needs ``storage``; the model must be picklable).
    :param validation_particles: draws of each validation IWAE (>= 2).
    :param report_every: steps between validation reports (default ``num_steps // 10``).
    :param pruner: an Optuna pruner (default ``MedianPruner`` after 4 trials and a fifth
        of the steps); ``optuna.pruners.NopPruner()`` turns pruning off.
    :param guide_kwargs: extra keyword arguments of the guide (e.g. ``full_rank=True``).
    :param progress: a ``tqdm`` bar over trials.
    :param verbose: keep Optuna's per-trial log lines (default: errors only).
    :param callbacks: Optuna callbacks ``f(study, frozen_trial)`` called after each trial.
    :returns: a :class:`TuneResult` (``best_params``, ``score``, ``guide``, ``study``).
    :raises ImportError: if Optuna is not installed (``pip install "pyro_nfvi[tune]"``).
    :raises RuntimeError: if no trial completed.

    The returned guide holds its trained parameters; to call it, start from an empty param
    store (``pyro.clear_param_store()``) or call it inside ``pyro.get_param_store().scope()``
    so that no parameter of the same name in your store replaces them.
    """
    if not callable(model):
        raise ArgumentError(f"model must be a callable Pyro model, got {type(model).__name__}")
    families = _check_families(families, GUIDE_FAMILIES)
    num_flows = _check_range(num_flows, "num_flows", integer=True)
    lr = _check_range(lr, "lr", integer=False)
    num_steps, num_trials, timeout, report_every, n_jobs = _check_common(
        num_steps, num_trials, timeout, report_every, n_jobs, storage, seed)
    num_particles = check_int(num_particles, "num_particles")
    validation_particles = check_int(validation_particles, "validation_particles", minimum=2)
    if guide_kwargs is not None and not isinstance(guide_kwargs, Mapping):
        raise ArgumentError(f"guide_kwargs must be None or a dict of guide options, got {guide_kwargs!r}")
    guide_kwargs = dict(guide_kwargs or {})
    optuna = _import_optuna()
    _check_optuna_extras(optuna, pruner, callbacks)
    fit_kw = dict(num_steps=num_steps, num_particles=num_particles, guide_kwargs=guide_kwargs,
                  validation_particles=validation_particles, report_every=report_every)

    def fit_one(params, tseed, report=None):
        return _fit_guide(model, args, kwargs, params, tseed, seed, report=report, **fit_kw)

    def rebuild(params, tseed):
        return fit_one(params, tseed)[:2]

    keep: Dict[int, Any] = {}
    objective = _objective_wrapper(optuna, fit_one, families, num_flows, lr, seed, True, keep,
                                   "IWAE")
    worker_spec = dict(kind="guide", args=(model, *args), kwargs=dict(
        families=families, num_flows=num_flows, lr=lr, num_steps=num_steps,
        num_particles=num_particles, storage=storage, validation_particles=validation_particles,
        report_every=report_every, pruner=pruner, guide_kwargs=guide_kwargs, **kwargs))
    if pruner is None:
        pruner = _default_pruner(optuna, num_steps, report_every)
    with fork_rng():
        return _run_search(objective, "maximize", keep, rebuild, num_trials=num_trials,
                           timeout=timeout, seed=seed, storage=storage, study_name=study_name,
                           n_jobs=n_jobs, pruner=pruner, progress=progress, verbose=verbose,
                           worker_spec=worker_spec, callbacks=callbacks)


# ------------------------------------------------------------------------- densities
_FIT_DENSITY_OWN = ("flow", "target", "num_steps", "lr", "seed", "callback", "progress", "dim")


def _density_score(q, target, num_samples: int, seed: int) -> float:
    """``KL(q‖p)`` in nats on ``num_samples`` fresh draws (``−ELBO`` if ``log Z`` is
    unknown: the KL up to the constant ``log Z``)."""
    from .diagnostics import evaluate_density

    with _seeded(seed), torch.no_grad():
        m = evaluate_density(q, target, num_samples=num_samples)
    return m["kl"] if math.isfinite(m["log_Z"]) else -m["elbo"]


def _make_density_flow(family: str, dim: int, num_flows: int):
    from .helpers import planar_flow, radial_flow

    return (planar_flow if family == "planar" else radial_flow)(dim, num_flows)


class _Affine(TransformModule):
    """``z = loc + exp(log_scale) ⊙ x`` as a TransformModule (the affine layer that
    :func:`~pyro_nfvi.infer.fit_density` appends, held here so that the validation reports
    during training can build ``q``)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        # no cache: torch's is keyed on tensor identity and would answer with values from
        # before an optimiser step; the inverse is two cheap operations
        super().__init__(cache_size=0)
        self.loc = torch.nn.Parameter(torch.zeros(dim))
        self.log_scale = torch.nn.Parameter(torch.full((dim,), math.log(scale)))

    def _call(self, x):
        return self.loc + self.log_scale.exp() * x

    def _inverse(self, y):
        return (y - self.loc) * (-self.log_scale).exp()

    def log_abs_det_jacobian(self, x, y):
        return self.log_scale.sum().expand(x.shape[:-1])


def _fit_density_one(target, params, seed, base_seed, *, dim, num_steps, validation_samples,
                     report_every, fit_kwargs, report=None):
    import pyro.distributions as dist

    from .infer import fit_density

    fit_kwargs = dict(fit_kwargs)
    affine = fit_kwargs.pop("affine", True)
    init_scale = fit_kwargs.pop("init_scale", 1.0)
    base = fit_kwargs.pop("base", None) or dist.Normal(torch.zeros(dim), 1.0).to_event(1)
    steps = [0]
    with _seeded(seed):
        flow = [_make_density_flow(params["family"], dim, params["num_flows"])]
        if affine:
            flow.append(_Affine(dim, init_scale))

        def callback(step: int, loss: float) -> None:
            steps[0] = step + 1
            if report is not None and (step + 1) % report_every == 0 and step + 1 < num_steps:
                k = (step + 1) // report_every - 1
                q = dist.TransformedDistribution(base, flow)
                report(step + 1, _density_score(q, target, validation_samples,
                                                 validation_seed(base_seed, k)))

        fitted = fit_density(flow, target, num_steps=num_steps, lr=params["lr"], base=base,
                             affine=False, progress=False, callback=callback, **fit_kwargs)
        score = _density_score(fitted.q, target, validation_samples, final_seed(base_seed))
    return fitted, score, steps[0]


def tune_density(
    target: Any,
    *,
    families: Sequence[str] = DENSITY_FAMILIES,
    num_flows: Union[int, Tuple[int, int]] = (2, 64),
    lr: Union[float, Tuple[float, float]] = (1e-3, 3e-2),
    num_steps: int = 2000,
    num_trials: Optional[int] = 20,
    timeout: Optional[float] = None,
    seed: int = 0,
    storage: Optional[Union[str, Any]] = None,
    study_name: Optional[str] = None,
    n_jobs: int = 1,
    validation_samples: int = 2000,
    report_every: Optional[int] = None,
    pruner: Optional[Any] = None,
    dim: int = 2,
    progress: bool = False,
    verbose: bool = False,
    callbacks: Optional[Sequence[Callable]] = None,
    **fit_kwargs: Any,
) -> TuneResult:
    """Search the family (planar/radial), number of flows K and learning rate of a flow
    fitted to an unnormalised density with :func:`~pyro_nfvi.infer.fit_density`.

    Each trial fits ``[flow, affine]`` (the same affine layer ``fit_density`` appends by
    default; ``affine=False`` drops it) for ``num_steps`` steps with the given ``lr``
    and reports ``KL(q‖p)`` on ``validation_samples`` fresh draws every ``report_every``
    steps; the trial's score is the KL at the end (lower is better; ``−ELBO`` when the
    target's ``log Z`` is unknown). Give ``timeout`` for a time budget: no trial starts
    after it (the running one finishes). The random streams, failures and parallel trials
    are as for :func:`tune`.

    :param target: a :class:`~pyro_nfvi.targets.Target`, a name (``"U1"``) or a callable
        ``z -> log p̃(z)``.
    :param dim: dimension of the density.
    :param fit_kwargs: further arguments of :func:`~pyro_nfvi.infer.fit_density`
        (``batch_size``, ``beta0``, ``anneal_steps``, ``clip_norm``, ...).
    :returns: a :class:`TuneResult` whose ``guide`` is the best trial's ``DensityFit``.

    Other parameters as for :func:`tune`.
    """
    from .targets import get_target

    if isinstance(target, str):
        target = get_target(target)
    if not callable(target) and not hasattr(target, "log_prob_unnormalized"):
        raise ArgumentError(f"target must be a Target, a name or a callable, got {target!r}")
    families = _check_families(families, DENSITY_FAMILIES)
    num_flows = _check_range(num_flows, "num_flows", integer=True)
    lr = _check_range(lr, "lr", integer=False)
    num_steps, num_trials, timeout, report_every, n_jobs = _check_common(
        num_steps, num_trials, timeout, report_every, n_jobs, storage, seed)
    validation_samples = check_int(validation_samples, "validation_samples", minimum=2)
    dim = check_int(dim, "dim")
    bad = sorted(set(fit_kwargs) & set(_FIT_DENSITY_OWN))
    if bad:
        raise ArgumentError(f"tune_density sets {', '.join(bad)} itself; use its own arguments")
    optuna = _import_optuna()
    _check_optuna_extras(optuna, pruner, callbacks)
    fit_kw = dict(dim=dim, num_steps=num_steps, validation_samples=validation_samples,
                  report_every=report_every, fit_kwargs=fit_kwargs)

    def fit_one(params, tseed, report=None):
        return _fit_density_one(target, params, tseed, seed, report=report, **fit_kw)

    def rebuild(params, tseed):
        return fit_one(params, tseed)[:2]

    keep: Dict[str, Any] = {}
    objective = _objective_wrapper(optuna, fit_one, families, num_flows, lr, seed, False, keep,
                                   "KL")
    worker_spec = dict(kind="density", args=(target,), kwargs=dict(
        families=families, num_flows=num_flows, lr=lr, num_steps=num_steps, storage=storage,
        validation_samples=validation_samples, report_every=report_every, pruner=pruner,
        dim=dim, **fit_kwargs))
    if pruner is None:
        pruner = _default_pruner(optuna, num_steps, report_every)
    with fork_rng():
        return _run_search(objective, "minimize", keep, rebuild, num_trials=num_trials,
                           timeout=timeout, seed=seed, storage=storage, study_name=study_name,
                           n_jobs=n_jobs, pruner=pruner, progress=progress, verbose=verbose,
                           worker_spec=worker_spec, callbacks=callbacks)


def plot_search(results: Dict[str, TuneResult], title: Optional[str] = None):
    """A figure of searches: one panel per entry of ``results`` (e.g. per target), every
    trial at its ``(K, lr)`` (log axes), coloured by its final score; planar ``o``, radial
    ``^``, Sylvester ``s``; pruned trials as grey ``+``, failed ones as red ``x``; the best
    trial circled. Returns a :class:`matplotlib.figure.Figure` (no pyplot state)."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    markers = {"planar": "o", "radial": "^", "sylvester": "s"}
    fig = Figure(figsize=(4.4 * len(results), 3.8), layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (name, res) in zip(axes, results.items()):
        trials = res.study.trials
        minimize = res.study.direction.name == "MINIMIZE"
        done = [t for t in trials if t.state.name == "COMPLETE"]
        values = [t.value for t in done]
        norm = Normalize(min(values), max(values)) if values else None
        sc = None
        for fam, m in markers.items():
            ts = [t for t in done if t.params.get("family") == fam]
            if ts:
                sc = ax.scatter([t.params["num_flows"] for t in ts], [t.params["lr"] for t in ts],
                                c=[t.value for t in ts], cmap="viridis_r" if minimize else "viridis",
                                norm=norm, marker=m, s=40, label=fam, edgecolors="k",
                                linewidths=0.3)
        for state, m, c in (("PRUNED", "+", "0.5"), ("FAIL", "x", "red")):
            ts = [t for t in trials if t.state.name == state and "num_flows" in t.params]
            if ts:
                ax.scatter([t.params["num_flows"] for t in ts], [t.params["lr"] for t in ts],
                           marker=m, c=c, s=40, label=state.lower())
        bp = res.best_params
        ax.scatter([bp["num_flows"]], [bp["lr"]], s=220, facecolors="none", edgecolors="red",
                   linewidths=1.5, label="best")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("number of flows K")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{name}: best {bp['family']} K={bp['num_flows']}, lr={bp['lr']:.2g}",
                     fontsize=9)
        ax.legend(fontsize=7, loc="best")
        if sc is not None:
            fig.colorbar(sc, ax=ax, label="final KL (nats)" if minimize else "IWAE (nats)")
    if title:
        fig.suptitle(title)
    return fig


class _CallableModule(types.ModuleType):
    """``pyro_nfvi.tune`` is this module and also :func:`tune` (``pyro_nfvi.tune(model,
    ...)``): the package exports the function under the module's own name."""

    def __call__(self, *args: Any, **kwargs: Any) -> TuneResult:
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
