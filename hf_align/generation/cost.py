"""Cost of each exit depth, the way the efficiency survey reports it: blocks run, FLOPs, latency, memory, throughput.

``hf_align.exit_costs(model, inputs)`` runs the model to each exit depth l = 1..L and reports, per depth:

* ``blocks_run``: l (blocks l+1..L never run: the forward stops after block l, :meth:`LayerView.run_blocks`);
* ``flops``: FLOPs *counted* by ``torch.utils.flop_counter.FlopCounterMode`` while the exit-at-l forward runs
  (embeddings, blocks 1..l, the model's own head once at l). A FLOP is one multiply or one add: a (m x k) @
  (k x n) product is 2mkn. Counted are matrix products, convolutions and attention (SDPA; the CPU flash kernel
  is added to the counter's table here); element-wise work (norms, activations, softmax, residual adds,
  biases) is not counted, by the counter or by the analytic count;
* ``flops_analytic``: the same quantity from shapes alone, for any family (no architecture names):

  - every ``nn.Linear`` / ``Conv1D`` inside a block: ``2 * in_features * out_features`` per token it is applied
    to (all B*T tokens of the call);
  - attention scores and weighted sum per block: ``2 * 2 * B * H * T_q * T_k * d_head`` with ``H * d_head``
    from the config (``num_attention_heads``, ``head_dim`` or ``hidden_size / num_attention_heads``); the
    whole T_q x T_k rectangle is counted, as the kernels compute it (causal masking saves nothing on CPU);
    when decoding, T_k is what block j's cache holds plus the new position (a sliding-window or chunked layer's
    cache keeps only its window);
  - the head (the linear layers the model's own head calls, found by running it once): ``2 * in * out`` per
    pooled row (B for CLS / last-token heads, every position for LM heads);
  - the embedding stage: lookups are free; a patch-embedding ``Conv2d`` costs
    ``2 * C_out * (C_in / groups) * k_h * k_w`` per output pixel; a linear projection after the lookup costs
    ``2 * in * out`` per token. Embeddings are *included* in both counts.

  ``flops_rel_err = |flops - flops_analytic| / flops_analytic`` (the rotary-table product of Llama-style
  models is the only counted product without an analytic term; it is ~d_head FLOPs per token);
* ``latency_ms``: median wall time of the exit-at-l call over ``repeats`` runs, the depths interleaved in
  every repeat (after one warm-up round);
* ``peak_memory_mb``: the peak over the call of the bytes held by tensors *created during the call* (tracked
  with a ``TorchDispatchMode`` that registers every output storage with a weak reference and drops it once
  freed); weights, inputs and a pre-filled KV cache are not included; the allocator's own slack is not seen.
  Measured in a separate pass (not timed), on CPU and GPU alike;
* ``throughput``: samples/s (classifiers), tokens/s (LMs): B / latency for classifiers and decoding steps,
  B * T / latency for a prompt forward;
* ``speedup`` = latency_L / latency_l and ``flops_fraction`` = flops_l / flops_L.

What one call is:

* classifiers (``mode="forward"``): one forward of the batch to depth l and the head on the pooled token;
* causal LMs, ``mode="decode"`` (default): one decoding step - one new token per row, attending to a KV cache
  of ``kv_length`` earlier positions (pre-filled at full depth, outside the measurement; blocks 1..l read and
  extend it, and it is restored after every call), the LM head on the new position. CALM's state
  propagation of the skipped blocks' keys/values is a per-token-exit overhead, not part of this cost;
* causal LMs, ``mode="forward"``: one prompt forward of B x T tokens (no cache), the LM head at every position.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..layers import LayerView, _task_of, preserved_state, unwrap_model

__all__ = ["ExitCostTable", "exit_costs", "plot_exit_costs", "count_flops", "peak_memory"]

MODES = ("decode", "forward")

COLUMNS = ("exit_layer", "blocks_run", "flops", "flops_analytic", "flops_rel_err", "flops_fraction", "latency_ms",
           "speedup", "peak_memory_mb", "throughput")


# ----------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flop_mapping() -> dict:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flop
    return mapping


def count_flops(fn, *args, model: nn.Module | None = None, **kwargs) -> tuple[Any, int]:
    """``(fn(*args, **kwargs), FLOPs counted by FlopCounterMode)`` (CPU SDPA included, see the module docstring).

    With ``model``, its parameters' ``requires_grad`` flags are switched off during the count and restored:
    the counter's module tracker cannot hook a parameter passed as a module input under ``no_grad`` (DeBERTa's
    relative embeddings).
    """
    params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    try:
        for p in params:
            p.requires_grad_(False)
        with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
            result = fn(*args, **kwargs)
    finally:
        for p in params:
            p.requires_grad_(True)
    return result, int(counter.get_total_flops())


class _PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created under the mode and still alive (weak references).

    An op's output counts when its storage is new: views and in-place results (which share the storage of one of
    the op's inputs, e.g. a transposed weight) do not."""

    def __init__(self):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._weak = StorageWeakRef
        self.refs: dict[int, tuple[Any, int]] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.refs.items() if ref.expired()]:
            self.live -= self.refs.pop(key)[1]
        # views and in-place results share an input's storage: not a new allocation
        inputs = {self._weak(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ref = self._weak(storage)
                if ref.cdata not in self.refs and ref.cdata not in inputs:
                    self.refs[ref.cdata] = (ref, storage.nbytes())
                    self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out


def peak_memory(fn, *args, **kwargs) -> tuple[Any, int]:
    """``(fn(*args, **kwargs), peak bytes)`` of the tensors created during the call (see the module docstring)."""
    with _PeakMemory() as tracker:
        result = fn(*args, **kwargs)
    return result, int(tracker.peak)


# ----------------------------------------------------------------------------------------------------------
# The analytic count
# ----------------------------------------------------------------------------------------------------------


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored as (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def _attention_width(config) -> tuple[int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return heads, int(head_dim)


def block_linear_flops_per_token(block: nn.Module) -> int:
    """``sum 2 * in * out`` over the linear layers of one block: its FLOPs per token outside attention scores."""
    return sum(2 * s[0] * s[1] for m in block.modules() if (s := _linear_shape(m)) is not None)


def _conv_flops(module: nn.Conv2d, height: int, width: int, batch: int) -> int:
    out_hw = []
    padding = module.padding
    if isinstance(padding, str):  # "valid": none; "same": the output keeps the input size (stride 1)
        padding = (0, 0) if padding == "valid" else None
    for i, (size, k, s, d) in enumerate(zip((height, width), module.kernel_size, module.stride, module.dilation)):
        out_hw.append(size if padding is None else (size + 2 * padding[i] - d * (k - 1) - 1) // s + 1)
    per_pixel = 2 * module.out_channels * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return batch * out_hw[0] * out_hw[1] * per_pixel


def _modules_called(model: nn.Module, fn) -> list[nn.Module]:
    """The linear / conv modules ``fn()`` calls, in call order (forward hooks, removed afterwards)."""
    called: dict[int, nn.Module] = {}

    def record(module, args, output) -> None:
        called.setdefault(id(module), module)

    handles = []
    for module in model.modules():
        if _linear_shape(module) is not None or isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(record))
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return list(called.values())


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ExitCostTable:
    """Cost per exit depth: ``rows[l-1]`` is a dict with :data:`COLUMNS` for exit depth l (list of dicts)."""

    rows: list[dict]
    model: str
    task: str
    mode: str
    batch_size: int
    seq_len: int
    kv_length: int | None
    repeats: int
    throughput_unit: str
    device: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def column(self, name: str) -> list:
        return [row[name] for row in self.rows]

    def describe(self) -> str:
        if self.mode == "decode":
            what = f"one decoding step: batch {self.batch_size}, 1 new token per row, KV cache of {self.kv_length}"
        elif self.task == "image-classification":
            what = f"one forward: batch {self.batch_size} images ({self.seq_len} tokens each)"
        else:
            what = f"one forward: batch {self.batch_size} x {self.seq_len} tokens"
        return f"{self.model} ({self.task}), {what}; median of {self.repeats} interleaved repeats on {self.device}"

    def to_markdown(self) -> str:
        """A markdown table (one row per exit depth) with a one-line description above it."""
        header = ["exit layer", "blocks run", "FLOPs (counted)", "FLOPs (analytic)", "rel. err", "FLOPs / full",
                  "latency (ms)", "speed-up", "peak mem (MB)", self.throughput_unit]
        lines = [self.describe(), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self.rows:
            analytic = "not counted" if r["flops_analytic"] is None else f"{r['flops_analytic']:.4g}"
            rel = "-" if r["flops_rel_err"] is None else f"{r['flops_rel_err']:.2%}"
            cells = [str(r["exit_layer"]), str(r["blocks_run"]), f"{r['flops']:.4g}", analytic, rel, f"{r['flops_fraction']:.3f}", f"{r['latency_ms']:.3f}",
                     f"{r['speedup']:.2f}x", f"{r['peak_memory_mb']:.3f}", f"{r['throughput']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines)

    def plot(self, path: str | None = None):
        return plot_exit_costs(self, path)


def plot_exit_costs(table: ExitCostTable, path: str | None = None):
    """Four panels against the exit depth: FLOPs (counted and analytic), latency, peak memory, throughput.

    Returns the matplotlib figure; saves it when ``path`` is given.
    """
    import matplotlib.pyplot as plt

    depth = table.column("exit_layer")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(depth, table.column("flops"), "o-", label="counted")
    if all(v is not None for v in table.column("flops_analytic")):
        axes[0].plot(depth, table.column("flops_analytic"), "x--", label="analytic")
    axes[0].set_ylabel("FLOPs per call")
    axes[0].legend()
    axes[1].plot(depth, table.column("latency_ms"), "o-")
    axes[1].set_ylabel("latency (ms, median)")
    axes[2].plot(depth, table.column("peak_memory_mb"), "o-")
    axes[2].set_ylabel("peak memory (MB)")
    axes[3].plot(depth, table.column("throughput"), "o-")
    axes[3].set_ylabel(table.throughput_unit)
    for ax in axes:
        ax.set_xlabel("exit layer")
        ax.set_xticks(depth)
        ax.grid(alpha=0.3)
    fig.suptitle(table.describe(), fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# ----------------------------------------------------------------------------------------------------------
# The function
# ----------------------------------------------------------------------------------------------------------


def _position_limit(model: nn.Module) -> int | None:
    """The most positions a text model takes (``max_position_embeddings`` / ``n_positions``), or None.

    A learned position table with a padding index starts counting after it (RoBERTa's position ids begin at
    ``padding_idx + 1``), so ``padding_idx + 1`` of its rows are not positions."""
    config = getattr(model, "config", None)
    if config is None or getattr(model, "main_input_name", None) == "pixel_values":
        return None  # images: the sequence is the config's patches
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_pos = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if not isinstance(max_pos, int) or isinstance(max_pos, bool) or max_pos < 1:
        return None
    for name, module in model.named_modules():
        if (isinstance(module, nn.Embedding) and "position" in name.rsplit(".", 1)[-1]
                and module.num_embeddings == max_pos and module.padding_idx is not None):
            return max_pos - module.padding_idx - 1
    return max_pos


def _check_length(model: nn.Module, mode: str, tokens: int, what: str) -> None:
    """Refuse a length the model cannot take: ``tokens`` positions (forward) or ``tokens`` cached + 1 new (decode)."""
    limit = _position_limit(model)
    if limit is None:
        return
    needed = tokens + 1 if mode == "decode" else tokens
    if needed > limit:
        allowed = limit - 1 if mode == "decode" else limit
        extra = " (a decoding step adds one position after the cache)" if mode == "decode" else ""
        raise ValueError(f"{what}={tokens} needs {needed} positions{extra}, but {type(model).__name__} takes "
                         f"at most {limit}: {what} must be at most {allowed}")


def _synthetic_inputs(view: LayerView, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """``batch_size`` x ``seq_len`` tokens exactly (no padding), or images of the config's size."""
    inputs = view.example_inputs(batch_size=batch_size, seq_len=seq_len)
    if "input_ids" in inputs and inputs["input_ids"].shape[1] != seq_len:
        # example_inputs keeps a margin below the position limit; the caller's length was checked against it
        config = view.hf_model.config
        vocab = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(1, vocab, (inputs["input_ids"].shape[0], seq_len), generator=generator)
        inputs = {"input_ids": ids.to(view.device), "attention_mask": torch.ones_like(ids).to(view.device)}
    if "attention_mask" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])  # no padding: every token is work
        pad = getattr(view.hf_model.config, "pad_token_id", None)
        if pad is not None:
            ids = inputs["input_ids"]
            inputs["input_ids"] = torch.where(ids == pad, (ids + 1) % view.hf_model.config.vocab_size, ids)
    return inputs


def exit_costs(
    model: nn.Module,
    inputs: dict[str, torch.Tensor] | None = None,
    *,
    mode: str | None = None,
    batch_size: int = 1,
    seq_len: int | None = None,
    kv_length: int | None = None,
    exit_layers: Sequence[int] | None = None,
    repeats: int = 5,
    progress: bool = True,
) -> ExitCostTable:
    """Cost of every exit depth l = 1..L of a supported classifier or causal LM (see the module docstring).

    Args:
        model: a supported ``*ForSequenceClassification`` / ``*ForImageClassification`` / ``*ForCausalLM``.
        inputs: one batch of model inputs (``input_ids`` [+ ``attention_mask``] or ``pixel_values``); by default
            a synthetic batch of ``batch_size`` x ``seq_len`` tokens (images of the config's size).
        seq_len: tokens per row of the synthetic batch; default 128, or fewer when the model takes fewer positions
            (decoding needs one position after the cache). A length beyond the model's
            ``max_position_embeddings`` / ``n_positions`` is a ``ValueError`` before any forward.
        mode: ``"decode"`` (causal LMs' default: one decoding step with a KV cache of ``kv_length``) or
            ``"forward"`` (one forward of the batch; the only mode for classifiers).
        kv_length: cache length for ``mode="decode"``; default: the inputs' length (the inputs pre-fill it).
        exit_layers: the depths to measure (default all, 1..L).
        repeats: timing repeats (median reported; depths interleaved in every repeat).

    Returns:
        an :class:`ExitCostTable` (``.rows`` is a list of dicts; ``.to_markdown()``, ``.plot(path)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"exit_costs expects a transformers model (torch.nn.Module), got {type(model).__name__}")
    hf_model = unwrap_model(model)  # what the layer view sees; the arguments are checked before its self-check runs
    task = _task_of(hf_model)
    lm = task == "causal-lm"
    mode = mode if mode is not None else ("decode" if lm else "forward")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "decode" and not lm:
        raise ValueError(f"mode='decode' needs a causal LM; {type(hf_model).__name__} is a {task or 'base'} model")
    if seq_len is None:
        limit = _position_limit(hf_model)
        seq_len = 128 if limit is None else max(1, min(128, limit - 1 if mode == "decode" else limit))
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if kv_length is not None and (isinstance(kv_length, bool) or not isinstance(kv_length, int) or kv_length < 1):
        raise ValueError(f"kv_length must be a positive integer, got {kv_length!r}")
    if kv_length is not None and mode != "decode":
        raise ValueError("kv_length applies to mode='decode' only")
    if inputs is not None and not isinstance(inputs, dict):
        raise TypeError(f"inputs must be a dict of model inputs (one batch), got {type(inputs).__name__}")
    if mode == "decode" and kv_length is not None:
        _check_length(hf_model, mode, kv_length, "kv_length")
    elif inputs is None:
        _check_length(hf_model, mode, seq_len, "seq_len")
    elif isinstance(inputs.get("input_ids"), torch.Tensor) and inputs["input_ids"].ndim == 2:
        _check_length(hf_model, mode, int(inputs["input_ids"].shape[1]), "len(input_ids)")
    view = LayerView(model)
    L = view.num_layers
    depths = list(range(1, L + 1)) if exit_layers is None else list(exit_layers)
    if not depths or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= L for d in depths):
        raise ValueError(f"exit_layers must be integers in [1, {L}], got {exit_layers!r}")
    if L not in depths:
        depths.append(L)  # the full depth is the reference of speed-up and FLOPs fraction
    depths = sorted(set(depths))
    if inputs is None:
        inputs = _synthetic_inputs(view, batch_size, kv_length if mode == "decode" and kv_length is not None else seq_len)
    inputs = {k: v.to(view.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
              if k not in ("labels", "label")}
    key = "pixel_values" if "pixel_values" in inputs else "input_ids"
    if key not in inputs:
        raise ValueError(f"inputs need `input_ids` or `pixel_values`, got {sorted(inputs)}")
    batch = int(inputs[key].shape[0])

    with preserved_state(model), torch.no_grad():
        model.eval()
        if mode == "decode":
            call, analytic, tokens, seq, kv = _decode_setup(view, inputs, kv_length)
        else:
            call, analytic, tokens, seq, kv = _forward_setup(view, inputs)
        flops, memory, times = {}, {}, {d: [] for d in depths}
        for d in depths:
            flops[d] = count_flops(call, d, model=model)[1]
            memory[d] = peak_memory(call, d)[1]
        for d in depths:  # warm-up round
            call(d)
        from tqdm.auto import tqdm

        bar = tqdm(total=repeats * len(depths), desc="exit costs", disable=not progress, leave=False)
        sync = torch.cuda.synchronize if view.device.type == "cuda" else (lambda: None)  # kernels are async
        for _ in range(repeats):
            for d in depths:
                sync()
                start = time.perf_counter()
                call(d)
                sync()
                times[d].append(time.perf_counter() - start)
                bar.update(1)
        bar.close()

    full_latency = statistics.median(times[L])
    counted = view.family.flops_counted  # False: the analytic count does not hold (mixture-of-experts routing)
    rows = []
    for d in depths:
        latency = statistics.median(times[d])
        rows.append({
            "exit_layer": d,
            "blocks_run": d,
            "flops": flops[d],
            "flops_analytic": analytic(d) if counted else None,
            "flops_rel_err": abs(flops[d] - analytic(d)) / analytic(d) if counted else None,
            "flops_fraction": flops[d] / flops[L],
            "latency_ms": 1e3 * latency,
            "speedup": full_latency / latency,
            "peak_memory_mb": memory[d] / 2**20,
            "throughput": tokens / latency,
        })
    unit = "tokens/s" if lm else "samples/s"
    notes = ["FLOPs include the embeddings and the head once at the exit; element-wise work is not counted.",
             "peak memory: tensors created during the call (weights, inputs and a pre-filled KV cache excluded)."]
    if not counted:
        notes.append(f"analytic FLOPs not counted for family {view.family.name!r} (its blocks do work the shape walk "
                     "does not see: mixture-of-experts routing, relative-position attention); the counted FLOPs are "
                     "measured.")
    return ExitCostTable(rows=rows, model=type(view.hf_model).__name__, task=view.task, mode=mode, batch_size=batch,
                         seq_len=seq, kv_length=kv, repeats=repeats, throughput_unit=unit, device=str(view.device),
                         notes=notes)


def _analytic(view: LayerView, tokens_per_block: int, scores_per_block: int | Sequence[int], head_modules,
              head_rows: int, embedding_flops: int):
    """Build ``depth -> analytic FLOPs`` (see the module docstring); ``scores_per_block``: one count for every
    block, or one per block (decoding with sliding-window layers, whose cache holds fewer keys)."""
    if isinstance(scores_per_block, int):
        scores_per_block = [scores_per_block] * len(view.blocks)
    per_block = [block_linear_flops_per_token(b) * tokens_per_block + scores
                 for b, scores in zip(view.blocks, scores_per_block)]
    head = sum(2 * s[0] * s[1] * head_rows for m in head_modules if (s := _linear_shape(m)) is not None)

    def analytic(depth: int) -> int:
        return embedding_flops + sum(per_block[:depth]) + head

    return analytic


def _head_modules(view: LayerView, state) -> list[nn.Module]:
    in_blocks = {id(m) for m in view.blocks.modules()}
    return [m for m in _modules_called(view.hf_model, lambda: view.head(state.hidden, state.context))
            if id(m) not in in_blocks]


def _embedding_flops(view: LayerView, inputs: dict, batch: int, tokens: int) -> int:
    """Analytic FLOPs of the embedding stage: the linear / conv modules the model calls before its first block."""
    called = _modules_called(view.hf_model, lambda: view.prepare(**inputs))
    total = 0
    for module in called:
        if isinstance(module, nn.Conv2d):
            height, width = inputs["pixel_values"].shape[-2:]
            total += _conv_flops(module, int(height), int(width), batch)
        elif (shape := _linear_shape(module)) is not None:
            total += 2 * shape[0] * shape[1] * tokens
    return total


def _forward_setup(view: LayerView, inputs: dict):
    state0 = view.prepare(**inputs)
    batch, seq = state0.hidden.shape[0], state0.hidden.shape[1]
    heads, head_dim = _attention_width(view.layer_config)
    scores = 2 * 2 * batch * heads * seq * seq * head_dim
    head_modules = _head_modules(view, state0)
    head_rows = batch * seq if view.pooling == "none" else batch
    analytic = _analytic(view, batch * seq, scores, head_modules, head_rows,
                         _embedding_flops(view, inputs, batch, batch * seq))

    def call(depth: int):
        state = view.run_blocks(view.prepare(**inputs), depth)
        return view.head(state.hidden, state.context)

    tokens = batch if view.task != "causal-lm" else batch * seq
    return call, analytic, tokens, seq, None


def _decode_setup(view: LayerView, inputs: dict, kv_length: int | None):
    from transformers import DynamicCache

    model = view.hf_model
    ids = inputs["input_ids"]
    if kv_length is not None and ids.shape[1] < kv_length:
        raise ValueError(f"inputs have {ids.shape[1]} tokens, fewer than kv_length={kv_length}")
    prompt = ids[:, :kv_length] if kv_length is not None else ids
    batch, kv = prompt.shape
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt, cache=cache, use_cache=True)  # pre-fill at full depth (not measured)
    new = prompt[:, -1:]
    step_inputs = {"input_ids": new, "cache": cache, "use_cache": True,
                   "position_ids": torch.full((batch, 1), kv, dtype=torch.long, device=new.device)}

    # blocks append to the cache (by concatenation); every call starts again from the pre-filled one
    saved = [(layer.keys, layer.values) for layer in cache.layers]

    def call(depth: int):
        try:
            state = view.run_blocks(view.prepare(**step_inputs), depth)
            return view.head(state.hidden[:, -1:], state.context)
        finally:
            for layer, (keys, values) in zip(cache.layers, saved):
                layer.keys, layer.values = keys, values

    heads, head_dim = _attention_width(view.layer_config)
    # the new position attends to the keys block j's cache holds plus its own: kv + 1, or the window for a
    # sliding-window / chunked layer, whose cache keeps only the last window - 1 keys
    key_lengths = [(keys.shape[-2] if keys is not None else kv) + 1 for keys, _ in saved]
    key_lengths += [kv + 1] * (len(view.blocks) - len(key_lengths))
    scores = [2 * 2 * batch * heads * 1 * keys * head_dim for keys in key_lengths]
    state0 = view.prepare(**step_inputs)
    head_modules = _head_modules(view, state0)
    analytic = _analytic(view, batch, scores, head_modules, batch, _embedding_flops(view, step_inputs, batch, batch))
    return call, analytic, batch, 1, kv
