"""Saving and loading a flow guide: a state dict loaded before the guide's first call."""

from __future__ import annotations


class _GuideSaving:
    """Loading of saved parameters (mixed into :class:`~pyro_nfvi.guides.AutoNormalizingFlow`).

    Like all Pyro autoguides, a flow guide creates its parameters on the first call, so run
    the guide once (with the model's arguments) before :meth:`load_state_dict`::

        guide = AutoNormalizingFlow(model, init_transform_fn)
        guide(data)                    # creates the parameters
        guide.load_state_dict(state)   # now the keys match

    For a model without arguments :meth:`load_state_dict` does this setup itself.
    """

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
