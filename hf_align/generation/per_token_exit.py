"""Per-token early exit for decoders (CALM, Schuster et al. 2022) through the model's own shared LM head.

Greedy decoding in which every new token leaves the model at the first block that is sure of it:

* The prompt is encoded at full depth by the model's own forward (prefill); the first new token is its
  full-depth argmax.
* Each later step feeds the previous token and runs blocks 1, 2, ... one at a time, with the arguments the
  model itself prepared for its blocks (mask, rotary tables, KV cache; see :class:`~hf_align.LayerView`).
  After block l (l >= ``min_exit_layer``) the model's own head (final norm + LM head) gives
  ``p_l = softmax(head(h_l))`` at the new position and a confidence ``c_l``; the token exits at the first
  l with ``c_l > threshold`` (always at block L) and the next token is ``argmax p_l``. Blocks l+1..L never
  run for it.
* **State propagation (lossy).** Later tokens attend to this token in blocks l+1..L, whose keys/values for it
  were never computed. They are filled from the exit state: for j = l+1..L, the keys/values of block j are
  those block j's attention would cache if h_l were its input,
  ``K_j = RoPE_j(W_K^j norm_j(h_l))``, ``V_j = W_V^j norm_j(h_l)`` (the block's own input norm, key/value
  projections and rotary position; GPT-2 has no rotary). This is CALM's propagation: exactly defined, but the
  output is *not* the full-depth output - report quality (agreement with full-depth greedy, perplexity)
  beside the speed, as ``benchmarks/per_token_exit.py`` does.

Confidence measures (``confidence=``), all in [0, 1] (a threshold of 1 never fires):

* ``"softmax"`` (CALM's softmax response): ``c_l = p_l^(1) - p_l^(2)``, the gap between the two largest
  probabilities;
* ``"max_prob"``: ``c_l = p_l^(1)``;
* ``"state"`` (CALM's hidden-state saturation): ``c_l = cos(h_l, h_{l-1})`` at the new position (clamped at 0).

Cost of deciding: ``"softmax"`` and ``"max_prob"`` need the head (2·D·V FLOPs per row, as much as a block
for a small model with a large vocabulary) after every block from ``min_exit_layer`` on, for the rows still
running; ``"state"`` needs it only at the exit. With ``threshold=1`` no head runs before block L.

Batches (left padding) decode in lock-step: a block runs for the batch while any unfinished row still needs
it; rows that have exited ride along with their exit state as input, so the block writes exactly the
propagated keys/values for them (its output for those rows is discarded). Once every row has exited, the
remaining blocks' keys/values are filled by the family's key/value projection alone
(:func:`hf_align.layers.get_kv_projection`, or :func:`hf_align.families.recorded_kv`), block j with its own
arguments (hybrid models: its own mask and rotary table). Compute saved per step is therefore L minus the *largest* exit
depth in the batch; each row's tokens are those it would get alone. Rows that finished (EOS) exit at once.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.utils import ModelOutput

from ..families import get_kv_projection, kv_projection_families, recorded_kv
from ..layers import LayerView, preserved_state
from .front_door import (
    check_attention_mask,
    check_decoder,
    check_front,
    check_generation,
    check_input_ids,
    generate_streamer,
    layer_view,
    positions_from_mask,
)

__all__ = ["CONFIDENCES", "EarlyExitGenerateOutput", "EarlyExitScore", "PerTokenEarlyExit", "early_exit_generate"]

CONFIDENCES = ("softmax", "max_prob", "state")

@dataclass
class EarlyExitGenerateOutput(ModelOutput):
    """``sequences`` (B, T + N): prompt + new tokens, as ``generate`` returns them.
    ``exit_layers`` (B, N): the block (1-based) whose head chose each new token (L = full depth; the first new
    token always comes from the full-depth prefill; 0 for padding after a row finished).
    ``blocks_run``: block forwards run (a block run on the whole batch counts once), prefill included.
    ``num_layers``: L. ``cache``: the KV cache after the last step (propagated entries included)."""

    sequences: torch.LongTensor | None = None
    exit_layers: torch.LongTensor | None = None
    blocks_run: int | None = None
    num_layers: int | None = None
    cache: Any = None

    @property
    def mean_exit_layer(self) -> float:
        """Average exit depth over the generated (non-padding) tokens."""
        real = self.exit_layers[self.exit_layers > 0]
        return float(real.double().mean()) if real.numel() else float("nan")


@dataclass
class EarlyExitScore(ModelOutput):
    """``nll`` (B, N) float64: negative log-likelihood of each scored true token under its exit distribution;
    ``exit_layers`` (B, N); ``blocks_run``; ``num_layers``. ``perplexity`` = exp(mean nll)."""

    nll: torch.Tensor | None = None
    exit_layers: torch.LongTensor | None = None
    blocks_run: int | None = None
    num_layers: int | None = None

    @property
    def perplexity(self) -> float:
        return float(torch.exp(self.nll.mean()))


def _confidence(kind: str, logits: torch.Tensor, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """(R, V) logits, (R, D) hidden states after this block and before it -> (R,) confidence in [0, 1]."""
    if kind == "state":
        return torch.nn.functional.cosine_similarity(hidden.double(), previous.double(), dim=-1).clamp_min(0.0)
    probs = logits.double().softmax(-1)
    if kind == "max_prob":
        return probs.max(-1).values
    top = probs.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


class PerTokenEarlyExit:
    """CALM-style per-token early exit for a supported causal LM (see the module docstring).

    Args:
        model: a ``*ForCausalLM`` / ``*LMHeadModel`` of a decoder-only family (``LayerFamily.causal``; registered
            or inferred by structure). State propagation uses the family's registered key/value projection
            (GPT-2, Llama / Mistral / Qwen2), else :func:`hf_align.families.recorded_kv` (the block's own code,
            stopped at its cache update). Not copied or changed.
        threshold: exit when the confidence is strictly above it; in [0, 1] (1 disables exits).
        confidence: ``"softmax"`` (top-1 minus top-2 probability), ``"max_prob"`` or ``"state"``.
        min_exit_layer: no exit before this block (1..L).
        view: an existing :class:`~hf_align.LayerView` of ``model`` (skips building and self-checking a new one).
    """

    def __init__(self, model: torch.nn.Module, *, threshold: float = 0.9, confidence: str = "softmax",
                 min_exit_layer: int = 1, view: LayerView | None = None):
        _check_settings(threshold, confidence, 1, 1)
        view = view if view is not None else LayerView(model)
        if view.task != "causal-lm":
            raise ValueError(
                f"per-token early exit needs a causal language model with an LM head; {type(view.hf_model).__name__} "
                f"is a {view.task} model"
            )
        if getattr(view.hf_model.config, "is_encoder_decoder", False):
            raise ValueError("per-token early exit supports decoder-only models, not encoder-decoder models")
        kv = get_kv_projection(view.family.name) or (recorded_kv if view.family.causal else None)
        if kv is None:
            raise ValueError(
                f"family {view.family.name!r} has no key/value projection for state propagation; families with one: "
                f"{kv_projection_families()} (hf_align.layers.register_kv_projection adds one)"
            )
        L = view.num_layers
        if isinstance(min_exit_layer, bool) or not isinstance(min_exit_layer, int) or not 1 <= min_exit_layer <= L:
            raise ValueError(f"min_exit_layer must be an integer in [1, {L}], got {min_exit_layer!r}")
        self.view = view
        self.model = view.hf_model
        self.kv_projection = kv
        self.threshold = float(threshold)
        self.confidence = confidence
        self.min_exit_layer = min_exit_layer

    @property
    def num_layers(self) -> int:
        return self.view.num_layers

    # -- decoding --------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **generate_kwargs: Any) -> EarlyExitGenerateOutput:
        """Greedy decoding with per-token exit, through ``model.generate``'s own preparation (generation config,
        special tokens, the mask inferred from pad tokens, logits processors, stopping criteria): the same front
        door, and the same errors for the same mistakes, as self-speculative decoding. ``generate_kwargs`` are
        ``generate``'s (max_new_tokens / max_length, eos_token_id, pad_token_id, repetition_penalty, stopping
        criteria, a streamer...); sampling and beam search are refused."""
        from transformers import GenerationMixin

        check_front(self.model, input_ids, attention_mask)
        if attention_mask is not None:
            generate_kwargs["attention_mask"] = attention_mask
        decoding = functools.partial(per_token_exit, runner=self)
        return GenerationMixin.generate(self.model, input_ids=input_ids, custom_generate=decoding, **generate_kwargs)

    def _decode(self, input_ids, logits_processor, stopping_criteria, config, streamer, model_kwargs):
        model, L = self.model, self.num_layers
        batch = input_ids.shape[0]
        device = input_ids.device
        max_new = int(config.max_length) - input_ids.shape[1]
        cache = DynamicCache(config=model.config)
        mask = model_kwargs.get("attention_mask")
        # model inputs as generate() prepares them: position ids from the mask (left padding), and no mask at all
        # when it has no padding
        state: dict[str, Any] = {"cache": cache, "use_cache": True, "attention_mask": mask}
        if "position_ids" in inspect.signature(model.forward).parameters:
            positions = model_kwargs.get("position_ids")
            state["position_ids"] = positions if positions is not None else positions_from_mask(mask, input_ids)
        pad = config._pad_token_tensor
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        unfinished = torch.ones(batch, dtype=torch.long, device=device)
        exit_layers = torch.zeros(batch, max_new, dtype=torch.long, device=device)

        # prefill at full depth: the model's own forward
        inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **state)
        logits = model(**inputs, return_dict=True).logits[:, -1]
        blocks_run = L
        depth = torch.full((batch,), L, dtype=torch.long, device=device)
        sequences = input_ids
        for step in range(max_new):
            if step > 0:
                logits, depth, ran = self._step(sequences, state, unfinished.bool(), cache)
                blocks_run += ran
            scores = logits_processor(sequences, logits.to(torch.float32))  # generate's float32 scores
            next_tokens = scores.argmax(-1)
            if has_eos and pad is not None:
                next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
            exit_layers[:, step] = torch.where(unfinished.bool(), depth, torch.zeros_like(depth))
            sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
            if state["attention_mask"] is not None:
                state["attention_mask"] = torch.cat([state["attention_mask"],
                                                     state["attention_mask"].new_ones((batch, 1))], dim=-1)
            if "position_ids" in state:
                state["position_ids"] = torch.cat([state["position_ids"], state["position_ids"][:, -1:] + 1], dim=-1)
            unfinished = unfinished & ~stopping_criteria(sequences, None)
            if streamer is not None:
                streamer.put(next_tokens.cpu())
            if int(unfinished.max()) == 0:
                exit_layers = exit_layers[:, : step + 1]
                break
        if streamer is not None:
            streamer.end()
        return EarlyExitGenerateOutput(sequences=sequences, exit_layers=exit_layers, blocks_run=blocks_run,
                                       num_layers=L, cache=cache)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, prefix_length: int = 1) -> EarlyExitScore:
        """Teacher-forced quality of per-token exit on real text (CALM's decoding, the true tokens fed back).

        ``input_ids[:, :prefix_length]`` is encoded at full depth (prefill); then every following real token is
        fed one step at a time with per-token exit and state propagation, exactly as in :meth:`generate`, and
        the exit distribution is scored on the true next token: ``nll[b, i] = -log p_exit(x_{p+i} | x_{<p+i})``
        for i = 0..n-p-1 (the first from the full-depth prefill). ``perplexity = exp(mean nll)``; with
        ``threshold=1`` it equals the model's own causal-LM loss on the same tokens. Rows must not be padded.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a (batch, length) LongTensor without padding")
        batch, length = input_ids.shape
        if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or not 1 <= prefix_length < length:
            raise ValueError(f"prefix_length must be an integer in [1, {length - 1}], got {prefix_length!r}")
        model, L = self.model, self.num_layers
        cache = DynamicCache(config=model.config)
        model_kwargs: dict[str, Any] = {"cache": cache, "use_cache": True, "attention_mask": None}
        if "position_ids" in inspect.signature(model.forward).parameters:
            model_kwargs["position_ids"] = torch.arange(prefix_length, device=input_ids.device).expand(batch, -1)
        prefix = input_ids[:, :prefix_length]
        inputs = model.prepare_inputs_for_generation(prefix, is_first_iteration=True, **model_kwargs)
        logits = model(**inputs, return_dict=True).logits[:, -1]
        depth = torch.full((batch,), L, dtype=torch.long, device=input_ids.device)
        blocks_run = L
        everyone = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        nll, exits = [], []
        for t in range(prefix_length, length):
            if t > prefix_length:
                if "position_ids" in model_kwargs:
                    positions = model_kwargs["position_ids"]
                    model_kwargs["position_ids"] = torch.cat([positions, positions[:, -1:] + 1], dim=-1)
                logits, depth, ran = self._step(input_ids[:, :t], model_kwargs, everyone, cache)
                blocks_run += ran
            nll.append(-logits.double().log_softmax(-1).gather(-1, input_ids[:, t, None]).squeeze(-1))
            exits.append(depth)
        return EarlyExitScore(nll=torch.stack(nll, 1), exit_layers=torch.stack(exits, 1), blocks_run=blocks_run,
                              num_layers=L)

    def _step(self, sequences, model_kwargs, unfinished, cache):
        """One decoding step for the last token of ``sequences``: (logits (B, V), exit depth (B,), blocks run)."""
        view, L = self.view, self.num_layers
        inputs = self.model.prepare_inputs_for_generation(sequences, next_sequence_length=1, **model_kwargs)
        state = view.prepare(**inputs)
        batch = state.batch_size
        exited = ~unfinished  # finished rows leave at once (their tokens are padding)
        exit_hidden = state.hidden.clone()  # (B, 1, D): the state each exited row propagates
        depth = torch.zeros(batch, dtype=torch.long, device=exit_hidden.device)
        logits = None
        ran = 0
        any_exited = bool(exited.any())
        for layer in range(1, L + 1):
            previous = state.hidden
            if any_exited:  # exited rows feed their exit state: the block writes their propagated K/V
                state = replace(state, hidden=torch.where(exited[:, None, None], exit_hidden, state.hidden))
            state = view.run_block(state)  # writes block `layer`'s K/V for every row
            ran += 1
            # no head before min_exit_layer; none before L with threshold 1 (no confidence exceeds 1)
            if layer < L and (layer < self.min_exit_layer or self.threshold >= 1.0):
                continue
            active = (~exited).nonzero().squeeze(1)
            h = state.hidden[active, -1]  # (R, D)
            if layer == L:
                fire = torch.ones(active.numel(), dtype=torch.bool, device=h.device)
                row_logits = view.head(h[:, None], context=view.context())[:, -1]  # (R, V)
            elif self.confidence == "state":  # decided from hidden states: the head runs for the exiting rows only
                fire = _confidence("state", None, h, previous[active, -1]) > self.threshold
                if not bool(fire.any()):
                    continue
                row_logits = view.head(h[fire][:, None], context=view.context())[:, -1]
            else:
                row_logits = view.head(h[:, None], context=view.context())[:, -1]
                fire = _confidence(self.confidence, row_logits, h, previous[active, -1]) > self.threshold
            if logits is None:
                logits = row_logits.new_zeros((batch, row_logits.shape[-1]))
            rows = active[fire]
            logits[rows] = row_logits if self.confidence == "state" and layer < L else row_logits[fire]
            depth[rows] = layer
            exit_hidden[rows] = state.hidden[rows]
            exited[rows] = True
            any_exited = any_exited or bool(fire.any())
            if bool(exited.all()):
                break
        # blocks after the last exit never run: fill their K/V by propagating each row's exit state
        for j in range(layer + 1, L + 1):  # block j's own arguments (hybrid models: its own mask / rotary table)
            keys, values = self.kv_projection(view.blocks[j - 1], exit_hidden, state.arguments_of(j)[1])
            cache.update(keys, values, j - 1)
        if logits is None:  # every row had finished: nothing was decided
            logits = torch.zeros(batch, 1, device=exit_hidden.device)
        return logits, depth, ran


def _check_settings(threshold: Any, confidence: Any, min_exit_layer: Any, num_layers: int) -> None:
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1] (exit when confidence > threshold), got {threshold!r}")
    if isinstance(min_exit_layer, bool) or not isinstance(min_exit_layer, int) or not 1 <= min_exit_layer <= num_layers:
        raise ValueError(f"min_exit_layer must be an integer in [1, {num_layers}], got {min_exit_layer!r}")


