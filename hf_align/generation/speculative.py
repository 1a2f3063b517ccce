"""Self-speculative decoding: draft with the first k blocks through the model's own LM head, verify with all L.

One round, with the sequence processed up to position p-1 (every layer's KV cache has length p) and the last
generated token x_p not yet processed (LayerSkip, Elhoushi et al. 2024; Draft&Verify, Zhang et al. 2023)::

    draft   for i = 0..n-1:  d_{i+1} = pick(head(h_k(x_p, d_1..d_i)))      blocks 1..k, one position per step
    verify  h_k(d_n)                                                         blocks 1..k, the one undrafted position
            y_0..y_n = pick(head(h_L(x_p, d_1..d_n)))                        blocks k+1..L, n+1 positions at once
    accept  greedy:   a = max{j : d_i = y_{i-1} for all i <= j};   emit d_1..d_a, y_a
            sampling: accept d_j with probability min(1, p_j(d_j) / q_j(d_j)) in order; at the first rejection
                      emit a sample of norm(max(0, p_j - q_j)); if all n are accepted emit a bonus sample of p_n
    crop    every layer's cache to p + a + 1 (x_p, d_1..d_a); the emitted last token is the next round's x_p

``head`` is the model's own head (final norm + LM head, :meth:`hf_align.LayerView.head`), so the draft model is
the model itself truncated at block k. **KV reuse**: blocks 1..k already computed keys/values for x_p, d_1..d_{n-1}
while drafting; verification runs blocks 1..k only for d_n and blocks k+1..L for the n+1 positions, instead of all
L blocks for n+1 positions (transformers' ``assistant_early_exit`` keeps a separate draft cache and recomputes).

Greedy output equals ``model.generate`` token for token (up to floating-point accumulation order: the verifier
scores n+1 positions in one pass where ``generate`` scores them one at a time). Sampling output is distributed
exactly as ``generate``'s (Leviathan et al. 2023, Chen et al. 2023): for every position the emitted token has the
target distribution p, whatever q is. In a batch the round keeps the smallest accepted count over unfinished rows
so one cache crop serves all rows; a row that accepted more emits its next accepted draft token, which is still an
exact sample of p.
"""

from __future__ import annotations

import copy
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..layers import HeadContext, LayerView, _task_of, preserved_state, unwrap_model

__all__ = [
    "SpeculativeDecoderOnlyOutput",
    "SpeculativeStats",
    "speculative_acceptance",
    "speculative_generate",
    "speculative_sample",
]

# generation settings speculative decoding honours (the rest must keep generate's default value)
_HONOURED = {
    "max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "pad_token_id",
    "bos_token_id", "eos_token_id", "decoder_start_token_id", "return_dict_in_generate", "use_cache",
}
# settings that have no effect on a single-sequence decoding without an assistant model / beams / compilation
_INERT = {
    "_from_model_config", "transformers_version", "length_penalty", "early_stopping", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
    "compile_config", "disable_compile", "is_assistant", "cache_config", "continuous_batching_config",
    "diversity_penalty", "num_beam_groups", "prefill_chunk_size", "max_cache_len",
}
# neutral values of settings that speculative decoding cannot honour (beyond generate's own defaults)
_NEUTRAL = {
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "output_logits": False,
    "min_new_tokens": 0, "low_memory": False, "renormalize_logits": False, "token_healing": False,
    "cache_implementation": "dynamic", "use_mtp": False,
}
_EMPTY_CONTEXT = HeadContext()


# ----------------------------------------------------------------------------------------------------------
# The acceptance rule (pure functions)
# ----------------------------------------------------------------------------------------------------------


