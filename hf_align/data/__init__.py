"""hf_align.data: the one base under analysis, training, early exit and the CLI. Imports nothing of hf-align.

* :mod:`.batches`: user data -> model batches (collate, padding, every data form, rank sharding);
* :mod:`.labels`: the one label rule (label keys, class ids in ``[0, num_labels)``, ``-100`` ignored);
* :mod:`.embedded`: real datasets that ship with a dependency (scikit-learn's digits, SciPy's and Python's
  documentation) and the tokenizers trained on them.
"""

from .batches import *  # noqa: F401,F403
from .batches import __all__ as _batches_all
from .embedded import (
    SCIPY_TOPICS,
    digits_split,
    lm_blocks,
    load_digits_dataset,
    load_python_docs_texts,
    load_scipy_docs_dataset,
    train_bpe_tokenizer,
    train_wordpiece_tokenizer,
)
from .labels import *  # noqa: F401,F403
from .labels import __all__ as _labels_all

__all__ = [*_batches_all, *_labels_all, "SCIPY_TOPICS", "digits_split", "lm_blocks", "load_digits_dataset", "load_python_docs_texts",
           "load_scipy_docs_dataset", "train_bpe_tokenizer", "train_wordpiece_tokenizer"]