def per_token_exit(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    threshold: float = 0.9,
    confidence: str = "softmax",
    min_exit_layer: int = 1,
    runner: PerTokenEarlyExit | None = None,
    **model_kwargs: Any,
) -> EarlyExitGenerateOutput:
    """Per-token early exit as a ``custom_generate`` callable: ``model.generate(**inputs,
    custom_generate=hf_align.per_token_exit, threshold=0.9)`` (greedy; ``generate``'s logits processors are applied
    to the exit logits, its stopping criteria checked after every token). Its own options: ``threshold``,
    ``confidence``, ``min_exit_layer`` (see :class:`PerTokenEarlyExit`), or a ready ``runner``."""
    streamer = generate_streamer(streamer)
    hf_model = check_decoder(model)
    check_generation(hf_model, generation_config, model_kwargs, logits_processor, synced_gpus=synced_gpus)
    check_input_ids(input_ids)
    check_attention_mask(input_ids, model_kwargs.get("attention_mask"))
    if generation_config.do_sample:
        raise ValueError("per-token early exit is greedy: pass do_sample=False (the model's generation config samples)")
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise ValueError(f"per-token early exit writes propagated keys/values into a DynamicCache; "
                         f"cache_implementation={generation_config.cache_implementation!r} is not supported")
    if int(generation_config.max_length) <= input_ids.shape[1]:
        raise ValueError(f"nothing to generate: the prompt has {input_ids.shape[1]} tokens and max_length is "
                         f"{generation_config.max_length}; pass max_new_tokens")
    if runner is None:
        _check_settings(threshold, confidence, min_exit_layer, int(hf_model.config.num_hidden_layers))
        runner = PerTokenEarlyExit(model, threshold=threshold, confidence=confidence, min_exit_layer=min_exit_layer,
                                   view=layer_view(model))
    with preserved_state(model):
        return runner._decode(input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                              model_kwargs)