def speculative_acceptance(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling rule (Leviathan et al. 2023) as probabilities.

    Args:
        p: (B, n+1, V) target distributions at the n+1 verified positions (after the same warpers as ``generate``).
        q: (B, n, V) draft distributions the draft tokens were sampled from.
        draft: (B, n) draft tokens.

    Returns:
        ``accept`` (B, n): ``min(1, p_j(x_j) / q_j(x_j))``, the probability of accepting draft token j given
        that the ones before it were accepted; ``residual`` (B, n+1, V): the distribution sampled on rejection at
        j, ``norm(max(0, p_j - q_j))`` for j < n, and ``p_n`` (the bonus position) for j = n. Where p_j <= q_j
        everywhere (p_j = q_j: a rejection has probability 0) the residual falls back to p_j.
    """
    n = draft.shape[1]
    p_draft = p[:, :n].gather(-1, draft.unsqueeze(-1)).squeeze(-1)
    q_draft = q.gather(-1, draft.unsqueeze(-1)).squeeze(-1)
    accept = torch.where(q_draft > 0, (p_draft / q_draft.clamp_min(torch.finfo(q.dtype).tiny)).clamp(max=1.0),
                         torch.ones_like(p_draft))
    residual = (p[:, :n] - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(p.dtype).tiny), p[:, :n])
    return accept, torch.cat([residual, p[:, n:]], dim=1)


def speculative_sample(
    p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample the rule of :func:`speculative_acceptance`: returns ``num_accepted`` (B,) and ``next_token`` (B,).

    Draft token j is accepted when ``u_j < accept_j`` (u_j uniform in [0, 1)) and all before it were;
    ``next_token`` is a sample of ``residual[num_accepted]`` (the correction, or the bonus token when all n
    were accepted). The emitted tokens ``draft[:num_accepted] + [next_token]`` are distributed as p.
    """
    accept, residual = speculative_acceptance(p, q, draft)
    u = torch.rand(accept.shape, generator=generator, device=accept.device, dtype=accept.dtype)
    num_accepted = (u < accept).to(torch.long).cumprod(-1).sum(-1)
    rows = torch.arange(draft.shape[0], device=draft.device)
    next_token = torch.multinomial(residual[rows, num_accepted], 1, generator=generator).squeeze(-1)
    return num_accepted, next_token


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SpeculativeStats:
    """What a :func:`speculative_generate` call did.

    ``drafted``/``accepted`` count draft tokens over unfinished rows (each row's own accepted prefix), so
    ``acceptance_rate = accepted / drafted``; ``new_tokens`` is the number of generated positions per row,
    ``tokens_per_second = batch_size * new_tokens / seconds`` (prefill included).
    """

    exit_layer: int
    num_draft_tokens: int
    num_layers: int
    batch_size: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    calibration: dict[str, Any] | None = None
    fast_path: bool | None = None  # draft steps skipped the model's preamble (checked bit-exact on first use)
    block_positions: list[int] = field(default_factory=list)  # positions run through each block (KV-reuse check)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.batch_size * self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        keys = ("exit_layer", "num_draft_tokens", "num_layers", "batch_size", "rounds", "drafted", "accepted",
                "new_tokens", "seconds", "fast_path", "acceptance_rate", "tokens_per_round", "tokens_per_second")
        out = {key: getattr(self, key) for key in keys}
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out


