"""The layer view: one object that knows a transformer's blocks, their hidden states and the model's own head.

Every other part of hf-align (analysis, aligned training, early exit, collapse metrics) goes through
:class:`LayerView`; this module is the only place that knows architecture names. Families are declared in
one registry (:func:`register_family`), the way PEFT declares its target-module mappings.

For a supported model instance ``view = LayerView(model)`` gives

* ``view.num_layers`` (L) and ``view.blocks`` — the L transformer blocks in order;
* ``view.hidden_states(**inputs)`` — L+1 hidden states from one forward: index 0 is the embedding output
  (the input of block 1), index l the raw output of block l (before any final norm);
* ``view.head(hidden, **inputs)`` — the model's own head applied to a hidden state of any layer: final
  norm (if the model has one), pooling as the model does it (CLS token, last non-padding token, ...),
  pooler, dropout, classifier or LM head — the *same modules* the model uses;
* ``view.layer_logits(**inputs)`` — ``[head(h_1), ..., head(h_L)]`` from one forward; the last equals the
  model's own logits;
* ``view.prepare(**inputs)`` / ``view.run_blocks(state, k)`` / ``view.forward_until(k, **inputs)`` — a
  forward that stops after block k and never runs blocks k+1..L. The model's own forward is run up to its
  first block, where a pre-hook captures the exact arguments the model prepared for its blocks (attention
  masks, rotary position embeddings, relative positions) and stops; the blocks are then run in a loop with
  those arguments. A :class:`LayerState` can drop finished rows (:meth:`LayerState.select`) so that
  samples that exit early leave the batch.

**Self-check.** Building a view runs the model on a small synthetic (padded) batch and checks that the
head applied to the last block's output reproduces the model's own logits (max abs diff <= ``atol``,
1e-5 in float32). A model that is unsupported, or supported but mismatching (a new transformers version
moved something), gets a :class:`ValueError` — never a silently wrong answer. After any error the model is
as it was: no hooks attached, every module's train/eval flag restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "BASE_TASK",
    "TASKS",
    "HeadContext",
    "LayerFamily",
    "LayerState",
    "LayerView",
    "register_family",
    "supported_families",
    "get_family",
]

TASKS = ("sequence-classification", "image-classification", "causal-lm")
# A head-less base model (BertModel, ViTModel, GPT2Model, LlamaModel...): hidden states, stop-after-k and
# pooling work; anything that needs a head raises a clear error.
BASE_TASK = "feature-extraction"

# Class-name suffixes (searched along the MRO, so user subclasses work) -> task.
_TASK_SUFFIXES = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForImageClassification", "image-classification"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
)


@dataclass
class HeadContext:
    """What a head needs besides the hidden state: the token ids and mask the model was called with."""

    input_ids: torch.Tensor | None = None  # (B, T)
    attention_mask: torch.Tensor | None = None  # (B, T)

    def select(self, index: torch.Tensor) -> HeadContext:
        return HeadContext(
            input_ids=None if self.input_ids is None else self.input_ids[index],
            attention_mask=None if self.attention_mask is None else self.attention_mask[index],
        )


HeadFn = Callable[[nn.Module, torch.Tensor, HeadContext], torch.Tensor]


@dataclass
class LayerFamily:
    """One architecture family in the registry.

    Args:
        name: a short family name ("bert").
        model_types: the ``config.model_type`` values it covers.
        heads: task -> ``fn(model, hidden, ctx) -> logits``; ``model`` is the transformers model (PEFT
            wrappers removed), ``hidden`` a (B, T, D) block output, ``ctx`` a :class:`HeadContext`.
            The function must use the model's own modules so that it *is* the model's head.
        classifiers: task -> dotted path (from the model) of the final linear layer (W, b) of the head.
        block_paths: dotted paths (from ``model.base_model``) tried first to find the blocks; the
            structural fallback is the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries.
        unbatched_kwargs: names of block keyword arguments that have no batch dimension (never row-sliced
            when finished samples leave a batch).
        pooling: task -> how the head pools tokens ("cls", "last", "none" for per-token LM heads).
        final_norm: dotted path (from ``model.base_model``) of the final norm the base model applies to the
            last block's output (``None`` if it has none); used for head-less base models.
        final_norm_in_hidden_states: whether the model's own ``output_hidden_states=True`` returns the last
            hidden state *after* that final norm (GPT-2, Llama) or before it (ViT, whose
            ``last_hidden_state`` alone is normed).
    """

    name: str
    model_types: tuple[str, ...]
    heads: dict[str, HeadFn]
    classifiers: dict[str, str] = field(default_factory=dict)
    block_paths: tuple[str, ...] = ()
    unbatched_kwargs: tuple[str, ...] = ()
    pooling: dict[str, str] = field(default_factory=dict)
    final_norm: str | None = None
    final_norm_in_hidden_states: bool = False


_REGISTRY: dict[str, LayerFamily] = {}


def register_family(
    name: str,
    model_types: Sequence[str],
    heads: dict[str, HeadFn],
    *,
    classifiers: dict[str, str] | None = None,
    block_paths: Sequence[str] = (),
    unbatched_kwargs: Sequence[str] = (),
    pooling: dict[str, str] | None = None,
    final_norm: str | None = None,
    final_norm_in_hidden_states: bool = False,
    overwrite: bool = False,
) -> LayerFamily:
    """Register a family so that :class:`LayerView` supports it.

    Example (a hypothetical encoder whose classifier reads the CLS token after a final norm)::

        def my_head(model, hidden, ctx):
            return model.classifier(model.base_model.final_norm(hidden[:, 0]))

        hf_align.register_family("mymodel", ["mymodel"], {"sequence-classification": my_head},
                                 classifiers={"sequence-classification": "classifier"})

    The self-check then verifies the head against the model's own logits the first time a view is built.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if isinstance(model_types, str) or not model_types:
        raise TypeError(f"model_types must be a non-empty list of config.model_type strings, got {model_types!r}")
    unknown = set(heads) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)} in heads; expected some of {list(TASKS)}")
    for task, fn in heads.items():
        if not callable(fn):
            raise TypeError(f"heads[{task!r}] must be callable (model, hidden, ctx) -> logits, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"family {name!r} is already registered; pass overwrite=True to replace it")
    for other in _REGISTRY.values():
        if other.name != name and set(other.model_types) & set(model_types) and not overwrite:
            raise ValueError(
                f"model type(s) {sorted(set(other.model_types) & set(model_types))} already belong to family "
                f"{other.name!r}; pass overwrite=True to take them over"
            )
    if overwrite:
        for other in list(_REGISTRY.values()):
            kept = tuple(t for t in other.model_types if t not in set(model_types))
            if other.name != name and kept != other.model_types:
                _REGISTRY[other.name] = replace(other, model_types=kept)
    family = LayerFamily(
        name=name,
        model_types=tuple(model_types),
        heads=dict(heads),
        classifiers=dict(classifiers or {}),
        block_paths=tuple(block_paths),
        unbatched_kwargs=tuple(unbatched_kwargs),
        pooling=dict(pooling or {}),
        final_norm=final_norm,
        final_norm_in_hidden_states=bool(final_norm_in_hidden_states),
    )
    _REGISTRY[name] = family
    return family


def supported_families() -> dict[str, dict[str, Any]]:
    """``{family: {"model_types": [...], "tasks": [...]}}`` for every registered family."""
    return {f.name: {"model_types": list(f.model_types), "tasks": [*f.heads, BASE_TASK]} for f in _REGISTRY.values()}


def get_family(model_type: str) -> LayerFamily | None:
    for family in _REGISTRY.values():
        if model_type in family.model_types:
            return family
    return None


def _supported_text() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.model_types)}: {', '.join([*f.heads, BASE_TASK])})" for f in _REGISTRY.values())


