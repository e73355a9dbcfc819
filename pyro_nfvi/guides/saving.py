"""Saving and loading a flow guide: a state dict loaded before the first call, and a pickled
guide that keeps (or says how to re-attach) the model its placement re-runs."""

from __future__ import annotations

import pickle
from typing import Callable

import pyro
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.params.param_store import param_with_module_name


def take_stored_module_params(guide, name: str, module: torch.nn.Module) -> bool:
    """Register the guide's submodule ``module`` (attribute ``name``) with Pyro, taking
    the values Pyro's param store holds for it (a checkpoint loaded before the first
    call: ``pyro.get_param_store().load``), as Pyro's guides take theirs; ``False`` (and
    nothing done) where the store holds none. Why: a plain ``nn.Module`` keeps its fresh
    tensors under ``pyro.module`` unless told to update them."""
    if not guide._pyro_context.active:
        return False
    fullname = guide._pyro_get_fullname(name)
    store = pyro.get_param_store()
    if not any(param_with_module_name(fullname, n) in store for n, _ in module.named_parameters()):
        return False
    pyro.module(fullname, module, update_module_params=True)
    return True


class _GuideSaving:
    """Saving and loading (mixed into :class:`~pyro_nfvi.guides.AutoNormalizingFlow`).

    **State dicts.** Like all Pyro autoguides, a flow guide creates its parameters on the
    first call, so run the guide once (with the model's arguments) before
    :meth:`load_state_dict`::

        guide = AutoNormalizingFlow(model, init_transform_fn)
        guide(data)                    # creates the parameters
        guide.load_state_dict(state)   # now the keys match

    For a model without arguments :meth:`load_state_dict` does this setup itself.

    **Whole guides** (``torch.save(guide, f)``, ``torch.load(f, weights_only=False)``,
    ``pickle``, ``copy.deepcopy``). Pyro's autoguides drop the model when pickled; a flow
    guide with hierarchical sites re-runs the model's prior on every call (to place
    them), so this guide keeps the model where pickle can store it *by reference* (a
    function or class defined at the top level of an importable module, or a picklable
    ``PyroModule``) and find it again when loading. Otherwise (a lambda, a closure, a
    function of a ``__main__`` loaded elsewhere) the guide still loads, and the first
    call that needs the model raises a ``RuntimeError`` saying how to re-attach it::

        guide = torch.load(f, weights_only=False)
        guide.model = model            # only if the guide says it lost its model

    A guide without hierarchical sites needs the model only to set itself up and when the
    shapes of the model's arguments change, so it works after loading even without it (as
    Pyro's ``AutoNormal`` does). Saving never removes the model from the live guide
    (Pyro's ``AutoGuide.__getstate__`` does).
    """

    @property
    def model(self) -> Callable:
        """The model this guide is for. Assign to re-attach it to a loaded guide."""
        model = None if self._model is None else self._model[0]
        if model is None:
            why = getattr(self, "_nfvi_model_lost", "it was not saved")
            raise RuntimeError(
                f"{type(self).__name__} has no model: Pyro's autoguides do not pickle the "
                f"model, and this guide could not keep it ({why}). Re-attach it with "
                "`guide.model = model` (the same model the guide was fitted to) before "
                "calling the guide."
            )
        return model

    @model.setter
    def model(self, model: Callable) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        # wrapped as AutoContinuous.__init__ does: the model's own init_loc_fn
        init_loc_fn = getattr(self, "_init_loc_fn", init_to_median)
        self._model = (InitMessenger(init_loc_fn)(model),)
        self.__dict__.pop("_nfvi_model_lost", None)

    def __getstate__(self):
        model, master = self._model, self.master
        state = super().__getstate__()  # Pyro's: a copy without the model and master ...
        self._model, self.master = model, master  # ... which it also drops from self
        for key in ("_placement_args", "_nfvi_placement_check"):
            state.pop(key, None)  # the model's data: not part of a saved guide
        try:  # by reference: fails here for a lambda or closure, or when loading
            state["_nfvi_model_pickle"] = pickle.dumps(None if model is None else model[0])
        except Exception as e:  # noqa: BLE001 -- any failure only means "re-attach it"
            state["_nfvi_model_lost"] = f"pickling it failed: {type(e).__name__}: {e}"
        return state

    def __setstate__(self, state) -> None:
        blob = state.pop("_nfvi_model_pickle", None)
        super().__setstate__(state)
        if blob is not None:
            try:
                self._model = (pickle.loads(blob),)
            except Exception as e:  # noqa: BLE001 -- e.g. the model's module is gone
                self._nfvi_model_lost = f"loading it failed: {type(e).__name__}: {e}"

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        """
        As :meth:`torch.nn.Module.load_state_dict`. Parameters only exist after
        the guide has been run once: call ``guide(*args, **kwargs)`` first. For
        models without arguments this method runs that setup itself.
        """
        if self.prototype_trace is None and len(state_dict):
            try:
                self._setup_prototype()
            except TypeError as e:
                raise RuntimeError(
                    f"{type(self).__name__} has no parameters yet: call "
                    "guide(*args, **kwargs) once with the model's arguments "
                    "before load_state_dict()."
                ) from e
        return super().load_state_dict(state_dict, strict=strict, **kwargs)
