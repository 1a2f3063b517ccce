"""``exit_layer="auto"`` / ``num_draft_tokens="auto"`` for self-speculative decoding: choose the draft depth k and
the draft count n inside the call, from the prompt and from the call's own rounds.

* **Prior, teacher-forced on the prompt.** The prefill runs every block over the prompt anyway; on its last real
  positions (up to ``prompt_positions``) the shared head is applied after every block l < L, and
  ``agree_l / total_l`` is how often its argmax equals the final argmax on the user's own text (not on a greedy
  continuation, which for a weak model is degenerate and flatters acceptance).
* **Costs, measured on the call's own cache.** The model's preamble, one block and the head, on 1 and on n+1 new
  positions (median of 3), right after the prefill: timed at 1 position, at the largest n+1 and at one size near 4;
  the sizes between are interpolated linearly.
* **Prediction.** With i.i.d. acceptance alpha a round emits ``E(alpha, n) = (1 - alpha^{n+1}) / (1 - alpha)``
  tokens and costs ``T(k, n) = (n+1)(t_pre_1 + k t_block_1) + n t_head_1 + t_pre_{n+1} + (L-k) t_block_{n+1} +
  t_head_{n+1}``; the choice maximises ``E(alpha_k, n) / T(k, n)``.
* **Overheads, measured on the call's own steps.** What the parts above leave out (the draft steps' processors and
  picks, the verify positions' processors, the cache bookkeeping, emission) is measured from the wall time of
  every round: ``o = median over rounds of (measured - T(k, n)) / (n + 1)``, an overhead per drafted or verified
  position, so the choice compares ``T(k, n) + (n+1) o``. The plain alternative is measured the same way: with the
  exit layer automatic, the first two tokens after the prefill are decoded plainly and timed (they are real
  tokens of the call), so ``t_plain`` is the measured median. This is what keeps a call from speculating where
  the parts predict a gain that the whole round does not deliver (large batches on a CPU).
* **Re-chosen as the call goes.** After every round the depth in use has a measured acceptance (accepted drafts and
  rejections: the maximum-likelihood alpha is ``accepted / (accepted + rejections)``), combined with its prior as
  ``w`` pseudo-observations; depths not yet used get their prior scaled by the measured/prior ratio of the depths
  that were. The choice moves only when the predicted gain exceeds ``switch_margin``.
* **Plain decoding when nothing pays off.** With the exit layer automatic, when even the best (k, n) is predicted
  slower than plain decoding (the draft is rarely right, or a round's extra positions cost too much at this size
  and batch), the rest of the call decodes the ordinary way: one step of the model's own forward per token, with
  the same processors, criteria and emission.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..layers import LayerView
from .front_door import EMPTY_CONTEXT

__all__ = ["AUTO_DRAFT_COUNTS", "ExitChooser", "expected_tokens_per_round"]

AUTO_DRAFT_COUNTS = (1, 2, 3, 4, 6, 8)


def expected_tokens_per_round(alpha: float, n: int) -> float:
    """E[tokens emitted per round] = sum_{j=0..n} alpha^j = (1 - alpha^{n+1}) / (1 - alpha) for i.i.d. acceptance."""
    return float(n + 1) if alpha >= 1.0 else (1.0 - alpha ** (n + 1)) / (1.0 - alpha)


def _median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class ExitChooser:
    """The automatic (k, n) of one decoding call (module docstring)."""

    prompt_positions = 32

    def __init__(self, view: LayerView, *, fixed_exit_layer: int | None = None, fixed_num_draft: int | None = None,
                 candidates: list[int] | None = None, prior_weight: float = 4.0, switch_margin: float = 0.05,
                 allow_plain: bool = True):
        self.view = view
        self.num_layers = view.num_layers
        self.candidates = [fixed_exit_layer] if fixed_exit_layer is not None else (
            list(candidates) if candidates is not None else list(range(1, self.num_layers)))
        self.draft_counts = [fixed_num_draft] if fixed_num_draft is not None else list(AUTO_DRAFT_COUNTS)
        self.allow_plain = allow_plain and fixed_exit_layer is None
        self.prior_weight = prior_weight
        self.switch_margin = switch_margin
        self.prior: dict[int, float] = {}
        self.agreement: dict[int, tuple[int, int]] = {}
        self.observed: dict[int, list[int]] = {}  # k -> [accepted, rejections]
        self.costs: dict[int, dict[str, float]] = {}
        self.current: tuple[int, int] | None = None
        self.plain = False  # no (k, n) is predicted faster than plain decoding: decode the ordinary way
        self.history: list[tuple[int, int]] = []
        self.seconds = 0.0
        self.round_overheads: list[float] = []  # per position: (measured round - T(k, n)) / (n + 1)
        self.plain_times: list[float] = []  # measured plain steps (with emission)
        self._first_round = True

    # -- calibration -----------------------------------------------------------------------------------

    def calibrate(self, decoder) -> None:
        """Read the prompt agreement the prefill counted and time the round's parts on the call's cache."""
        start = time.perf_counter()
        agreement = decoder.layer_agreement or {}
        for k in self.candidates:
            agree, total = agreement.get(k, (0, 0))
            self.agreement[k] = (agree, total)
            self.prior[k] = (agree + 1.0) / (total + 2.0)  # Laplace: no prompt positions -> 1/2
        wanted = sorted({1, *(n + 1 for n in self.draft_counts)})
        # timed at 1, the largest and (for more than one draft count) one middle size; sizes between are
        # interpolated linearly (a block's cost on a CPU or GPU is close to affine in the positions at these sizes)
        timed = sorted({1, wanted[-1], *([min(wanted, key=lambda m: abs(m - 4))] if len(wanted) > 2 else [])})
        for m in timed:
            self.costs[m] = self._step_costs(decoder, m)
        for m in wanted:
            if m not in self.costs:
                low = max(t for t in timed if t < m)
                high = min(t for t in timed if t > m)
                w = (m - low) / (high - low)
                self.costs[m] = {part: (1 - w) * self.costs[low][part] + w * self.costs[high][part]
                                 for part in self.costs[low]}
        self.current = self._best()
        self.history.append(self.current)
        self._check_plain()
        self.seconds += time.perf_counter() - start

    def _check_plain(self) -> None:
        """Fall back to plain decoding (for the rest of the call) when even the best (k, n) is predicted slower."""
        if self.allow_plain and self.predicted_speedup(*self.current) < 1.0:
            self.plain = True
            self.history.append(("plain", 0))

    def _step_costs(self, decoder, m: int) -> dict[str, float]:
        view, cache = self.view, decoder.cache
        batch = decoder.tokens.shape[0]
        positions = decoder.position[:, None] + 1 + torch.arange(m, device=decoder.device)
        if decoder.position_limit is not None:
            positions = positions.clamp(max=decoder.position_limit - 1)
        inputs = {"input_ids": decoder.pending[:, None].expand(-1, m), "position_ids": positions, "cache": cache,
                  "use_cache": True}
        if decoder.slot_mask is not None:
            inputs["attention_mask"] = torch.cat([decoder.slot_mask, decoder.slot_mask.new_ones(batch, m)], dim=1)
        state = view.prepare(**inputs)
        middle = self.num_layers // 2
        block = view.blocks[middle]
        kwargs = state.block_kwargs

        def one_block():
            block(state.hidden, *state.block_args, **kwargs)
            cache.layers[middle].crop(-m)

        return {
            "preamble": _median_time(lambda: view.prepare(**inputs)),
            "block": _median_time(one_block),
            "head": _median_time(lambda: view.head(state.hidden, EMPTY_CONTEXT)),
        }

    # -- prediction ------------------------------------------------------------------------------------

    def part_seconds(self, k: int, n: int) -> float:
        """T(k, n): a round's preambles, blocks and heads, from the timed parts alone."""
        one, many = self.costs[1], self.costs[n + 1]
        return ((n + 1) * (one["preamble"] + k * one["block"]) + n * one["head"] + many["preamble"]
                + (self.num_layers - k) * many["block"] + many["head"])

    def overhead_per_position(self) -> float:
        # (0 until three rounds were timed: one slow round must not end speculation for the rest of the call)
        return statistics.median(self.round_overheads[-16:]) if len(self.round_overheads) >= 3 else 0.0

    def round_seconds(self, k: int, n: int) -> float:
        """T(k, n) + (n + 1) o: the parts plus the measured overhead per drafted or verified position."""
        return self.part_seconds(k, n) + (n + 1) * self.overhead_per_position()

    def plain_part_seconds(self) -> float:
        one = self.costs[1]
        return one["preamble"] + self.num_layers * one["block"] + one["head"]

    def plain_seconds(self) -> float:
        """A plain step: measured in this call when it was (the median), else from the timed parts."""
        return statistics.median(self.plain_times[-16:]) if self.plain_times else self.plain_part_seconds()

    def needs_plain_probe(self) -> bool:
        """With the exit layer automatic, the first two tokens after the prefill are plain steps, timed."""
        return self.allow_plain and not self.plain and len(self.plain_times) < 2

    def observe_plain(self, seconds: float) -> None:
        """Fold one measured plain step (compute and emission) in; fall back to plain if nothing beats it."""
        start = time.perf_counter()
        self.plain_times.append(seconds)
        if not self.needs_plain_probe():
            self._check_plain()
        self.seconds += time.perf_counter() - start

    def alpha(self, k: int) -> float:
        w = self.prior_weight
        if k in self.observed:
            accepted, rejections = self.observed[k]
            return (accepted + w * self.prior[k]) / (accepted + rejections + w)
        ratios = [self.alpha(j) / self.prior[j] for j in self.observed if self.prior[j] > 0]
        scale = statistics.fmean(ratios) if ratios else 1.0
        return min(0.999, self.prior[k] * scale)

    def predicted_speedup(self, k: int, n: int) -> float:
        return expected_tokens_per_round(self.alpha(k), n) / self.round_seconds(k, n) * self.plain_seconds()

    def _best(self) -> tuple[int, int]:
        options = [(k, n) for k in self.candidates for n in self.draft_counts]
        return max(options, key=lambda kn: self.predicted_speedup(*kn))

    def choice(self) -> tuple[int, int]:
        return self.current

    def observe(self, k: int, n: int, accepted: int, drafted: int, rejections: int,
                seconds: float | None = None) -> None:
        """Fold one round's measured acceptance (and its wall time, compute and emission: the per-position
        overhead; the call's first round, which also checks the draft steps' shortcut, is not timed) in and
        re-choose (with hysteresis)."""
        start = time.perf_counter()
        if seconds is not None and not self._first_round:
            self.round_overheads.append((seconds - self.part_seconds(k, n)) / (n + 1))
        self._first_round = False
        if drafted:
            seen = self.observed.setdefault(k, [0, 0])
            seen[0] += accepted
            seen[1] += rejections
        best = self._best()
        if best != self.current and self.predicted_speedup(*best) > (1 + self.switch_margin) * \
                self.predicted_speedup(*self.current):
            self.current = best
            self.history.append(best)
        self._check_plain()
        self.seconds += time.perf_counter() - start

    def report(self) -> dict[str, Any]:
        k, n = self.current
        return {
            "exit_layer": k,
            "num_draft_tokens": n,
            "prompt_agreement": {layer: (a / t if t else float("nan")) for layer, (a, t) in self.agreement.items()},
            "prompt_positions": {layer: t for layer, (a, t) in self.agreement.items()},
            "alpha": {layer: self.alpha(layer) for layer in self.candidates},
            "measured": {layer: {"accepted": a, "rejections": r,
                                 "alpha": a / (a + r) if a + r else float("nan")}
                         for layer, (a, r) in self.observed.items()},
            "predicted_speedup": {f"{layer},{count}": self.predicted_speedup(layer, count)
                                  for layer in self.candidates for count in self.draft_counts},
            "costs_s": {m: dict(c) for m, c in self.costs.items()},
            "overhead_per_position_s": self.overhead_per_position(),
            "plain_step_s": {"measured": statistics.median(self.plain_times) if self.plain_times else None,
                             "parts": self.plain_part_seconds()},
            "history": list(self.history),
            "plain": self.plain,
            "calibration_seconds": self.seconds,
        }
