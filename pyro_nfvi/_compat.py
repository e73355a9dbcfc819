"""Every use of a private torch / Pyro interface in this package, in one place.

Each item says why no public API serves and which versions it was checked on. The
whole test suite passes on torch 2.13.0 and pyro-ppl 1.9.2 (see ``pyproject.toml``);
on another release, a failure here is the first thing to look at. Each helper degrades
to the conservative answer when the private name is gone (e.g. "a transform may be
active": take the plain autograd path), so a rename costs speed, not correctness,
except where noted.

One more dependency on torch's internals cannot live here, being an override:
``transforms._base.LadjCacheMixin`` overrides ``Transform.__call__`` and ``_inv_call`` (the
methods that hold torch's identity-keyed cache), see the comment there.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Type

import torch

__all__ = [
    "autoguide_setup_prototype",
    "compile_unavailable_errors",
    "functorch_transforms_active",
    "import_lightning_pytorch",
    "import_torchvision",
    "split_init_messenger",
    "tensor_version",
]


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ...) or a
    forward-mode AD level (``torch.autograd.forward_ad.dual_level``) is in progress.

    Why private: torch has no public query. The hand-written kernels have no batching
    rule or jvp, so inside such a transform the plain autograd loop must run.
    Checked on torch 2.13.0 (``torch._C._are_functorch_transforms_active`` and
    ``torch.autograd.forward_ad._current_level``; both exist since torch 2.0). If either
    name disappears this answers False for it: vmap/jacrev over a stack would then
    raise inside the kernel (tests/test_transforms.py checks this path).
    """
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    dual_level = getattr(torch.autograd.forward_ad, "_current_level", -1)  # -1: none open
    return bool(active is not None and active()) or dual_level >= 0


def tensor_version(t: torch.Tensor) -> int:
    """The version counter of ``t``, bumped by every in-place change.

    Why private: ``Tensor._version`` is the only way to see that a sample was modified
    in place since a cached pair was made (autograd's own "modified by an inplace
    operation" check reads the same counter). Checked on torch 2.13.0; present since
    torch 1.0.
    """
    return t._version


def compile_unavailable_errors() -> Tuple[Type[BaseException], ...]:
    """The exception types that mean "``torch.compile`` cannot run here" (no or a broken
    C++ compiler, a backend that fails to build the kernel), as opposed to a bug in the
    compiled function, which must propagate.

    Why private: torch exposes no public exception types for these. Checked on torch
    2.13.0: ``torch._dynamo.exc.BackendCompilerFailed`` (the backend raised while
    compiling; inductor's ``InductorError`` derives from it),
    ``torch._inductor.exc.InvalidCxxCompiler`` and ``CppCompileError``. Names missing
    from another release are skipped (that release's errors then propagate).
    """
    found = []
    for module, names in (
        ("torch._dynamo.exc", ("BackendCompilerFailed",)),
        ("torch._inductor.exc", ("InvalidCxxCompiler", "CppCompileError")),
    ):
        try:
            mod = __import__(module, fromlist=["_"])
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(found)


def autoguide_setup_prototype(guide, *args, **kwargs) -> None:
    """Run only :class:`pyro.infer.autoguide.AutoGuide`'s prototype setup (trace the
    model, record ``prototype_trace`` and plates) on ``guide``, skipping the setup of the
    subclasses in between (``AutoContinuous`` builds a ``_unpack_latent`` layout that a
    flow guide with hierarchical sites does not use).

    Why private: ``_setup_prototype`` is the hook Pyro's own autoguides override, but it
    is not public API; there is no public way to run the base class's part alone.
    Checked on pyro-ppl 1.9.2 (unchanged since 1.8).
    """
    from pyro.infer.autoguide import AutoGuide

    AutoGuide._setup_prototype(guide, *args, **kwargs)


def split_init_messenger(model: Callable) -> Tuple[Optional[Callable], Callable]:
    """``(init_fn, inner)`` where ``model`` is ``InitMessenger(init_fn)(inner)``, as
    Pyro's ``AutoContinuous.__init__`` wraps the user's model; else ``(None, model)``.

    Why: the guide's placement runs the model's prior every step and sets every site it
    places itself, but under the wrapper the init strategy runs first at each of those
    sites (``init_to_median``: 15 prior draws from the global random stream, then
    overwritten). Running ``InitMessenger(init_fn)(placer(inner))`` instead keeps the
    strategy for any other site and skips it where the placement sets the value.

    Why private: Pyro keeps only the wrapped model, and ``Messenger.__call__`` returns
    ``_bound_partial(partial(_context_wrap, messenger, fn))``, an internal layout (read
    through ``partial.__reduce__``, which also sees it in an unpickled guide's model).
    Checked on pyro-ppl 1.9.2 (the same since 1.8). On another layout this answers
    ``(None, model)``: the placement then runs the wrapped model as before (slower,
    the same values).
    """
    from functools import partial

    from pyro.infer.autoguide.initialization import InitMessenger

    if not isinstance(model, partial):
        return None, model
    # the function and arguments partial itself holds (``_bound_partial`` shadows its
    # ``func`` with a slot, which an unpickled one does not even set)
    _, (fn,), (_, args, _, _) = partial.__reduce__(model)
    if (getattr(fn, "__name__", None) == "_context_wrap" and len(args) == 2
            and isinstance(args[0], InitMessenger) and callable(args[1])):
        return args[0].init_fn, args[1]
    return None, model


def import_torchvision():
    """``import torchvision``, also where its C++ ops cannot load.

    Why: torchvision's wheels on PyPI are CUDA builds. Next to a CPU build of torch (what
    this project installs) their ops library fails to load, which torchvision tolerates,
    but torchvision 0.28's ``_meta_registrations`` then registers fake kernels for
    ``torchvision::nms`` and ``torchvision::qnms`` unconditionally and the import raises
    ``RuntimeError: operator torchvision::nms does not exist``. The data sets this
    package uses need no op: define the two schemas (``torch.library``, public) and import
    again. Checked on torchvision 0.28.0 with torch 2.13.0+cpu.
    """
    import sys

    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            if not hasattr(torch.ops.torchvision, op):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_LIBS.append(lib)  # a Library deregisters its ops when collected
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision
    return torchvision


_TORCHVISION_LIBS: list = []


def import_lightning_pytorch():
    """``import lightning.pytorch``, after :func:`import_torchvision` where torchvision is
    installed: Lightning imports torchvision when it finds it, and would raise the error
    that :func:`import_torchvision` works around."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()
    import lightning.pytorch as pl

    return pl
