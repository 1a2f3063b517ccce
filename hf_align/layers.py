"""The layer view: one object that knows a transformer's blocks, their hidden states and the model's own head.

Every other part of hf-align (analysis, aligned training, early exit, collapse metrics) goes through
:class:`LayerView`. Architecture names live only in the family registry (:mod:`hf_align.families`,
:func:`register_family`, the way PEFT declares its target-module mappings); this module reads it.

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
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

# The registry lives in families.py; its public names stay importable from here (old import paths).
from .families import (  # noqa: F401
    _REGISTRY,
    _TASK_SUFFIXES,
    BASE_TASK,
    TASKS,
    HeadContext,
    InferenceError,
    LayerFamily,
    _final_stage,
    _supported_text,
    cls_token,
    get_family,
    get_kv_projection,
    infer_family,
    kv_projection_families,
    last_non_pad_token,
    register_family,
    register_kv_projection,
    supported_families,
)

__all__ = [
    "BASE_TASK",
    "TASKS",
    "HeadContext",
    "LayerFamily",
    "LayerState",
    "LayerView",
    "PerBlock",
    "register_family",
    "supported_families",
    "get_family",
]

# ----------------------------------------------------------------------------------------------------------
# The view
# ----------------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the pre-hook on the first block once its arguments are captured."""


def _owned(fn: Callable) -> Callable:
    """A hook that acts only in the thread that registered it (and is a no-op in every other thread).

    The view's hooks live only for one call, but the model may be shared: another thread running the same
    model meanwhile (a pipeline served from several threads) must not see them. Registering and removing a
    hook are single dict operations, atomic under the GIL, and ``Module.__call__`` copies the hook dict before
    iterating it, so concurrent calls are safe."""
    owner = threading.get_ident()

    def hook(*args, **kwargs):
        if threading.get_ident() != owner:
            return None
        return fn(*args, **kwargs)

    return hook


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


class PerBlock(tuple):
    """A block argument whose value differs between blocks (hybrid attention: Gemma 2/3's sliding and global
    masks, per-layer-type rotary tables): element ``i`` is what the model passes to block ``i + 1``
    (:data:`ABSENT` where it passes that block nothing under this name). Arguments that every block gets
    unchanged stay plain values; :meth:`LayerView.run_block` gives block l its own element."""

    def __repr__(self) -> str:
        return f"PerBlock({tuple.__repr__(self)})"


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()  # a PerBlock element for a block that does not get this argument


def _at_block(value: Any, index: int) -> Any:
    return value[index] if isinstance(value, PerBlock) else value


def _row_select(value: Any, index: torch.Tensor, batch: int) -> Any:
    """Index the batch dimension of every tensor (recursively in tuples/lists/dicts) whose dim 0 is ``batch``."""
    if isinstance(value, PerBlock):
        return PerBlock(_row_select(v, index, batch) for v in value)
    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_row_select(v, index, batch) for v in value)
    if isinstance(value, list):
        return [_row_select(v, index, batch) for v in value]
    if isinstance(value, dict):
        return {k: _row_select(v, index, batch) for k, v in value.items()}
    return value


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """A block call's (args, kwargs) -> (hidden states, other args, other kwargs)."""
    kwargs = dict(kwargs)
    if args:
        return args[0], tuple(args[1:]), kwargs
    if "hidden_states" in kwargs:
        return kwargs.pop("hidden_states"), (), kwargs
    raise RuntimeError("could not find the hidden states among the first block's arguments")


def _same_object(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, bool, str)) and a == b)