# ----------------------------------------------------------------------------------------------------------
# Head building blocks (pooling as the models do it)
# ----------------------------------------------------------------------------------------------------------


def cls_token(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, D): the first token, as BERT-style poolers and ViT classifiers take it."""
    return hidden[:, 0]


def last_non_pad_token(hidden: torch.Tensor, ctx: HeadContext, pad_token_id: int | None) -> torch.Tensor:
    """(B, T, D) -> (B, D), the rule of transformers' decoder ``*ForSequenceClassification``.

    The rightmost token whose id is not ``pad_token_id`` (works for left and right padding); the last
    position when there is no pad id or no ``input_ids``.
    """
    batch = hidden.shape[0]
    if pad_token_id is None or ctx.input_ids is None:
        index = torch.full((batch,), hidden.shape[1] - 1, device=hidden.device, dtype=torch.long)
    else:
        non_pad = (ctx.input_ids != pad_token_id).to(hidden.device, torch.int32)
        positions = torch.arange(ctx.input_ids.shape[-1], device=hidden.device, dtype=torch.int32)
        index = (positions * non_pad).argmax(-1)
    return hidden[torch.arange(batch, device=hidden.device), index]


def _pad_id(model: nn.Module) -> int | None:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "pad_token_id", None)


# -- encoders --------------------------------------------------------------------------------------------


def _bert_sequence_head(model, hidden, ctx):
    # BertForSequenceClassification: pooler (dense + tanh on CLS) -> dropout -> classifier
    return model.classifier(model.dropout(model.base_model.pooler(hidden)))


def _classification_head_module(model, hidden, ctx):
    # RoBERTa / XLM-R / ELECTRA: the classifier module takes the whole sequence and reads token 0 itself
    return model.classifier(hidden)


def _distilbert_sequence_head(model, hidden, ctx):
    # DistilBertForSequenceClassification: CLS -> pre_classifier -> ReLU -> dropout -> classifier
    pooled = torch.relu(model.pre_classifier(cls_token(hidden)))
    return model.classifier(model.dropout(pooled))


def _deberta_sequence_head(model, hidden, ctx):
    # DebertaV2ForSequenceClassification: ContextPooler (CLS -> dropout -> dense -> act) -> dropout -> classifier
    return model.classifier(model.dropout(model.pooler(hidden)))


def _roberta_lm_head(model, hidden, ctx):
    return model.lm_head(hidden)


def _electra_lm_head(model, hidden, ctx):
    return model.generator_lm_head(model.generator_predictions(hidden))


# -- vision ----------------------------------------------------------------------------------------------


def _vit_image_head(model, hidden, ctx):
    # ViT/DeiT ForImageClassification: final LayerNorm (per token, so CLS first is the same) -> classifier
    return model.classifier(model.base_model.layernorm(cls_token(hidden)))


# -- decoders --------------------------------------------------------------------------------------------


def _decoder_sequence_head(norm_name: str) -> HeadFn:
    def head(model, hidden, ctx):
        # final norm -> score, read at the last non-padding token (pad id rule of transformers)
        pooled = last_non_pad_token(hidden, ctx, _pad_id(model))
        return model.score(getattr(model.base_model, norm_name)(pooled))

    return head


def _decoder_lm_head(norm_name: str) -> HeadFn:
    def head(model, hidden, ctx):
        return model.lm_head(getattr(model.base_model, norm_name)(hidden))

    return head


def _register_builtin_families() -> None:
    seq, img, lm = TASKS
    register_family(
        "bert",
        ["bert"],
        {seq: _bert_sequence_head},
        classifiers={seq: "classifier"},
        block_paths=("encoder.layer",),
        pooling={seq: "cls"},
    )
    register_family(
        "roberta",
        ["roberta", "xlm-roberta"],
        {seq: _classification_head_module, lm: _roberta_lm_head},
        classifiers={seq: "classifier.out_proj", lm: "lm_head.decoder"},
        block_paths=("encoder.layer",),
        pooling={seq: "cls", lm: "none"},
    )
    register_family(
        "distilbert",
        ["distilbert"],
        {seq: _distilbert_sequence_head},
        classifiers={seq: "classifier"},
        block_paths=("transformer.layer",),
        pooling={seq: "cls"},
    )
    register_family(
        "electra",
        ["electra"],
        {seq: _classification_head_module, lm: _electra_lm_head},
        classifiers={seq: "classifier.out_proj", lm: "generator_lm_head"},
        block_paths=("encoder.layer",),
        pooling={seq: "cls", lm: "none"},
    )
    register_family(
        "deberta-v2",
        ["deberta-v2"],
        {seq: _deberta_sequence_head},
        classifiers={seq: "classifier"},
        block_paths=("encoder.layer",),
        unbatched_kwargs=("rel_embeddings", "relative_pos"),
        pooling={seq: "cls"},
    )
    register_family(
        "vit",
        ["vit", "deit"],
        {img: _vit_image_head},
        classifiers={img: "classifier"},
        block_paths=("layers", "encoder.layer"),
        pooling={img: "cls"},
        final_norm="layernorm",
    )
    register_family(
        "gpt2",
        ["gpt2"],
        {seq: _decoder_sequence_head("ln_f"), lm: _decoder_lm_head("ln_f")},
        classifiers={seq: "score", lm: "lm_head"},
        block_paths=("h",),
        pooling={seq: "last", lm: "none"},
        final_norm="ln_f",
        final_norm_in_hidden_states=True,
    )
    register_family(
        "llama",
        ["llama", "mistral", "qwen2"],
        {seq: _decoder_sequence_head("norm"), lm: _decoder_lm_head("norm")},
        classifiers={seq: "score", lm: "lm_head"},
        block_paths=("layers",),
        pooling={seq: "last", lm: "none"},
        final_norm="norm",
        final_norm_in_hidden_states=True,
    )


_register_builtin_families()


# ----------------------------------------------------------------------------------------------------------
# The view
# ----------------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the pre-hook on the first block once its arguments are captured."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT or hf-align wrappers (``get_base_model()``), or inside a container
    that is not itself a transformers model (e.g. a sentence-transformers ``SentenceTransformer``: its first
    ``PreTrainedModel`` submodule); the model itself otherwise."""
    return _unwrap_chain(model)[-1]


