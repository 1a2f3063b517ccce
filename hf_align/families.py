"""The family registry: the one place in hf-align that knows architecture names.

Each supported architecture family is declared once (:func:`register_family`), the way PEFT declares its
target-module mappings: which ``config.model_type`` values it covers, the model's own head for each task (final
norm, pooling, pooler, classifier or LM head, built from the model's *own* modules), where its blocks live, how it
pools, and its final norm. Per-family key/value projections (used by per-token early exit) are declared here too
(:func:`register_kv_projection`). :class:`hf_align.LayerView` reads this registry and self-checks every entry
against the model's own outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "BASE_TASK",
    "TASKS",
    "HeadContext",
    "LayerFamily",
    "get_family",
    "get_kv_projection",
    "is_causal_lm_family",
    "recorded_kv",
    "router_aux_loss",
    "support_table",
    "kv_projection_families",
    "register_family",
    "register_kv_projection",
    "supported_families",
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
        pooling: task -> how the head pools tokens ("cls", "last", "mean", "none" for per-token LM heads), or a
            callable ``config -> str`` where the configuration decides.
        final_norm: dotted path (from ``model.base_model``) of the final norm the base model applies to the
            last block's output (``None`` if it has none); used for head-less base models.
        final_norm_in_hidden_states: whether the model's own ``output_hidden_states=True`` returns the last
            hidden state *after* that final norm (GPT-2, Llama) or before it (ViT, whose
            ``last_hidden_state`` alone is normed).
        causal: a decoder-only (left-to-right) family: its causal LMs can be decoded by speculative decoding
            and per-token exit.
        flops_counted: ``exit_costs``' analytic FLOP count holds for the family (False for mixture-of-experts
            blocks, whose expert FLOPs depend on the routing, and DeBERTa's relative-position attention: the
            table says "not counted"; the measured FLOPs are still reported).
        blocks: ``fn(base_model) -> list of modules`` for families whose L block applications are not one
            ``ModuleList`` (ALBERT shares one layer group across all layers).
        base_model: whether the family's head-less base model (``AutoModel``) is supported (False for CLIP /
            SigLIP, whose base model is the dual text-image model: use their vision towers' families).
        config_path: the attribute of the model's config that configures the blocks, where it is not the config
            itself (CLIP / SigLIP image classifiers: ``"vision_config"``).
        limits: capability -> a known limit, shown in the support table beside "yes" (e.g. speculative
            decoding of ALiBi models at batch 1 only).
        inferred: for a family built by the structural fallback, what was inferred (``None`` if registered).
    """

    name: str
    model_types: tuple[str, ...]
    heads: dict[str, HeadFn]
    classifiers: dict[str, str] = field(default_factory=dict)
    block_paths: tuple[str, ...] = ()
    unbatched_kwargs: tuple[str, ...] = ()
    pooling: dict[str, str] = field(default_factory=dict)
    final_norm: str | tuple[str, ...] | None = None
    final_norm_in_hidden_states: bool = False
    causal: bool = False
    flops_counted: bool = True
    blocks: Callable[[nn.Module], list[nn.Module]] | None = None
    config_path: str | None = None
    base_model: bool = True
    limits: dict[str, str] = field(default_factory=dict)
    inferred: str | None = None

    @property
    def is_decoder(self) -> bool:
        """Alias of :attr:`causal` (decoder-only, left to right)."""
        return self.causal


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
    final_norm: str | Sequence[str] | None = None,
    final_norm_in_hidden_states: bool = False,
    causal: bool = False,
    flops_counted: bool = True,
    blocks: Callable[[nn.Module], list[nn.Module]] | None = None,
    config_path: str | None = None,
    base_model: bool = True,
    limits: dict[str, str] | None = None,
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
        final_norm=final_norm if final_norm is None or isinstance(final_norm, str) else tuple(final_norm),
        final_norm_in_hidden_states=bool(final_norm_in_hidden_states),
        causal=bool(causal),
        flops_counted=bool(flops_counted),
        blocks=blocks,
        config_path=config_path,
        base_model=bool(base_model),
        limits=dict(limits or {}),
    )
    _REGISTRY[name] = family
    return family