@dataclass
class SpeculativeDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` (``sequences``; scores/logits/attentions/hidden states stay None) + ``stats``."""

    stats: SpeculativeStats | None = None


# ----------------------------------------------------------------------------------------------------------
# Validation (no work before it passes)
# ----------------------------------------------------------------------------------------------------------

_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_view(model: nn.Module) -> LayerView:
    """One self-checked :class:`LayerView` per live model (kept in a module-level weak map, not on the model)."""
    view = _VIEWS.get(model)
    if view is None:
        view = LayerView(model)
        _VIEWS[model] = view
    return view


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"speculative_generate expects a transformers causal LM (torch.nn.Module), got {type(model).__name__}")
    hf_model = unwrap_model(model)
    config = getattr(hf_model, "config", None)
    name = type(hf_model).__name__
    if config is None:
        raise TypeError(f"speculative_generate expects a transformers model with a config, got {name}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; speculative_generate supports decoder-only causal LMs")
    task = _task_of(hf_model)
    if task in ("sequence-classification", "image-classification"):
        raise ValueError(
            f"{name} is a classifier with no LM head; speculative decoding drafts and verifies tokens through the "
            "model's LM head, so it needs a causal LM (a *ForCausalLM / *LMHeadModel model)"
        )
    if task != "causal-lm":
        kind = "an encoder-only model" if not hf_model.can_generate() and getattr(config, "is_decoder", None) is False \
            else "a model without an LM head"
        raise ValueError(
            f"{name} is {kind} (no causal LM head); speculative decoding needs a decoder-only causal LM "
            "(a *ForCausalLM / *LMHeadModel model of a supported family)"
        )
    if hasattr(config, "is_decoder") and not config.is_decoder and not _is_causal_family(hf_model):
        raise ValueError(
            f"{name} is an encoder-only (bidirectional) model: config.is_decoder is False, so it cannot decode "
            "left to right; speculative decoding needs a decoder-only causal LM"
        )
    return hf_model


def _is_causal_family(hf_model: nn.Module) -> bool:
    """Decoder-only families (registry data: their sequence classifiers read the last token)."""
    from ..layers import get_family

    family = get_family(hf_model.config.model_type)
    return family is not None and family.pooling.get("sequence-classification") == "last"


def _generation_config(hf_model: nn.Module, kwargs: dict[str, Any]) -> GenerationConfig:
    """``generate``'s own merge: the model's generation config, generate's defaults where unset, then kwargs."""
    config = copy.deepcopy(hf_model.generation_config)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    unused = config.update(**kwargs)
    if unused:
        raise ValueError(
            f"speculative_generate cannot honour the argument(s) {sorted(unused)}: it accepts input_ids, "
            "attention_mask and generation-config settings (max_new_tokens, do_sample, temperature, top_k, top_p, "
            "min_p, eos_token_id, pad_token_id, return_dict_in_generate); logits processors, stopping criteria, "
            "streamers, assistant models and extra model inputs are not supported"
        )
    defaults = GenerationConfig._get_default_generation_params()
    bad = []
    for key, value in config.to_dict().items():
        if key in _HONOURED or key in _INERT or value is None:
            continue
        if key in defaults and value == defaults[key]:
            continue
        if key in _NEUTRAL and value == _NEUTRAL[key]:
            continue
        bad.append(f"{key}={value!r}")
    if config.use_cache is False:
        bad.append("use_cache=False (speculative decoding needs the KV cache)")
    if bad:
        raise ValueError(
            f"speculative_generate cannot honour {', '.join(bad)}: it supports greedy decoding and sampling with "
            "temperature / top_k / top_p / min_p only (no beam search, repetition or n-gram penalties, forced or "
            "suppressed tokens, stop strings, multiple return sequences, per-step scores or attentions)"
        )
    return config


def _check_inputs(input_ids: Any, attention_mask: Any) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        got = f"{type(input_ids).__name__}" + (f" of shape {tuple(input_ids.shape)} and dtype {input_ids.dtype}"
                                             if isinstance(input_ids, torch.Tensor) else "")
        raise TypeError(f"input_ids must be a (batch, length) integer tensor, got {got}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one prompt token per row")
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    if not bool((attention_mask[:, -1] == 1).all()):
        raise ValueError(
            "speculative_generate needs left padding (every row's last prompt position must be a real token), as "
            "decoder-only generate does; pad on the left (tokenizer.padding_side = 'left')"
        )
    if not bool((attention_mask.sum(-1) > 0).all()):
        raise ValueError("every row of attention_mask needs at least one real token")


def _check_window(hf_model: nn.Module, total_length: int) -> None:
    """Sliding-window attention layers keep only the last W keys; drafting past the window is not supported."""
    windows = [getattr(layer, "sliding_window", None) for layer in DynamicCache(config=hf_model.config).layers
               if getattr(layer, "is_sliding", False)]
    windows = [w for w in windows if isinstance(w, int)]
    if windows and total_length > min(windows):
        raise ValueError(
            f"{type(hf_model).__name__} uses sliding-window attention (window {min(windows)} tokens) and prompt + "
            f"max_new_tokens = {total_length} exceeds it; speculative_generate supports sliding-window models only "
            "within the window"
        )


def _check_schedule(exit_layer: Any, num_draft_tokens: Any, num_layers: int) -> None:
    if isinstance(exit_layer, bool) or not (isinstance(exit_layer, int) or exit_layer == "auto"):
        raise TypeError(f"exit_layer must be an integer in [1, {num_layers - 1}] or 'auto', got {exit_layer!r}")
    if isinstance(exit_layer, int) and not 1 <= exit_layer <= num_layers - 1:
        raise ValueError(
            f"exit_layer must be in [1, {num_layers - 1}] (the draft uses blocks 1..exit_layer of the model's "
            f"{num_layers}), got {exit_layer}"
        )
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be a positive integer, got {num_draft_tokens!r}")


# ----------------------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------------------


class _Decoder:
    """The state of one speculative_generate call: the sequences, the shared DynamicCache and the settings."""

    def __init__(self, view: LayerView, config: GenerationConfig, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, generator: torch.Generator | None, count_blocks: bool):
        self.view = view
        self.model = view.hf_model
        self.config = config
        self.generator = generator
        self.num_layers = view.num_layers
        self.sequences = input_ids
        self.prompt_length = input_ids.shape[1]
        batch = input_ids.shape[0]
        # generate's position ids: cumsum of the mask - 1 (pads get 0); the mask is dropped when it is all ones
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            self.mask = attention_mask.to(torch.long)
            positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        else:
            self.mask = None
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(batch, -1)
        self.prompt_positions = positions
        self.last_position = positions[:, -1]
        eos = config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self.eos = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
        self.pad = pad
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        self.do_sample = bool(config.do_sample)
        self.warpers = self._warpers(config) if self.do_sample else None
        self.cache = DynamicCache(config=self.model.config)
        self.counts = [0] * self.num_layers if count_blocks else None
        self.embed = self.model.get_input_embeddings()
        self.fast = None  # None: not yet checked; True/False: draft steps skip the model's preamble (see _fast_state)

    @staticmethod
    def _warpers(config: GenerationConfig) -> LogitsProcessorList:
        """generate's sampling warpers, in generate's order (temperature, top-k, top-p, min-p)."""
        warpers = LogitsProcessorList()
        if config.temperature is not None and config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        if config.min_p is not None:
            warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
        return warpers

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> warped probabilities (float32 like generate)."""
        shape = logits.shape
        scores = self.warpers(None, logits.reshape(-1, shape[-1]).float())
        return torch.softmax(scores, dim=-1).reshape(shape)

    # -- running the model ------------------------------------------------------------------------------

    def _mask_upto(self, length: int) -> torch.Tensor | None:
        if self.mask is None:
            return None
        extra = length - self.mask.shape[1]
        if extra <= 0:
            return self.mask[:, :length]
        return torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], extra)], dim=1)

    def _state(self, ids: torch.Tensor, first_position: torch.Tensor, total_length: int, mask: Any = None,
               embeds: bool = False):
        """The model's own forward up to block 1 for ``ids`` (B, m) at positions first_position + 0..m-1.

        ``mask``: an already built 4D mask for these queries (a slice of the verify pass's mask); the model returns
        a 4D mask as it is, so draft steps skip mask construction. Otherwise the model builds its own from the 2D mask.
        """
        m = ids.shape[1]
        inputs = {
            "position_ids": first_position[:, None] + torch.arange(m, device=ids.device),
            "cache": self.cache,
            "use_cache": True,
        }
        if embeds:  # zero token embeddings: the state's hidden is then the position part of the embedding output
            inputs["inputs_embeds"] = self.embed.weight.new_zeros(ids.shape[0], m, self.embed.weight.shape[1])
        else:
            inputs["input_ids"] = ids
        if mask is None:
            mask = self._mask_upto(total_length)
        if mask is not None:
            inputs["attention_mask"] = mask
        return self.view.prepare(**inputs)

    def _fast_state(self, verify, token: torch.Tensor, i: int, n: int, step_mask):
        """Draft step i's block inputs without running the model's preamble.

        ``verify`` was prepared with zero token embeddings for positions p..p+n, so its hidden is the position part
        of the embedding output; the step's input is ``embed(token) + verify.hidden[:, i]`` and its block arguments
        are the verify pass's, sliced to query i (rotary tables, position ids) and keys :p+i+1 (the 4D mask).
        Exact only for embeddings of the form ``embed(ids) + f(positions)``, so the first use is compared with
        the model's own preamble (tensor for tensor, bit for bit) and the fast path is dropped if anything differs.
        """
        hidden = self.embed(token[:, None]) + verify.hidden[:, i: i + 1]
        batch = token.shape[0]

        def cut(value):
            if isinstance(value, torch.Tensor):
                if value.dim() == 4 and value.shape[-2] == n + 1:
                    return step_mask
                if value.dim() >= 2 and value.shape[1] == n + 1 and value.shape[0] in (1, batch):
                    return value[:, i: i + 1]
            return value

        return replace(verify.map_arguments(cut), hidden=hidden)

    @staticmethod
    def _find_mask(state, queries: int, keys: int) -> torch.Tensor | None:
        """The 4D attention mask (.., queries, keys) among the captured block arguments, if the model built one."""
        for value in state.arguments():
            if isinstance(value, torch.Tensor) and value.dim() == 4 and tuple(value.shape[-2:]) == (queries, keys):
                return value
        return None

    def _run(self, state, until: int):
        if self.counts is not None:
            for layer in range(state.depth, until):
                self.counts[layer] += state.hidden.shape[1]
        return self.view.run_blocks(state, until)

    def _pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next token from (B, V) draft logits: argmax, or a sample of the warped q (returned too)."""
        if not self.do_sample:
            return logits.float().argmax(-1), None
        q = self.probs(logits)
        return torch.multinomial(q, 1, generator=self.generator).squeeze(-1), q

    def prefill(self) -> torch.Tensor:
        """All L blocks over the prompt, as generate's first step; returns the first new token (B,)."""
        inputs = {"input_ids": self.sequences, "position_ids": self.prompt_positions, "cache": self.cache,
                  "use_cache": True}
        if self.mask is not None:
            inputs["attention_mask"] = self.mask
        state = self.view.prepare(**inputs)
        state = self._run(state, self.num_layers)
        logits = self.view.head(state.hidden[:, -1:], _EMPTY_CONTEXT)[:, -1]
        if not self.do_sample:
            return logits.float().argmax(-1)
        return torch.multinomial(self.probs(logits), 1, generator=self.generator).squeeze(-1)

    def round(self, pending: torch.Tensor, k: int, n: int, stats: SpeculativeStats) -> torch.Tensor:
        """One draft-verify round from the unprocessed token ``pending`` (B,); returns the emitted tokens (B, a+1)."""
        p = self.cache.get_seq_length()  # positions processed by every layer
        start = self.last_position  # position id of `pending`
        # the verify pass's block arguments (queries p..p+n, kv length p+n+1), captured while every layer has length p
        verify = self._state(pending[:, None].expand(-1, n + 1), start, p + n + 1,
                             embeds=self.fast is not False)
        # rows i, columns :p+i+1 of the verify mask serve draft step i; without padding a one-token step needs no
        # mask (generate passes none either)
        mask = self._find_mask(verify, n + 1, p + n + 1) if self.mask is not None else None
        hidden_k, drafts, qs = [], [], []
        token = pending
        for i in range(n + 1):  # i < n: draft steps; i == n: blocks 1..k for the last draft token
            step_mask = None if mask is None else mask[:, :, i: i + 1, : p + i + 1]
            state = None
            if self.fast is not False:
                state = self._fast_state(verify, token, i, n, step_mask)
                if self.fast is None:  # first use: must equal the model's own preamble exactly, else never again
                    own = self._state(token[:, None], start + i, p + i + 1, step_mask)
                    self.fast = _same_state(state, own)
                    state = own
            if state is None or self.fast is False:
                state = self._state(token[:, None], start + i, p + i + 1, step_mask)
            state = self._run(state, k)
            hidden_k.append(state.hidden)
            if i == n:
                break
            token, q = self._pick(self.view.head(state.hidden, _EMPTY_CONTEXT)[:, -1])
            drafts.append(token)
            qs.append(q)
        draft = torch.stack(drafts, dim=1) if drafts else pending.new_zeros(pending.shape[0], 0)
        state = self._run(replace(verify, hidden=torch.cat(hidden_k, dim=1), depth=k), self.num_layers)
        logits = self.view.head(state.hidden, _EMPTY_CONTEXT)  # (B, n+1, V)
        active = self.unfinished
        if not self.do_sample:
            target = logits.float().argmax(-1)  # (B, n+1)
            row_accepted = (draft == target[:, :n]).to(torch.long).cumprod(-1).sum(-1)
            a = int(row_accepted[active].min()) if bool(active.any()) else n
            emitted = target[:, : a + 1]
        else:
            probs = self.probs(logits)
            row_accepted, correction = speculative_sample(probs, torch.stack(qs, dim=1), draft, self.generator) \
                if n else (torch.zeros_like(pending), torch.multinomial(probs[:, 0], 1, generator=self.generator)[:, 0])
            a = int(row_accepted[active].min()) if bool(active.any()) else n
            last = torch.where(row_accepted > a, draft[:, a] if a < n else correction, correction)
            emitted = torch.cat([draft[:, :a], last[:, None]], dim=1)
        stats.rounds += 1
        stats.drafted += n * int(active.sum())
        stats.accepted += int(row_accepted[active].sum())
        self.cache.crop(-(n - a))  # keep x_p, d_1..d_a: length p + a + 1
        return emitted

    def append(self, emitted: torch.Tensor, budget: int) -> bool:
        """Append emitted tokens one position at a time with generate's EOS/pad rule; True when decoding is done."""
        for j in range(min(emitted.shape[1], budget)):
            token = emitted[:, j]
            if self.eos.numel():
                token = torch.where(self.unfinished, token, torch.full_like(token, self.pad))
            self.sequences = torch.cat([self.sequences, token[:, None]], dim=1)
            if self.mask is not None:
                self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            self.last_position = self.last_position + 1
            if self.eos.numel():
                self.unfinished = self.unfinished & ~torch.isin(token, self.eos)
                if not bool(self.unfinished.any()):
                    return True
        return False


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(
            _same_value(a[key], b[key]) for key in a)
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, bool, str)) and a == b)


def _same_state(a, b) -> bool:
    """Two block-input states are the same: hidden and every argument equal bit for bit (the cache is one object)."""
    return _same_value(a.hidden, b.hidden) and _same_value(a.block_args, b.block_args) and _same_value(
        a.block_kwargs, b.block_kwargs)


def speculative_generate(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    exit_layer: int | str = "auto",
    num_draft_tokens: int = 4,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
    **generate_kwargs: Any,
):
    """Self-speculative decoding: draft ``num_draft_tokens`` with blocks 1..``exit_layer`` + the model's own LM head,
    verify with one pass of the full model that reuses the draft's KV cache of blocks 1..k (module docstring).

    Args:
        model: a causal LM of a supported family (``hf_align.supported_families()``: GPT-2, Llama, Mistral,
            Qwen2...), optionally PEFT-wrapped. It is not changed: no hook, cache or config change stays behind.
        input_ids, attention_mask: the prompt, left-padded for batches (as for ``model.generate``).
        exit_layer: k in [1, L-1], the depth of the draft; ``"auto"`` picks k by :func:`choose_exit_layer`.
        num_draft_tokens: n, draft tokens per round.
        generator: a ``torch.Generator`` for the sampling path (draft samples, acceptance, corrections).
        return_stats: also return the :class:`SpeculativeStats` (``(output, stats)``).
        **generate_kwargs: ``model.generate`` settings: max_new_tokens / max_length, do_sample, temperature,
            top_k, top_p, min_p, eos_token_id, pad_token_id, return_dict_in_generate. Others (beam search,
            penalties, processors, stopping criteria, scores...) raise ``ValueError`` naming them.

    Returns:
        Like ``model.generate``: the (B, prompt + new) token tensor, or with ``return_dict_in_generate=True`` a
        :class:`SpeculativeDecoderOnlyOutput` (``sequences`` and ``stats``: drafted/accepted counts, acceptance
        rate, tokens/s).
    """
    hf_model = _check_model(model)
    if input_ids is None:
        raise ValueError("speculative_generate needs input_ids (the prompt); inputs_embeds are not supported")
    _check_inputs(input_ids, attention_mask)
    num_layers = int(hf_model.config.num_hidden_layers)
    _check_schedule(exit_layer, num_draft_tokens, num_layers)
    config = _generation_config(hf_model, generate_kwargs)
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - input_ids.shape[1]
    if max_new < 1:
        raise ValueError(
            f"nothing to generate: the prompt has {input_ids.shape[1]} tokens and max_length is {config.max_length}; "
            "pass max_new_tokens"
        )
    _check_window(hf_model, input_ids.shape[1] + max_new)
    device = next(hf_model.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = attention_mask.to(device) if attention_mask is not None else None

    view = _layer_view(model)
    calibration = None
    if exit_layer == "auto":
        from .auto_exit import choose_exit_layer  # (auto_exit builds on this module's decoder)

        exit_layer, calibration = choose_exit_layer(model, input_ids, attention_mask,
                                                    num_draft_tokens=num_draft_tokens)
    stats = SpeculativeStats(exit_layer=exit_layer, num_draft_tokens=num_draft_tokens, num_layers=num_layers,
                             batch_size=input_ids.shape[0], calibration=calibration)
    with torch.no_grad(), preserved_state(model):
        start_time = time.perf_counter()
        decoder = _Decoder(view, config, input_ids, attention_mask, generator, count_blocks=True)
        pending = decoder.prefill()
        done = decoder.append(pending[:, None], max_new)
        generated = 1
        while not done and generated < max_new:
            n = min(num_draft_tokens, max_new - generated - 1)
            emitted = decoder.round(pending, exit_layer, n, stats)
            done = decoder.append(emitted, max_new - generated)
            generated += emitted.shape[1]
            pending = emitted[:, -1]
        stats.seconds = time.perf_counter() - start_time
    stats.new_tokens = decoder.sequences.shape[1] - input_ids.shape[1]
    stats.block_positions = list(decoder.counts)
    stats.fast_path = decoder.fast
    sequences = decoder.sequences
    if config.return_dict_in_generate:
        output = SpeculativeDecoderOnlyOutput(sequences=sequences, stats=stats)
    else:
        output = sequences
    return (output, stats) if return_stats else output
