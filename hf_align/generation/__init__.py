"""Early exit for decoders: per-token exit (CALM) and the cost of each exit depth."""

from .cost import ExitCostTable, exit_costs, plot_exit_costs
from .per_token_exit import CONFIDENCES, EarlyExitGenerateOutput, PerTokenEarlyExit, early_exit_generate

__all__ = [
    "CONFIDENCES",
    "EarlyExitGenerateOutput",
    "ExitCostTable",
    "PerTokenEarlyExit",
    "early_exit_generate",
    "exit_costs",
    "plot_exit_costs",
]
