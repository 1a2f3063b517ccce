"""The curricula of the aligned LM recipe: layer dropout rising with depth and early-exit loss curricula.

Both follow torchtune's implementations of LayerSkip (Elhoushi et al., 2024; ``torchtune.modules.layer_dropout``
and ``torchtune.modules.early_exit_loss``), written as small pure functions of (layer, step) so that the
trainer, the tests and the docs share one definition. Layers are 1-based here (block l = 1..L); torchtune's
are 0-based (``i = l - 1``).
"""

from __future__ import annotations

import contextlib
import math
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


@contextlib.contextmanager
def skipping_blocks(blocks: Sequence[torch.nn.Module], mask: torch.Tensor) -> Iterator[None]:
    """While active, block l passes its input hidden state through, unchanged, for the samples ``mask[l-1]``.

    Implemented with forward hooks on the blocks (removed on exit): the block runs on the whole batch and its
    output rows of skipped samples are replaced by its input rows (``torch.where``), so a skipped sample's
    hidden state and gradient bypass the block exactly, while the others are untouched. (The compute of a
    skipped row is not saved; see docs/aligned_training.md.)
    """
    handles = []

    def hook(index):
        def replace(module, args, kwargs, out):
            if not bool(mask[index].any()):
                return None
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = out if isinstance(out, torch.Tensor) else out[0]
            skip = mask[index].to(hidden_out.device).view(-1, *([1] * (hidden_out.dim() - 1)))
            new = torch.where(skip, hidden_in.to(hidden_out.dtype), hidden_out)
            return new if isinstance(out, torch.Tensor) else (new, *out[1:])

        return replace

    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_hook(hook(index), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


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
