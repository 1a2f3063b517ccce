"""hf_align.metrics: ``evaluate`` modules (thin wrappers over :mod:`hf_align.analysis`), one folder each."""

import os

__all__ = ["path"]


def path(name: str) -> str:
    """The folder of the ``evaluate`` module ``name`` (``"cka"``, ``"neural_collapse"``) inside the installed
    package, for ``evaluate.load(path("cka"), "linear")``."""
    folder = os.path.join(os.path.dirname(__file__), name)
    if not os.path.isfile(os.path.join(folder, f"{name}.py")):
        names = sorted(d for d in os.listdir(os.path.dirname(__file__)) if os.path.isfile(os.path.join(os.path.dirname(__file__), d, f"{d}.py")))
        raise ValueError(f"no evaluate module {name!r} in hf_align.metrics; expected one of {names}")
    return folder
