"""Moved to :mod:`hf_align.cli.loading`; this path warns once and goes in hf-align 0.3."""

from ._deprecated import moved

__getattr__, __all__ = moved(__name__, "hf_align.cli.loading")
