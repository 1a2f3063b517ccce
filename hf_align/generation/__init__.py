"""hf_align.generation: early exit for decoder LMs (self-speculative decoding through the shared LM head)."""

from .speculative import (
    SpeculativeDecoderOnlyOutput,
    SpeculativeStats,
    choose_exit_layer,
    speculative_acceptance,
    speculative_generate,
    speculative_sample,
)

__all__ = [
    "SpeculativeDecoderOnlyOutput",
    "SpeculativeStats",
    "choose_exit_layer",
    "speculative_acceptance",
    "speculative_generate",
    "speculative_sample",
]
