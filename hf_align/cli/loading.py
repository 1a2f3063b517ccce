"""What the ``hf-align`` commands load: a model (folder or Hub id), its processor, and a labelled dataset.

Datasets come from ``datasets.load_dataset``: a Hub id, a local folder (csv/json/parquet files or an image
folder) or a local file (``.csv``, ``.json``/``.jsonl``, ``.parquet``), or one of the embedded datasets that
ship with a dependency (``embedded:digits``, ``embedded:scipy-docs``, and ``embedded:python-docs`` for causal
LMs). Causal-LM text (``.txt`` files, packing into blocks) is read by :mod:`.lm`. Every bad input is a
:class:`CLIError` with one line that says what was expected and what came, raised before any training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.embedded import digits_split
from ..data.labels import IGNORE_INDEX, labelled
from .arguments import EMBEDDED, DataArguments, ModelArguments  # noqa: F401 (the loaders' arguments)

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class CLIError(ValueError):
    """A bad command-line argument: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- datasets


def embedded_dataset(name: str, seed: int = 0):
    """The embedded datasets in raw form (``image``/``text`` + a ``label`` ClassLabel), train/test splits.

    ``embedded:digits``: scikit-learn's 1,797 8x8 handwritten digits as greyscale PIL images;
    ``embedded:scipy-docs``: prose paragraphs of SciPy's documentation labelled by subpackage
    (see :mod:`hf_align.data`); ``embedded:python-docs``: the topics of CPython's ``pydoc_data`` as a ``text``
    column (no labels; for causal LMs, :func:`hf_align.data.load_python_docs_texts`'s split by topic).
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    if name == "embedded:digits":
        from PIL import Image as PILImage
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.round(digits.images / 16.0 * 255).clip(0, 255).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
        labels = digits.target.astype(np.int64)
        splits = dict(zip(("train", "test"), digits_split(labels, 0.25, seed)))  # = load_digits_dataset's split
        features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
        return DatasetDict({
            split: Dataset.from_dict({"image": [PILImage.fromarray(pixels[i], mode="L") for i in idx],
                                      "label": labels[idx].tolist()}, features=features)
            for split, idx in splits.items()
        })
    if name == "embedded:scipy-docs":
        from ..data import load_scipy_docs_dataset

        data = load_scipy_docs_dataset(seed=seed)
        return DatasetDict({split: ds.remove_columns("object").rename_column("labels", "label") for split, ds in data.items()})
    if name == "embedded:python-docs":
        from ..data import load_python_docs_texts

        texts = load_python_docs_texts(seed=seed)
        return DatasetDict({split: Dataset.from_dict({"text": docs}) for split, docs in texts.items()})
    raise CLIError(f"unknown embedded dataset {name!r}; expected one of {list(EMBEDDED)}")


def load_raw_dataset(args: DataArguments):
    """``datasets.DatasetDict`` for ``--dataset_name`` (Hub id, local folder / file, or embedded)."""
    from datasets import DatasetDict, load_dataset

    name = args.dataset_name
    if not name:
        raise CLIError(f"--dataset_name is required: a Hub dataset id, a local folder or file, or one of {list(EMBEDDED)}")
    if name.startswith("embedded:"):
        return embedded_dataset(name)
    try:
        if os.path.isfile(name):
            ext = os.path.splitext(name)[1].lower()
            if ext not in _FILE_BUILDERS:
                raise CLIError(f"cannot read {name!r}: expected a {', '.join(sorted(_FILE_BUILDERS))} file or a folder")
            kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
            data = load_dataset(_FILE_BUILDERS[ext], data_files=name, **kwargs)
        else:
            if _looks_like_path(name) and not os.path.isdir(name):
                raise CLIError(f"dataset folder or file {name!r} does not exist")
            data = load_dataset(name, args.dataset_config)
    except CLIError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        raise CLIError(f"could not load dataset {name!r}: {_first_line(err)}") from err
    if not isinstance(data, DatasetDict):
        data = DatasetDict(train=data)
    return data


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "") or name.endswith(
        tuple(_FILE_BUILDERS))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def subsample(ds, max_samples: int | None, seed: int = 0):
    """A seeded random subset of ``max_samples`` examples in their original order (files are often sorted by
    class, so the first N would miss classes); all of ``ds`` when it is small enough or ``max_samples`` is None."""
    if max_samples is None or max_samples >= len(ds):
        return ds
    if max_samples < 1:
        raise CLIError(f"--max_train_samples / --max_eval_samples must be >= 1, got {max_samples}")
    return ds.select(np.sort(np.random.default_rng(seed).choice(len(ds), size=max_samples, replace=False)))


def select_split(data, split: str, max_samples: int | None = None):
    if split not in data:
        raise CLIError(f"the dataset has no split {split!r}; available splits: {list(data)}")
    return subsample(data[split], max_samples)


def evaluation_split(data, split: str, max_samples: int | None = None):
    """The split to evaluate / analyze: ``split``, or the only split of a one-split dataset (a single csv / json
    file loads as ``train``), with a note saying so."""
    if split not in data and len(data) == 1:
        (only,) = list(data)
        print(f"data: no {split!r} split; using the only split, {only!r}")
        split = only
    return select_split(data, split, max_samples)


def train_eval_splits(data, args: DataArguments, seed: int = 0):
    """(train, eval, note): the test split when there is one, else ``eval_split_size`` of train held out."""
    train = select_split(data, args.dataset_train_split)
    if args.dataset_test_split in data:
        evaluation, note = data[args.dataset_test_split], f"evaluation split {args.dataset_test_split!r}"
    else:
        if not 0 < args.eval_split_size < 1:
            raise CLIError(f"--eval_split_size must be in (0, 1), got {args.eval_split_size}")
        from sklearn.model_selection import train_test_split

        labels = train[args.label_column] if args.label_column in train.column_names else None
        if labels is not None:
            check_missing_labels(labels, args.label_column, args.dataset_train_split)
        idx = np.arange(len(train))
        try:
            fit, held = train_test_split(idx, test_size=args.eval_split_size, random_state=seed, stratify=labels)
        except ValueError:  # a class too small to stratify
            fit, held = train_test_split(idx, test_size=args.eval_split_size, random_state=seed)
        train, evaluation = train.select(np.sort(fit)), train.select(np.sort(held))
        note = (f"no {args.dataset_test_split!r} split: {len(evaluation)} examples ({args.eval_split_size:g}) of "
                f"{args.dataset_train_split!r} held out for evaluation")
    return subsample(train, args.max_train_samples, seed), subsample(evaluation, args.max_eval_samples, seed), note


def check_columns(ds, columns: dict[str, str | None], split: str) -> None:
    for option, column in columns.items():
        if column is not None and column not in ds.column_names:
            raise CLIError(f"column {column!r} ({option}) is not in the {split!r} split; available columns: {ds.column_names}")


@dataclass
class LabelSpace:
    names: list[str]  # id -> name
    from_strings: bool  # the column holds strings mapped through ``names``


# a label space may hold ids the data never uses (a subset of ImageNet's 1000 classes), but not this many more:
# one id of 10^12 in a csv must not build a 10^12-class classifier
MAX_UNUSED_LABEL_IDS = 1000


def check_missing_labels(values, column: str, split: str | None = None) -> None:
    """Every example needs a class label: ``null`` (JSON) / empty or ``nan`` (csv) fail here, in one line."""
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and not np.isfinite(v))]
    if missing:
        where = f" of the {split!r} split" if split else ""
        raise CLIError(f"label column {column!r}{where} has {len(missing)} missing value(s) (null / NaN; first at row "
                       f"{missing[0]}); every example needs a class label: fill in or drop those rows")


def label_space(datasets_: list, column: str) -> LabelSpace:
    """The classes of ``column`` over the given splits: ClassLabel names, ``0..max`` for integer ids, or the
    sorted distinct strings."""
    from datasets import ClassLabel

    feature = datasets_[0].features[column]
    if isinstance(feature, ClassLabel):
        return LabelSpace(list(feature.names), False)
    values = [v for ds in datasets_ for v in ds[column]]
    if not values:
        raise CLIError(f"label column {column!r} is empty")
    check_missing_labels(values, column)
    if all(isinstance(v, str) for v in values):
        return LabelSpace(sorted(set(values)), True)
    if not all(isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer()) for v in values):
        bad = next(v for v in values if not isinstance(v, (int, np.integer, str)))
        raise CLIError(f"label column {column!r} must hold integer class ids or strings, got {bad!r}")
    kept = [int(v) for v in values if int(v) != IGNORE_INDEX]  # the one label rule: -100 = no target, ignored
    if not kept:
        raise CLIError(f"label column {column!r} holds no class ids (every label is {IGNORE_INDEX}, the ignore index)")
    low, high = min(kept), max(kept)
    if low < 0:
        raise CLIError(f"label column {column!r} holds negative class ids (min {low}); expected ids in 0..num_labels-1 "
                       f"({IGNORE_INDEX} is ignored)")
    distinct = len(set(kept))
    if high + 1 > distinct + MAX_UNUSED_LABEL_IDS:
        raise CLIError(f"label column {column!r} holds the class id {high}, far beyond its {distinct} distinct ids: that "
                       f"would build a {high + 1}-class classifier. Use ids 0..{distinct - 1} (or string labels)")
    return LabelSpace([str(i) for i in range(high + 1)], False)


def check_label_range(datasets_: list, column: str, space: LabelSpace, num_labels: int, model: str,
                      label2id: dict | None = None) -> None:
    """Integer labels must lie in ``0..num_labels-1`` of the model's classifier; string labels must be among the
    model's own label names when it has named labels (not transformers' default ``LABEL_k``)."""
    if space.from_strings:
        named = {k for k in (label2id or {}) if not str(k).startswith("LABEL_")}
        if named and not set(space.names) <= named:
            missing = sorted(set(space.names) - named)
            raise CLIError(f"label column {column!r} holds {missing[:5]}{'...' if len(missing) > 5 else ''}, which are "
                           f"not among {model}'s labels {sorted(named)}")
        if len(space.names) > num_labels:
            raise CLIError(f"label column {column!r} holds {len(space.names)} distinct labels, but {model} has "
                           f"num_labels={num_labels}; use a model with a matching head or a base checkpoint")
        return
    ids = np.concatenate([np.asarray(ds[column], dtype=np.int64) for ds in datasets_ if len(ds)])
    ids = ids[labelled(ids)]
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if high >= num_labels or low < 0:
        raise CLIError(f"label column {column!r} holds class ids {low}..{high}, but {model} has num_labels={num_labels} "
                       f"(ids 0..{num_labels - 1}; {IGNORE_INDEX} is ignored); use a model with a matching head or a "
                       "base checkpoint")


# ---------------------------------------------------------------------------------------------- models


TASK_AUTO = {"sequence-classification": "AutoModelForSequenceClassification",
             "image-classification": "AutoModelForImageClassification"}


def load_model_config(model_args: ModelArguments):
    """``(config, modality)`` after checking the folder exists and the family is supported (no weights read)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    from ..families import get_family

    path = model_args.model_name_or_path
    if not os.path.isdir(path) and _looks_like_path(path):
        raise CLIError(f"model folder {path!r} does not exist")
    try:
        config = AutoConfig.from_pretrained(path, **model_args.hub_kwargs())
    except Exception as err:
        where = "local folder" if os.path.isdir(path) else "Hub repo id (or a local folder)"
        raise CLIError(f"could not load a model config from {path!r} as a {where}: {_first_line(err)}") from err
    model_type = getattr(config, "model_type", None)
    if get_family(model_type) is None:
        raise CLIError(f"unknown model family: {path!r} has config.model_type={model_type!r}, which hf-align has no "
                       f"layer view for; supported: {supported_text()} (register one with hf_align.register_family)")
    if type(config) in AutoModelForSequenceClassification._model_mapping:
        modality = "text"
    elif type(config) in AutoModelForImageClassification._model_mapping:
        modality = "image"
    elif type(config) in AutoModelForCausalLM._model_mapping:
        modality = "text"
    else:
        raise CLIError(f"{path!r} ({model_type}) has neither a sequence- nor an image-classification model class")
    return config, modality


