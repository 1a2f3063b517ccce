"""The ``hf-align`` command line (on top of everything else; nothing below imports it).

* :mod:`.commands`: the commands and the parser (``train``, ``analyze``, ``evaluate``, ``demo``, ``layers``);
* :mod:`.loading`: what the commands load (model folder / Hub id, processor, labelled dataset) and their
  ``HfArgumentParser`` data / model arguments;
* :mod:`.lm`: ``train`` / ``evaluate`` for causal LMs (documents packed into blocks, the LM head kept, per-block
  perplexity, per-exit acceptance, the measured self-speculative speed-up);
* :mod:`.demo`: the main job on embedded data.

``hf-align --version`` answers without importing the commands (or torch).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (argparse's own errors, ``--help`` and ``--version`` raise
    ``SystemExit``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--version"]:
        from .. import __version__

        print(f"hf-align {__version__}")
        raise SystemExit(0)
    from .commands import main as run

    return run(args)


def __getattr__(name: str):
    # hf_align.cli was one module: its other names (build_parser, COMMANDS, cmd_train...) are in .commands
    import importlib

    if name.startswith("__") or name in ("commands", "loading", "demo"):
        raise AttributeError(f"module 'hf_align.cli' has no attribute {name!r}")
    commands = importlib.import_module(".commands", __name__)
    try:
        return getattr(commands, name)
    except AttributeError:
        raise AttributeError(f"module 'hf_align.cli' has no attribute {name!r}") from None


__all__ = ["main"]