def early_exit_generate(model: torch.nn.Module, *, threshold: float = 0.9, confidence: str = "softmax",
                        min_exit_layer: int = 1, **inputs_and_generate_kwargs: Any) -> EarlyExitGenerateOutput:
    """Greedy decoding with CALM-style per-token early exit (see :mod:`hf_align.generation.per_token_exit`).

    ``hf_align.early_exit_generate(model, **tokenizer(prompts, return_tensors="pt", padding=True),
    threshold=0.9, max_new_tokens=32)``: inputs are ``input_ids`` (+ ``attention_mask``, left padding for
    batches); the rest are generation arguments (max_new_tokens / max_length, eos_token_id, pad_token_id).
    A token exits at the first block l >= ``min_exit_layer`` whose shared-head confidence is > ``threshold``;
    blocks after it never run for that token and their keys/values are propagated from h_l (lossy).
    With ``threshold=1`` no token exits and the output is exactly ``model.generate``'s greedy output.
    """
    from transformers import GenerationMixin

    kwargs = dict(inputs_and_generate_kwargs)
    input_ids, attention_mask = kwargs.pop("input_ids", None), kwargs.get("attention_mask")
    hf_model = check_front(model, input_ids, attention_mask)  # checks before any forward (the view's self-check)
    decoding = functools.partial(per_token_exit, threshold=threshold, confidence=confidence,
                                 min_exit_layer=min_exit_layer)
    return GenerationMixin.generate(hf_model, input_ids=input_ids, custom_generate=decoding, **kwargs)