def _unwrap_chain(model: nn.Module) -> list[nn.Module]:
    from transformers import PreTrainedModel

    chain = [model]
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        elif not isinstance(model, PreTrainedModel):
            inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
        else:
            break
        if inner is None or inner is model or any(inner is m for m in chain):
            break
        chain.append(inner)
        model = inner
    return chain


def _layer_classifier_provider(model: nn.Module) -> Callable[[int], nn.Module | None] | None:
    """A wrapper's ``layer_classifier(layer)`` anywhere along the wrapper chain (see :meth:`LayerView.head`)."""
    for module in _unwrap_chain(model):
        provider = getattr(module, "layer_classifier", None)
        if callable(provider):
            return provider
    return None


def _task_of(model: nn.Module) -> str | None:
    for cls in type(model).__mro__:
        for suffix, task in _TASK_SUFFIXES:
            if cls.__name__.endswith(suffix):
                return task
    return None


def _row_select(value: Any, index: torch.Tensor, batch: int) -> Any:
    """Index the batch dimension of every tensor (recursively in tuples/lists/dicts) whose dim 0 is ``batch``."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_row_select(v, index, batch) for v in value)
    if isinstance(value, list):
        return [_row_select(v, index, batch) for v in value]
    if isinstance(value, dict):
        return {k: _row_select(v, index, batch) for k, v in value.items()}
    return value


@dataclass
class LayerState:
    """A batch in flight between blocks.

    ``hidden`` (B, T, D) is the output of block ``depth`` (the embedding output when ``depth == 0``);
    ``block_args``/``block_kwargs`` are what the model itself passes to each block (captured from its own
    forward); ``context`` is what the head needs.
    """

    hidden: torch.Tensor
    depth: int
    block_args: tuple
    block_kwargs: dict
    context: HeadContext
    unbatched_kwargs: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> LayerState:
        """The same state for a subset of the batch rows (for samples that stay after others exit)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.hidden.device)
        batch = self.batch_size
        if batch == 1 and index.numel() == 1:
            return self
        kwargs = {
            k: (v if k in self.unbatched_kwargs else _row_select(v, index, batch)) for k, v in self.block_kwargs.items()
        }
        return LayerState(
            hidden=self.hidden[index],
            depth=self.depth,
            block_args=_row_select(self.block_args, index, batch),
            block_kwargs=kwargs,
            context=self.context.select(index),
            unbatched_kwargs=self.unbatched_kwargs,
        )


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit, whatever happens inside."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class LayerView:
    """A view of a supported Hugging Face model's layers (see the module docstring).

    Args:
        model: a transformers ``*ForSequenceClassification``, ``*ForImageClassification`` or
            ``*ForCausalLM`` model of a registered family, or its head-less base model (``BertModel``,
            ``ViTModel``, ``GPT2Model``, ``LlamaModel``...; task ``"feature-extraction"``: hidden states,
            stop-after-k and pooling work, :meth:`head` raises), optionally wrapped by PEFT or held by a
            container such as a sentence-transformers model. It is not copied or changed; the view holds a
            reference.
        check: run the self-check now (recommended; it takes one tiny forward).
        check_inputs: inputs for the self-check; by default a synthetic padded batch built from the config.
        atol: tolerance of the self-check (max abs difference of logits; of hidden states for base models).
            Default 1e-5 for float32 models, 5e-2 for half precision.

    Raises:
        ValueError: unsupported model type or task (the message lists the supported families and how to
            register one), blocks not found, or a failing self-check (with the measured difference).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        check: bool = True,
        check_inputs: dict[str, Any] | None = None,
        atol: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"LayerView expects a transformers model (torch.nn.Module), got {type(model).__name__}")
        self.model = model
        self.hf_model = unwrap_model(model)
        # wrappers may replace the head's final linear layer per block (see head(); the multi-exit model does)
        self._layer_classifier = _layer_classifier_provider(model)
        config = getattr(self.hf_model, "config", None)
        model_type = getattr(config, "model_type", None)
        how = (
            "Register a family with hf_align.register_family(name, model_types=[...], heads={task: fn}) "
            "(see docs/layers.md)."
        )
        family = get_family(model_type) if model_type else None
        if family is None:
            raise ValueError(
                f"hf_align has no layer-view adapter for {type(self.hf_model).__name__} "
                f"(config.model_type={model_type!r}). Supported families: {_supported_text()}. {how}"
            )
        task = _task_of(self.hf_model)
        if task is None and getattr(self.hf_model, "base_model", None) is self.hf_model:
            task = BASE_TASK  # a head-less base model
        if task != BASE_TASK and task not in family.heads:
            raise ValueError(
                f"{type(self.hf_model).__name__} is a {family.name} model, but its head type ({task or 'unknown'}) "
                f"is not supported; family {family.name!r} supports {[*family.heads, BASE_TASK]}. "
                f"Supported families: {_supported_text()}. {how}"
            )
        self.family = family
        self.task = task
        self.base = self.hf_model.base_model
        self.num_layers = int(config.num_hidden_layers)
        self.blocks = self._find_blocks()
        self._head_fn = family.heads.get(task)
        if atol is None:
            atol = 1e-5 if self.dtype == torch.float32 else (5e-2 if self.dtype in (torch.float16, torch.bfloat16) else 1e-9)
        self.atol = float(atol)
        self.last_check_diff: float | None = None
        if check:
            self.self_check(check_inputs)

    # -- structure -------------------------------------------------------------------------------------

    def _find_blocks(self) -> nn.ModuleList:
        n = self.num_layers
        for path in self.family.block_paths:
            try:
                module = self.base.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.ModuleList) and len(module) >= n:
                return module
        candidates = [
            (name.count("."), name, m)
            for name, m in self.base.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) == n
        ]
        if not candidates:
            raise ValueError(
                f"could not find the {n} transformer blocks of {type(self.hf_model).__name__}: no nn.ModuleList with "
                f"config.num_hidden_layers={n} entries (tried {list(self.family.block_paths)}). Register the family "
                "again with the right block_paths (hf_align.register_family(..., block_paths=[...], overwrite=True))."
            )
        return min(candidates, key=lambda c: (c[0], c[1]))[2]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def pooling(self) -> str:
        """How the model's head pools tokens: "cls", "last" or "none" (per-token LM head). For a head-less
        base model: the pooling of the family's own classifier ("cls" for encoders and ViT, "last" for
        decoders)."""
        if self.task == BASE_TASK:
            return next((p for p in self.family.pooling.values() if p != "none"), "cls")
        return self.family.pooling.get(self.task, "cls")

    @property
    def has_head(self) -> bool:
        """False for a head-less base model (task ``"feature-extraction"``)."""
        return self._head_fn is not None

    @property
    def is_vision(self) -> bool:
        """Whether the model takes ``pixel_values`` (its ``main_input_name``)."""
        return getattr(self.hf_model, "main_input_name", "input_ids") == "pixel_values"

    def _require_head(self, what: str) -> None:
        if self._head_fn is None:
            raise ValueError(
                f"{type(self.hf_model).__name__} is a base model without a head (task {BASE_TASK!r}): hidden states, "
                f"forward_until and pooling work, but {what} needs the model's head. Load a model with one "
                "(e.g. AutoModelForSequenceClassification / AutoModelForImageClassification / AutoModelForCausalLM)."
            )

    @property
    def classifier(self) -> nn.Module:
        """The final linear layer of the head (its ``weight`` is W, one row per class / token)."""
        self._require_head("the classifier")
        path = self.family.classifiers.get(self.task)
        if path is None:
            raise ValueError(f"family {self.family.name!r} declares no classifier path for task {self.task!r}")
        module = self.hf_model.get_submodule(path)
        # PEFT's ModulesToSaveWrapper: the active trainable copy
        if hasattr(module, "modules_to_save") and hasattr(module, "active_adapter"):
            active = module.active_adapter
            active = active[0] if isinstance(active, (list, tuple)) else active
            module = module.modules_to_save[active]
        return module

    def __repr__(self) -> str:
        return (
            f"LayerView(model={type(self.hf_model).__name__}, family={self.family.name!r}, task={self.task!r}, "
            f"num_layers={self.num_layers}, pooling={self.pooling!r})"
        )

    def describe(self) -> str:
        """A short human-readable description (what ``hf-align layers`` prints)."""
        lines = [repr(self)]
        names = {id(m): n for n, m in self.hf_model.named_modules()}
        lines.append(f"  blocks: {names.get(id(self.blocks), '?')} ({len(self.blocks)} x {type(self.blocks[0]).__name__})")
        try:
            lines.append(f"  classifier: {self.family.classifiers[self.task]} {tuple(self.classifier.weight.shape)}")
        except (KeyError, AttributeError, ValueError):
            pass
        if self.last_check_diff is not None:
            what = "head(h_L) - model logits" if self.has_head else "view hidden states - model hidden states"
            lines.append(f"  self-check: max |{what}| = {self.last_check_diff:.2e} (atol {self.atol:g})")
        return "\n".join(lines)

    # -- inputs ----------------------------------------------------------------------------------------

    def _model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if not inputs:
            raise ValueError("no inputs given: pass the model's keyword inputs (input_ids=..., attention_mask=...)")
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", "label", "label_ids", "return_dict")}
        if self.is_vision:
            if "pixel_values" not in inputs:
                raise ValueError(
                    f"{type(self.hf_model).__name__} is an image model: expected `pixel_values`, got {sorted(inputs)}"
                )
        elif "input_ids" not in inputs and "inputs_embeds" not in inputs:
            raise ValueError(
                f"{type(self.hf_model).__name__} is a text model: expected `input_ids` (or `inputs_embeds`), "
                f"got {sorted(inputs)}"
            )
        if self.task == "causal-lm" or getattr(self.hf_model.config, "use_cache", False):
            inputs.setdefault("use_cache", False)
        return inputs

    def context(self, **inputs: Any) -> HeadContext:
        return HeadContext(input_ids=inputs.get("input_ids"), attention_mask=inputs.get("attention_mask"))

    def example_inputs(self, batch_size: int = 2, seq_len: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
        """A small synthetic batch for this model (padded where the head's pooling depends on padding)."""
        config = self.hf_model.config
        generator = torch.Generator().manual_seed(seed)
        if self.is_vision:
            size = config.image_size
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            pixels = torch.randn(batch_size, config.num_channels, height, width, generator=generator)
            return {"pixel_values": pixels.to(self.device, self.dtype)}
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        vocab = text_config.vocab_size
        max_pos = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
        seq_len = min(seq_len, max_pos - 2) if max_pos else seq_len
        pad = getattr(text_config, "pad_token_id", None)
        if pad is None and self.pooling == "last":
            batch_size = 1  # transformers' decoder classifiers refuse batches > 1 without a pad id
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
        fill = pad if pad is not None else 0
        ids = torch.where(ids == fill, (ids + 1) % vocab, ids)
        mask = torch.ones_like(ids)
        if batch_size > 1:
            ids[-1, -3:] = fill
            mask[-1, -3:] = 0
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    # -- running blocks --------------------------------------------------------------------------------

    def prepare(self, **inputs: Any) -> LayerState:
        """Run the model's own forward up to its first block; return the state before block 1.

        A pre-hook on the first block captures the arguments the model prepared for its blocks and stops the
        forward; nothing after the embeddings runs. The hook is removed whatever happens.
        """
        model_inputs = self._model_inputs(inputs)
        captured: dict[str, Any] = {}

        def capture(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.hf_model(**model_inputs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(
                f"{type(self.hf_model).__name__}'s forward finished without calling its first block; cannot build "
                "the layer states"
            )
        args, kwargs = captured["args"], dict(captured["kwargs"])
        if args:
            hidden, args = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            hidden = kwargs.pop("hidden_states")
        else:
            raise RuntimeError("could not find the hidden states among the first block's arguments")
        return LayerState(
            hidden=hidden,
            depth=0,
            block_args=args,
            block_kwargs=kwargs,
            context=self.context(**inputs),
            unbatched_kwargs=self.family.unbatched_kwargs,
        )

    def run_block(self, state: LayerState) -> LayerState:
        """Run the next block (number ``state.depth + 1``) on the state; the state is not modified."""
        if state.depth >= self.num_layers:
            raise ValueError(f"the state is already after the last block ({self.num_layers})")
        out = self.blocks[state.depth](state.hidden, *state.block_args, **state.block_kwargs)
        if not isinstance(out, torch.Tensor):  # tuples and ModelOutputs: hidden states first
            out = out[0]
        return replace(state, hidden=out, depth=state.depth + 1)

    def run_blocks(self, state: LayerState, until: int) -> LayerState:
        """Run blocks ``state.depth + 1 .. until``; blocks after ``until`` never run."""
        if not state.depth <= until <= self.num_layers:
            raise ValueError(f"until must be in [{state.depth}, {self.num_layers}], got {until}")
        while state.depth < until:
            state = self.run_block(state)
        return state

    def forward_until(self, k: int, **inputs: Any) -> torch.Tensor:
        """Hidden state (B, T, D) after block ``k`` (0 = embedding output); runs exactly k blocks."""
        if not isinstance(k, int) or not 0 <= k <= self.num_layers:
            raise ValueError(f"k must be an integer in [0, {self.num_layers}], got {k!r}")
        return self.run_blocks(self.prepare(**inputs), k).hidden

    def iter_states(self, **inputs: Any) -> Iterator[LayerState]:
        """Yield the state after the embeddings and after every block, from one forward."""
        state = self.prepare(**inputs)
        yield state
        while state.depth < self.num_layers:
            state = self.run_block(state)
            yield state

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Record every block's output while the model's *own* forward runs (forward hooks, removed on exit).

        Used for training, where the forward must go through the model as called by the caller (PEFT,
        DistributedDataParallel, gradient checkpointing): ``with view.recording() as outs: model(**inputs)``
        leaves ``outs == [h_1, ..., h_L]``. Recomputations during backward (gradient checkpointing) are not
        recorded: the hooks are gone by then.
        """
        outputs: list[torch.Tensor] = []

        def keep(module, args, out):
            outputs.append(out if isinstance(out, torch.Tensor) else out[0])

        handles = [block.register_forward_hook(keep) for block in self.blocks]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    def hidden_states(self, **inputs: Any) -> tuple[torch.Tensor, ...]:
        """L+1 hidden states from one forward: [0] embedding output, [l] output of block l (before final norm)."""
        return tuple(state.hidden for state in self.iter_states(**inputs))

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base model's final norm (``family.final_norm``) applied to a hidden state; identity if none."""
        if self.family.final_norm is None:
            return hidden
        return self.base.get_submodule(self.family.final_norm)(hidden)

    def output_hidden_states(self, **inputs: Any) -> tuple[torch.Tensor, ...]:
        """L+1 hidden states as the model's own ``output_hidden_states=True`` returns them: like
        :meth:`hidden_states`, except that the last one has the final norm applied for families whose models
        return it that way (GPT-2, Llama, Mistral, Qwen2). This is what the analysis (similarity, collapse
        on hidden states) measures, so its numbers match any tool built on ``output_hidden_states``."""
        states = self.hidden_states(**inputs)
        if self.family.final_norm_in_hidden_states:
            states = (*states[:-1], self.final_norm(states[-1]))
        return states

    # -- the head --------------------------------------------------------------------------------------

    def head(self, hidden: torch.Tensor, context: HeadContext | None = None, layer: int | None = None,
             **inputs: Any) -> torch.Tensor:
        """The model's own head on a (B, T, D) hidden state of any layer.

        Pass the same ``input_ids``/``attention_mask`` the model was called with (or a ``context``): decoder
        classifiers pool at the last non-padding token, found from the pad id exactly as the model does.
        ``layer`` (1-based) matters only for multi-exit models with separate per-layer classifiers
        (a wrapper along the chain that defines ``layer_classifier(layer) -> nn.Module | None``, as
        :class:`~hf_align.modeling.MultiExitModel` does): where it returns a module, that module replaces the
        head's final linear layer at this layer (everything before it — norm, pooling, pooler — stays shared,
        as in PABEE).
        """
        self._require_head("head()")
        if context is None:
            context = self.context(**inputs)
        override = None
        if self._layer_classifier is not None and layer is not None:
            override = self._layer_classifier(layer)
        if override is None:
            return self._head_fn(self.hf_model, hidden, context)
        handle = self.classifier.register_forward_hook(lambda module, args, out: override(args[0]))
        try:
            return self._head_fn(self.hf_model, hidden, context)
        finally:
            handle.remove()

    def head_features(self, hidden: torch.Tensor, context: HeadContext | None = None, **inputs: Any) -> torch.Tensor:
        """The head's *features* on a hidden state of any layer: the input of its final linear classifier
        (:attr:`classifier`) when the model's own head runs on ``hidden`` (after final norm, pooling, pooler /
        dense), recorded by a forward pre-hook on the classifier; the classifier itself is not run.
        (B, D_head) for classification heads."""
        self._require_head("head_features()")
        if context is None:
            context = self.context(**inputs)
        recorded: list[torch.Tensor] = []

        def record(module, args):
            recorded.append(args[0])
            raise _StopForward

        handle = self.classifier.register_forward_pre_hook(record)
        try:
            self._head_fn(self.hf_model, hidden, context)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not recorded:
            raise RuntimeError(f"the head of {type(self.hf_model).__name__} did not call its classifier")
        return recorded[0]

    def layer_logits(self, **inputs: Any) -> list[torch.Tensor]:
        """``[head(h_1), ..., head(h_L)]`` from one forward; the last equals the model's own logits."""
        self._require_head("layer_logits()")
        return [self.head(s.hidden, s.context, layer=s.depth) for s in self.iter_states(**inputs) if s.depth > 0]

    # -- self-check ------------------------------------------------------------------------------------

    def self_check(self, inputs: dict[str, Any] | None = None) -> float:
        """Check that ``head(h_L)`` equals the model's own logits (eval mode, no grad); return the max abs diff.

        Raises ``ValueError`` with the measured difference when it exceeds ``atol``. Module modes are restored.
        For a head-less base model the check compares :meth:`output_hidden_states` with the model's own
        ``output_hidden_states=True`` (every layer) and the final-normed last block with its
        ``last_hidden_state``.
        """
        if self._head_fn is None:
            return self._self_check_base(inputs)
        with preserved_state(self.model), torch.no_grad():
            self.model.eval()
            inputs = dict(inputs) if inputs is not None else self.example_inputs()
            model_inputs = self._model_inputs(inputs)
            reference = self.model(**model_inputs).logits
            ours = self.head(self.forward_until(self.num_layers, **inputs), **inputs)
        if reference.shape != ours.shape:
            raise ValueError(
                f"layer-view self-check failed for {type(self.hf_model).__name__} (family {self.family.name!r}): "
                f"head output shape {tuple(ours.shape)} != model logits shape {tuple(reference.shape)}"
            )
        diff = (reference.double() - ours.double()).abs().max().item()
        self.last_check_diff = diff
        if not diff <= self.atol:  # also catches NaN
            raise ValueError(
                f"layer-view self-check failed for {type(self.hf_model).__name__} (family {self.family.name!r}): "
                f"the head applied to the last block's output differs from the model's own logits by {diff:.3g} "
                f"(max abs, tolerance {self.atol:g}). This transformers version or model variant is not handled by "
                "the registered adapter; re-register the family with a matching head "
                "(hf_align.register_family(..., overwrite=True))."
            )
        return diff

    def _self_check_base(self, inputs: dict[str, Any] | None) -> float:
        with preserved_state(self.model), torch.no_grad():
            self.model.eval()
            inputs = dict(inputs) if inputs is not None else self.example_inputs()
            out = self.hf_model(**self._model_inputs(inputs), output_hidden_states=True, return_dict=True)
            raw = self.hidden_states(**inputs)
            last = self.final_norm(raw[-1])
            ours = (*raw[:-1], last) if self.family.final_norm_in_hidden_states else raw
        reference = list(out.hidden_states or ())
        if len(reference) != len(ours):
            raise ValueError(
                f"layer-view self-check failed for {type(self.hf_model).__name__} (family {self.family.name!r}): "
                f"the model returns {len(reference)} hidden states, the view {len(ours)}"
            )
        pairs = [*zip(ours, reference), (last, out.last_hidden_state)]
        diff = max((a.double() - b.double()).abs().max().item() for a, b in pairs)
        self.last_check_diff = diff
        if not diff <= self.atol:
            raise ValueError(
                f"layer-view self-check failed for {type(self.hf_model).__name__} (family {self.family.name!r}): the "
                f"view's hidden states differ from the model's own output_hidden_states / last_hidden_state by "
                f"{diff:.3g} (max abs, tolerance {self.atol:g}). Re-register the family with the right block_paths / "
                "final_norm (hf_align.register_family(..., overwrite=True))."
            )
        return diff


# ----------------------------------------------------------------------------------------------------------
# Key/value projections per family (for per-token early exit: CALM's state propagation)
# ----------------------------------------------------------------------------------------------------------
#
# ``fn(block, hidden, block_kwargs) -> (keys, values)``: the keys and values that ``block``'s self-attention
# would write into its KV cache if ``hidden`` (B, T, D) were the block's *input*: the block's own input norm,
# its own key/value projections and, where the family has one, its rotary position embedding (taken from the
# ``position_embeddings`` the model prepared for its blocks, found in ``block_kwargs``). Both tensors have the
# cache layout (B, H_kv, T, head_dim). Nothing else of the block runs.

KVProjectionFn = Callable[[nn.Module, torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor]]


def _gpt2_kv(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    # GPT2Block: ln_1 -> attn.c_attn (Conv1D, q|k|v concatenated); absolute positions are in the embeddings
    attn = block.attn
    _, keys, values = attn.c_attn(block.ln_1(hidden)).split(attn.split_size, dim=2)
    shape = (*keys.shape[:-1], -1, attn.head_dim)
    return keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _llama_kv(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    # LlamaDecoderLayer (also Mistral, Qwen2): input_layernorm -> k_proj / v_proj -> RoPE on the keys:
    # k' = k * cos + rotate_half(k) * sin, with (cos, sin) the (B, T, head_dim) tables the model prepared
    attn = block.self_attn
    normed = block.input_layernorm(hidden)
    shape = (*normed.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(normed).view(shape).transpose(1, 2)
    values = attn.v_proj(normed).view(shape).transpose(1, 2)
    position_embeddings = block_kwargs.get("position_embeddings")
    if position_embeddings is None:
        raise ValueError("the block arguments carry no `position_embeddings` (cos, sin); cannot rotate the keys")
    cos, sin = (t.unsqueeze(1) for t in position_embeddings)
    return keys * cos + _rotate_half(keys) * sin, values


_KV_PROJECTIONS: dict[str, KVProjectionFn] = {"gpt2": _gpt2_kv, "llama": _llama_kv}


def register_kv_projection(family: str, fn: KVProjectionFn, *, overwrite: bool = False) -> None:
    """Declare how a family's block turns a hidden state into the keys/values it caches (see above)."""
    if not callable(fn):
        raise TypeError(f"fn must be callable (block, hidden, block_kwargs) -> (keys, values), got {type(fn).__name__}")
    if family in _KV_PROJECTIONS and not overwrite:
        raise ValueError(f"family {family!r} already has a key/value projection; pass overwrite=True to replace it")
    _KV_PROJECTIONS[family] = fn


def get_kv_projection(family: str) -> KVProjectionFn | None:
    """The key/value projection of a family (``None`` when none is registered)."""
    return _KV_PROJECTIONS.get(family)


def kv_projection_families() -> list[str]:
    return sorted(_KV_PROJECTIONS)
