"""Importance log weights ``log p(x, z) − log q(z)`` of a guide's draws: in one vectorised
pass over a particle plate (Pyro's ``vectorized_importance_weights``), two of them
re-scored one at a time (a model can broadcast against the particle dim with the right
shapes and wrong numbers), or one draw at a time. The one home of this drawing, for
:func:`~pyro_nfvi.importance.importance_sample`,
:func:`~pyro_nfvi.diagnostics.importance_log_weights` and the particle check of
:func:`~pyro_nfvi.infer.fit`."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from pyro.infer.util import plate_log_prob_sum
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from ._rng import fork_rng


def plate_nesting(*traces) -> int:
    """The number of batch dims the vectorised plates of these traces use (``-dim`` of the
    leftmost plate): the ``max_plate_nesting`` they need, 0 without plates. The one place
    that reads it off traces (``importance.py`` needs the same number)."""
    dims = [
        -f.dim
        for tr in traces
        for site in tr.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.vectorized and f.dim is not None
    ]
    return max(dims, default=0)


class _VectorizeError(RuntimeError):
    pass


def _reference(model, guide, args, kwargs):
    """One un-vectorised model/guide run: latent site names, shapes and event dims, and
    max_plate_nesting (as :func:`pyro_nfvi.diagnostics.evaluate_guide` guesses it)."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    full_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    # the plates' subsample sites of this run, to replay them in the checked vectorised
    # pass: the guide's (replayed into the model from there) and the model's own
    guide_plates, model_plates = Trace(), Trace()
    for name, site in guide_trace.nodes.items():
        if site_is_subsample(site):
            guide_plates.add_node(name, **site)
    for name, site in full_trace.nodes.items():
        if site_is_subsample(site) and name not in guide_plates:
            model_plates.add_node(name, **site)
    model_trace = prune_subsample_sites(full_trace)
    latents = {
        name: (tuple(site["value"].shape), site["fn"].event_dim)
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    if not latents:
        raise ValueError("the model has no latent sample sites: nothing to weigh")
    guide_sites = {
        name for name, site in guide_trace.nodes.items() if site["type"] == "sample"
    }
    missing = sorted(set(latents) - guide_sites)
    if missing:
        raise ValueError(
            f"the guide does not sample the model's latent site(s) {missing}; importance "
            "weights need q(z) for every latent site"
        )
    return latents, plate_nesting(model_trace, guide_trace), (guide_plates, model_plates)


def _draw_vectorized(model, guide, args, kwargs, n, latents, mpn, subsample=None, **check):
    if subsample is not None:  # checked pass: the reference run's minibatch, to re-score
        guide_plates, model_plates = subsample
        guide = poutine.replay(guide, trace=guide_plates)
        model = poutine.replay(model, trace=model_plates)
        subsample = {
            name: site["value"]
            for tr in (guide_plates, model_plates)
            for name, site in tr.nodes.items()
        }
    with poutine.block():
        lw, model_trace, guide_trace = vectorized_importance_weights(
            model, guide, *args, num_samples=n, max_plate_nesting=mpn, **kwargs
        )
    lw = lw.detach().double().reshape(-1)
    if lw.shape != (n,):
        raise _VectorizeError(f"vectorised log weights have shape {tuple(lw.shape)}")
    samples = {}
    for name, (shape, event_dim) in latents.items():
        v = model_trace.nodes[name]["value"].detach()
        p = v.dim() - event_dim - (mpn + 1)  # where the particle plate put its dim
        if (
            p < 0
            or v.shape[p] != n
            or any(s != 1 for s in v.shape[:p])
            or v.numel() != n * math.prod(shape)
        ):
            raise _VectorizeError(
                f"site {name!r}: vectorised value of shape {tuple(v.shape)} does not match "
                f"its shape {shape} with {n} particles"
            )
        samples[name] = v.reshape((n,) + shape)  # drops the plate padding dims
    if subsample is not None and n > 1:
        _check_vectorized(model, args, kwargs, model_trace, guide_trace, samples, n, subsample, **check)
    return samples, lw


def _check_vectorized(model, args, kwargs, model_trace, guide_trace, samples, n, subsample,
                      advice=" (write it for vectorised particles, or pass vectorize=False)"):
    """A model that broadcasts its own tensors against the particle dim (e.g. a global
    scale of shape (n, 1) meeting data of shape (N, D)) can run vectorised with the right
    shapes and wrong numbers. Re-score two draws one at a time and compare log p(x, z)."""
    log_p = plate_log_prob_sum(
        model_trace, guide_trace.plate_to_symbol["num_particles_vectorized"]
    ).detach().double().reshape(-1)
    for i in (0, n - 1):
        data = dict(subsample, **{name: value[i] for name, value in samples.items()})
        with poutine.block():
            trace = poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)
        ref = float(trace.log_prob_sum())
        if not abs(ref - float(log_p[i])) <= 1e-3 + 1e-4 * abs(ref):
            raise _VectorizeError(
                f"the vectorised log p(x, z) of draw {i} is {float(log_p[i]):.6g}, a sequential "
                f"run gives {ref:.6g}: the model broadcasts against the particle dim{advice}"
            )


