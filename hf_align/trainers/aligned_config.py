"""Configuration of :class:`~hf_align.AlignedTrainer` (a ``TrainingArguments`` subclass, like TRL's configs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import TrainingArguments

LAYER_WEIGHT_SCHEMES = ("linear", "uniform", "sqrt", "last")


def layer_weights(scheme: str | Sequence[float], num_layers: int, layers: Sequence[int] | None = None) -> list[float]:
    """Per-block loss weights ``[w_1, ..., w_L]`` of the aligned loss ``sum_l w_l * CE(head(h_l), y)``.

    Schemes (over the participating layers ``layers``, 1-based, default all; the rest get 0):

    * ``"linear"`` — the paper's ``w_l = 2l / (L(L+1))``: proportional to depth, summing to 1;
    * ``"uniform"`` — ``1 / |layers|``;
    * ``"sqrt"`` — proportional to ``sqrt(l)``, summing to 1;
    * ``"last"`` — ``w_L = 1``, all others 0: standard training;
    * an explicit list of L non-negative numbers, used as given (not renormalised).
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    if layers is None:
        layers = list(range(1, num_layers + 1))
    else:
        layers = sorted({int(layer) for layer in layers})
        if not layers or layers[0] < 1 or layers[-1] > num_layers:
            raise ValueError(f"aligned_layers must be block numbers in 1..{num_layers}, got {list(layers)}")
    if isinstance(scheme, str):
        if scheme not in LAYER_WEIGHT_SCHEMES:
            raise ValueError(f"layer_weights must be one of {LAYER_WEIGHT_SCHEMES} or a list of {num_layers} numbers, got {scheme!r}")
        if scheme == "last":
            return [0.0] * (num_layers - 1) + [1.0]
        raw = {"linear": lambda l: float(l), "uniform": lambda l: 1.0, "sqrt": lambda l: math.sqrt(l)}[scheme]
        total = sum(raw(layer) for layer in layers)
        return [raw(layer) / total if layer in layers else 0.0 for layer in range(1, num_layers + 1)]
    weights = [float(w) for w in scheme]
    if len(weights) != num_layers:
        raise ValueError(f"layer_weights has {len(weights)} entries but the model has {num_layers} blocks")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"layer_weights must be finite and non-negative, got {weights}")
    if sum(weights) <= 0:
        raise ValueError("layer_weights must not all be zero")
    return weights


