"""`evaluate` metric module for neural collapse: a thin wrapper over :mod:`hf_align.analysis.collapse`.

    metric = evaluate.load("path/to/hf_align/metrics/neural_collapse")
    metric.compute(features=H, references=y, predictions=yhat, classifier_weight=W)

    token = evaluate.load("path/to/hf_align/metrics/neural_collapse", "token")   # causal LMs: one row per sequence
    token.compute(features=[H_seq (T x d), ...], references=[next-token ids (T), -100 = none], classifier_weight=W)
"""

import datasets
import evaluate
import numpy as np

from hf_align.analysis.collapse import ClassStatistics, collapse_metrics, token_collapse_metrics

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

Token level (config "token", causal LMs: the vocabulary as the classes; see docs/collapse.md):
    features: one entry per sequence, its features (T x d), e.g. the LM head's input at every position.
    references: one entry per sequence, the class of each position's feature (the next token; T ints), -100 for
        positions without a target (padding, the last position).
    predictions: not used.
    classifier_weight (K x d, optional): the LM head; num_classes (optional): K, default its rows.
    min_count (int, optional): classes with fewer targets are left out (default 1: the classes seen).
    weightings (list, optional): "balanced" and/or "frequency" (keys *_freq).
Returns (token level):
    nc1, cdnv, mean_norm, equinorm, gnc2_means_margin(_mean, _median), gnc3 (and *_freq), with the head
    gnc2_W_margin(_mean, _median), gnc2_W_seen_margin(...), tammes_max_cosine, zero_rows; and num_tokens,
    num_samples, num_seen, num_rare, num_unseen.
"""

_CITATION = """@inproceedings{jiang2024generalized, title={Generalized Neural Collapse for a Large Number of Classes},
author={Jiang, Jiachen and Zhou, Jinxin and Wang, Peng and Qu, Qing and Mixon, Dustin and You, Chong and Zhu, Zhihui},
booktitle={ICML}, year={2024}}"""


_NO_PREDICTION = -(2**62)  # stands for "no predictions passed" in evaluate's predictions column


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NeuralCollapse(evaluate.Metric):
    def _info(self):
        if self.config_name == "token":
            features = datasets.Features(
                {
                    "features": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                    "references": datasets.Sequence(datasets.Value("int64")),
                    "predictions": datasets.Value("int64"),
                }
            )
            return evaluate.MetricInfo(description=_DESCRIPTION, citation=_CITATION,
                                       inputs_description=_KWARGS_DESCRIPTION, features=features)
        if self.config_name not in ("default", None):
            raise ValueError(f"neural_collapse has the configurations 'default' and 'token', got {self.config_name!r}")
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
        global_mean="classes", gnc2_margin=True, min_count=1, weightings=("balanced", "frequency"),
    ):
        if self.config_name == "token":
            rows = [np.asarray(f, dtype=np.float64) for f in features]
            refs = [np.asarray(r, dtype=np.int64).reshape(-1) for r in references]
            for i, (f, r) in enumerate(zip(rows, refs)):
                if f.ndim != 2 or f.shape[0] != r.size:
                    raise ValueError(f"sequence {i}: features must be (T, d) with one reference per position; got "
                                     f"{f.shape} and {r.size} references")
            X = np.concatenate(rows) if rows else np.zeros((0, 0))
            y = np.concatenate(refs) if refs else np.zeros(0, np.int64)
            out = token_collapse_metrics(X, y, classifier_weight, num_classes=num_classes, min_count=min_count,
                                         weightings=weightings, gnc2_margin=gnc2_margin)
            return {k: float(v) for k, v in out.items()}
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
