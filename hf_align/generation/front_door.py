"""The one front door of hf-align's decoders: what they accept, checked once, with one message per mistake.

Both decoders (self-speculative decoding and per-token exit) are ``custom_generate`` callables: ``model.generate``
does transformers' own preparation (the generation-config merge with the model's defaults, special tokens, the
attention mask inferred from pad tokens, position ids, ``num_return_sequences`` expansion, logits processors and
stopping criteria, the cache) and then calls them with ``GenerationMixin._sample``'s signature. What is left to
check here is what ``_sample`` would honour but a decoder that emits several tokens per forward cannot: this
module says so before any forward runs.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import weakref
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList

from ..families import get_family
from ..layers import HeadContext, LayerView, _task_of, unwrap_model

DECODING = "hf-align decoding"  # the subject of every message: both decoders give the same error for the same mistake

__all__ = ["DECODING", "EMPTY_CONTEXT", "check_decoder", "check_generation", "layer_view", "rope_limit"]

EMPTY_CONTEXT = HeadContext()

_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_view(model: nn.Module) -> LayerView:
    """One self-checked :class:`LayerView` per live model (a module-level weak map: nothing is stored on the model)."""
    view = _VIEWS.get(model)
    if view is None:
        view = LayerView(model)
        _VIEWS[model] = view
    return view


def _is_causal_family(hf_model: nn.Module) -> bool:
    family = get_family(hf_model.config.model_type)
    if family is None:  # not registered: the structural fallback of the layer view says (after its self-check)
        try:
            return bool(layer_view(hf_model).family.causal)
        except ValueError:
            return False
    return bool(family.causal)


def check_decoder(model: Any, who: str = DECODING) -> nn.Module:
    """The transformers model inside ``model`` if it is a decoder-only causal LM; a clear error otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who} expects a transformers causal LM (torch.nn.Module), got {type(model).__name__}")
    hf_model = unwrap_model(model)
    config = getattr(hf_model, "config", None)
    name = type(hf_model).__name__
    if config is None:
        raise TypeError(f"{who} expects a transformers model with a config, got {name}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; {who} supports decoder-only causal LMs")
    task = _task_of(hf_model)
    if task in ("sequence-classification", "image-classification"):
        raise ValueError(
            f"{name} is a classifier with no LM head; {who} reads every token through the model's LM head, "
            "so it needs a causal LM (a *ForCausalLM / *LMHeadModel model)"
        )
    if task != "causal-lm":
        kind = "an encoder-only model" if not hf_model.can_generate() and getattr(config, "is_decoder", None) is False \
            else "a model without an LM head"
        raise ValueError(
            f"{name} is {kind} (no causal LM head); {who} needs a decoder-only causal LM "
            "(a *ForCausalLM / *LMHeadModel model of a supported family)"
        )
    if hasattr(config, "is_decoder") and not config.is_decoder and not _is_causal_family(hf_model):
        raise ValueError(
            f"{name} is an encoder-only (bidirectional) model: config.is_decoder is False, so it cannot decode "
            f"left to right; {who} needs a decoder-only causal LM"
        )
    return hf_model