def _merge_block_arguments(calls: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
    """Every block's (args, kwargs) -> one (args, kwargs) where values differing between blocks are PerBlock."""
    first_args, first_kwargs = calls[0]
    if any(len(a) != len(first_args) for a, _ in calls):
        raise RuntimeError("the model passes its blocks different numbers of positional arguments; cannot run them")

    def merge(values: list[Any]) -> Any:
        if all(_same_object(v, values[0]) for v in values):
            return values[0]
        return PerBlock(values)

    args = tuple(merge([a[i] for a, _ in calls]) for i in range(len(first_args)))
    keys = list(dict.fromkeys(k for _, kw in calls for k in kw))
    kwargs = {k: merge([kw.get(k, ABSENT) for _, kw in calls]) for k in keys}
    return args, kwargs


def _output_kind(out: Any) -> Any:
    """What a block returns: "tensor", or the length of the tuple whose first element is the hidden state."""
    if isinstance(out, torch.Tensor):
        return "tensor"
    if type(out) is tuple:
        return len(out)
    return "other"  # a ModelOutput or anything else: blocks are run for real when capturing


_PASS_LOCK = threading.Lock()
_PASS_USERS: dict[int, int] = {}  # id(block) -> number of captures in flight that switched its class
_PASS_CLASSES: dict[type, type] = {}
_PASS_LOCAL = threading.local()


def _passing_call(self, *args, **kwargs):
    """``__call__`` of a block while the view captures block arguments: in the capturing thread the capture's
    own function gets the call (before any hook: the block does not run and nobody sees a call); in every other
    thread it is the block's ordinary ``__call__``."""
    plan = getattr(_PASS_LOCAL, "plan", None)
    record = plan.get(id(self)) if plan else None
    base = type(self).__bases__[0]
    if record is None:
        return base.__call__(self, *args, **kwargs)
    return record(lambda: base.__call__(self, *args, **kwargs), args, kwargs)


def _passing_class(cls: type) -> type:
    sub = _PASS_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {"__call__": _passing_call, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__, "_hf_align_passing": True})
        _PASS_CLASSES[cls] = sub
    return sub


@contextlib.contextmanager
def _capturing(blocks: list[nn.Module], record: Callable) -> Iterator[None]:
    """Within the block, every call of one of ``blocks`` in this thread goes to ``record(run, args, kwargs)``
    (``run()`` runs the block for real) instead of the block. The blocks' classes are switched to a subclass
    that dispatches per thread (reference counted over concurrent captures) and switched back afterwards."""
    with _PASS_LOCK:
        for block in blocks:
            if _PASS_USERS.get(id(block), 0) == 0 and not getattr(type(block), "_hf_align_passing", False):
                block.__class__ = _passing_class(type(block))
            _PASS_USERS[id(block)] = _PASS_USERS.get(id(block), 0) + 1
    saved = getattr(_PASS_LOCAL, "plan", None)
    _PASS_LOCAL.plan = {**(saved or {}), **{id(b): record for b in blocks}}
    try:
        yield
    finally:
        _PASS_LOCAL.plan = saved
        with _PASS_LOCK:
            for block in blocks:
                _PASS_USERS[id(block)] -= 1
                if _PASS_USERS[id(block)] == 0:
                    del _PASS_USERS[id(block)]
                    if getattr(type(block), "_hf_align_passing", False):
                        block.__class__ = type(block).__bases__[0]


