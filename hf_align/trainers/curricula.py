"""The curricula of the aligned LM recipe: layer dropout rising with depth and early-exit loss curricula.

Both follow torchtune's implementations of LayerSkip (Elhoushi et al., 2024; ``torchtune.modules.layer_dropout``
and ``torchtune.modules.early_exit_loss``), written as small pure functions of (layer, step) so that the
trainer, the tests and the docs share one definition. Layers are 1-based here (block l = 1..L); torchtune's
are 0-based (``i = l - 1``).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator, Sequence

import torch

LAYER_DROPOUT_SCALES = ("uniform", "linear", "exp", "log", "sin", "sigmoid")
EARLY_EXIT_CURRICULA = ("rotational", "gradual")


def depth_scale(scale: str, period: int, value: int) -> float:
    """torchtune's ``get_scale``: a factor rising from 0 at ``value = 0`` to 1 at ``value >= period``.

    With ``x = value / period``: ``uniform`` 1, ``linear`` x, ``exp`` 2^x - 1, ``log`` log(value+1)/log(period+1),
    ``sin`` sin(pi x / 2), ``sigmoid`` 1 / (1 + e^(-10 (x - 1/2))) (not exactly 0 / 1 at the ends); clipped to [0, 1].
    ``period = 0`` gives 1.
    """
    if scale not in LAYER_DROPOUT_SCALES:
        raise ValueError(f"layer_dropout_scale must be one of {LAYER_DROPOUT_SCALES}, got {scale!r}")
    if period == 0 or value >= period:
        return 1.0
    x = value / period
    factor = {
        "uniform": lambda: 1.0,
        "exp": lambda: 2.0 ** x - 1.0,
        "linear": lambda: x,
        "log": lambda: math.log(value + 1, period + 1),
        "sin": lambda: math.sin(0.5 * math.pi * x),
        "sigmoid": lambda: 1.0 / (1.0 + math.exp(-10.0 * (x - 0.5))),
    }[scale]()
    return max(min(factor, 1.0), 0.0)


def layer_dropout_probs(p_max: float, num_layers: int, scale: str = "exp") -> list[float]:
    """Per-block skip probabilities ``p_l = p_max * depth_scale(scale, L - 1, l - 1)``, l = 1..L.

    ``p_1 = 0`` and ``p_L = p_max`` for every scale except ``uniform`` (all ``p_max``) and ``sigmoid`` (close to,
    not exactly, 0 and p_max). LayerSkip's choice is ``exp``: ``p_l = p_max (2^((l-1)/(L-1)) - 1)``.
    """
    if not 0.0 <= p_max < 1.0:
        raise ValueError(f"layer_dropout must be in [0, 1), got {p_max!r}")
    return [p_max * depth_scale(scale, num_layers - 1, layer - 1) for layer in range(1, num_layers + 1)]


def layer_dropout_mask(probs: Sequence[float], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(L, B) bool: True where block l is skipped for sample b; independent Bernoulli(p_l) draws per sample.

    One draw of an (L, B) uniform matrix from ``generator`` per forward, so the masks are a function of the
    trainer's seed and the number of forwards so far (deterministic, resumable by replaying the count).
    """
    u = torch.rand((len(probs), batch_size), generator=generator, dtype=torch.float64)
    return u < torch.tensor(list(probs), dtype=torch.float64)[:, None]


