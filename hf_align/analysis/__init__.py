"""Layer-wise representation analysis: the one data layer (:mod:`.data`), sample-wise cosine and the CKA family
(exact, streamed, one metric table), neural collapse (:mod:`.collapse`, imported on use), plots."""

from .collect import LayerSimilarity, UndefinedSimilarityWarning, default_pooling, layer_similarity
from .plots import plot_similarity
from .pooling import pool
from .similarity import (
    SIMILARITY_METRICS,
    SimilarityMetric,
    SimilarityUndefinedError,
    cosine,
    debiased_linear_cka,
    hsic1,
    linear_cka,
    minibatch_cka,
    rank_correlation,
    rbf_cka,
    similarity_metric,
)
from .streaming import SimilarityMatrix, StreamingCKA, StreamingCosine, StreamingMean, StreamingMinibatchCKA

__all__ = [
    "SIMILARITY_METRICS",
    "SimilarityMetric",
    "default_pooling",
    "similarity_metric",
    "layer_similarity",
    "LayerSimilarity",
    "UndefinedSimilarityWarning",
    "plot_similarity",
    "pool",
    "SimilarityUndefinedError",
    "cosine",
    "linear_cka",
    "debiased_linear_cka",
    "rbf_cka",
    "hsic1",
    "minibatch_cka",
    "rank_correlation",
    "SimilarityMatrix",
    "StreamingCKA",
    "StreamingCosine",
    "StreamingMean",
    "StreamingMinibatchCKA",
]
