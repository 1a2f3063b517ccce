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
target distribution p, whatever q is. Every logits processor ``generate`` prepared (repetition penalty, n-gram
bans, bad words, min_new_tokens, forced and suppressed tokens, the sampling warpers) is applied at every drafted
and every verified position, on that position's own prefix, exactly as ``_sample`` applies it one token at a time.

**Batches.** Each row keeps its own accepted count: the cache keeps the slots of the longest accepted prefix of the
round, the slots a row rejected are masked out for that row (its own attention mask), and position ids are per
row, so one shared cache serves rows that advance at different speeds; the holes are squeezed out of the cache
from time to time. Emission is separate from compute: tokens go to ``generate``'s stopping criteria, streamer and
scores one position at a time for the whole batch, as in ``_sample``.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..hub import EXIT_LAYER_KEY, NUM_DRAFT_KEY
from ..layers import LayerView, preserved_state, unwrap_model
from .auto_exit import AUTO_DRAFT_COUNTS, ExitChooser
from .compiled import compiled_segment_runner
from .front_door import (
    EMPTY_CONTEXT,
    check_attention_mask,
    check_decoder,
    check_front,
    check_generation,
    check_input_ids,
    check_rope,
    generate_streamer,
    layer_view,
    positions_from_mask,
)

__all__ = [
    "SpeculativeDecoderOnlyOutput",
    "SpeculativeStats",
    "speculative_acceptance",
    "speculative_generate",
    "speculative_sample",
    "choose_exit_layer",
    "generate_self_speculative",
    "self_speculative",
]

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
    rejections: int = 0  # (row, round) pairs that rejected a draft token (the MLE of i.i.d. acceptance is
    # accepted / (accepted + rejections))
    new_tokens: int = 0
    seconds: float = 0.0
    calibration: dict[str, Any] | None = None
    fast_path: bool | None = None  # draft steps skipped the model's preamble (checked bit-exact on first use)
    ragged: bool | None = None  # rows advanced by their own accepted counts (else together, by the smallest)
    plain_steps: int = 0  # ordinary decoding steps (automatic exit: the 2 timed ones, and all after falling back)
    compiled: bool = False  # draft, verify and plain steps ran under torch.compile (generate's compile criteria)
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
                "new_tokens", "seconds", "fast_path", "ragged", "rejections", "plain_steps", "compiled", "acceptance_rate", "tokens_per_round",
                "tokens_per_second")
        out = {key: getattr(self, key) for key in keys}
        if self.calibration is not None:
            out["calibration"] = self.calibration
        return out