@dataclass
class LayerState:
    """A batch in flight between blocks.

    ``hidden`` (B, T, D) is the output of block ``depth`` (the embedding output when ``depth == 0``);
    ``block_args``/``block_kwargs`` are what the model itself passes to its blocks (captured from its own
    forward); an argument that differs between blocks is a :class:`PerBlock` tuple (element l-1 for block l),
    so a state stays valid whatever its ``depth`` (``dataclasses.replace(state, depth=k)`` works);
    :meth:`arguments_of` gives one block's own arguments. ``context`` is what the head needs.
    """

    hidden: torch.Tensor
    depth: int
    block_args: tuple
    block_kwargs: dict
    context: HeadContext
    unbatched_kwargs: tuple[str, ...] = ()

    def map_arguments(self, fn: Callable[[Any], Any]) -> LayerState:
        """The same state with ``fn`` applied to every block argument (recursively into tuples and lists; dict
        values of ``block_kwargs``). ``fn`` gets each leaf value and returns its replacement."""

        def walk(value: Any) -> Any:
            if isinstance(value, PerBlock):  # each block's own value (absent entries stay absent)
                return PerBlock(v if v is ABSENT else walk(v) for v in value)
            if isinstance(value, tuple):
                return tuple(walk(v) for v in value)
            if isinstance(value, list):
                return [walk(v) for v in value]
            return fn(value)

        return replace(self, block_args=walk(self.block_args),
                       block_kwargs={key: walk(value) for key, value in self.block_kwargs.items()})

    def arguments(self) -> list[Any]:
        """Every block argument (positional, then keyword values), for inspection; a :class:`PerBlock` argument
        contributes each block's value once (in block order, identical values once)."""
        out: list[Any] = []
        for value in [*self.block_args, *self.block_kwargs.values()]:
            if isinstance(value, PerBlock):
                seen: list[Any] = []
                for v in value:
                    if v is not ABSENT and not any(v is w for w in seen):
                        seen.append(v)
                out.extend(seen)
            else:
                out.append(value)
        return out

    def arguments_of(self, layer: int) -> tuple[tuple, dict]:
        """``(args, kwargs)`` the model passes to block ``layer`` (1-based), hidden states excluded."""
        index = layer - 1
        args = tuple(_at_block(v, index) for v in self.block_args)
        kwargs = {k: _at_block(v, index) for k, v in self.block_kwargs.items()}
        return args, {k: v for k, v in kwargs.items() if v is not ABSENT}

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


