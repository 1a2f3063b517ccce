"""hf_align.modeling: early exit through the shared head, and the separate-heads multi-exit baseline."""

from .calibration import ExitCurve, calibrate, exit_curve
from .early_exit import POLICIES, EarlyExitConfig, EarlyExitModel, EarlyExitOutput
from .multi_exit import MultiExitConfig, MultiExitModel, add_exit_heads, load_multi_exit, register_auto_classes

__all__ = [
    "POLICIES",
    "EarlyExitConfig",
    "EarlyExitModel",
    "EarlyExitOutput",
    "ExitCurve",
    "MultiExitConfig",
    "MultiExitModel",
    "add_exit_heads",
    "calibrate",
    "exit_curve",
    "load_multi_exit",
    "register_auto_classes",
]