def rope_limit(config: Any) -> int | None:
    """The length past which a rotary table depends on the longest position seen (dynamic NTK / LongRoPE).

    Such tables are rebuilt from the largest position of each forward, so a pass over several positions at once
    (verification) rotates its earlier positions differently than one position at a time (generate) once the
    sequence is past the original length. Returns that length, or None when the model's rotary table is static.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        types = {v.get("rope_type", v.get("type")) for v in params.values()}  # per layer type (Gemma 3)
        params = next(iter(params.values())) if types & {"dynamic", "longrope"} else {}
    rope_type = params.get("rope_type", params.get("type")) if isinstance(params, dict) else None
    if rope_type not in ("dynamic", "longrope"):
        return None
    return int(params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings",
                                                                          None) or config.max_position_embeddings)


# generate options that a multi-token decoder cannot honour; each value is the reason
_REFUSED_FLAGS = {
    "output_attentions": "per-step attentions",
    "output_hidden_states": "per-step hidden states",
}
# processors whose output at a position depends on more than (that row's prefix, that position's scores): watermarks
# keep a random state per call, classifier-free guidance runs a second batch
_STATEFUL = ("WatermarkLogitsProcessor", "SynthIDTextWatermarkLogitsProcessor", "ClassifierFreeGuidanceLogitsProcessor",
             "UnbatchedClassifierFreeGuidanceLogitsProcessor")


def check_generation(hf_model: nn.Module, generation_config: GenerationConfig, model_kwargs: dict[str, Any],
                     logits_processor: LogitsProcessorList | None, *, who: str = DECODING, synced_gpus: bool = False,
                     allowed_model_kwargs: tuple[str, ...] = ()) -> None:
    """Refuse, before any forward, what ``_sample`` honours but ``who`` cannot (beam search and the other modes are
    refused by the mode check; everything else generate prepares is honoured by the decoders)."""
    mode = generation_config.get_generation_mode()
    if getattr(mode, "name", str(mode)) not in ("GREEDY_SEARCH", "SAMPLE"):
        settings = {key: getattr(generation_config, key, None) for key in
                    ("num_beams", "penalty_alpha", "num_beam_groups", "constraints", "force_words_ids")}
        settings = {k: v for k, v in settings.items() if v not in (None, 1, False)}
        detail = ", ".join(f"{k}={v!r}" for k, v in settings.items()) or str(mode)
        raise ValueError(
            f"{who} cannot honour {detail}: it decodes greedily or by sampling (do_sample, temperature, top_k, "
            "top_p, min_p... and every logits processor), not by beam search, group beam search, contrastive or "
            "constrained search"
        )
    if generation_config.use_cache is False:
        raise ValueError(f"{who} cannot honour use_cache=False: it needs the KV cache")
    bad = [f"{key}=True ({why})" for key, why in _REFUSED_FLAGS.items() if getattr(generation_config, key, False)]
    if bad:
        raise ValueError(f"{who} cannot honour {', '.join(bad)}: they are not computed one position at a time here")
    if synced_gpus:
        raise ValueError(f"{who} cannot honour synced_gpus=True (ZeRO-3 / FSDP lock-step decoding)")
    for processor in logits_processor or ():
        if type(processor).__name__ in _STATEFUL:
            raise ValueError(
                f"{who} cannot honour {type(processor).__name__}: it calls processors on drafted and re-verified "
                "positions, so processors must be pure functions of (input_ids, scores)"
            )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError(f"{who} needs input_ids (the prompt); inputs_embeds are not supported")
    cache = model_kwargs.get("cache")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(f"{who} starts from an empty cache; continuing from a filled `cache` is not supported")
    known = {"attention_mask", "position_ids", "cache", "use_cache", "logits_to_keep", "cache_position", "token_type_ids",
             *allowed_model_kwargs}
    extra = sorted(key for key, value in model_kwargs.items() if key not in known and value is not None)
    if extra:
        raise ValueError(f"{who} cannot pass the extra model input(s) {extra} to the model's blocks")
    token_types = model_kwargs.get("token_type_ids")
    if token_types is not None and bool((token_types != 0).any()):
        raise ValueError(f"{who} cannot honour non-zero token_type_ids")


def check_rope(hf_model: nn.Module, generation_config: GenerationConfig, who: str = DECODING) -> None:
    """Refuse a dynamic / LongRoPE rotary table past its original length for a decoder that runs several positions
    per forward (see :func:`rope_limit`)."""
    limit = rope_limit(hf_model.config)
    if limit is not None and generation_config.max_length > limit:
        raise ValueError(
            f"{type(hf_model).__name__} uses a dynamic rotary table (rope type dynamic / longrope) that changes past "
            f"{limit} positions, and max_length is {generation_config.max_length}; {who} verifies several positions "
            f"per forward, which would rotate them differently from generate there. Keep prompt + max_new_tokens <= "
            f"{limit}"
        )


def positions_from_mask(mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """generate's position ids for a left-padded prompt: ``cumsum(mask) - 1`` (0 on padding); ``arange`` without a
    mask."""
    if mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
    mask = mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def check_input_ids(input_ids: Any, who: str = DECODING) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        got = f"{type(input_ids).__name__}" + (f" of shape {tuple(input_ids.shape)} and dtype {input_ids.dtype}"
                                             if isinstance(input_ids, torch.Tensor) else "")
        raise TypeError(f"{who}: input_ids must be a (batch, length) integer tensor, got {got}")
    if input_ids.shape[1] == 0:
        raise ValueError(f"{who}: input_ids must hold at least one prompt token per row")


def check_attention_mask(input_ids: torch.Tensor, attention_mask: Any, who: str = DECODING) -> None:
    """A 2D 0/1 mask of input_ids' shape, left padded (every row's last position real, at least one real token)."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"{who}: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"{who}: attention_mask must hold only 0 (padding) and 1 (token)")
    if not bool((attention_mask[:, -1] == 1).all()):
        raise ValueError(
            f"{who} needs left padding (every row's last prompt position must be a real token), as decoder-only "
            "generate does; pad on the left (tokenizer.padding_side = 'left')"
        )
    if not bool((attention_mask.sum(-1) > 0).all()):
        raise ValueError(f"{who}: every row of attention_mask needs at least one real token")


def check_front(model: Any, input_ids: Any, attention_mask: Any, who: str = DECODING) -> nn.Module:
    """What the convenience front ends check before handing over to ``model.generate``."""
    hf_model = check_decoder(model, who)
    if input_ids is None:
        raise ValueError(f"{who} needs input_ids (the prompt); inputs_embeds are not supported")
    check_input_ids(input_ids, who)
    check_attention_mask(input_ids, attention_mask, who)
    return hf_model


@functools.cache
def _generate_code() -> types.CodeType:
    """The code object of ``GenerationMixin.generate`` under its decorators (looked up once per process)."""
    from transformers.generation.utils import GenerationMixin

    return inspect.unwrap(GenerationMixin.generate).__code__


def generate_streamer(streamer: Any) -> Any:
    """The streamer of the ``generate`` call that invoked this ``custom_generate`` callable.

    transformers 5's ``generate`` puts the prompt into ``streamer=`` and then drops it: its
    ``_extract_generation_mode_kwargs`` rebuilds the mode arguments from the callable's own extra parameters only,
    so ``model.generate(custom_generate=hf_align.self_speculative, streamer=s)`` would stream the prompt and never
    a new token. The streamer is still ``generate``'s own local variable: read it from the calling ``generate``
    frame (found by its code object, not by name), so every emitted token reaches it. A streamer passed
    explicitly wins; outside ``generate`` this returns ``None``."""
    if streamer is not None:
        return streamer
    code = _generate_code()
    frame = sys._getframe(1)
    for _ in range(16):  # generate -> (decorators) -> the callable
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_code is code:
            return frame.f_locals.get("streamer")
    return None