def _tasks(family: LayerFamily) -> list[str]:
    return [*family.heads, *([BASE_TASK] if family.base_model else [])]


def supported_families() -> dict[str, dict[str, Any]]:
    """``{family: {"model_types": [...], "tasks": [...]}}`` for every registered family."""
    return {f.name: {"model_types": list(f.model_types), "tasks": _tasks(f)} for f in _REGISTRY.values()}


def get_family(model_type: str) -> LayerFamily | None:
    for family in _REGISTRY.values():
        if model_type in family.model_types:
            return family
    return None


def is_causal_lm_family(model_type: str) -> bool:
    """Whether ``config.model_type`` belongs to a registered decoder-only (left-to-right) family."""
    family = get_family(model_type)
    return family is not None and family.causal


def _supported_text() -> str:
    return "; ".join(f"{f.name} ({', '.join(f.model_types)}: {', '.join(_tasks(f))})" for f in _REGISTRY.values())


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
        flops_counted=False,  # disentangled relative-position attention: products the shape walk does not see
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
        causal=True,
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
        causal=True,
    )
    _register_decoder_families()
    _register_encoder_and_vision_families()


def _final_stage(base: nn.Module, paths: str | Sequence[str] | None, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the base model's final modules (``paths`` from ``model.base_model``, in order; a path whose module is
    ``None`` in this configuration, e.g. OPT's ``project_out`` when it has none, is skipped)."""
    if paths is None:
        return hidden
    for path in (paths,) if isinstance(paths, str) else paths:
        module = base
        for part in path.split("."):
            if not hasattr(module, part):
                raise AttributeError(f"{type(base).__name__} has no module {path!r} (a family's final stage)")
            module = getattr(module, part)
            if module is None:
                break
        if module is not None:
            hidden = module(hidden)
    return hidden


# -- logits after the LM head, as each family's *ForCausalLM.forward computes them -----------------------


def _soft_cap(model, logits):
    # Gemma 2 / 3: final-logit soft-capping, cap * tanh(logits / cap)
    cap = model.config.final_logit_softcapping
    if cap is not None:
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits


def _logit_scale(model, logits):
    # Cohere: logits * logit_scale
    return logits * model.logit_scale


def _logits_scaling(model, logits):
    # Granite: logits / logits_scaling
    return logits / model.config.logits_scaling


def _lm_head(final: str | Sequence[str], lm_head: str = "lm_head", post: Callable | None = None) -> HeadFn:
    def head(model, hidden, ctx):
        logits = model.get_submodule(lm_head)(_final_stage(model.base_model, final, hidden))
        return logits if post is None else post(model, logits)

    return head


def _last_token_head(final: str | Sequence[str], score: str = "score") -> HeadFn:
    def head(model, hidden, ctx):
        # final stage -> score at the last non-padding token (per-token final stage: pooling first is the same)
        pooled = last_non_pad_token(hidden, ctx, _pad_id(model))
        return model.get_submodule(score)(_final_stage(model.base_model, final, pooled[:, None])[:, 0])

    return head


def _register_decoder_families() -> None:
    seq, _, lm = TASKS
    # name, model types, final stage (from base_model), blocks, sequence classifier?, logits post-processing, MoE
    table = [
        ("qwen3", ["qwen3"], "norm", "layers", True, None, False),
        ("gemma", ["gemma"], "norm", "layers", True, None, False),
        ("gemma2", ["gemma2"], "norm", "layers", True, _soft_cap, False),
        ("gemma3", ["gemma3_text"], "norm", "layers", True, _soft_cap, False),
        ("phi3", ["phi3"], "norm", "layers", True, None, False),
        ("phi", ["phi"], "final_layernorm", "layers", True, None, False),
        ("olmo", ["olmo"], "norm", "layers", True, None, False),
        ("olmo2", ["olmo2"], "norm", "layers", True, None, False),
        ("gpt-neox", ["gpt_neox"], "final_layer_norm", "layers", True, None, False),
        ("opt", ["opt"], ("decoder.final_layer_norm", "decoder.project_out"), "decoder.layers", True, None, False),
        ("falcon", ["falcon"], "ln_f", "h", True, None, False),
        ("stablelm", ["stablelm"], "norm", "layers", True, None, False),
        ("granite", ["granite"], "norm", "layers", False, _logits_scaling, False),
        ("starcoder2", ["starcoder2"], "norm", "layers", True, None, False),
        ("mixtral", ["mixtral"], "norm", "layers", True, None, True),
        ("qwen2-moe", ["qwen2_moe"], "norm", "layers", True, None, True),
        ("qwen3-moe", ["qwen3_moe"], "norm", "layers", True, None, True),
        ("cohere", ["cohere"], "norm", "layers", False, _logit_scale, False),
        ("bloom", ["bloom"], "ln_f", "h", True, None, False),
        ("gpt-bigcode", ["gpt_bigcode"], "ln_f", "h", True, None, False),
        ("gpt-neo", ["gpt_neo"], "ln_f", "h", True, None, False),
        ("gpt-j", ["gptj"], "ln_f", "h", True, None, False),
    ]
    # known limits of speculative decoding (hf_align/generation/speculative.py), shown in the support table
    window = {"speculative": "within the sliding window"}
    limits = {
        "gemma2": window, "gemma3": window, "llama4": {"speculative": "within one attention chunk"},
    }
    table.append(  # Llama 4 (text): chunked and global attention layers; its causal LM's base_model is itself
        ("llama4", ["llama4_text"], "model.norm", "model.layers", False, None, True))
    for name, model_types, final, blocks, has_seq, post, moe in table:
        heads = {lm: _lm_head(final, post=post)}
        classifiers = {lm: "lm_head"}
        pooling = {lm: "none", seq: "last"}  # a decoder family's classifier pools the last token
        if has_seq:
            heads[seq], classifiers[seq], pooling[seq] = _last_token_head(final), "score", "last"
        register_family(name, model_types, heads, classifiers=classifiers, block_paths=(blocks,), pooling=pooling,
                        final_norm=final, final_norm_in_hidden_states=True, causal=True, flops_counted=not moe,
                        limits=limits.get(name), base_model=name != "llama4")


# -- encoders and vision ---------------------------------------------------------------------------------


def _modernbert_sequence_head(model, hidden, ctx):
    # ModernBertForSequenceClassification: final_norm -> CLS or masked mean -> head (dense, act, norm) -> drop
    # -> classifier
    hidden = model.model.final_norm(hidden)
    if model.config.classifier_pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = ctx.attention_mask
        if mask is None:
            mask = torch.ones(hidden.shape[:2], device=hidden.device, dtype=torch.bool)
        pooled = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
    return model.classifier(model.drop(model.head(pooled)))


def _modernbert_pooling(config) -> str:
    return "cls" if config.classifier_pooling == "cls" else "mean"


def _albert_sequence_head(model, hidden, ctx):
    # AlbertForSequenceClassification: pooler (dense + tanh on CLS) -> dropout -> classifier
    base = model.base_model
    pooled = base.pooler_activation(base.pooler(hidden[:, 0]))
    return model.classifier(model.dropout(pooled))


def _dinov2_image_head(model, hidden, ctx):
    # Dinov2ForImageClassification: layernorm -> [CLS, mean of patch tokens] -> classifier
    hidden = model.base_model.layernorm(hidden)
    return model.classifier(torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1))


