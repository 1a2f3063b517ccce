"""hf-align: make a transformer's layers first-class on the Hugging Face stack.

Importing the package registers ``pipeline("early-exit-classification")`` and the multi-exit Auto model.
"""

__version__ = "0.1.0"

from .analysis import (  # noqa: E402
    LayerSimilarity,
    SimilarityUndefinedError,
    cosine,
    debiased_linear_cka,
    hsic1,
    layer_similarity,
    linear_cka,
    minibatch_cka,
    rank_correlation,
    rbf_cka,
)
from .collapse import ClassStatistics, collapse_metrics, collapse_report, gnc2, plot_collapse_progression  # noqa: E402
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
from .trainers import AlignedTrainer, AlignedTrainingArguments  # noqa: E402

register_auto_classes()
register_pipeline()

__all__ = [
    "LayerSimilarity",
    "SimilarityUndefinedError",
    "cosine",
    "debiased_linear_cka",
    "hsic1",
    "layer_similarity",
    "linear_cka",
    "minibatch_cka",
    "rank_correlation",
    "rbf_cka",
    "AlignedTrainer",
    "AlignedTrainingArguments",
    "ClassStatistics",
    "EarlyExitClassificationPipeline",
    "EarlyExitModel",
    "LayerView",
    "MultiExitConfig",
    "MultiExitModel",
    "add_exit_heads",
    "calibrate",
    "collapse_metrics",
    "collapse_report",
    "exit_curve",
    "gnc2",
    "plot_collapse_progression",
    "register_family",
    "supported_families",
    "__version__",
]
