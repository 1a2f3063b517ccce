"""CKA as an `evaluate` metric: similarity of two representations of the same samples.

Load it from this folder:  ``evaluate.load("path/to/hf_align/metrics/cka", "linear_cka")``. The configuration
names are the metric names of ``hf_align.analysis.similarity.SIMILARITY_METRICS`` (the same names as the functions
and ``layer_similarity(metric=...)``); the short names ``linear``, ``debiased``, ``rbf``, ``minibatch`` still work.
"""

import datasets
import evaluate

from hf_align.analysis.similarity import SIMILARITY_METRICS, similarity_metric

_DESCRIPTION = """
Centered Kernel Alignment between two feature matrices of the same n samples: `predictions` holds the
n feature vectors of representation X (width d1), `references` those of Y (width d2; may differ from d1).
Configurations (the config name picks the estimator; the short name in brackets also works):
  linear_cka           (linear) CKA = ||Y~^T X~||_F^2 / (||X~^T X~||_F ||Y~^T Y~||_F), X~ = column-centred X
                       (Kornblith et al. 2019)
  debiased_linear_cka  (debiased) linear CKA with the unbiased HSIC estimator (U-centred Grams), needs n >= 4
  rbf_cka              (rbf) RBF-kernel CKA, bandwidth = sigma * median pairwise distance (kwarg `sigma`, default 1)
  minibatch_cka        (minibatch) mean unbiased HSIC_1 over consecutive minibatches (Nguyen et al. 2021; kwarg
                       `batch_size`)
  cosine               the sample-wise cosine of Jiang et al. 2025, (1/n) sum_i cos(x_i, y_i) (needs d1 == d2;
                       kwarg `center`)
Constant (zero-variance) features make CKA undefined: the metric raises a ValueError
(SimilarityUndefinedError) instead of returning NaN.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of n feature vectors (representation X).
    references: list of n feature vectors (representation Y).
    sigma (float, rbf only): bandwidth multiplier, default 1.0.
    debiased (bool, rbf only): U-centre the RBF Grams, default False.
    batch_size (int, minibatch only): minibatch size (>= 4), default 256.
    drop_last (bool, minibatch only): leave out a trailing minibatch of < 4 samples, default False.
    center (bool, cosine only): subtract each representation's mean first, default False.
Returns:
    {"cka": float} (or {"cosine": float} for the cosine configuration).
Example:
    >>> cka = evaluate.load("hf_align/metrics/cka", "linear_cka")
    >>> cka.compute(predictions=[[1, 0], [0, 1], [1, 1], [2, 0]], references=[[2, 0], [0, 2], [2, 2], [4, 0]])
    {'cka': 1.0}
"""

_CITATION = """
@inproceedings{kornblith2019similarity, title={Similarity of Neural Network Representations Revisited},
  author={Kornblith, Simon and Norouzi, Mohammad and Lee, Honglak and Hinton, Geoffrey}, booktitle={ICML}, year={2019}}
@inproceedings{nguyen2021wide, title={Do Wide and Deep Networks Learn the Same Things?},
  author={Nguyen, Thao and Raghu, Maithra and Kornblith, Simon}, booktitle={ICLR}, year={2021}}
"""

_CONFIGS = tuple(SIMILARITY_METRICS)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CKA(evaluate.Metric):
    def _info(self):
        if self.config_name == "default":
            self.config_name = "linear_cka"
        try:
            self.config_name = similarity_metric(self.config_name).name
        except ValueError:
            raise ValueError(f"unknown CKA configuration {self.config_name!r}; expected one of {_CONFIGS}") from None
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/1905.00414", "https://arxiv.org/abs/2010.15327"],
        )

    def _compute(self, predictions, references, sigma=1.0, debiased=False, batch_size=256, drop_last=False, center=False):
        x, y = _matrix(predictions, "predictions"), _matrix(references, "references")
        fn = SIMILARITY_METRICS[self.config_name].function
        if self.config_name == "rbf_cka":
            return {"cka": fn(x, y, sigma=sigma, debiased=debiased)}
        if self.config_name == "minibatch_cka":
            return {"cka": fn(x, y, batch_size=batch_size, drop_last=drop_last)}
        if self.config_name == "cosine":
            return {"cosine": fn(x, y, center=center)}
        return {"cka": fn(x, y)}


def _matrix(rows, name):
    import numpy as np

    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise ValueError(f"{name}: every feature vector must have the same length, got lengths {sorted(widths)}")
    return np.asarray(rows, dtype=np.float64)