def _beit_image_head(model, hidden, ctx):
    # BeitForImageClassification: layernorm (identity with mean pooling) -> pooler (layernorm of the mean patch
    # token, or CLS) -> classifier
    base = model.base_model
    return model.classifier(base.pooler(base.layernorm(hidden)))


def _clip_image_head(model, hidden, ctx):
    # CLIPForImageClassification: mean of the patch tokens of the last block's output (no post_layernorm) ->
    # classifier
    return model.classifier(hidden[:, 1:, :].mean(dim=1))


def _siglip_image_head(model, hidden, ctx):
    # SiglipForImageClassification: post_layernorm -> mean over every token -> classifier
    return model.classifier(model.vision_model.post_layernorm(hidden).mean(dim=1))


def _albert_blocks(base: nn.Module) -> list[nn.Module]:
    # AlbertTransformer: layer i runs layer group int(i / (L / G)) (one shared group by default)
    config, groups = base.config, base.encoder.albert_layer_groups
    n, g = config.num_hidden_layers, config.num_hidden_groups
    return [groups[int(i / (n / g))] for i in range(n)]


def _register_encoder_and_vision_families() -> None:
    seq, img, _ = TASKS
    register_family(
        "modernbert", ["modernbert"], {seq: _modernbert_sequence_head}, classifiers={seq: "classifier"},
        block_paths=("layers",), pooling={seq: _modernbert_pooling}, final_norm="final_norm",
        final_norm_in_hidden_states=True,
    )
    register_family(
        "mpnet", ["mpnet"], {seq: _classification_head_module}, classifiers={seq: "classifier.out_proj"},
        block_paths=("encoder.layer",), pooling={seq: "cls"},
    )
    register_family(
        "albert", ["albert"], {seq: _albert_sequence_head}, classifiers={seq: "classifier"}, pooling={seq: "cls"},
        blocks=_albert_blocks,
    )
    register_family(
        "dinov2", ["dinov2"], {img: _dinov2_image_head}, classifiers={img: "classifier"},
        block_paths=("encoder.layer", "layers"), pooling={img: "cls"}, final_norm="layernorm",
    )
    register_family(
        "beit", ["beit"], {img: _beit_image_head}, classifiers={img: "classifier"},
        block_paths=("encoder.layer", "layers"), pooling={img: "cls"}, final_norm="layernorm",
    )
    register_family(
        "clip-vision", ["clip_vision_model"], {}, block_paths=("encoder.layers", "vision_model.encoder.layers"),
        pooling={img: "cls"},
    )
    register_family(
        "siglip-vision", ["siglip_vision_model"], {}, block_paths=("encoder.layers", "vision_model.encoder.layers"),
        pooling={img: "mean"}, final_norm="post_layernorm",
    )
    # the image classifiers built on those towers (their config is the dual config: blocks in vision_config)
    register_family(
        "clip", ["clip"], {img: _clip_image_head}, classifiers={img: "classifier"},
        block_paths=("vision_model.encoder.layers",), pooling={img: "mean"}, config_path="vision_config",
        base_model=False,
    )
    register_family(
        "siglip", ["siglip"], {img: _siglip_image_head}, classifiers={img: "classifier"},
        block_paths=("vision_model.encoder.layers",), pooling={img: "mean"}, config_path="vision_config",
        base_model=False,
    )


