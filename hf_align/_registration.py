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

# the modules hf-align registers into
AUTO_CLASSES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto",
                "transformers.modeling_utils")  # the multi-exit config and model (the first of them imported)
PIPELINES = "transformers.pipelines"  # pipeline("early-exit-classification")
DIFFUSERS = "diffusers"  # SuperResolutionPipeline in the diffusers namespace

_LOCK = threading.Lock()  # guards _PENDING only


class _Registration:
    """One action, run once after the first of ``names`` has been imported. An ``ImportError`` (a module it needs is
    itself still being imported) leaves it waiting for the others; any other failure is a warning, never an error in
    the user's import."""

    def __init__(self, action: Callable[[], None], names: tuple[str, ...]):
        self.action, self.names, self.done = action, names, False

    def run(self, just_imported: str | None = None) -> None:
        # no lock held while the action imports (another thread may hold an import lock and wait for ours); the
        # actions are idempotent, so two threads running one at the same time is harmless
        if self.done:
            return
        try:
            self.action()
            self.done = True
        except ImportError as error:
            if any(n != just_imported and not _initialised(n) for n in self.names):
                return  # retried when one of the other modules is imported
            self.done = True
            self._warn(error)
        except Exception as error:
            self.done = True
            self._warn(error)

    def _warn(self, error: Exception) -> None:
        warnings.warn(f"hf-align could not run {getattr(self.action, '__qualname__', self.action)} after importing "
                      f"{' / '.join(self.names)}: {error!r}", RuntimeWarning, stacklevel=3)


_PENDING: dict[str, list[_Registration]] = {}


def _initialised(name: str) -> bool:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None)
    return module is not None and not getattr(spec, "_initializing", False)


def _run(name: str) -> None:
    with _LOCK:
        registrations = _PENDING.pop(name, [])
    for registration in registrations:
        registration.run(just_imported=name)


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


def when_imported(names: str | tuple[str, ...], action: Callable[[], None]) -> None:
    """Run ``action()`` once: now if one of the modules ``names`` is imported, else right after the first of them is
    imported (an ``ImportError`` from the action retries it at the next one)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    registration = _Registration(action, names)
    if any(_initialised(n) for n in names):
        registration.run()
    if registration.done:
        return
    with _LOCK:
        for name in names:
            if not _initialised(name):
                _PENDING.setdefault(name, []).append(registration)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
