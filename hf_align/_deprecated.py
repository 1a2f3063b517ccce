"""Old import paths: a module that moved keeps a thin shim at its old path that warns once (on its first import)
and forwards every name, public or private, to the new home."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

REMOVAL = "0.3"  # the hf-align version in which the old paths go


def moved(old: str, *new: str, removal: str = REMOVAL) -> tuple[Callable[[str], Any], list[str]]:
    """Warn (``FutureWarning``, once: a module body runs once per process) that module ``old`` moved to ``new``
    and return ``(__getattr__, __all__)`` for the shim, looking names up in the new modules in order::

        __getattr__, __all__ = moved(__name__, "hf_align.data.batches", "hf_align.data.labels")
    """
    warnings.warn(f"{old} moved to {' / '.join(new)}; the old import path will be removed in hf-align {removal}",
                  FutureWarning, stacklevel=3)
    modules = [importlib.import_module(name) for name in new]
    names = [n for m in modules for n in getattr(m, "__all__", [k for k in vars(m) if not k.startswith("_")])]

    def __getattr__(name: str) -> Any:
        for module in modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {old!r} (moved to {' / '.join(new)}) has no attribute {name!r}")

    return __getattr__, list(dict.fromkeys(names))