_register_builtin_families()


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


class _KVRecorded(Exception):
    """Raised by the recording cache once the block's attention has handed it its keys and values."""


def recorded_kv(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Any family's key/value projection, by the block's own code: the block runs on ``hidden`` with a copy of
    its KV cache whose ``update(keys, values, layer_idx, ...)`` records what the attention hands it (after the
    block's input norm, key/value projections, key norm and rotary or any other position treatment) and stops
    the block right there. Nothing is written to the real cache; the rest of the block never runs.

    Used for every decoder-only family without a hand-written projection (``get_kv_projection``)."""
    from transformers.cache_utils import Cache

    kwargs = dict(block_kwargs)
    names = [k for k, v in kwargs.items() if isinstance(v, Cache)]
    if not names:
        raise ValueError("the block arguments carry no KV cache; cannot record the keys/values the block would cache")
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(key_states, value_states, *args, **kw):
        recorded.append((key_states, value_states))
        raise _KVRecorded

    for name in names:
        proxy = copy.copy(kwargs[name])
        proxy.update = update
        kwargs[name] = proxy
    try:
        block(hidden, **kwargs)
    except _KVRecorded:
        pass
    if not recorded:
        raise RuntimeError(f"{type(block).__name__} did not hand keys/values to its cache")
    return recorded[0]


_KV_PROJECTIONS: dict[str, KVProjectionFn] = {"gpt2": _gpt2_kv, "llama": _llama_kv}


def register_kv_projection(family: str, fn: KVProjectionFn, *, overwrite: bool = False) -> None:
    """Declare how a family's block turns a hidden state into the keys/values it caches (see above)."""
    if not callable(fn):
        raise TypeError(f"fn must be callable (block, hidden, block_kwargs) -> (keys, values), got {type(fn).__name__}")
    if family in _KV_PROJECTIONS and not overwrite:
        raise ValueError(f"family {family!r} already has a key/value projection; pass overwrite=True to replace it")
    _KV_PROJECTIONS[family] = fn


def get_kv_projection(family: str) -> KVProjectionFn | None:
    """The key/value projection of a family: the registered one, else :func:`recorded_kv` for a decoder-only
    family (``None`` for other families)."""
    if family in _KV_PROJECTIONS:
        return _KV_PROJECTIONS[family]
    registered = _REGISTRY.get(family)
    return recorded_kv if registered is not None and registered.causal else None


def kv_projection_families() -> list[str]:
    return sorted(set(_KV_PROJECTIONS) | {f.name for f in _REGISTRY.values() if f.causal})


# ----------------------------------------------------------------------------------------------------------
# Mixture-of-experts: the router's auxiliary loss, as the model adds it
# ----------------------------------------------------------------------------------------------------------


def router_aux_loss(model: nn.Module, outputs: Any) -> torch.Tensor | None:
    """The load-balancing loss a mixture-of-experts causal LM adds to its language-modelling loss
    (Mixtral / Qwen2-MoE / Qwen3-MoE ``*ForCausalLM.forward``: ``loss + router_aux_loss_coef * aux_loss``, present
    when the model was called with ``output_router_logits=True``); ``None`` when the outputs carry none."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is None:
        return None
    coef = getattr(model, "router_aux_loss_coef", None)
    if coef is None:
        coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    return coef * aux


# ----------------------------------------------------------------------------------------------------------
# The support table (generated: `hf-align layers --list_families`, docs/layers.md)
# ----------------------------------------------------------------------------------------------------------

CAPABILITIES = ("analysis", "aligned training", "classifier early exit", "speculative", "per-token exit", "exit costs")


def family_capabilities(family: LayerFamily) -> dict[str, str]:
    """What hf-align offers for a family, from its registry entry: "yes", "-" (not applicable), or for exit
    costs "counted" / "not counted" (analytic FLOPs)."""
    seq, img, lm = TASKS
    has_head = bool(family.heads)
    classifier = seq in family.heads or img in family.heads
    decoder_lm = family.causal and lm in family.heads
    caps = {
        "analysis": "yes",
        "aligned training": "yes" if has_head else "-",
        "classifier early exit": "yes" if classifier else "-",
        "speculative": "yes" if decoder_lm else "-",
        "per-token exit": "yes" if decoder_lm and get_kv_projection(family.name) is not None else "-",
        "exit costs": ("counted" if family.flops_counted else "not counted") if has_head else "-",
    }
    return {c: f"{v} ({family.limits[c]})" if v != "-" and c in family.limits else v for c, v in caps.items()}


def support_table() -> str:
    """The family x capability table (markdown) of every registered family."""
    names = {"sequence-classification": "seq-cls", "image-classification": "img-cls", "causal-lm": "causal-lm"}
    header = ["family", "model types", "heads", *CAPABILITIES]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for family in _REGISTRY.values():
        caps = family_capabilities(family)
        heads = ", ".join([*(names[t] for t in family.heads), *(["base"] if family.base_model else [])])
        lines.append("| " + " | ".join([family.name, ", ".join(family.model_types), heads,
                                          *(caps[c] for c in CAPABILITIES)]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m hf_align.families: print the support table
    print(support_table())


# ----------------------------------------------------------------------------------------------------------
# The structural fallback: a family nobody registered, inferred from the model's structure and own forward
# ----------------------------------------------------------------------------------------------------------


class InferenceError(ValueError):
    """The structural fallback could not infer a family (the message says what is missing)."""


def _probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    device = next(model.parameters()).device
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        pixels = torch.randn(1, config.num_channels, height, width, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": pixels.to(device, next(model.parameters()).dtype)}
    vocab = int(text.vocab_size)
    ids = torch.randint(1, vocab, (1, 6), generator=torch.Generator().manual_seed(0)) if vocab > 1 else torch.zeros(1, 6)
    return {"input_ids": ids.long().to(device), "attention_mask": torch.ones_like(ids).long().to(device)}


def _generic_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Logit post-processing read from the config (no architecture names): soft-capping
    (``final_logit_softcapping``), division by ``logits_scaling``, multiplication by the model's ``logit_scale``."""
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scaling = getattr(config, "logits_scaling", None)
    if scaling not in (None, 1, 1.0):
        logits = logits / scaling
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    return logits


def infer_family(model: nn.Module, task: str) -> LayerFamily:
    """Infer a :class:`LayerFamily` for a model of an unregistered type, by structure and by its own forward.

    * blocks: the shallowest ``nn.ModuleList`` of the base model with ``config.num_hidden_layers`` entries;
    * the final stage (final norm, projections): the base model's modules the model's own forward calls after
      the last block returns (forward hooks, one small probe forward);
    * the head: for causal LMs the output embeddings (``get_output_embeddings()``) after the final stage, with
      the config's logit soft-capping / scaling; for sequence classifiers of a left-to-right model the linear
      layer called last, read at the last non-padding token; base models need no head;
    * causal: whether the base model's output at the first position ignores the last token.

    The result is only a proposal: :class:`~hf_align.LayerView` keeps it only if its self-check passes.
    Raises :class:`InferenceError` saying what could not be found.
    """
    seq, _, lm = TASKS
    config = model.config
    model_type = getattr(config, "model_type", None) or type(model).__name__
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    how = ("register it with hf_align.register_family(name, model_types=[...], heads={task: fn}, block_paths=[...]) "
           "(see docs/layers.md)")
    if getattr(config, "is_encoder_decoder", False):
        raise InferenceError(f"{type(model).__name__} is an encoder-decoder model; the structural fallback infers "
                             f"encoder-only and decoder-only models; {how}")
    if not isinstance(n, int) or n < 1:
        raise InferenceError(f"cannot infer the layers of {type(model).__name__}: its config has no "
                             f"num_hidden_layers; {how}")
    base = model.base_model
    lists = [(name.count("."), name) for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:
        raise InferenceError(f"cannot infer the blocks of {type(model).__name__}: no nn.ModuleList with "
                             f"config.num_hidden_layers={n} entries in its base model; {how}")
    block_path = min(lists)[1]
    blocks = base.get_submodule(block_path)
    if task not in (lm, seq, BASE_TASK):
        raise InferenceError(f"the structural fallback infers causal LMs, decoder sequence classifiers and base "
                             f"models, not {task!r} models ({type(model).__name__}); {how}")

    # one probe forward: which modules run after the last block, and in what order
    names = {id(m): name for name, m in model.named_modules()}
    in_blocks = {id(m) for m in blocks.modules()}
    order: list[str] = []
    marker: list[int] = []

    def started(module, args):
        if id(module) not in in_blocks and module is not model and module is not base:
            order.append(names[id(module)])

    def last_done(module, args, out):
        marker[:] = [len(order)]

    handles = [m.register_forward_pre_hook(started) for m in model.modules()]
    handles.append(blocks[-1].register_forward_hook(last_done))
    inputs = _probe_inputs(model)
    try:
        with torch.no_grad():
            first = model(**inputs)
    except Exception as error:  # noqa: BLE001 - any failure of the probe is an inference failure
        raise InferenceError(f"cannot infer the layers of {type(model).__name__}: its forward failed on a probe "
                             f"batch ({type(error).__name__}: {error}); {how}") from error
    finally:
        for handle in handles:
            handle.remove()
    if not marker:
        raise InferenceError(f"{type(model).__name__}'s forward never ran its last block ({block_path}[{n - 1}]); {how}")
    after = order[marker[0]:]
    outer = [a for a in after if not any(a != b and a.startswith(b + ".") for b in after)]  # outermost modules only
    prefix = names[id(base)] + "." if base is not model else ""
    final = tuple(a[len(prefix):] for a in outer if a.startswith(prefix) and prefix)
    if base is model:
        final = tuple(outer)
    outside = [a for a in outer if not (prefix and a.startswith(prefix))] if base is not model else []

    # causal: the first position does not see a change of the last token
    ids = inputs.get("input_ids")
    causal = False
    if ids is not None and ids.shape[1] > 1:
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] % (int(text.vocab_size) - 1)) + 1 if text.vocab_size > 2 else 1 - changed[:, -1]
        def first_position(batch):
            out = base(**batch)
            if not isinstance(out, torch.Tensor):  # a base model's output, or the model's own logits
                out = next((v for v in (getattr(out, "last_hidden_state", None), getattr(out, "logits", None))
                            if v is not None), None)
            return None if out is None else out[:, 0]

        try:
            with torch.no_grad():
                a, b = first_position(inputs), first_position({**inputs, "input_ids": changed})
            causal = a is not None and b is not None and bool(torch.equal(a, b))
        except Exception:  # noqa: BLE001 - a base model that cannot be probed alone: not known to be causal
            causal = False

    described = [f"blocks {block_path} ({n} x {type(blocks[0]).__name__})",
                 f"final stage {list(final) or 'none'}", "left-to-right" if causal else "bidirectional"]
    heads: dict[str, HeadFn] = {}
    classifiers: dict[str, str] = {}
    pooling: dict[str, str] = {}
    if task == lm:
        head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head_module is None or id(head_module) not in names:
            raise InferenceError(f"cannot infer the LM head of {type(model).__name__}: no output embeddings; {how}")
        head_path = names[id(head_module)]
        if head_path in final:  # the base model is the model itself: the final stage ends before the head
            final = final[: final.index(head_path)]
            described[1] = f"final stage {list(final) or 'none'}"

        def lm_head(m, hidden, ctx, _final=final, _path=head_path):
            return _generic_logits(m, m.get_submodule(_path)(_final_stage(m.base_model, _final, hidden)))

        heads[lm], classifiers[lm], pooling[lm] = lm_head, head_path, "none"
        described.append(f"LM head {head_path} (+ the config's logit soft-capping / scaling)")
    elif task == seq:
        linears = [a for a in outside if isinstance(model.get_submodule(a), nn.Linear)]
        if not causal or not linears or len(outside) != 1:
            raise InferenceError(
                f"cannot infer the classification head of {type(model).__name__}: the structural fallback reads the "
                f"last token of a left-to-right model through one linear layer (found {outside} after the base model, "
                f"{'left-to-right' if causal else 'bidirectional'}); {how}")
        score = linears[-1]
        heads[seq] = _last_token_head(final, score)
        classifiers[seq], pooling[seq] = score, "last"
        described.append(f"classifier {score} at the last non-padding token")
    if causal:
        pooling.setdefault(seq, "last")
    final_in_hidden = False
    if final:
        try:
            with torch.no_grad():
                out = base(**inputs, output_hidden_states=True)
            states = getattr(out, "hidden_states", None)
            final_in_hidden = bool(states) and torch.equal(states[-1], out.last_hidden_state)
        except Exception:  # noqa: BLE001 - the base model's self-check decides
            final_in_hidden = False
    del first
    return LayerFamily(
        name=f"inferred:{model_type}", model_types=(model_type,), heads=heads, classifiers=classifiers,
        block_paths=(block_path,), pooling=pooling, final_norm=final or None,
        final_norm_in_hidden_states=final_in_hidden, causal=causal, flops_counted=True,
        inferred="; ".join(described),
    )
