"""Embedded real data that ships with a dependency (scikit-learn), as `datasets.Dataset` objects."""

from __future__ import annotations

import re

import numpy as np


def digits_split(labels: np.ndarray, test_size: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train indices, test indices)`` of the digits: stratified by label, seeded. The one split of the digits
    (:func:`load_digits_dataset` and the CLI's ``embedded:digits`` both use it)."""
    from sklearn.model_selection import train_test_split

    return tuple(train_test_split(np.arange(len(labels)), test_size=test_size, random_state=seed, stratify=labels))


def load_digits_dataset(test_size: float = 0.25, seed: int = 0, image_size: int = 8):
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as a ``DatasetDict``.

    Columns: ``pixel_values`` (1, image_size, image_size) float32 scaled to [-1, 1] and ``labels`` (int).
    The split is stratified and seeded, so the same call gives the same train/test sets.
    """
    from datasets import Dataset, DatasetDict
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # (N, 8, 8) in [-1, 1]
    if image_size != 8:
        import torch
        import torch.nn.functional as F

        images = F.interpolate(torch.from_numpy(images)[:, None], size=(image_size, image_size), mode="bilinear",
                               align_corners=False)[:, 0].numpy()
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = digits_split(labels, test_size, seed)

    def build(idx):
        return Dataset.from_dict({"pixel_values": images[idx][:, None], "labels": labels[idx]}).with_format("torch")

    return DatasetDict(train=build(idx_train), test=build(idx_test))


SCIPY_TOPICS = ("linalg", "signal", "stats", "optimize", "special", "ndimage", "interpolate", "sparse")
_SECTION_END = re.compile(r"\n(Examples|References|See Also|Notes)\n-+")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
_PARAM_LINE = re.compile(r"^\w[\w ,*]*\s:\s")
_HEADERS = {"Parameters", "Returns", "Raises", "Attributes", "Methods", "Yields", "Other Parameters", "Warns"}


def _prose_paragraphs(doc: str, max_chars: int = 400) -> list[str]:
    """Prose paragraphs of a numpydoc docstring: no signatures, section headers, parameter lines or examples."""
    paragraphs = []
    for para in _SECTION_END.split(doc)[0].split("\n\n"):
        lines = [ln for ln in para.split("\n") if not re.match(r"^\s*-+\s*$", ln) and ln.strip() not in _HEADERS]
        text = " ".join(" ".join(ln for ln in lines if not _PARAM_LINE.match(ln)).split())
        if len(text) >= 30 and not _SIGNATURE.match(text) and ">>>" not in text:
            paragraphs.append(text[:max_chars])
    return paragraphs


def load_scipy_docs_dataset(topics=SCIPY_TOPICS, test_size: float = 0.25, seed: int = 0):
    """Real English text that ships with a dependency: SciPy's own documentation, labelled by subpackage.

    Each sample is one prose paragraph of the docstring of a public object of ``scipy.<topic>`` (signature
    lines, section headers, parameter lines and examples removed); the label is the subpackage (linear
    algebra, signal processing, statistics, optimisation, special functions, image processing,
    interpolation, sparse matrices). The split is by documented *object* (all paragraphs of one function go
    to the same side, stratified by topic), so the test set holds functions never seen in training.
    Returns a ``DatasetDict`` with columns ``text``, ``labels``, ``object``.
    """
    import importlib
    import inspect

    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    groups: dict[str, list[tuple[str, int]]] = {}
    for label, topic in enumerate(topics):
        module = importlib.import_module(f"scipy.{topic}")
        seen_docs: set[str] = set()  # aliases share a docstring: keep one, so no text is on both sides of the split
        for name in sorted(getattr(module, "__all__", dir(module))):
            obj = getattr(module, name, None)
            if name.startswith("_") or obj is None or inspect.ismodule(obj):
                continue
            doc = inspect.getdoc(obj)
            if not doc or doc in seen_docs:
                continue
            seen_docs.add(doc)
            paragraphs = _prose_paragraphs(doc)
            if paragraphs:
                groups[f"scipy.{topic}.{name}"] = [(p, label) for p in paragraphs]
    rng = np.random.default_rng(seed)
    train, test = [], []
    for topic in topics:
        keys = sorted(k for k in groups if k.startswith(f"scipy.{topic}."))
        rng.shuffle(keys)
        n_test = max(1, round(test_size * len(keys)))
        for i, key in enumerate(keys):
            (test if i < n_test else train).extend((text, lab, key) for text, lab in groups[key])
    features = Features({"text": Value("string"), "labels": ClassLabel(names=list(topics)), "object": Value("string")})

    def build(rows):
        texts, labels, objects = zip(*rows)
        return Dataset.from_dict({"text": list(texts), "labels": list(labels), "object": list(objects)}, features=features)

    return DatasetDict(train=build(train), test=build(test))


def train_wordpiece_tokenizer(texts, vocab_size: int = 4000, model_max_length: int = 128):
    """A BERT-style WordPiece tokenizer trained on ``texts`` (no download), as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length)


def load_python_docs_texts(test_fraction: float = 0.1, seed: int = 0) -> dict[str, list[str]]:
    """Real English prose that ships offline: the Python Language Reference / Library topics in the stdlib.

    Source: ``pydoc_data.topics.topics`` (part of CPython's standard library; the text of the "Python
    Language Reference" and built-in help topics, ~465k characters in 3.11; Python Software Foundation
    License, https://docs.python.org/3/license.html). Each topic (e.g. ``"assert"``, ``"formatstrings"``)
    is one document. The split is by topic: ``round(test_fraction * n_topics)`` whole topics, drawn with a
    seeded generator, form the test side, so no test text is seen in training. Whitespace runs inside lines
    are kept (the reference's code blocks are indented); trailing spaces are removed.
    Returns ``{"train": [...], "test": [...]}`` (lists of documents, in topic-name order).
    """
    from pydoc_data.topics import topics

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    names = sorted(topics)
    rng = np.random.default_rng(seed)
    n_test = max(1, round(test_fraction * len(names)))
    test_names = set(rng.choice(names, size=n_test, replace=False).tolist())

    def clean(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.strip().split("\n"))

    return {"train": [clean(topics[n]) for n in names if n not in test_names],
            "test": [clean(topics[n]) for n in names if n in test_names]}


def train_bpe_tokenizer(texts, vocab_size: int = 4096, model_max_length: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts`` (no download), as a ``PreTrainedTokenizerFast``.

    Byte-level, so every string is encodable (no unknown token); one special token ``<|endoftext|>`` (id 0)
    serves as BOS, EOS and padding. BPE training with the ``tokenizers`` library is deterministic for the
    same texts and vocab size (unlike WordPiece training), which tests check by training twice.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"vocab_size must be an integer >= 257 (256 bytes + <|endoftext|>), got {vocab_size!r}")
    eos = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=eos, eos_token=eos, pad_token=eos,
                                   model_max_length=model_max_length)


def lm_blocks(texts, tokenizer, block_size: int = 128):
    """Causal-LM training samples: the documents tokenized, joined with EOS, cut into ``block_size`` tokens.

    Returns a ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels`` (= ``input_ids``;
    the model shifts them). The tail shorter than ``block_size`` is dropped.
    """
    from datasets import Dataset

    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)  # no length warning
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"the texts give {len(ids)} tokens, fewer than one block of {block_size}")
    blocks = np.asarray(ids[: n * block_size], dtype=np.int64).reshape(n, block_size)
    return Dataset.from_dict({"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks.copy()})
