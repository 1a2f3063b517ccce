"""Registration without importing heavy modules: run an action once a module has been imported.

``import hf_align`` must not import torch, transformers' pipelines or diffusers (seconds each). Yet after it,
``pipeline("early-exit-classification")``, the multi-exit Auto classes and ``DiffusionPipeline.from_pretrained`` of a
super-resolution folder must work. So each registration waits for the module it registers into: if that module is
already imported the action runs at once, otherwise a finder on ``sys.meta_path`` wraps the module's loader and runs
the action right after the module has executed (the first time anybody imports it). Imports nothing of hf-align.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings
from collections.abc import Callable

_PENDING: dict[str, list[Callable[[], None]]] = {}
_LOCK = threading.RLock()


def _initialised(name: str) -> bool:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


def _run(name: str) -> None:
    with _LOCK:
        actions = _PENDING.pop(name, [])
    for action in actions:
        try:
            action()
        except Exception as error:  # never break the user's import; say what did not get registered
            warnings.warn(f"hf-align could not register {getattr(action, '__qualname__', action)} after importing "
                          f"{name}: {error!r}", RuntimeWarning, stacklevel=2)


class _RunAfterLoader(importlib.abc.Loader):
    """The module's own loader, plus the pending actions once the module has executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _run(module.__name__)

    def __getattr__(self, name):  # get_resource_reader, is_package, get_code...: the module's own loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RunAfterLoader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def when_imported(name: str, action: Callable[[], None]) -> None:
    """Run ``action()`` now if module ``name`` is imported, else right after its first import."""
    with _LOCK:
        if not _initialised(name):
            _PENDING.setdefault(name, []).append(action)
            if _FINDER not in sys.meta_path:
                sys.meta_path.insert(0, _FINDER)
            return
    action()
