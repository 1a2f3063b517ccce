"""hf-align: make a transformer's layers first-class on the Hugging Face stack.

Importing the package registers ``pipeline("early-exit-classification")`` and the multi-exit Auto model.
The analysis, neural-collapse and diffusion APIs are imported on first use (they pull in diffusers, scipy...).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .layers import LayerView, register_family, supported_families  # noqa: E402
from .modeling import (  # noqa: E402
    EarlyExitModel,
    MultiExitConfig,
    MultiExitModel,
    add_exit_heads,
    calibrate,
    exit_curve,
    register_auto_classes,
)
from .pipelines.early_exit_classification import EarlyExitClassificationPipeline, register_pipeline  # noqa: E402
from .trainers.aligned_config import AlignedTrainingArguments  # noqa: E402
from .trainers.aligned_trainer import AlignedTrainer  # noqa: E402

register_auto_classes()
register_pipeline()

_LAZY = {
    # layer-wise similarity (analysis/)
    **{name: ".analysis" for name in ("LayerSimilarity", "SimilarityUndefinedError", "cosine", "debiased_linear_cka",
                                      "hsic1", "layer_similarity", "linear_cka", "minibatch_cka", "rank_correlation",
                                      "rbf_cka")},
    # neural collapse
    **{name: ".collapse" for name in ("ClassStatistics", "collapse_metrics", "collapse_report", "gnc2",
                                      "plot_collapse_progression")},
    # DREAM and super-resolution (diffusers)
    "dream_rectify": ".diffusion",
    "sr_unet": ".diffusion",
    "SuperResolutionPipeline": ".pipelines.super_resolution",
    "DREAMTrainer": ".trainers.dream_trainer",
    "DREAMTrainingArguments": ".trainers.dream_config",
    # decoders: per-token early exit (CALM) and the cost of each exit depth
    **{name: ".generation" for name in ("ExitCostTable", "PerTokenEarlyExit", "early_exit_generate", "exit_costs",
                                        "plot_exit_costs")},
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AlignedTrainer",
    "AlignedTrainingArguments",
    "EarlyExitClassificationPipeline",
    "EarlyExitModel",
    "LayerView",
    "MultiExitConfig",
    "MultiExitModel",
    "add_exit_heads",
    "calibrate",
    "exit_curve",
    "register_family",
    "supported_families",
    *sorted(_LAZY),
    "__version__",
]
