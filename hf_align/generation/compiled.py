"""The compiled path of hf-align's decoders: ``torch.compile`` of block segments, where ``generate`` would compile.

transformers compiles the decoding step of ``generate`` when the cache is compileable (``cache_implementation=
"static"``) on a GPU-like device (or with ``compile_config._compile_all_devices``), unless ``disable_compile``.
Self-speculative decoding runs blocks in segments instead of whole forwards: the draft steps (blocks 1..k on one
position), the verify pass (blocks k+1..L on n+1 positions) and plain steps (blocks 1..L on one position). Each
segment, at each (batch, positions) shape, runs through its own compiled copy of
:func:`hf_align.layers.run_block_sequence` (the loop every block runs through), with
``generation_config.compile_config``'s options.

Graphs are kept per compile configuration, in this module, never on the model. Dynamo keeps graphs per code
object, so each segment gets its own copy of the loop's code object (one shared function would hit dynamo's
recompile limit across the draft and verify segments of several (k, n)). The copies are held least-recently-used
first and dropped past :data:`MAX_SEGMENTS` per configuration and :data:`MAX_CONFIGURATIONS` configurations, so a
long process that decodes with many models or shapes does not accumulate graphs without bound.
"""

from __future__ import annotations

import threading
import types
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from ..layers import run_block_sequence

__all__ = ["MAX_CONFIGURATIONS", "MAX_SEGMENTS", "CompiledSegments", "compiled_segment_runner"]

MAX_SEGMENTS = 64  # compiled segments kept per compile configuration (least recently used dropped first)
MAX_CONFIGURATIONS = 4  # compile configurations kept

_LOCK = threading.Lock()


class CompiledSegments:
    """``torch.compile(run_block_sequence, **options)`` per (first block, last block, batch, positions); called as
    ``runner(first_block_index, blocks, hidden, arguments)`` (the ``runner`` of :meth:`LayerView.run_blocks`)."""

    def __init__(self, options: dict[str, Any], max_segments: int = MAX_SEGMENTS):
        self.options = options
        self.max_segments = max_segments
        self.functions: OrderedDict[tuple[int, int, int, int], Any] = OrderedDict()

    def _function(self, key: tuple[int, int, int, int]):
        with _LOCK:
            function = self.functions.get(key)
            if function is not None:
                self.functions.move_to_end(key)
                return function
            code = run_block_sequence.__code__.replace()
            name = f"run_block_sequence_{key[0]}_{key[1]}_{key[2]}x{key[3]}"
            copy = types.FunctionType(code, run_block_sequence.__globals__, name)
            function = self.functions[key] = torch.compile(copy, **self.options)
            while len(self.functions) > self.max_segments:
                self.functions.popitem(last=False)
            return function

    def __call__(self, start: int, blocks: list[nn.Module], hidden: torch.Tensor,
                 arguments: list[tuple[tuple, dict]]) -> torch.Tensor:
        key = (start, start + len(blocks), hidden.shape[0], hidden.shape[1])
        return self._function(key)(blocks, hidden, arguments)


_COMPILED: OrderedDict[str, CompiledSegments] = OrderedDict()


def compiled_segment_runner(hf_model: nn.Module, config: GenerationConfig, cache: Any) -> CompiledSegments | None:
    """The compiled block runner of a call, or None: transformers' own rule for compiling the decoding steps of
    ``generate`` (``GenerationMixin._valid_auto_compile_criteria``: a compileable, non-dynamic cache, i.e.
    ``cache_implementation="static"``; a GPU-like device, or ``compile_config._compile_all_devices``; not
    ``disable_compile``; no quantizer that forbids it; no CPU/disk offload), and its options
    (``generation_config.compile_config``, else the model's default: inductor, ``mode="reduce-overhead"``).

    The prefill runs eagerly, as in ``generate``."""
    if not hasattr(hf_model, "_valid_auto_compile_criteria"):
        return None
    if not hf_model._valid_auto_compile_criteria({"cache": cache}, config):
        return None
    compile_config = config.compile_config or hf_model._default_compile_config()
    options = compile_config.to_dict()
    key = repr(sorted(options.items(), key=lambda item: item[0]))
    with _LOCK:
        runner = _COMPILED.get(key)
        if runner is None:
            runner = _COMPILED[key] = CompiledSegments(options)
        _COMPILED.move_to_end(key)
        while len(_COMPILED) > MAX_CONFIGURATIONS:
            _COMPILED.popitem(last=False)
    return runner
