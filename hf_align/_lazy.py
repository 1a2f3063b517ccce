"""The one lazy-import mechanism (PEP 562): names imported from their module on first attribute access."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any


def lazy_exports(package: str, table: dict[str, str], namespace: dict[str, Any],
                 submodules: Sequence[str] = ()) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for a package whose names in ``table`` (name -> relative module) are imported
    on first use and then cached in ``namespace`` (the package's ``globals()``); ``submodules`` are imported on
    first attribute access too (``hf_align.analysis`` without ``import hf_align.analysis``)::

        __getattr__, __dir__ = lazy_exports(__name__, {"DREAMTrainer": ".trainers.dream_trainer"}, globals())
    """

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            namespace[name] = value
            return value
        if name in submodules:
            return importlib.import_module(f".{name}", package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table) | set(submodules))

    return __getattr__, __dir__