@dataclass
class SpeculativeDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` (``sequences``; scores/logits/attentions/hidden states stay None) + ``stats``."""

    stats: SpeculativeStats | None = None


# ----------------------------------------------------------------------------------------------------------
# Logits processors at positions of rows of different lengths
# ----------------------------------------------------------------------------------------------------------

# transformers' processors whose output for a row depends only on that row's prefix and scores (and the prefix
# length): they may be called on any subset of rows, so rows of a batch can advance by their own accepted counts
_ROW_LOCAL = {
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
    "EpsilonLogitsWarper", "EtaLogitsWarper", "TopHLogitsWarper", "RepetitionPenaltyLogitsProcessor",
    "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor", "SequenceBiasLogitsProcessor",
    "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "SuppressTokensLogitsProcessor",
    "SuppressTokensAtBeginLogitsProcessor", "ForcedBOSTokenLogitsProcessor", "ForcedEOSTokenLogitsProcessor",
    "ExponentialDecayLengthPenalty", "InfNanRemoveLogitsProcessor", "LogitNormalization",
}


# their per-row attributes (one entry per batch row), sliced when the processor is called on a subset of rows
_PER_ROW_ATTRIBUTES = {"RepetitionPenaltyLogitsProcessor": ("prompt_ignore_length",)}


def _row_local(processors: LogitsProcessorList) -> bool:
    return all(type(p).__name__ in _ROW_LOCAL for p in processors)


def _for_rows(processor: Any, rows: torch.Tensor, batch: int) -> Any:
    """The processor as it would be for a batch of just ``rows`` (its per-row attributes sliced; a shallow copy)."""
    names = [name for name in _PER_ROW_ATTRIBUTES.get(type(processor).__name__, ())
             if isinstance(getattr(processor, name, None), torch.Tensor) and getattr(processor, name).shape[:1] == (batch,)]
    if not names:
        return processor
    subset = copy.copy(processor)
    for name in names:
        setattr(subset, name, getattr(processor, name)[rows.to(getattr(processor, name).device)])
    return subset


# processors whose output does not depend on the prefix at all (neither its tokens nor its length)
_PREFIX_FREE = {
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
    "EpsilonLogitsWarper", "EtaLogitsWarper", "TopHLogitsWarper", "SuppressTokensLogitsProcessor",
    "InfNanRemoveLogitsProcessor", "LogitNormalization",
}


class _Processors:
    """generate's prepared logits processors, applied at one position of every row, on that row's own prefix.

    ``tokens`` (B, T) holds each row's sequence (left-padded prompt + its tokens so far, as ``_sample``'s input_ids
    would be when that row reaches this position); ``lengths`` (B,) says where each row's prefix ends. Rows of equal
    length are processed together (with one length: the whole batch in one call, exactly as ``_sample`` calls it);
    when no processor reads the prefix (the sampling warpers), the whole batch is one call whatever the lengths.
    Each processor is called as ``LogitsProcessorList`` calls it (extra keyword arguments only for processors that
    take them; there are none here), without its per-call signature inspection.
    """

    def __init__(self, processors: LogitsProcessorList):
        self.processors = list(processors)
        self.prefix_free = all(type(p).__name__ in _PREFIX_FREE for p in self.processors)

    @staticmethod
    def _apply(processors, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in processors:
            scores = processor(input_ids, scores)
        return scores

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if not self.processors:
            return logits
        if self.prefix_free:
            return self._apply(self.processors, tokens[:, : int(lengths.max())], logits)
        first = int(lengths[0])
        if bool((lengths == first).all()):
            return self._apply(self.processors, tokens[:, :first], logits)
        out = torch.empty_like(logits)
        batch = logits.shape[0]
        for value in torch.unique(lengths).tolist():
            rows = (lengths == value).nonzero().squeeze(-1)
            processors = [_for_rows(p, rows, batch) for p in self.processors]
            out[rows] = self._apply(processors, tokens[rows, :value], logits[rows])
        return out


# ----------------------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------------------


class _Decoder:
    """The state of one decoding call.

    Compute and emission are kept apart. **Compute** runs draft-verify rounds on a shared KV cache; each row keeps
    its own accepted count (``ragged``): the round keeps, for every layer, the slots of the longest accepted prefix
    in the batch, and marks the slots that a row rejected as padding in the attention mask (``slot_mask``), so a
    row's later tokens never attend to them; position ids are per row. Holes are squeezed out of the cache now and
    then (:meth:`compact`). Each row's accepted tokens go to its own buffer (``tokens``, ``length``). **Emission**
    then hands the tokens to ``generate``'s machinery one position at a time, for all rows together, exactly as
    ``_sample`` does: pad for finished rows, stopping criteria on the whole batch, the streamer, the scores.
    """

    def __init__(self, view: LayerView, config: GenerationConfig, processors: LogitsProcessorList,
                 stopping_criteria: StoppingCriteriaList, streamer: Any, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, cache: Any,
                 generator: torch.Generator | None, max_draft: int, ragged: bool, count_blocks: bool):
        self.view = view
        self.model = view.hf_model
        self.config = config
        self.processors = _Processors(processors)
        self.stopping = stopping_criteria
        self.streamer = streamer
        self.generator = generator
        self.do_sample = bool(config.do_sample)
        self.num_layers = view.num_layers
        self.ragged = ragged
        batch, prompt = input_ids.shape
        device = input_ids.device
        self.device = device
        self.rows = torch.arange(batch, device=device)
        self.prompt_length = prompt
        self.max_new = int(config.max_length) - prompt
        room = prompt + self.max_new + 2 * (max_draft + 1) + 2
        self.tokens = input_ids.new_zeros(batch, room)
        self.tokens[:, :prompt] = input_ids
        self.length = torch.full((batch,), prompt, dtype=torch.long, device=device)
        self.out = input_ids  # what _sample's input_ids would be: the emitted columns, pads after a row finished
        mask = attention_mask.to(torch.long) if attention_mask is not None else None
        if position_ids is None:
            position_ids = positions_from_mask(mask, input_ids)
        self.prompt_positions = position_ids
        self.position = position_ids[:, -1].clone()  # position id of the last token in each row's buffer
        self.slot_mask = mask if mask is not None and not bool((mask == 1).all()) else None
        self.cache = cache
        self.static = isinstance(cache, StaticCache)
        self.capacity = int(cache.layers[0].max_cache_len) if self.static else None
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None)
        self.position_limit = int(limit) if isinstance(limit, int) else None
        self.eos = config._eos_token_tensor if getattr(config, "_eos_token_tensor", None) is not None else None
        if self.eos is not None:
            self.eos = self.eos.to(device).reshape(-1)
        pad = getattr(config, "_pad_token_tensor", None)
        self.pad = pad.to(device) if pad is not None else None
        self.has_eos_criteria = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        self.unfinished = torch.ones(batch, dtype=torch.long, device=device)
        self.compute_done = torch.zeros(batch, dtype=torch.bool, device=device)
        keep_scores = bool(config.return_dict_in_generate and config.output_scores)
        keep_logits = bool(config.return_dict_in_generate and config.output_logits)
        vocab = self.model.get_output_embeddings().weight.shape[0] if self.model.get_output_embeddings() is not None \
            else None
        shape = (batch, room - prompt, vocab)
        self.score_buffer = torch.zeros(shape, dtype=torch.float32, device=device) if keep_scores else None
        self.logit_buffer = torch.zeros(shape, dtype=torch.float32, device=device) if keep_logits else None
        self.scores: tuple | None = () if keep_scores else None
        self.raw_logits: tuple | None = () if keep_logits else None
        self.counts = [0] * self.num_layers if count_blocks else None
        self.embed = self.model.get_input_embeddings()
        self.fast = None  # None: not yet checked; True/False: draft steps skip the model's preamble (see _fast_state)
        self.pending = None  # (B,) each row's last token, not yet in the cache
        self.layer_agreement: dict[int, tuple[int, int]] | None = None
        self.compiled = None  # the compiled block runner (static cache, generate's compile criteria): set by the caller

    # -- helpers ---------------------------------------------------------------------------------------

    def slots(self) -> int:
        return int(self.cache.get_seq_length())

    def _pick(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """generate's token selection from processed (B, V) scores: argmax, or a sample of softmax(scores)."""
        if not self.do_sample:
            return scores.argmax(-1), None
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1), probs

    def _run(self, state, until: int):
        if self.counts is not None:
            for layer in range(state.depth, until):
                self.counts[layer] += state.hidden.shape[1]
        return self.view.run_blocks(state, until, runner=self.compiled)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, m, D) -> (B, m, V) float32 logits through the model's own head (final norm + LM head)."""
        return self.view.head(hidden, EMPTY_CONTEXT).to(torch.float32)

    def _state(self, ids: torch.Tensor, positions: torch.Tensor, mask2d: torch.Tensor | None, mask4=None,
               embeds: bool = False):
        """The model's own forward up to block 1 for ``ids`` (B, m) at ``positions`` (B, m).

        ``mask4``: an already built 4D mask for these queries (a slice of the verify pass's mask); the model takes a
        4D mask as it is, so draft steps skip mask construction. Otherwise the model builds its own from ``mask2d``.
        """
        inputs = {"position_ids": positions, "cache": self.cache, "use_cache": True}
        if embeds:  # zero token embeddings: the state's hidden is then the position part of the embedding output
            inputs["inputs_embeds"] = self.embed.weight.new_zeros(ids.shape[0], ids.shape[1], self.embed.weight.shape[1])
        else:
            inputs["input_ids"] = ids
        mask = mask4 if mask4 is not None else mask2d
        if mask is not None:
            inputs["attention_mask"] = mask
        return self.view.prepare(**inputs)

    def _fast_state(self, verify, token: torch.Tensor, i: int, n: int, step_mask):
        """Draft step i's block inputs without running the model's preamble.

        ``verify`` was prepared with zero token embeddings for the n+1 positions of the round, so its hidden is the
        position part of the embedding output; the step's input is ``embed(token) + verify.hidden[:, i]`` and its
        block arguments are the verify pass's, sliced to query i (rotary tables, position ids) and to the keys
        before it (the 4D mask). Exact only for embeddings of the form ``embed(ids) + f(positions)``, so the first
        use is compared with the model's own preamble (tensor for tensor, bit for bit) and dropped if anything
        differs.
        """
        hidden = self.embed(token[:, None]) + verify.hidden[:, i: i + 1]
        batch = token.shape[0]

        def cut(value):
            if isinstance(value, torch.Tensor):
                if value.dim() == 4 and value.shape[-2] == n + 1:  # each block's own mask, cut to query i
                    if step_mask is None and not self.static:
                        return None  # no padding: one query on a dynamic cache needs no mask (generate passes none)
                    # keys: a dynamic cache's p+n+1 cut to p+i+1; a static cache's whole length stays
                    return value[:, :, i: i + 1] if self.static else value[:, :, i: i + 1, : value.shape[-1] - n + i]
                if value.dim() >= 2 and value.shape[1] == n + 1 and value.shape[0] in (1, batch):
                    return value[:, i: i + 1]
            return value

        return replace(verify.map_arguments(cut), hidden=hidden)

    @staticmethod
    def _find_mask(state, queries: int) -> torch.Tensor | None:
        """The 4D attention mask (.., queries, keys) among the captured block arguments, if the model built one."""
        for value in state.arguments():
            if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-2] == queries:
                return value
        return None

    def _process(self, lengths: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.processors(self.tokens, lengths, logits)

    # -- prefill ---------------------------------------------------------------------------------------

    def prefill(self, agreement_positions: int = 0) -> None:
        """All L blocks over the prompt, as generate's first step; the first new token goes to every row's buffer.

        With ``agreement_positions`` > 0, also count, for every block l < L, on the last real prompt positions, how
        often the shared head's argmax after block l equals the final one (teacher-forced agreement on the prompt,
        the prior of the automatic exit choice)."""
        ids = self.tokens[:, : self.prompt_length]
        inputs = {"input_ids": ids, "position_ids": self.prompt_positions, "cache": self.cache, "use_cache": True}
        if self.slot_mask is not None:
            inputs["attention_mask"] = self.slot_mask
        state = self.view.prepare(**inputs)
        window = min(agreement_positions, self.prompt_length - 1)
        guesses = {}
        while state.depth < self.num_layers:
            state = self._run(state, state.depth + 1)
            if window and state.depth < self.num_layers:
                guesses[state.depth] = self._head(state.hidden[:, -window - 1: -1]).argmax(-1)
        logits = self._head(state.hidden[:, -window - 1:])
        if window:
            final = logits[:, :-1].argmax(-1)
            real = (self.slot_mask[:, -window - 1: -1] == 1) if self.slot_mask is not None else torch.ones_like(final,
                                                                                                           dtype=torch.bool)
            self.layer_agreement = {layer: (int(((g == final) & real).sum()), int(real.sum()))
                                    for layer, g in guesses.items()}
        logits = logits[:, -1]
        scores = self._process(self.length, logits)
        token, _ = self._pick(scores)
        self._store(torch.zeros_like(self.length), token[:, None], scores[:, None], logits[:, None])
        self.pending = token

    def _store(self, accepted: torch.Tensor, emitted: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor) -> None:
        """Append row b's ``accepted[b] + 1`` tokens ``emitted[b, :accepted[b] + 1]`` to its buffer (active rows)."""
        active = ~self.compute_done
        counts = torch.where(active, accepted + 1, torch.zeros_like(accepted))
        width = emitted.shape[1]
        offsets = torch.arange(width, device=self.device)
        keep = offsets[None, :] < counts[:, None]  # (B, width)
        rows, cols = keep.nonzero(as_tuple=True)
        self.tokens[rows, self.length[rows] + cols] = emitted[rows, cols]
        produced = self.length - self.prompt_length
        if self.score_buffer is not None:
            self.score_buffer[rows, produced[rows] + cols] = scores[rows, cols]
        if self.logit_buffer is not None:
            self.logit_buffer[rows, produced[rows] + cols] = logits[rows, cols]
        if self.eos is not None and self.has_eos_criteria:
            hit = torch.isin(emitted, self.eos) & keep
            self.compute_done |= hit.any(-1)
        self.length = self.length + counts
        self.position = self.position + counts
        self.compute_done |= (self.length - self.prompt_length) >= self.max_new
        self._finished_need_nothing()

    def _finished_need_nothing(self) -> None:
        """A finished row needs no more compute when generate pads it (there is an EOS criterion); without one,
        ``_sample`` keeps emitting the model's own tokens for it, so it keeps computing."""
        if self.has_eos_criteria:
            self.compute_done |= self.unfinished == 0

    # -- one round -------------------------------------------------------------------------------------

    def round(self, k: int, n: int, stats: SpeculativeStats) -> None:
        """One draft-verify round of n drafts at depth k for every row still computing."""
        m = n + 1
        batch = self.tokens.shape[0]
        active = ~self.compute_done
        if self.static and self.slots() + m > self.capacity:
            self.compact()
        p = self.slots()
        offsets = torch.arange(m, device=self.device)
        positions = torch.where(active, self.position, torch.zeros_like(self.position))[:, None] + offsets
        if self.position_limit is not None:
            positions = positions.clamp(max=self.position_limit - 1)  # rows past their budget: never emitted
        mask2d = None
        if self.slot_mask is not None:
            mask2d = torch.cat([self.slot_mask, self.slot_mask.new_ones(batch, m)], dim=1)
        pending = self.pending
        # the verify pass's block arguments (queries p..p+n), captured while every layer has p slots
        verify = self._state(pending[:, None].expand(-1, m), positions, mask2d, embeds=self.fast is not False)
        # the verify pass's 4D mask serves the draft steps, unless the blocks build position biases from the 2D
        # mask themselves (ALiBi: an `alibi` argument)
        mask4 = self._find_mask(verify, m) if mask2d is not None and "alibi" not in verify.block_kwargs else None
        if self.fast is None and self.embed.weight.shape[1] != verify.hidden.shape[-1]:
            self.fast = False  # token embeddings projected to the hidden size (OPT's project_in): no shortcut
        hidden_k, drafts, qs, draft_logits = [], [], [], []
        token = pending
        for i in range(m):  # i < n: draft steps; i == n: blocks 1..k for the last draft token
            step_mask = None
            if mask4 is not None:
                step_mask = mask4[:, :, i: i + 1, : p + i + 1] if mask4.shape[-1] == p + m else mask4[:, :, i: i + 1]
            step_mask2d = None if mask2d is None else mask2d[:, : p + i + 1]
            state = None
            if self.fast is not False:
                state = self._fast_state(verify, token, i, n, step_mask)
                if self.fast is None:  # first use: must equal the model's own preamble exactly, else never again
                    own = self._state(token[:, None], positions[:, i: i + 1], step_mask2d, step_mask)
                    self.fast = _same_state(state, own)
                    state = own
            if state is None:
                state = self._state(token[:, None], positions[:, i: i + 1], step_mask2d, step_mask)
            state = self._run(state, k)
            hidden_k.append(state.hidden)
            if i == n:
                break
            logits = self._head(state.hidden)[:, -1]
            scores = self._process(self.length + i, logits)
            token, q = self._pick(scores)
            self.tokens[self.rows, self.length + i] = torch.where(active, token, self.tokens[self.rows, self.length + i])
            drafts.append(token)
            qs.append(q)
            draft_logits.append(logits)
        draft = torch.stack(drafts, dim=1) if drafts else pending.new_zeros(batch, 0)
        state = self._run(replace(verify, hidden=torch.cat(hidden_k, dim=1), depth=k), self.num_layers)
        logits = self._head(state.hidden)  # (B, n+1, V)
        scores = torch.stack([self._process(self.length + j, logits[:, j]) for j in range(m)], dim=1)
        if not self.do_sample:
            target = scores.argmax(-1)  # (B, n+1)
            row_accepted = (draft == target[:, :n]).to(torch.long).cumprod(-1).sum(-1)
            correction = target[self.rows, row_accepted]
        elif n:
            probs = torch.softmax(scores, dim=-1)
            row_accepted, correction = speculative_sample(probs, torch.stack(qs, dim=1), draft, self.generator)
        else:
            row_accepted = torch.zeros_like(pending)
            correction = torch.multinomial(torch.softmax(scores[:, 0], -1), 1, generator=self.generator)[:, 0]
        if self.ragged or not bool(active.any()):
            accepted = row_accepted
        else:  # lock step: every row keeps the smallest accepted count; a row that accepted more emits its next
            a = int(row_accepted[active].min())  # draft token (an exact sample of p as well)
            accepted = torch.full_like(row_accepted, a)
            correction = torch.where(row_accepted > a, draft[:, a] if a < n else correction, correction)
        emitted = torch.cat([draft, correction[:, None]], dim=1)
        emitted[self.rows, accepted] = correction
        stats.rounds += 1
        stats.drafted += n * int(active.sum())
        stats.accepted += int(row_accepted[active].sum())
        stats.rejections += int((row_accepted[active] < n).sum())
        keep = int(accepted[active].max()) if bool(active.any()) else 0
        self.cache.crop(-(n - keep))  # keep slots p .. p + keep (the longest accepted prefix + its last token)
        kept = offsets[: keep + 1][None, :] <= accepted[:, None]
        kept &= active[:, None]
        if self.slot_mask is not None or not bool(kept.all()):
            if self.slot_mask is None:
                self.slot_mask = torch.ones(batch, p, dtype=torch.long, device=self.device)
            self.slot_mask = torch.cat([self.slot_mask, kept.to(torch.long)], dim=1)
        self._store(accepted, emitted, scores, logits)
        self.pending = torch.where(active, emitted[self.rows, accepted], pending)
        if not self.static and self.slot_mask is not None:
            holes = int((self.slot_mask == 0).sum(-1).min())
            if holes >= max(16, self.slot_mask.shape[1] // 4):
                self.compact()

    def plain_step(self) -> None:
        """One ordinary decoding step for every row still computing, through the model's own forward (what
        ``_sample`` does): the automatic choice falls back to it when no draft depth is predicted to pay off."""
        batch = self.tokens.shape[0]
        active = ~self.compute_done
        positions = torch.where(active, self.position, torch.zeros_like(self.position))[:, None]
        if self.position_limit is not None:
            positions = positions.clamp(max=self.position_limit - 1)
        inputs = {"input_ids": self.pending[:, None], "position_ids": positions, "cache": self.cache, "use_cache": True}
        if self.slot_mask is not None:
            inputs["attention_mask"] = torch.cat([self.slot_mask, self.slot_mask.new_ones(batch, 1)], dim=1)
        if self.compiled is not None:  # the compiled blocks 1..L on the model's own block arguments
            state = self._run(self.view.prepare(**inputs), self.num_layers)
            logits = self._head(state.hidden)[:, -1]
        else:
            logits = self.model(**inputs).logits[:, -1].to(torch.float32)
            if self.counts is not None:
                self.counts = [c + 1 for c in self.counts]
        scores = self._process(self.length, logits)
        token, _ = self._pick(scores)
        if self.slot_mask is not None or not bool(active.all()):
            if self.slot_mask is None:
                self.slot_mask = torch.ones(batch, self.slots() - 1, dtype=torch.long, device=self.device)
            self.slot_mask = torch.cat([self.slot_mask, active[:, None].to(torch.long)], dim=1)
        self._store(torch.zeros_like(self.length), token[:, None], scores[:, None], logits[:, None])
        self.pending = torch.where(active, token, self.pending)

    def compact(self) -> None:
        """Squeeze every row's masked slots out of the cache: each row's real slots move to the right end, in order,
        left-padded (keys keep the rotation of their own position ids, so attention is unchanged)."""
        if self.slot_mask is None:
            return
        mask = self.slot_mask.bool()
        real = mask.sum(-1)
        width = int(real.max())
        # stable sort: padding first, then the real slots in their order
        order = torch.sort(mask.to(torch.int8), dim=-1, stable=True).indices[:, -width:]
        for layer in self.cache.layers:
            if not getattr(layer, "is_initialized", False):
                continue
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            keys = layer.keys.gather(2, index)
            values = layer.values.gather(2, order[:, None, :, None].expand(-1, layer.values.shape[1], -1,
                                                                           layer.values.shape[-1]))
            if isinstance(layer.cumulative_length if hasattr(layer, "cumulative_length") else None, torch.Tensor):
                layer.keys[:, :, :width].copy_(keys)
                layer.values[:, :, :width].copy_(values)
                layer.cumulative_length.fill_(width)
            else:
                layer.keys, layer.values = keys, values
        self.slot_mask = mask.gather(1, order).to(torch.long)
        if bool((self.slot_mask == 1).all()):
            self.slot_mask = None

    # -- emission --------------------------------------------------------------------------------------

    def emit(self) -> bool:
        """Hand every position all unfinished rows have computed to generate's machinery; True when done."""
        emitted = self.out.shape[1] - self.prompt_length
        produced = self.length - self.prompt_length
        live = self.unfinished.bool() if self.has_eos_criteria else torch.ones_like(self.compute_done)
        ready = int(produced[live].min()) if bool(live.any()) else emitted
        for column in range(emitted, ready):
            next_tokens = self.tokens[:, self.prompt_length + column]
            if self.has_eos_criteria and self.pad is not None:
                next_tokens = next_tokens * self.unfinished + self.pad * (1 - self.unfinished)
            self.out = torch.cat([self.out, next_tokens[:, None]], dim=-1)
            if self.scores is not None:
                self.scores += (self.score_buffer[:, column].clone(),)
            if self.raw_logits is not None:
                self.raw_logits += (self.logit_buffer[:, column].clone(),)
            self.unfinished = self.unfinished & ~self.stopping(self.out, self.scores)
            if self.streamer is not None:
                self.streamer.put(next_tokens.cpu())
            if int(self.unfinished.max()) == 0:
                return True
        self._finished_need_nothing()
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
    return _same_value(a.hidden, b.hidden) and _same_value(a.arguments(), b.arguments())


# ----------------------------------------------------------------------------------------------------------
# The custom_generate callable
# ----------------------------------------------------------------------------------------------------------

DEFAULT_NUM_DRAFT_TOKENS = 4


def _check_schedule(exit_layer: Any, num_draft_tokens: Any, num_layers: int) -> None:
    if isinstance(exit_layer, bool) or not (isinstance(exit_layer, int) or exit_layer == "auto"):
        raise TypeError(f"exit_layer must be an integer in [1, {num_layers - 1}] or 'auto', got {exit_layer!r}")
    if isinstance(exit_layer, int) and not 1 <= exit_layer <= num_layers - 1:
        raise ValueError(
            f"exit_layer must be in [1, {num_layers - 1}] (the draft uses blocks 1..exit_layer of the model's "
            f"{num_layers}), got {exit_layer}"
        )
    if num_draft_tokens != "auto" and (isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int)
                                       or num_draft_tokens < 1):
        raise ValueError(f"num_draft_tokens must be a positive integer or 'auto', got {num_draft_tokens!r}")


def _local_attention_span(config: Any) -> int | None:
    """The smallest local attention span of the model's layers (sliding window, local window, attention chunk),
    read from its config; None when every layer attends to the whole sequence."""
    spans = [getattr(config, key, None) for key in ("sliding_window", "window_size", "attention_chunk_size")]
    spans = [s for s in spans if isinstance(s, int) and not isinstance(s, bool) and s > 0]
    return min(spans) if spans else None


def _sliding_windows(hf_model: nn.Module) -> list[int]:
    windows = [getattr(layer, "sliding_window", None) for layer in DynamicCache(config=hf_model.config).layers
               if getattr(layer, "is_sliding", False)]
    return [w for w in windows if isinstance(w, int)]


def self_speculative(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    exit_layer: int | str | None = None,
    num_draft_tokens: int | str | None = None,
    generator: torch.Generator | None = None,
    speculative_stats: SpeculativeStats | None = None,
    **model_kwargs: Any,
):
    """Self-speculative decoding as a ``custom_generate`` callable: ``model.generate(**inputs,
    custom_generate=hf_align.self_speculative, exit_layer=2, num_draft_tokens=4)``.

    ``generate`` prepares everything as usual (generation config, logits processors and warpers, stopping criteria,
    special tokens, the attention mask, ``num_return_sequences``, the cache) and calls this with
    ``GenerationMixin._sample``'s signature. Each round drafts ``n`` tokens with blocks 1..k + the model's own head
    and verifies them with one pass of blocks k+1..L over the n+1 positions, reusing the drafts' keys/values of
    blocks 1..k (module docstring). Every logits processor runs at every verified position on that position's own
    prefix, so the output is ``_sample``'s: token for token greedy (up to float accumulation order), and in
    distribution when sampling (Leviathan et al. 2023: accept a draft x with probability min(1, p(x)/q(x)), else
    sample norm(max(0, p - q)); p and q are the processed distributions of the full model and of the draft).
    Stopping criteria (EOS, ``max_length``, ``stop_strings``, ``max_time``, user criteria) and the streamer see one
    position at a time for the whole batch, as in ``_sample``.

    Its own options (``generate`` passes them through):
        exit_layer: k in [1, L-1], or ``"auto"`` (chosen from teacher-forced agreement on the prompt and then from
            the acceptance measured in the call; :mod:`hf_align.generation.auto_exit`). Default: the model's
            ``generation_config.self_speculative_exit_layer`` (written by hf-align when it saves an aligned LM),
            else ``"auto"``.
        num_draft_tokens: n, or ``"auto"``; default ``generation_config.self_speculative_num_draft_tokens``, else 4
            (``"auto"`` when exit_layer is ``"auto"``).
        generator: a ``torch.Generator`` for every random draw of the sampling path.
        speculative_stats: a :class:`SpeculativeStats` to fill (``return_dict_in_generate=True`` also returns it as
            ``output.stats``).

    Batches: each row keeps its own accepted count when every processor is row-local (transformers' own
    processors and warpers); with a processor hf-align does not know, rows advance together by the smallest
    count, so the processor is always called on the whole batch at one length, as ``_sample`` calls it.
    Sliding-window models also advance together (the window counts cache slots).
    """
    streamer = generate_streamer(streamer)
    hf_model = check_decoder(model)
    config = generation_config
    check_generation(hf_model, config, model_kwargs, logits_processor, synced_gpus=synced_gpus)
    check_rope(hf_model, config)
    check_input_ids(input_ids)
    num_layers = int(hf_model.config.num_hidden_layers)
    if exit_layer is None:
        exit_layer = getattr(config, EXIT_LAYER_KEY, None) or "auto"
    if num_draft_tokens is None:
        num_draft_tokens = getattr(config, NUM_DRAFT_KEY, None) or ("auto" if exit_layer == "auto"
                                                                    else DEFAULT_NUM_DRAFT_TOKENS)
    _check_schedule(exit_layer, num_draft_tokens, num_layers)
    attention_mask = model_kwargs.get("attention_mask")
    check_attention_mask(input_ids, attention_mask)
    prompt = input_ids.shape[1]
    max_new = int(config.max_length) - prompt
    if max_new < 1:
        raise ValueError(f"nothing to generate: the prompt has {prompt} tokens and max_length is {config.max_length}; "
                         "pass max_new_tokens")
    max_draft = num_draft_tokens if isinstance(num_draft_tokens, int) else max(AUTO_DRAFT_COUNTS)
    windows = _sliding_windows(hf_model)
    window = _local_attention_span(hf_model.config)
    # rows advance by their own counts while the cache (with its masked holes, at most about a third more slots
    # than tokens between compactions) stays within every local attention span, which counts cache slots
    worst_slots = (prompt + max_new + max_draft + 1) * 4 // 3 + 16 + 2 * (max_draft + 1)
    ragged = _row_local(logits_processor) and (window is None or worst_slots <= window)
    if windows and prompt + max_new > min(windows):
        raise ValueError(
            f"{type(hf_model).__name__} uses sliding-window attention (window {min(windows)} tokens) and prompt + "
            f"max_new_tokens = {prompt + max_new} exceeds it; hf-align decoding supports sliding-window models only "
            "within the window"
        )
    view = layer_view(model)
    stats = speculative_stats if speculative_stats is not None else SpeculativeStats(
        exit_layer=exit_layer if isinstance(exit_layer, int) else 0,
        num_draft_tokens=num_draft_tokens if isinstance(num_draft_tokens, int) else 0, num_layers=num_layers)
    stats.num_layers = num_layers
    stats.batch_size = input_ids.shape[0]
    cache = model_kwargs.get("cache")
    if isinstance(cache, StaticCache) or config.cache_implementation == "static":
        # room for the drafts of the last round and for rejected slots between compactions
        cache = StaticCache(config=hf_model.config, max_cache_len=int(config.max_length) + 2 * (max_draft + 1) + 8)
    else:
        cache = DynamicCache(config=hf_model.config)
    device = next(hf_model.parameters()).device
    with torch.no_grad(), preserved_state(model):
        start_time = time.perf_counter()
        decoder = _Decoder(view, config, logits_processor, stopping_criteria, streamer, input_ids.to(device),
                           attention_mask.to(device) if attention_mask is not None else None,
                           model_kwargs.get("position_ids"), cache, generator, max_draft, ragged, count_blocks=True)
        chooser = None
        if exit_layer == "auto" or num_draft_tokens == "auto":
            chooser = ExitChooser(view, fixed_exit_layer=None if exit_layer == "auto" else exit_layer,
                                  fixed_num_draft=None if num_draft_tokens == "auto" else num_draft_tokens)
        decoder.prefill(agreement_positions=chooser.prompt_positions if chooser is not None else 0)
        decoder.compiled = compiled_segment_runner(hf_model, config, cache)  # the prefill runs eagerly
        stats.compiled = decoder.compiled is not None
        done = decoder.emit()
        if chooser is not None and not done:
            chooser.calibrate(decoder)
        while not done:
            k, n = chooser.choice() if chooser is not None else (exit_layer, num_draft_tokens)
            remaining = decoder.max_new - (decoder.length - decoder.prompt_length)[~decoder.compute_done]
            if remaining.numel() == 0:  # nothing to compute, yet some row is unfinished: cannot happen with
                break  # generate's criteria (max_length always stops); guard against custom lists without it
            if chooser is not None and (chooser.plain or chooser.needs_plain_probe()):
                # no draft depth pays off (decode the ordinary way), or a plain step is being timed
                begin = time.perf_counter()
                decoder.plain_step()
                stats.plain_steps += 1
                done = decoder.emit()
                if not chooser.plain:
                    chooser.observe_plain(time.perf_counter() - begin)
                continue
            if decoder.compiled is None:  # (compiled: keep n, one graph per (k, n); the extra tokens are never emitted)
                n = max(0, min(n, int(remaining.max()) - 1))
            before = (stats.accepted, stats.drafted, stats.rejections)
            begin = time.perf_counter()
            decoder.round(k, n, stats)
            done = decoder.emit()
            if chooser is not None:
                chooser.observe(k, n, stats.accepted - before[0], stats.drafted - before[1],
                                stats.rejections - before[2], seconds=time.perf_counter() - begin)
        if streamer is not None:
            streamer.end()
        stats.seconds = time.perf_counter() - start_time
    if chooser is not None and chooser.current is not None:  # (not chosen when the first token ended the call)
        stats.exit_layer, stats.num_draft_tokens = chooser.choice()
        stats.calibration = chooser.report()
    stats.new_tokens = decoder.out.shape[1] - prompt
    stats.block_positions = list(decoder.counts)
    stats.fast_path = decoder.fast
    stats.ragged = ragged
    if config.return_dict_in_generate:
        return SpeculativeDecoderOnlyOutput(sequences=decoder.out, scores=decoder.scores, logits=decoder.raw_logits,
                                            stats=stats)
    return decoder.out


def _route_extras(kwargs: dict[str, Any], generation_config: GenerationConfig | None):
    """transformers 5's ``generate`` does not hand ``tokenizer`` to a ``custom_generate`` callable (its
    ``_extract_generation_mode_kwargs`` keeps only the callable's own parameters), so ``stop_strings`` would find no
    tokenizer: they become a ``StopStringCriteria`` in ``stopping_criteria`` here. (The streamer, dropped the same
    way, is read back from ``generate``'s frame: :func:`~hf_align.generation.front_door.generate_streamer`.)"""
    decoding = self_speculative
    stop_strings = kwargs.pop("stop_strings", None)
    if stop_strings is None and generation_config is not None:
        stop_strings = generation_config.stop_strings
        if stop_strings is not None:
            generation_config = copy.deepcopy(generation_config)
            generation_config.stop_strings = None
    if stop_strings is not None:
        tokenizer = kwargs.get("tokenizer")
        if tokenizer is None:
            raise ValueError("stop_strings need the model's tokenizer: pass tokenizer= as for generate")
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
        kwargs["stopping_criteria"] = criteria
    if generation_config is not None:
        kwargs["generation_config"] = generation_config
    return decoding, kwargs


def generate_self_speculative(model: nn.Module, *args: Any, **kwargs: Any):
    """``GenerationMixin.generate(model, *args, custom_generate=self_speculative, **kwargs)``, with streamers and
    ``stop_strings`` routed to the decoder (see :func:`_route_extras`). What ``speculative_generate`` and the
    ``custom_generate/generate.py`` of a saved aligned LM call."""
    from transformers import GenerationMixin

    kwargs.pop("custom_generate", None)
    kwargs.pop("trust_remote_code", None)
    if len(args) > 1:  # generate(inputs, generation_config, ...): name the generation config
        args, kwargs["generation_config"] = args[:1], args[1]
    decoding, kwargs = _route_extras(kwargs, kwargs.pop("generation_config", None))
    return GenerationMixin.generate(unwrap_model(model), *args, custom_generate=decoding, **kwargs)


def speculative_generate(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    exit_layer: int | str | None = None,
    num_draft_tokens: int | str | None = None,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
    **generate_kwargs: Any,
):
    """Self-speculative decoding, as a function: ``model.generate(input_ids, attention_mask=...,
    custom_generate=self_speculative, exit_layer=..., num_draft_tokens=..., **generate_kwargs)``.

    Everything ``generate`` accepts for greedy decoding and sampling is accepted (generation config, logits
    processors, stopping criteria, ``stop_strings`` with ``tokenizer=``, streamers, ``num_return_sequences``,
    ``output_scores``, ``cache_implementation="static"``...); see :func:`self_speculative`.

    Args:
        model: a causal LM of a supported family (``hf_align.supported_families()``), optionally PEFT-wrapped. It is
            not changed: no hook, cache or config change stays behind.
        input_ids, attention_mask: the prompt, left-padded for batches (as for ``model.generate``; without a mask,
            generate infers it from the pad token).
        exit_layer, num_draft_tokens, generator: see :func:`self_speculative`.
        return_stats: also return the :class:`SpeculativeStats` (``(output, stats)``).

    Returns:
        What ``model.generate`` returns: the (B, prompt + new) token tensor, or with ``return_dict_in_generate=True``
        a :class:`SpeculativeDecoderOnlyOutput` (``sequences``, ``scores``/``logits`` when asked, and ``stats``).
    """
    hf_model = check_front(model, input_ids, attention_mask)
    num_layers = int(hf_model.config.num_hidden_layers)
    _check_schedule("auto" if exit_layer is None else exit_layer,
                    "auto" if num_draft_tokens is None else num_draft_tokens, num_layers)
    stats = SpeculativeStats(exit_layer=exit_layer if isinstance(exit_layer, int) else 0,
                             num_draft_tokens=num_draft_tokens if isinstance(num_draft_tokens, int) else 0,
                             num_layers=num_layers)
    if attention_mask is not None:
        generate_kwargs["attention_mask"] = attention_mask
    output = generate_self_speculative(model, input_ids=input_ids, exit_layer=exit_layer,
                                       num_draft_tokens=num_draft_tokens, generator=generator,
                                       speculative_stats=stats, **generate_kwargs)
    return (output, stats) if return_stats else output


def choose_exit_layer(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_draft_tokens: int | str = "auto",
    candidates: list[int] | None = None,
) -> tuple[int, dict[str, Any]]:
    """The (k, n) the automatic choice starts a call with on these prompts, without decoding.

    Runs the prefill (all blocks over the prompts, counting per-block agreement of the shared head with the final
    argmax on the prompt's own positions) and the cost measurement of :class:`ExitChooser`. Returns
    ``(k, report)``; ``report["num_draft_tokens"]`` is n, ``report["prompt_agreement"][l]`` the teacher-forced
    agreement of block l, ``report["predicted_speedup"]`` the prediction per ``"k,n"``.
    """
    hf_model = check_decoder(model)
    check_input_ids(input_ids)
    check_attention_mask(input_ids, attention_mask)
    view = layer_view(model)
    config = hf_model.generation_config.__class__.from_dict(hf_model.generation_config.to_dict())
    config.max_length = input_ids.shape[1] + 1
    config.do_sample = False
    fixed = None if num_draft_tokens == "auto" else int(num_draft_tokens)
    chooser = ExitChooser(view, fixed_num_draft=fixed, candidates=candidates)
    with torch.no_grad(), preserved_state(model):
        decoder = _Decoder(view, config, [], [], None, input_ids, attention_mask, None,
                           DynamicCache(config=hf_model.config), None, max(chooser.draft_counts), True, False)
        decoder.prefill(agreement_positions=ExitChooser.prompt_positions)
        chooser.calibrate(decoder)
    k, n = chooser.choice()
    report = chooser.report()
    if chooser.predicted_speedup(k, n) < 1.0:
        warnings.warn(
            f"choose_exit_layer: no draft depth is predicted faster than plain generate on these prompts (best k={k}, "
            f"n={n}: {chooser.predicted_speedup(k, n):.2f}x, prompt agreement {chooser.prior[k]:.2f}); the model's "
            "early layers rarely agree with its last (train it with the aligned loss, hf_align.AlignedTrainer)",
            stacklevel=2,
        )
    return k, report