def run_block_sequence(blocks: list[nn.Module], hidden: torch.Tensor,
                       arguments: list[tuple[tuple, dict]]) -> torch.Tensor:
    """``blocks`` in order on ``hidden``, each with its own captured ``(args, kwargs)``; a block's output is its
    hidden state, or a tuple / ModelOutput whose first item is. The one loop every block runs through (eager, or
    as the function a compiled runner compiles: :mod:`hf_align.generation.compiled`)."""
    for block, (args, kwargs) in zip(blocks, arguments):
        out = block(hidden, *args, **kwargs)
        hidden = out if isinstance(out, torch.Tensor) else out[0]
    return hidden


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
        task = _task_of(self.hf_model)
        if task is None and getattr(self.hf_model, "base_model", None) is self.hf_model:
            task = BASE_TASK  # a head-less base model
        if family is None:
            family = self._inferred_family(model_type, task, how)
        if task == BASE_TASK and not family.base_model:
            raise ValueError(
                f"{type(self.hf_model).__name__} is the base model of family {family.name!r}, which is supported only "
                f"with its heads {list(family.heads)}. Supported families: {_supported_text()}. {how}"
            )
        if task != BASE_TASK and task not in family.heads:
            raise ValueError(
                f"{type(self.hf_model).__name__} is a {family.name} model, but its head type ({task or 'unknown'}) "
                f"is not supported; family {family.name!r} supports {[*family.heads, BASE_TASK]}. "
                f"Supported families: {_supported_text()}. {how}"
            )
        self.family = family
        self.task = task
        self.base = self.hf_model.base_model
        # the configuration of the blocks: the model's own, or a sub-configuration (CLIP's vision_config)
        self.layer_config = getattr(config, family.config_path) if family.config_path else config
        self.num_layers = int(self.layer_config.num_hidden_layers)
        self.blocks = self._find_blocks()
        self._output_kind: Any = None  # what a block returns (learned on the first capture, see prepare)
        self._head_fn = family.heads.get(task)
        if atol is None:
            atol = 1e-5 if self.dtype == torch.float32 else (5e-2 if self.dtype in (torch.float16, torch.bfloat16) else 1e-9)
        self.atol = float(atol)
        self.last_check_diff: float | None = None
        if check:
            try:
                self.self_check(check_inputs)
            except Exception as error:  # noqa: BLE001 - an inferred view that fails in any way is refused
                if family.inferred is None:
                    raise
                raise ValueError(
                    f"hf_align has no layer-view adapter for {type(self.hf_model).__name__} (config.model_type="
                    f"{model_type!r}); it inferred a layer view by structure ({family.inferred}), but it does not "
                    f"reproduce the model: {error} Register the family with hf_align.register_family(name, "
                    "model_types=[...], heads={task: fn}) (see docs/layers.md)."
                ) from None
            if family.inferred is not None:
                warnings.warn(
                    f"hf_align: {type(self.hf_model).__name__} (model_type {model_type!r}) is not a registered family; "
                    f"inferred by structure: {family.inferred}. Kept: the self-check reproduces the model's own "
                    f"outputs (max abs diff {self.last_check_diff:.2e}). Register the family to make this explicit.",
                    stacklevel=2,
                )
        elif family.inferred is not None:
            raise ValueError(f"{type(self.hf_model).__name__} is not a registered family; an inferred view "
                             f"({family.inferred}) is kept only after its self-check, so check=False is refused")

    # -- structure -------------------------------------------------------------------------------------

    def _inferred_family(self, model_type: str | None, task: str | None, how: str) -> LayerFamily:
        """The structural fallback (:func:`hf_align.families.infer_family`) for an unregistered model type."""
        unsupported = (f"hf_align has no layer-view adapter for {type(self.hf_model).__name__} "
                       f"(config.model_type={model_type!r}) and")
        if getattr(self.hf_model, "config", None) is None or task is None:
            raise ValueError(f"{unsupported} its head type is unknown. Supported families: {_supported_text()}. {how}")
        try:
            family = infer_family(self.hf_model, task)
        except InferenceError as error:
            raise ValueError(f"{unsupported} the structural fallback failed: {error}. Supported families: "
                             f"{_supported_text()}.") from None
        return family

    def _find_blocks(self) -> nn.ModuleList:
        n = self.num_layers
        if self.family.blocks is not None:  # L block applications that are not one ModuleList (shared layers)
            blocks = list(self.family.blocks(self.base))
            if len(blocks) != n:
                raise ValueError(f"family {self.family.name!r} gave {len(blocks)} blocks, expected {n}")
            return nn.ModuleList(blocks)
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
        decoders; "mean" where the family's classifier averages tokens). A family may declare it per
        configuration (a callable ``config -> str``, e.g. ModernBERT's ``classifier_pooling``)."""
        values = [p(self.hf_model.config) if callable(p) else p for p in self.family.pooling.values()]
        if self.task == BASE_TASK:
            return next((p for p in values if p != "none"), "cls")
        pooling = self.family.pooling.get(self.task, "cls")
        return pooling(self.hf_model.config) if callable(pooling) else pooling

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
        if self.family.inferred is not None:
            lines.append(f"  inferred by structure (not registered): {self.family.inferred}")
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
        config = self.layer_config if self.is_vision else self.hf_model.config
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

        The arguments the model prepares for *each* block are captured (hybrid models give sliding and global
        layers different masks and rotary tables): while the model's forward runs, each call of a block in this
        thread is recorded and answered with its input hidden state (the block does not run, and no hook of the
        block sees a call), and the forward stops at block L's call, so nothing after the embeddings and the
        model's own mask / position preparation runs. Arguments that differ between blocks become
        :class:`PerBlock` tuples. The very first capture of a view runs blocks 1..L-1 for real, once, to learn
        what a block returns. Other threads using the model meanwhile see ordinary blocks.
        """
        model_inputs = self._model_inputs(inputs)
        calls: list[tuple[tuple, dict]] = []
        n = self.num_layers
        kind = self._output_kind

        def record(run, args, kwargs):
            calls.append((args, kwargs))
            if len(calls) >= n:
                raise _StopForward
            if kind is None or kind == "other":  # the first capture runs the blocks and learns what they return
                out = run()
                if self._output_kind is None:
                    self._output_kind = _output_kind(out)
                return out
            hidden = args[0] if args else kwargs["hidden_states"]
            return hidden if kind == "tensor" else (hidden, *([None] * (kind - 1)))

        modules = list({id(b): b for b in self.blocks}.values())
        try:
            with _capturing(modules, record):
                self.hf_model(**model_inputs)
        except _StopForward:
            pass
        if not calls:
            raise RuntimeError(
                f"{type(self.hf_model).__name__}'s forward finished without calling its first block; cannot build "
                "the layer states"
            )
        if len(calls) != n:
            raise RuntimeError(
                f"{type(self.hf_model).__name__}'s forward called its blocks {len(calls)} times, expected {n}; "
                "cannot capture every block's arguments"
            )
        hidden = _split_hidden(*calls[0])[0]
        args, kwargs = _merge_block_arguments([_split_hidden(*c)[1:] for c in calls])
        return LayerState(
            hidden=hidden,
            depth=0,
            block_args=args,
            block_kwargs=kwargs,
            context=self.context(**inputs),
            unbatched_kwargs=self.family.unbatched_kwargs,
        )

    def run_block(self, state: LayerState) -> LayerState:
        """Run the next block (number ``state.depth + 1``) on the state, with that block's own arguments; the
        state is not modified."""
        if state.depth >= self.num_layers:
            raise ValueError(f"the state is already after the last block ({self.num_layers})")
        return self.run_blocks(state, state.depth + 1)

    def segment(self, state: LayerState, until: int) -> tuple[list[nn.Module], list[tuple[tuple, dict]]]:
        """Blocks ``state.depth + 1 .. until`` and each one's own ``(args, kwargs)``: the input of
        :func:`run_block_sequence` (what a compiled runner takes)."""
        if not state.depth <= until <= self.num_layers:
            raise ValueError(f"until must be in [{state.depth}, {self.num_layers}], got {until}")
        return (list(self.blocks[state.depth: until]),
                [state.arguments_of(layer + 1) for layer in range(state.depth, until)])

    def run_blocks(self, state: LayerState, until: int, runner: Any = None) -> LayerState:
        """Run blocks ``state.depth + 1 .. until``; blocks after ``until`` never run. ``runner``: a replacement for
        :func:`run_block_sequence` with its signature (a compiled copy), given the first block's index first."""
        blocks, arguments = self.segment(state, until)
        if not blocks:
            return state
        if runner is None:
            hidden = run_block_sequence(blocks, state.hidden, arguments)
        else:
            hidden = runner(state.depth, blocks, state.hidden, arguments)
        return replace(state, hidden=hidden, depth=until)

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

        # one hook per module: a block shared by several layers (ALBERT's layer groups) records each of its calls once
        handles = [block.register_forward_hook(_owned(keep)) for block in {id(b): b for b in self.blocks}.values()]
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
        return _final_stage(self.base, self.family.final_norm, hidden)

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
        handle = self.classifier.register_forward_hook(_owned(lambda module, args, out: override(args[0])))
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

        handle = self.classifier.register_forward_pre_hook(_owned(record))
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


_EVAL_LOCK = threading.Lock()
_EVAL_USERS: dict[int, list] = {}  # id(model) -> [calls inside eval_mode, the modes to restore]


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Eval mode (dropout off) for every module of ``models`` inside the block; when the last call using a model
    leaves, each of its modules gets back its own train/eval flag, whatever happened inside.

    Re-entrant, also across threads: calls sharing a model (a pipeline served from several threads) all run in eval
    mode, and the flags saved by the first are restored by the last, so no call sees another's restore and the
    model ends as it began."""
    entered = []
    try:
        for model in models:
            if model is None:
                continue
            with _EVAL_LOCK:
                entry = _EVAL_USERS.get(id(model))
                if entry is None:
                    entry = _EVAL_USERS[id(model)] = [0, [(m, m.training) for m in model.modules()]]
                    model.eval()
                entry[0] += 1
            entered.append(model)
        yield
    finally:
        for model in reversed(entered):  # reverse order, so shared modules end as they began
            with _EVAL_LOCK:
                entry = _EVAL_USERS[id(model)]
                entry[0] -= 1
                if entry[0] == 0:
                    del _EVAL_USERS[id(model)]
                    for module, training in entry[1]:
                        module.training = training
