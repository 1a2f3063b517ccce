"""hf_align.generation: early exit for decoder LMs through the shared LM head.

Self-speculative decoding (draft with the first k blocks, verify with all), per-token early exit (CALM), the
cost of every exit depth, and the measured speed-up of self-speculative decoding per (k, n) (``speculative_profile``).
"""

from .cost import ExitCostTable, exit_costs, plot_exit_costs
from .per_token_exit import CONFIDENCES, EarlyExitGenerateOutput, PerTokenEarlyExit, early_exit_generate, per_token_exit
from .profile import SpeculativeProfile, speculative_profile
from .speculative import (
    SpeculativeDecoderOnlyOutput,
    SpeculativeStats,
    choose_exit_layer,
    self_speculative,
    speculative_acceptance,
    speculative_generate,
    speculative_sample,
)

__all__ = [
    "CONFIDENCES",
    "EarlyExitGenerateOutput",
    "ExitCostTable",
    "PerTokenEarlyExit",
    "SpeculativeDecoderOnlyOutput",
    "SpeculativeProfile",
    "SpeculativeStats",
    "choose_exit_layer",
    "early_exit_generate",
    "exit_costs",
    "per_token_exit",
    "plot_exit_costs",
    "self_speculative",
    "speculative_acceptance",
    "speculative_generate",
    "speculative_profile",
    "speculative_sample",
]
