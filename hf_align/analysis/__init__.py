"""Layer-wise representation analysis: sample-wise cosine and the CKA family (exact, streamed), plots."""

from .collect import LayerSimilarity, UndefinedSimilarityWarning, layer_similarity
from .plots import plot_similarity
from .pooling import pool
from .similarity import (
    SimilarityUndefinedError,
    cosine,
    debiased_linear_cka,
    hsic1,
    linear_cka,
    minibatch_cka,
    rank_correlation,
    rbf_cka,
)
from .streaming import SimilarityMatrix, StreamingCKA, StreamingCosine, StreamingMean, StreamingMinibatchCKA

__all__ = [
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
