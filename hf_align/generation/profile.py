"""Measure self-speculative decoding against plain ``generate`` on given prompts: :func:`speculative_profile`.

``speculative_profile(model, input_ids)`` decodes the same prompts with ``model.generate(...)`` (plain) and with
``model.generate(..., custom_generate=self_speculative, exit_layer=k, num_draft_tokens=n)`` for every (k, n),
the same number of new tokens each time (``min_new_tokens = max_new_tokens``), and reports per (k, n):

* ``speculative_s`` / ``plain_s``: median wall time of one ``generate`` call (prefill included) over ``repeats``
  runs; every repeat runs plain and all (k, n) in turn (interleaved, so a slow phase of the machine hits all
  of them), after one untimed warm-up of each;
* ``speedup = plain_s / speculative_s`` (> 1: self-speculative decoding is faster on this machine, at this
  batch size and length);
* ``acceptance``: the fraction of drafted tokens the full model accepted in those calls
  (:class:`~hf_align.generation.speculative.SpeculativeStats`: ``accepted / drafted`` over all repeats).

The teacher-forced counterpart on given token blocks (no decoding) is ``AlignedTrainer.evaluate``'s
``eval_layer_{l}_greedy_acceptance`` / ``eval_layer_{l}_sampling_acceptance``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..layers import LayerView, unwrap_model
from .front_door import check_decoder
from .speculative import SpeculativeStats, self_speculative

__all__ = ["SpeculativeProfile", "speculative_profile"]

WHO = "speculative_profile"


@dataclass
class SpeculativeProfile:
    """What :func:`speculative_profile` measured. ``rows``: one dict per (k, n) (``exit_layer``,
    ``num_draft_tokens``, ``acceptance``, ``speedup``, ``speculative_s``, ``plain_s``); ``recommended``: the row
    with the highest speedup (``exit_layer``, ``num_draft_tokens``, ``speedup``, ``acceptance``, and
    ``plain_is_faster: True`` when even that one is slower than plain decoding). ``outputs`` holds the generated
    sequences of the last timed call of each setting (``"plain"`` and ``(k, n)``)."""

    rows: list[dict[str, Any]]
    recommended: dict[str, Any]
    plain_s: float
    num_layers: int
    batch_size: int
    prompt_length: int
    max_new_tokens: int
    repeats: int
    do_sample: bool
    device: str
    outputs: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "recommended": dict(self.recommended), "plain_s": self.plain_s,
                "num_layers": self.num_layers, "batch_size": self.batch_size, "prompt_length": self.prompt_length,
                "max_new_tokens": self.max_new_tokens, "repeats": self.repeats, "do_sample": self.do_sample,
                "device": self.device}

    def describe(self) -> str:
        return (f"{'sampling' if self.do_sample else 'greedy'}, batch {self.batch_size}, prompt {self.prompt_length} "
                f"tokens, {self.max_new_tokens} new tokens, median of {self.repeats} on {self.device}; "
                f"plain generate {self.plain_s * 1e3:.1f} ms")

    def to_markdown(self) -> str:
        best = (self.recommended["exit_layer"], self.recommended["num_draft_tokens"])
        lines = [f"Measured: {self.describe()}.", "",
                 "| exit layer k | draft tokens n | acceptance | speed-up | speculative (ms) | plain (ms) |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            mark = " **recommended**" if (r["exit_layer"], r["num_draft_tokens"]) == best else ""
            acc = "n/a" if r["acceptance"] != r["acceptance"] else f"{100 * r['acceptance']:.1f}%"
            lines.append(f"| {r['exit_layer']} | {r['num_draft_tokens']} | {acc} | {r['speedup']:.2f}x{mark} | "
                         f"{r['speculative_s'] * 1e3:.1f} | {r['plain_s'] * 1e3:.1f} |")
        if self.recommended.get("plain_is_faster"):
            lines += ["", "Plain decoding is faster than every measured (k, n) here (the best speed-up is below 1)."]
        return "\n".join(lines)

    def plot(self, path: str | None = None):
        """Speed-up against the exit layer k, one line per draft count n (1 = plain ``generate``). Returns the
        matplotlib figure; saves it when ``path`` is given."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.5, 3.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for n in sorted({r["num_draft_tokens"] for r in self.rows}):
            rows = [r for r in self.rows if r["num_draft_tokens"] == n]
            ax.plot([r["exit_layer"] for r in rows], [r["speedup"] for r in rows], "o-", label=f"n = {n}")
        ax.axhline(1.0, color="grey", ls="--", lw=1, label="plain generate")
        ax.set_xlabel("exit layer k (draft depth)")
        ax.set_ylabel("speed-up over plain generate")
        ax.set_xticks(sorted({r["exit_layer"] for r in self.rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(self.describe(), fontsize=7)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def _check_ints(name: str, values: Any, low: int, high: int | None) -> list[int]:
    if isinstance(values, (int, str)) or not isinstance(values, Iterable):
        raise ValueError(f"{WHO}: {name} must be a sequence of integers, got {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"{WHO}: {name} must not be empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
            where = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{WHO}: every entry of {name} must be an integer {where}, got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{WHO}: {name} has repeated entries: {values}")
    return values


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speculative_profile(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit_layers: Sequence[int] | None = None,
    draft_counts: Sequence[int] = (1, 2, 4),
    max_new_tokens: int = 32,
    repeats: int = 3,
    do_sample: bool = False,
    progress: bool = True,
) -> SpeculativeProfile:
    """Time self-speculative decoding at every exit layer k and draft count n against plain ``generate``.

    Measured (module docstring): the median wall time of ``model.generate(input_ids, attention_mask=...,
    max_new_tokens=m, min_new_tokens=m, do_sample=...)`` plain and with ``custom_generate=self_speculative,
    exit_layer=k, num_draft_tokens=n``, ``repeats`` interleaved runs each after one warm-up; the drafted-token
    acceptance of those speculative calls. Greedy speculative output equals plain output token for token, so
    the two decode the same tokens; sampling decodes the same number of tokens from the same distribution.

    Args:
        model: a supported decoder-only causal LM (``*ForCausalLM`` / ``*LMHeadModel``) with L >= 2 blocks.
        input_ids: (B, T) prompts; ``attention_mask`` (B, T) for left-padded batches.
        exit_layers: the draft depths k to measure, each in [1, L-1]; default all of 1..L-1.
        draft_counts: the draft lengths n (each >= 1).
        max_new_tokens: tokens generated per call (>= 1), forced with ``min_new_tokens``.
        repeats: timed runs of every setting (>= 1); the median is reported.
        do_sample: sample (with the model's generation config's warpers) instead of greedy decoding.
        progress: a tqdm progress bar over the calls.

    Returns:
        a :class:`SpeculativeProfile` (``.rows``, ``.recommended``, ``.to_markdown()``, ``.plot(path)``,
        ``.to_dict()``).
    """
    hf_model = check_decoder(model, WHO)
    L = int(hf_model.config.num_hidden_layers)
    if L < 2:
        raise ValueError(f"{WHO}: the model has {L} block(s); drafting with the first k < L blocks needs L >= 2")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.numel() == 0:
        raise ValueError(f"{WHO}: input_ids must be a non-empty (batch, length) tensor of token ids, got "
                         f"{type(input_ids).__name__}{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else ''}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{WHO}: input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape):
        raise ValueError(f"{WHO}: attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__}")
    ks = list(range(1, L)) if exit_layers is None else _check_ints("exit_layers", exit_layers, 1, L - 1)
    ns = _check_ints("draft_counts", draft_counts, 1, None)
    for name, value in (("max_new_tokens", max_new_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{WHO}: {name} must be an integer >= 1, got {value!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"{WHO}: do_sample must be True or False, got {do_sample!r}")
    positions = getattr(hf_model.config, "max_position_embeddings", None) or getattr(hf_model.config, "n_positions", None)
    if isinstance(positions, int) and input_ids.shape[1] + max_new_tokens > positions:
        raise ValueError(f"{WHO}: prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's {positions} positions")

    device = LayerView(unwrap_model(model)).device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    common = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=do_sample)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        eos = model.generation_config.eos_token_id
        common["pad_token_id"] = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0

    settings = [(k, n) for k in ks for n in ns]

    def call(setting, stats=None):
        extra = {} if setting == "plain" else dict(custom_generate=self_speculative, exit_layer=setting[0],
                                                    num_draft_tokens=setting[1], speculative_stats=stats)
        _sync(device)
        start = time.perf_counter()
        out = model.generate(**inputs, **common, **extra)
        _sync(device)
        return time.perf_counter() - start, out

    from tqdm.auto import tqdm

    times: dict[Any, list[float]] = {s: [] for s in ["plain", *settings]}
    drafted = {s: 0 for s in settings}
    accepted = {s: 0 for s in settings}
    outputs: dict[Any, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=2 + repeats * (1 + len(settings)), desc=WHO, disable=not progress,
                                   leave=False) as bar:
            call("plain")  # warm-up (not timed)
            bar.update()
            call(settings[0], SpeculativeStats(exit_layer=settings[0][0], num_draft_tokens=settings[0][1], num_layers=L))
            bar.update()
            for _ in range(repeats):
                for setting in ["plain", *settings]:
                    stats = None if setting == "plain" else SpeculativeStats(exit_layer=setting[0],
                                                                            num_draft_tokens=setting[1], num_layers=L)
                    seconds, out = call(setting, stats)
                    times[setting].append(seconds)
                    outputs[setting] = out.detach().cpu()
                    if stats is not None:
                        drafted[setting] += stats.drafted
                        accepted[setting] += stats.accepted
                    bar.update()
    finally:
        model.train(was_training)

    plain_s = statistics.median(times["plain"])
    rows = []
    for k, n in settings:
        spec_s = statistics.median(times[(k, n)])
        rows.append({"exit_layer": k, "num_draft_tokens": n,
                     "acceptance": accepted[(k, n)] / drafted[(k, n)] if drafted[(k, n)] else float("nan"),
                     "speedup": plain_s / spec_s, "speculative_s": spec_s, "plain_s": plain_s})
    best = max(rows, key=lambda r: r["speedup"])  # the first of equal ones
    recommended = {key: best[key] for key in ("exit_layer", "num_draft_tokens", "speedup", "acceptance")}
    if best["speedup"] < 1:
        recommended["plain_is_faster"] = True
    return SpeculativeProfile(rows=rows, recommended=recommended, plain_s=plain_s, num_layers=L,
                              batch_size=int(input_ids.shape[0]), prompt_length=int(input_ids.shape[1]),
                              max_new_tokens=max_new_tokens, repeats=repeats, do_sample=do_sample, device=str(device),
                              outputs=outputs)