def supported_text() -> str:
    """The registered families, their model types and tasks, in one line (from the public ``supported_families``)."""
    from ..families import supported_families

    return "; ".join(f"{name} ({', '.join(f['model_types'])}: {', '.join(f['tasks'])})"
                     for name, f in supported_families().items())


def is_causal_lm(config) -> bool:
    """Whether the checkpoint's ``config.architectures`` names a causal-LM class: ``*ForCausalLM``, or one of
    transformers' causal-LM classes (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: GPT-2's is ``GPT2LMHeadModel``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = (getattr(config, "architectures", None) or [""])[0]
    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return bool(arch) and (arch.endswith("ForCausalLM") or arch in names)


def is_classifier(config, modality: str) -> bool:
    arch = (getattr(config, "architectures", None) or [""])[0]
    return arch.endswith("ForSequenceClassification" if modality == "text" else "ForImageClassification")


def load_classifier(model_args: ModelArguments, config, modality: str, space: LabelSpace | None):
    """The classifier: the saved one when the checkpoint has a classification head, else a new head with
    ``len(space.names)`` labels on the pretrained body. Returns ``(model, new_head: bool)``."""
    import transformers
    from safetensors import SafetensorError

    auto = getattr(transformers, TASK_AUTO["sequence-classification" if modality == "text" else "image-classification"])
    common = dict(use_safetensors=True, **model_args.hub_kwargs())
    path = model_args.model_name_or_path
    try:
        if is_classifier(config, modality) or space is None:
            return auto.from_pretrained(path, config=config, **common), False
        labels = dict(num_labels=len(space.names), id2label=dict(enumerate(space.names)),
                      label2id={n: i for i, n in enumerate(space.names)})
        return auto.from_pretrained(path, **labels, **common), True
    except CLIError:
        raise
    except (OSError, ValueError, SafetensorError) as err:  # e.g. a truncated model.safetensors
        raise CLIError(f"could not load the weights of {path!r} (safetensors only): {_first_line(err)}") from err


def load_processor(model_args: ModelArguments, modality: str):
    from transformers import AutoImageProcessor, AutoTokenizer

    path = model_args.model_name_or_path
    try:
        if modality == "text":
            return AutoTokenizer.from_pretrained(path, **model_args.hub_kwargs())
        return AutoImageProcessor.from_pretrained(path, **model_args.hub_kwargs())
    except Exception as err:
        what = "tokenizer (tokenizer.json / tokenizer_config.json)" if modality == "text" else "image processor (preprocessor_config.json)"
        raise CLIError(f"{path!r} has no {what}; save it beside the model (processor.save_pretrained(folder)): "
                       f"{_first_line(err)}") from err


# ---------------------------------------------------------------------------------------------- processing


def encode(ds, processor, modality: str, args: DataArguments, space: LabelSpace, label2id: dict | None = None,
           num_channels: int = 3, max_positions: int | None = None, desc: str = "encode"):
    """Model inputs + ``labels`` (int64) from a raw split; every other column is dropped."""
    column = args.label_column
    if space.from_strings:
        mapping = label2id if label2id and set(space.names) <= set(label2id) else {n: i for i, n in enumerate(space.names)}

        def to_id(v):
            return int(mapping[v])
    else:
        def to_id(v):
            return int(v)

    if modality == "text":
        max_length = args.max_length
        for limit in (getattr(processor, "model_max_length", None), max_positions):
            if isinstance(limit, int) and 0 < limit < max_length:
                max_length = limit  # never longer than the tokenizer or the model's position table allows

        def fn(batch):
            pair = batch[args.text_pair_column] if args.text_pair_column else None
            out = processor(batch[args.text_column], pair, truncation=True, max_length=max_length)
            out["labels"] = [to_id(v) for v in batch[column]]
            return dict(out)
    else:
        mode = "L" if num_channels == 1 else "RGB"

        def fn(batch):
            images = [im.convert(mode) for im in batch[args.image_column]]
            out = {"pixel_values": list(processor(images=images, return_tensors="np")["pixel_values"])}
            out["labels"] = [to_id(v) for v in batch[column]]
            return out
    encoded = ds.map(fn, batched=True, remove_columns=ds.column_names, desc=desc)
    return encoded.with_format("torch")


def collator(processor, modality: str):
    if modality == "text":
        from transformers import DataCollatorWithPadding

        pad = DataCollatorWithPadding(processor)
        return lambda features: dict(pad(features))  # a plain dict of tensors (not a BatchEncoding)
    from transformers import default_data_collator

    return default_data_collator


def loader(encoded, processor, modality: str, batch_size: int):
    from torch.utils.data import DataLoader

    return DataLoader(encoded, batch_size=batch_size, shuffle=False, collate_fn=collator(processor, modality))


def ensure_pad_token(processor, model) -> None:
    """Decoder tokenizers often have no pad token: use EOS (the model's sequence head needs a pad id)."""
    if getattr(processor, "pad_token", "x") is None:
        if processor.eos_token is None:
            raise CLIError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token and save it")
        processor.pad_token = processor.eos_token
    pad_id = getattr(processor, "pad_token_id", None)
    if pad_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id


def fresh_model_for(name: str, train_split, seed: int = 0) -> tuple[Any, Any, str, str]:
    """For an embedded dataset without ``--model_name_or_path``: ``(model, processor, modality, description)``."""
    from .demo import digits_image_processor, digits_vit, scipy_docs_encoder

    if name == "embedded:digits":
        return (digits_vit(seed=seed), digits_image_processor(), "image",
                "a fresh 6-block ViT for 8x8 greyscale digits (random init, hf_align.cli.demo.digits_vit) with an 8x8 "
                "image processor scaling pixels to [-1, 1]")
    if name == "embedded:scipy-docs":
        model, tokenizer = scipy_docs_encoder(train_split["text"], num_labels=train_split.features["label"].num_classes,
                                              seed=seed)
        return (model, tokenizer, "text",
                f"a fresh {model.config.num_hidden_layers}-block BERT-style encoder (random init, "
                "hf_align.cli.demo.scipy_docs_encoder) with a WordPiece tokenizer trained on the training texts")
    raise CLIError(f"--model_name_or_path is required unless --dataset_name is one of {list(EMBEDDED)}")