def _has_accelerator() -> bool:
    """Whether torch sees an accelerator (CUDA, MPS, XPU, ...): the DataLoader's own test for pinning memory."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


@dataclass
class AlignedTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for aligned training (Jiang, Zhou & Zhu, ICLR 2025).

    The loss is ``L_aligned = sum_{l=1..L} w_l * CE(head(h_l), y)`` where ``head`` is the model's own head
    (final norm, pooling, pooler, classifier or LM head) and ``h_l`` the output of block l, all from one
    forward pass. ``layer_weights="last"`` is standard training.
    """

    layer_weights: str | list[float] = field(
        default="linear",
        metadata={
            "help": "Per-layer loss weights: 'linear' (2l/(L(L+1)), the paper's default), 'uniform', 'sqrt', "
            "'last' (= standard training) or an explicit list of L non-negative numbers (used as given)."
        },
    )
    aligned_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Blocks (1-based) that take part in the loss; default all. Named weight schemes are "
                  "renormalised over them."},
    )
    eval_layers: bool = field(
        default=True,
        metadata={"help": "Report eval_layer_{l}_accuracy / eval_layer_{l}_loss for every block, "
                  "eval_minimal_depth and eval_monotone at evaluation."},
    )
    minimal_depth_tolerance: float = field(
        default=0.01,
        metadata={"help": "eval_minimal_depth is the first block whose accuracy is within this (absolute) "
                  "tolerance of the last block's accuracy."},
    )
    log_layer_losses: bool = field(
        default=True,
        metadata={"help": "Log the per-layer training losses (layer_{l}_loss) next to the total loss."},
    )
    lm_loss_chunk_size: int = field(
        default=1024,
        metadata={"help": "Causal LM: tokens per chunk when computing each layer's loss through the shared LM "
                  "head; chunks are recomputed in backward (checkpointed) so no layer's full logits are held."},
    )
    layer_distillation: float = field(
        default=0.0,
        metadata={"help": "Causal LM: self-distillation weight beta of the early exits toward the last block: each "
                  "intermediate block's per-token loss becomes CE(p_l, y) + beta * KL(p_L || p_l), with the last "
                  "block's distribution p_L held fixed (no gradient through it); 0 = off."},
    )
    layer_dropout: float = field(
        default=0.0,
        metadata={"help": "LayerSkip layer dropout: the skip probability p_max of the last block (training only; "
                  "0 = off). Block l is skipped, i.e. passes its input through, with probability "
                  "p_l = p_max * scale((l-1)/(L-1)), drawn independently per sample and per forward from a "
                  "generator seeded with the trainer's seed."},
    )
    layer_dropout_scale: str = field(
        default="exp",
        metadata={"help": "How p_l rises from 0 (block 1) to p_max (block L), torchtune's scales: 'exp' "
                  "(2^x - 1, LayerSkip's choice), 'linear' (x), 'log', 'sin', 'sigmoid' or 'uniform' "
                  "(p_max everywhere)."},
    )
    early_exit_curriculum: str | None = field(
        default=None,
        metadata={"help": "Which intermediate blocks carry the loss at each optimizer step (torchtune's "
                  "early_exit_loss curricula; the last block always does): None (all of aligned_layers), "
                  "'rotational' (every early_exit_every-th block, the set shifted by one block each step) or "
                  "'gradual' (blocks join from the last towards the first; all are on after "
                  "early_exit_gradual_fraction of max_steps)."},
    )
    early_exit_every: int = field(
        default=4,
        metadata={"help": "Rotational curriculum: R, the loss is on every R-th block (torchtune's layers='0::R') "
                  "unless aligned_layers is given, whose mask is rotated instead."},
    )
    early_exit_gradual_fraction: float = field(
        default=0.5,
        metadata={"help": "Gradual curriculum: the fraction of max_steps after which every block carries the loss "
                  "(torchtune's fraction_scale)."},
    )
    write_model_card: bool = field(
        default=True,
        metadata={"help": "Write a model card (README.md) with the layer-wise accuracy table and plot when saving."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dataloader_pin_memory and not _has_accelerator():
            self.dataloader_pin_memory = False  # nothing to pin for: the DataLoader would only warn on every run
        if isinstance(self.layer_weights, str):
            if self.layer_weights not in LAYER_WEIGHT_SCHEMES:
                raise ValueError(
                    f"layer_weights must be one of {LAYER_WEIGHT_SCHEMES} or a list of numbers, got {self.layer_weights!r}"
                )
        else:
            weights = [float(w) for w in self.layer_weights]
            if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"layer_weights must be finite, non-negative and not all zero, got {weights}")
            self.layer_weights = weights
        if not 0 <= self.minimal_depth_tolerance <= 1:
            raise ValueError(f"minimal_depth_tolerance must be in [0, 1], got {self.minimal_depth_tolerance}")
        from .curricula import EARLY_EXIT_CURRICULA, LAYER_DROPOUT_SCALES

        if not 0.0 <= self.layer_dropout < 1.0:
            raise ValueError(f"layer_dropout must be a probability in [0, 1), got {self.layer_dropout!r}")
        if self.layer_dropout_scale not in LAYER_DROPOUT_SCALES:
            raise ValueError(f"layer_dropout_scale must be one of {LAYER_DROPOUT_SCALES}, got {self.layer_dropout_scale!r}")
        if self.early_exit_curriculum is not None and self.early_exit_curriculum not in EARLY_EXIT_CURRICULA:
            raise ValueError(f"early_exit_curriculum must be None or one of {EARLY_EXIT_CURRICULA}, "
                             f"got {self.early_exit_curriculum!r}")
        if not isinstance(self.early_exit_every, int) or self.early_exit_every < 1:
            raise ValueError(f"early_exit_every must be a positive integer, got {self.early_exit_every!r}")
        if not 0.0 < self.early_exit_gradual_fraction <= 1.0:
            raise ValueError(f"early_exit_gradual_fraction must be in (0, 1], got {self.early_exit_gradual_fraction!r}")
        if not (math.isfinite(self.layer_distillation) and self.layer_distillation >= 0):
            raise ValueError(f"layer_distillation must be a finite number >= 0, got {self.layer_distillation!r}")
        if self.lm_loss_chunk_size < 1:
            raise ValueError(f"lm_loss_chunk_size must be >= 1, got {self.lm_loss_chunk_size}")
