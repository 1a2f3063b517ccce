"""hf-align: make a transformer's layers first-class on the Hugging Face stack.

Importing the package registers ``pipeline("early-exit-classification")``, the multi-exit Auto model and
``SuperResolutionPipeline`` for ``diffusers.DiffusionPipeline.from_pretrained``. The analysis, neural-collapse and
DREAM training APIs are imported on first use (they pull in scipy, scikit-image...).
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._lazy import lazy_exports  # noqa: E402
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


def _register_diffusers_pipeline() -> None:
    # DiffusionPipeline.from_pretrained(<SR folder or repo id>) looks the class up in the `diffusers` namespace
    from .pipelines.super_resolution import register_diffusers_pipeline

    register_diffusers_pipeline()


_register_diffusers_pipeline()

_LAZY = {
    # layer-wise similarity (analysis/)
    **{name: ".analysis" for name in ("LayerSimilarity", "SimilarityUndefinedError", "cosine", "debiased_linear_cka",
                                      "hsic1", "layer_similarity", "linear_cka", "minibatch_cka", "rank_correlation",
                                      "rbf_cka")},
    # neural collapse
    **{name: ".analysis.collapse" for name in ("ClassStatistics", "collapse_metrics", "collapse_report", "gnc2",
                                      "plot_collapse_progression")},
    # self-speculative decoding (generation/)
    **{name: ".generation" for name in ("SpeculativeStats", "choose_exit_layer", "self_speculative", "speculative_generate")},
    # DREAM and super-resolution (diffusers)
    "dream_rectify": ".diffusion",
    "sr_unet": ".diffusion",
    "SuperResolutionPipeline": ".pipelines.super_resolution",
    "DREAMTrainer": ".trainers.dream_trainer",
    "DREAMTrainingArguments": ".trainers.dream_config",
    # decoders: per-token early exit (CALM) and the cost of each exit depth
    **{name: ".generation" for name in ("ExitCostTable", "PerTokenEarlyExit", "early_exit_generate", "exit_costs",
                                        "per_token_exit", "plot_exit_costs")},
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


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