def _rows(value, keep: torch.Tensor, batch: int):
    """``value`` restricted to the batch rows ``keep``: tensors of 2+ dims whose first dim is the batch are
    indexed, tuples / lists recursively; everything else (1-D ``cache_position``, broadcast (1, ...) masks and
    rotary tables, flags) is passed as it is. Raises ``TypeError`` for objects that may hold batch rows but
    cannot be sliced here (caches, flex-attention block masks)."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, keep.to(value.device)) if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, keep, batch) for v in value)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    raise TypeError(f"cannot select batch rows of a {type(value).__name__} block argument")


@contextlib.contextmanager
def skipping_blocks(blocks: Sequence[torch.nn.Module], mask: torch.Tensor, skip_compute: bool = True) -> Iterator[None]:
    """While active, block l passes its input hidden state through, unchanged, for the samples ``mask[l-1]``.

    With ``skip_compute`` (the default) this is batch-dimension skipping, as LayerSkip's and torchtune's
    ``LayerDropout``: each block's ``forward`` is wrapped (restored on exit) so that it runs only on the rows it
    keeps, ``h_out = h_in`` then ``h_out[kept] = block(h_in[kept], args[kept])``, where every block argument with
    the batch as its first dimension (the 4-D attention mask, per-row position ids / rotary tables) is cut to the
    same rows. A skipped row never enters the block, so its compute is saved; its hidden state and gradient
    bypass the block exactly. Where a block argument cannot be cut by rows (a KV cache, a flex-attention block
    mask, a batch folded into another dimension such as BLOOM's ALiBi bias) or with ``skip_compute=False``
    (mixture-of-experts models, whose load-balancing loss needs every row's router logits), the block runs on the
    whole batch and the skipped rows' outputs are replaced by their inputs (``torch.where``): the same values, no
    compute saved.
    """
    saved = []

    def wrap(index: int, forward):
        def forward_on_kept_rows(*args, **kwargs):
            skip = mask[index]
            if not bool(skip.any()):
                return forward(*args, **kwargs)
            hidden_in = args[0] if args else kwargs["hidden_states"]
            batch = hidden_in.shape[0]
            keep = (~skip).nonzero().squeeze(1)
            if skip_compute and keep.numel() > 0 and blocks[index] not in _CANNOT_CUT:
                try:
                    cut_args, cut_kwargs = _rows(tuple(args), keep, batch), _rows(list(kwargs.values()), keep, batch)
                    out = forward(*cut_args, **dict(zip(kwargs, cut_kwargs)))
                except (TypeError, RuntimeError):
                    # an argument holds the batch in another layout (BLOOM's ALiBi bias is (batch * heads, 1, T)):
                    # this block runs every row from now on; a real error raises again in the full call below
                    _CANNOT_CUT[blocks[index]] = True
                else:
                    _RETURNS_TENSOR[blocks[index]] = isinstance(out, torch.Tensor)
                    kept_out = out if isinstance(out, torch.Tensor) else out[0]
                    new = hidden_in.to(kept_out.dtype).index_copy(0, keep.to(kept_out.device), kept_out)
                    return new if isinstance(out, torch.Tensor) else (new, *out[1:])
            kind = _RETURNS_TENSOR.get(blocks[index])
            if skip_compute and keep.numel() == 0 and kind is not None:  # every row skips: the block is not run
                return hidden_in if kind else (hidden_in,)
            out = forward(*args, **kwargs)
            _RETURNS_TENSOR[blocks[index]] = isinstance(out, torch.Tensor)
            hidden_out = out if isinstance(out, torch.Tensor) else out[0]
            where = skip.to(hidden_out.device).view(-1, *([1] * (hidden_out.dim() - 1)))
            new = torch.where(where, hidden_in.to(hidden_out.dtype), hidden_out)
            return new if isinstance(out, torch.Tensor) else (new, *out[1:])

        return forward_on_kept_rows

    try:
        for index, block in enumerate(blocks):
            if block not in _RETURNS_TENSOR and (kind := _annotated_kind(block)) is not None:
                _RETURNS_TENSOR[block] = kind
            had_own = "forward" in vars(block)
            saved.append((block, had_own, vars(block).get("forward")))
            block.forward = wrap(index, block.forward)
        yield
    finally:
        for block, had_own, own in saved:
            if had_own:
                block.forward = own
            else:
                del block.forward


# per block: whether its forward returns the hidden state as a tensor (transformers 5 decoder layers) or as a tuple
# (older blocks); read from the return annotation, else learnt from the block's first call
_RETURNS_TENSOR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# blocks whose arguments could not be cut by rows: they run every row (same values, no compute saved)
_CANNOT_CUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _annotated_kind(block: torch.nn.Module) -> bool | None:
    import inspect

    try:
        annotation = inspect.signature(type(block).forward).return_annotation
    except (TypeError, ValueError):
        return None
    if annotation is inspect.Signature.empty:
        return None
    if annotation is torch.Tensor or annotation in ("torch.Tensor", "Tensor", "torch.FloatTensor"):
        return True
    text = str(annotation).lower()
    return False if text.startswith(("tuple", "typing.tuple")) else None


def rotational_layers(initial: Sequence[bool], step: int) -> list[bool]:
    """torchtune's ``RotationalEarlyExitCurriculum``: the initial mask rolled right by ``step`` (mod L).

    ``initial`` usually marks every R-th block (torchtune's ``layers="0::R"``), so at each optimizer step a
    different 1/R of the blocks carries the early-exit loss. The last block is added by the caller.
    """
    n = len(initial)
    return [bool(initial[(i - step) % n]) for i in range(n)]


def gradual_layers(initial: Sequence[bool], step: int, max_steps: int, fraction: float = 0.5) -> list[bool]:
    """torchtune's ``GradualEarlyExitCurriculum``: block i (0-based) joins once
    ``step / max_steps >= fraction * (L - i) / L``, i.e. from the last block towards the first, all enabled
    at ``fraction`` of training; intersected with ``initial``. The last block is added by the caller.

    (torchtune's recipe evaluates this with the step count of the previous optimizer step; here ``step`` is
    the current optimizer step, ``trainer.state.global_step``.)
    """
    if max_steps < 1:
        raise ValueError(f"the gradual curriculum needs the number of training steps, got max_steps={max_steps}")
    n = len(initial)
    done = step / max_steps
    return [bool(initial[i]) and done >= fraction * (n - i) / n for i in range(n)]


def every_rth_layer(num_layers: int, every: int) -> list[bool]:
    """torchtune's ``"0::R"`` as a mask over blocks 1..L: blocks 1, 1 + R, 1 + 2R, ..."""
    return [i % every == 0 for i in range(num_layers)]
