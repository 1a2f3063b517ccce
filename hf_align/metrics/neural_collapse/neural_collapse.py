"""`evaluate` metric module for neural collapse: a thin wrapper over :mod:`hf_align.analysis.collapse`.

    metric = evaluate.load("path/to/hf_align/metrics/neural_collapse")
    metric.compute(features=H, references=y, predictions=yhat, classifier_weight=W)
"""

import datasets
import evaluate
import numpy as np

from hf_align.analysis.collapse import ClassStatistics, collapse_metrics

_DESCRIPTION = """Neural-collapse metrics of features and a linear classifier (Papyan et al. 2020; Zhu et al. 2021;
Jiang et al. 2024): NC1 = tr(Sigma_W Sigma_B^+)/K (and Papyan's convention without /K), NC2 for the
centered class means and for W (equinorm CoV, equiangularity, cosine std, ETF distance), NC3 (Papyan,
Zhu), NC4 (nearest-class-center mismatch with the network's predictions), and for K > d+1 the exact
one-vs-rest margin GNC2 of the row-normalised W, GNC3 and the Tammes quantity. See docs/collapse.md."""

_KWARGS_DESCRIPTION = """
Args:
    features: list of feature vectors (N x d), e.g. penultimate-layer features.
    references: list of int class labels in [0, num_classes).
    predictions: list of int network predictions (optional; used for NC4, left out without them).
    num_classes (int, optional): K; default max(references) + 1.
    classifier_weight (array K x d, optional): the last linear layer's weight; enables NC2(W), NC3, GNC2,
        GNC3 and the Tammes quantity.
    global_mean (str, optional): "classes" (mean of class means, default) or "samples" (Papyan's code).
    gnc2_margin (bool, optional): compute the exact GNC2 margin (default True).
Returns:
    dict of floats: nc1, nc1_papyan, nc2_means_*, nc4, and with classifier_weight nc2_W_*, tammes_max_cosine,
    gnc2_margin, nc3_papyan, nc3_zhu, gnc3.
"""

_CITATION = """@inproceedings{jiang2024generalized, title={Generalized Neural Collapse for a Large Number of Classes},
author={Jiang, Jiachen and Zhou, Jinxin and Wang, Peng and Qu, Qing and Mixon, Dustin and You, Chong and Zhu, Zhihui},
booktitle={ICML}, year={2024}}"""


_NO_PREDICTION = -(2**62)  # stands for "no predictions passed" in evaluate's predictions column


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NeuralCollapse(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "features": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                    "predictions": datasets.Value("int64"),
                }
            ),
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """``predictions`` are optional (only NC4 needs them); every other input as documented."""
        if predictions is None and references is not None:
            if kwargs.get("features") is None:
                raise ValueError("neural_collapse needs features (N x d) and references (N class ids)")
            predictions = [_NO_PREDICTION] * len(references)  # a column evaluate can store; NC4 is left out
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(
        self, features, references, predictions, num_classes=None, classifier_weight=None,
        global_mean="classes", gnc2_margin=True,
    ):
        X = np.asarray(features, dtype=np.float64)
        y = np.asarray(references)
        predictions = np.asarray(predictions)
        if predictions.size and np.all(predictions == _NO_PREDICTION):
            predictions = None
        if num_classes is None:
            num_classes = int(y.max()) + 1 if y.size else 0
        stats = ClassStatistics(int(num_classes), X.shape[1] if X.ndim == 2 else None).update(X, y)
        out = collapse_metrics(
            stats, classifier_weight, features=None if predictions is None else X, predictions=predictions,
            global_mean=global_mean, gnc2_margin=gnc2_margin,
        )
        return {k: float(v) for k, v in out.items()}