#: the seed of :func:`vectorization_problem`'s draws (inside ``fork_rng``)
_CHECK_SEED = 20251


def vectorization_problem(model, guide, args, kwargs, max_plate_nesting: int) -> Optional[str]:
    """Why ``model`` gives wrong numbers under vectorised particles (a message), or
    ``None``: two particles drawn in one vectorised pass are re-scored one at a time
    (:func:`_check_vectorized`). Models that fail outright under the particle plate, or
    whose reference run fails, are not judged here (``None``): their errors surface where
    they run. Runs on forked random streams, without gradients: the caller's random
    stream and parameters are left as they were."""
    with fork_rng(), torch.no_grad(), poutine.block():
        torch.manual_seed(_CHECK_SEED)  # its own draws, not a preview of the caller's next
        try:
            latents, _, subsample = _reference(model, guide, args, kwargs)
            _draw_vectorized(model, guide, args, kwargs, 2, latents, max_plate_nesting, subsample,
                             advice="")
        except _VectorizeError as e:
            return str(e)
        except Exception:  # noqa: BLE001 -- not this check's to report
            return None
    return None


def _draw_sequential(model, guide, args, kwargs, n, latents):
    log_w, values = [], {name: [] for name in latents}
    with poutine.block():
        for _ in range(n):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            log_w.append(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
            for name in latents:
                values[name].append(model_trace.nodes[name]["value"].detach())
    samples = {name: torch.stack(v) for name, v in values.items()}
    return samples, torch.stack(log_w).detach().double().reshape(-1)


def check_draw_options(vectorize, max_plate_nesting, batch_size=None) -> None:
    """The options of the drawing below, checked before any model run."""
    if vectorize is not None and not isinstance(vectorize, bool):
        raise TypeError(f"vectorize must be None, True or False, got {vectorize!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if max_plate_nesting is not None and (
        isinstance(max_plate_nesting, bool)
        or not isinstance(max_plate_nesting, numbers.Integral)
        or max_plate_nesting < 0
    ):
        raise ValueError(f"max_plate_nesting must be an int >= 0, got {max_plate_nesting!r}")


def _draw(model, guide, args, kwargs, num_samples, max_plate_nesting, vectorize, batch_size):
    check_draw_options(vectorize, max_plate_nesting, batch_size)
    with poutine.block():
        latents, guessed, subsample = _reference(model, guide, args, kwargs)
    mpn = guessed if max_plate_nesting is None else int(max_plate_nesting)
    if vectorize is not False:
        try:
            chunk = num_samples if batch_size is None else int(batch_size)
            parts = []
            done = 0
            while done < num_samples:
                m = min(chunk, num_samples - done)
                # the first pass is checked against sequential runs
                sub = subsample if done == 0 else None
                parts.append(_draw_vectorized(model, guide, args, kwargs, m, latents, mpn, sub))
                done += m
            samples = {name: torch.cat([p[0][name] for p in parts]) for name in latents}
            return samples, torch.cat([p[1] for p in parts]), True
        except Exception:
            if vectorize:
                raise
    return _draw_sequential(model, guide, args, kwargs, num_samples, latents) + (False,)
