"""``exit_layer="auto"`` for :func:`~hf_align.generation.speculative_generate`: pick the draft depth k.

For each k, the greedy agreement alpha_k of block k's shared-head prediction with the full model is measured on a
short continuation of the prompt, and one draft step, one verification round and the head are timed. With i.i.d.
acceptance a round of n drafts emits E = (1 - alpha^{n+1}) / (1 - alpha) tokens, so the predicted speed is
E / (n * t_draft(k) + t_verify(k)); the k with the best prediction against plain decoding is chosen.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..layers import LayerView, preserved_state
from .speculative import _EMPTY_CONTEXT, _check_inputs, _check_model, _check_schedule, _layer_view

__all__ = ["choose_exit_layer", "expected_tokens_per_round"]



def _median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def expected_tokens_per_round(alpha: float, n: int) -> float:
    """E[tokens emitted per round] = sum_{j=0..n} alpha^j = (1 - alpha^{n+1}) / (1 - alpha) for i.i.d. acceptance."""
    return float(n + 1) if alpha >= 1.0 else (1.0 - alpha ** (n + 1)) / (1.0 - alpha)


def choose_exit_layer(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_draft_tokens: int = 4,
    calibration_tokens: int = 16,
    candidates: list[int] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Pick the draft depth k that maximises the expected tokens/s on these prompts (a short calibration).

    1. Acceptance: a greedy continuation of ``calibration_tokens`` tokens (``model.generate``), then one forward
       over prompt + continuation; alpha_k = the fraction of continuation positions where the argmax of the
       shared head on block k's output equals the full model's argmax (the greedy acceptance probability).
    2. Cost of one round (seconds, measured on the prompt's cache, per block assumed equal):
       ``T(k) = (n+1) (t_embed + k t_block1) + n t_head1 + t_embed_{n+1} + (L-k) t_block_{n+1} + t_head_{n+1}``
       (t_x1: one position, t_x_{n+1}: n+1 positions at once).
    3. ``k* = argmax_k E(alpha_k, n) / T(k)`` with ``E(alpha, n) = (1 - alpha^{n+1}) / (1 - alpha)``.

    Returns ``(k*, report)``; the report holds alpha_k, the predicted tokens/s per k and the measured costs.
    """
    hf_model = _check_model(model)
    _check_inputs(input_ids, attention_mask)
    num_layers = int(hf_model.config.num_hidden_layers)
    _check_schedule(1 if num_layers > 1 else 0, num_draft_tokens, num_layers)
    candidates = list(candidates) if candidates is not None else list(range(1, num_layers))
    for k in candidates:
        _check_schedule(k, num_draft_tokens, num_layers)
    view = _layer_view(model)
    n = num_draft_tokens
    with torch.no_grad(), preserved_state(model):
        pad = hf_model.generation_config.pad_token_id
        eos = hf_model.generation_config.eos_token_id
        if pad is None:
            pad = eos if isinstance(eos, int) else (eos[0] if eos else 0)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        full = hf_model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=calibration_tokens,
                                 do_sample=False, pad_token_id=pad)
        full_mask = torch.cat([mask, torch.ones_like(full[:, input_ids.shape[1]:])], dim=1)
        positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
        states = list(view.iter_states(input_ids=full, attention_mask=full_mask, position_ids=positions))
        lo, hi = input_ids.shape[1] - 1, full.shape[1] - 1  # positions predicting the continuation
        continuation = full[:, lo + 1: hi + 1]
        eos_ids = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                               dtype=torch.long, device=full.device)
        is_eos = torch.isin(continuation, eos_ids).to(torch.long)
        valid = (is_eos.cumsum(-1) - is_eos) == 0  # up to and including each row's first EOS
        final = view.head(states[-1].hidden[:, lo:hi], _EMPTY_CONTEXT).float().argmax(-1)
        alpha = {}
        for k in candidates:
            guess = view.head(states[k].hidden[:, lo:hi], _EMPTY_CONTEXT).float().argmax(-1)
            alpha[k] = float((guess == final)[valid].double().mean()) if bool(valid.any()) else 0.0
        costs = _round_costs(view, input_ids, mask, n)
    predicted = {}
    for k in candidates:
        t_round = ((n + 1) * (costs["embed_1"] + k * costs["block_1"]) + n * costs["head_1"] + costs["embed_n1"]
                   + (num_layers - k) * costs["block_n1"] + costs["head_n1"])
        predicted[k] = expected_tokens_per_round(alpha[k], n) / t_round
    t_plain = costs["embed_1"] + num_layers * costs["block_1"] + costs["head_1"]
    best = max(candidates, key=lambda k: predicted[k])
    if predicted[best] * t_plain < 1.0:
        warnings.warn(
            f"choose_exit_layer: no draft depth is predicted faster than plain generate on these prompts (best k={best}: "
            f"{predicted[best] * t_plain:.2f}x, acceptance {alpha[best]:.2f}); the model's early layers rarely agree "
            "with its last (train it with the aligned loss, hf_align.AlignedTrainer)",
            stacklevel=2,
        )
    report = {
        "alpha": alpha,
        "predicted_tokens_per_s": predicted,
        "predicted_plain_tokens_per_s": 1.0 / t_plain,
        "predicted_speedup": {k: predicted[k] * t_plain for k in candidates},
        "costs_s": costs,
        "num_draft_tokens": n,
        "calibration_tokens": calibration_tokens,
        "exit_layer": best,
    }
    return best, report


def _round_costs(view: LayerView, input_ids: torch.Tensor, mask: torch.Tensor, n: int) -> dict[str, float]:
    """Median seconds of: the model's forward up to block 1, one block, the head - for 1 and n+1 new positions."""
    cache = DynamicCache(config=view.hf_model.config)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    all_ones = bool((mask == 1).all())
    prompt = {"input_ids": input_ids, "position_ids": positions, "cache": cache, "use_cache": True}
    if not all_ones:
        prompt["attention_mask"] = mask
    view.run_blocks(view.prepare(**prompt), view.num_layers)
    costs = {}
    for m, suffix in ((1, "1"), (n + 1, "n1")):
        costs.update(_step_costs(view, cache, input_ids, mask, positions, m, suffix, all_ones))
    return costs


def _step_costs(view, cache, input_ids, mask, positions, m, suffix, all_ones) -> dict[str, float]:
    inputs = {"input_ids": input_ids[:, -1:].expand(-1, m),
              "position_ids": positions[:, -1:] + 1 + torch.arange(m, device=input_ids.device),
              "cache": cache, "use_cache": True}
    if not all_ones:
        inputs["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], m)], dim=1)
    state = view.prepare(**inputs)
    middle = view.num_layers // 2
    block = view.blocks[middle]

    def one_block():
        block(state.hidden, *state.block_args, **state.block_kwargs)
        cache.layers[middle].crop(-m)

    return {
        f"embed_{suffix}": float(_median_time(lambda: view.prepare(**inputs))),
        f"block_{suffix}": float(_median_time(one_block)),
        f"head_{suffix}": float(_median_time(lambda: view.head(state.hidden, _EMPTY_CONTEXT))),
    }
