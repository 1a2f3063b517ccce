"""AlignedTrainer: one shared head trained after every layer (Jiang, Zhou & Zhu, ICLR 2025).

    L_aligned = sum_{l=1..L} w_l * CE(head(h_l), y),    w_l = 2l / (L(L+1)) by default,

with ``head`` the model's own head (final norm, pooling, pooler, classifier / LM head; see
:class:`~hf_align.LayerView`) and ``h_l`` the output of block l, all from one forward of the model.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from ..data import IGNORE_INDEX, check_labels, dataset_labels, labelled
from ..data import LABEL_KEYS as _LABEL_KEYS
from ..families import router_aux_loss
from ..layers import HeadContext, LayerView
from .aligned_config import AlignedTrainingArguments, layer_weights
from .curricula import (
    every_rth_layer,
    gradual_layers,
    layer_dropout_mask,
    layer_dropout_probs,
    rotational_layers,
    skipping_blocks,
)


def minimal_depth(accuracies: list[float], tolerance: float) -> int:
    """The first block (1-based) whose accuracy is within ``tolerance`` of the last block's."""
    target = accuracies[-1] - tolerance
    return next(layer for layer, acc in enumerate(accuracies, start=1) if acc >= target)


def is_monotone(accuracies: list[float]) -> bool:
    """Whether accuracy never decreases with depth."""
    return all(b >= a for a, b in zip(accuracies, accuracies[1:]))


class AlignedTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss applies the model's own head after every block.

    Works for ``*ForSequenceClassification``, ``*ForImageClassification`` and ``*ForCausalLM`` models of every
    family :class:`~hf_align.LayerView` supports, PEFT-wrapped or not. The forward goes through the model as
    the Trainer prepared it (DDP, PEFT), with hooks recording the blocks' outputs; the last block's term uses
    the model's own logits, so ``layer_weights="last"`` is exactly standard training.

    Evaluation adds ``eval_layer_{l}_accuracy`` and ``eval_layer_{l}_loss`` for every block l = 1..L,
    ``eval_minimal_depth`` and ``eval_monotone`` (1.0 if accuracy never decreases with depth); for causal LMs
    also ``eval_layer_{l}_perplexity = exp(sum_tokens -log p_l(next token) / n_tokens)`` over the whole eval set
    and ``eval_perplexity`` (the last block's), and for every exit l < L the teacher-forced draft acceptance against
    the last block over the same tokens: ``eval_layer_{l}_greedy_acceptance`` (the fraction of tokens where
    ``argmax p_l = argmax p_L``) and ``eval_layer_{l}_sampling_acceptance`` (the mean of ``sum_v min(p_l(v), p_L(v))``,
    the probability that a token drafted from ``p_l`` at T = 1 is accepted by speculative sampling). Options of the LM recipe (layer dropout, early-exit curricula)
    are in :class:`AlignedTrainingArguments` and :mod:`hf_align.trainers.curricula`. Training logs
    add ``layer_{l}_loss``. Saving writes a model card with the layer-wise table and plot; the saved model is
    a plain transformers model.
    """

    def __init__(self, model=None, args: AlignedTrainingArguments | None = None, *pargs, **kwargs):
        if model is None:
            raise ValueError("AlignedTrainer needs a model instance (model_init is not supported)")
        if args is None:
            args = AlignedTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, AlignedTrainingArguments):
            raise TypeError(f"args must be AlignedTrainingArguments, got {type(args).__name__}")
        self.layer_view = LayerView(model)  # unsupported / mismatching models fail here, before anything runs
        if not self.layer_view.has_head:
            raise ValueError(
                f"AlignedTrainer trains the model's own head after every block, but {type(model).__name__} has no head "
                "(a base model). Load a model with one, e.g. AutoModelForSequenceClassification / "
                "AutoModelForImageClassification (num_labels=...) or AutoModelForCausalLM."
            )
        self._check_batch_labels = False  # set when a dataset's labels cannot be read up front
        num_layers = self.layer_view.num_layers
        self.layer_loss_weights = layer_weights(args.layer_weights, num_layers, args.aligned_layers)
        self.layer_dropout_probs = layer_dropout_probs(args.layer_dropout, num_layers, args.layer_dropout_scale)
        if args.layer_distillation > 0 and self.layer_view.task != "causal-lm":
            raise ValueError(f"layer_distillation distils a causal LM's early exits toward its last block; "
                             f"{type(model).__name__} is a {self.layer_view.task} model")
        if args.layer_dropout > 0 and args.gradient_checkpointing:
            # the skip is applied by forward hooks, which are gone when checkpointed blocks are recomputed
            raise ValueError("layer_dropout > 0 cannot be combined with gradient_checkpointing=True; "
                             f"got layer_dropout={args.layer_dropout} with gradient checkpointing on")
        bound = inspect.signature(Trainer.__init__).bind(self, model, args, *pargs, **kwargs).arguments
        eval_dataset = bound.get("eval_dataset")
        for name, dataset in [("train_dataset", bound.get("train_dataset"))] + (
            [(f"eval_dataset[{k!r}]", v) for k, v in eval_dataset.items()] if isinstance(eval_dataset, dict)
            else [("eval_dataset", eval_dataset)]
        ):
            self._check_labels(dataset, name, bound.get("data_collator"))
        super().__init__(model, args, *pargs, **kwargs)
        self._layer_loss_sum = torch.zeros(num_layers, dtype=torch.float64)
        self._layer_loss_steps = torch.zeros(num_layers, dtype=torch.float64)
        # layer dropout draws: seeded by the trainer's seed (and the process, so ranks draw independently)
        self._dropout_generator = torch.Generator().manual_seed(args.seed * 1_000_003 + args.process_index)
        self._eval_stats: list[torch.Tensor] | None = None
        # causal LMs: the measured best (exit_layer, num_draft_tokens) of self-speculative decoding (a dict with
        # "exit_layer", "num_draft_tokens", "speedup", "acceptance"), set by profile_speculative() or by hand; the
        # card reports it and save_model writes it into the generation config as the custom_generate default
        self.speculative_recommendation: dict | None = None

    # -- checks ----------------------------------------------------------------------------------------

    def _check_labels(self, dataset, name: str, data_collator=None) -> None:
        if dataset is None:
            return
        if isinstance(dataset, torch.utils.data.IterableDataset) or type(dataset).__name__ == "IterableDataset":
            # streams (datasets.IterableDataset's [0] is a column, not an example): checked on every batch
            self._check_batch_labels = True
            return
        try:
            sample = dataset[0]
        except Exception:  # iterable datasets: checked at the first batch instead
            self._check_batch_labels = True  # and their label range on every batch, before its step
            return
        if not isinstance(sample, Mapping):
            return
        if any(k in sample for k in _LABEL_KEYS):
            label = next(sample[k] for k in _LABEL_KEYS if k in sample)
            if self._single_label_classes() is not None and isinstance(label, (str, bytes)):
                raise TypeError(
                    f"{name} labels must be integer class ids in [0, {self._single_label_classes()}), got the string "
                    f"{label!r}. Map them to ids first, e.g. dataset.class_encode_column('label') or "
                    "dataset.map(lambda x: {'label': label2id[x['label']]}), and pass id2label/label2id to the model."
                )
            self._check_label_range(dataset, name)
            return
        if self.layer_view.task == "causal-lm" and data_collator is not None:
            try:
                batch = data_collator([{k: v for k, v in sample.items() if k in ("input_ids", "attention_mask")}])
                if "labels" in batch:
                    return
            except Exception:
                pass
        raise ValueError(
            f"{name} has no labels: expected a 'labels' (or 'label') column, got columns {sorted(sample)}. "
            "AlignedTrainer trains every layer against the labels"
            + (" (for causal LM, use a collator that makes them, e.g. DataCollatorForLanguageModeling(mlm=False))."
               if self.layer_view.task == "causal-lm" else ".")
        )

    def _single_label_classes(self) -> int | None:
        """num_labels when the labels are class ids (single-label classification), else None."""
        config = self.layer_view.hf_model.config
        if self.layer_view.task == "causal-lm" or config.num_labels < 2:
            return None
        if config.problem_type not in (None, "single_label_classification"):
            return None
        return int(config.num_labels)

    def _check_label_range(self, dataset, name: str) -> None:
        """Class labels outside [0, num_labels) fail here, before any training step (the data layer's check)."""
        classes = self._single_label_classes()
        if classes is None:
            return
        labels = dataset_labels(dataset)
        if labels is None:
            self._check_batch_labels = True  # not readable up front: checked per batch, before its step
            return
        check_labels(labels, classes, what=f"{name} labels")

    # -- the loss --------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.layer_view.num_layers

    def _forward_layers(self, model, inputs: dict[str, Any]):
        """One forward of the model (as prepared by the Trainer) recording every block's output."""
        model_inputs = {k: v for k, v in inputs.items() if k not in _LABEL_KEYS}
        if self.layer_view.task == "causal-lm":
            model_inputs.setdefault("use_cache", False)
        skip = contextlib.nullcontext()
        if model.training and self.args.layer_dropout > 0:
            batch = next(v.shape[0] for v in model_inputs.values() if isinstance(v, torch.Tensor))
            mask = layer_dropout_mask(self.layer_dropout_probs, batch, self._dropout_generator)
            # mixture of experts: the load-balancing loss needs every row's router logits in every block
            moe = bool(model_inputs.get("output_router_logits", getattr(self.layer_view.hf_model.config,
                                                                        "output_router_logits", False)))
            skip = skipping_blocks(self.layer_view.blocks, mask, skip_compute=not moe)
        with skip, self.layer_view.recording() as hidden:  # recording sees the skipping forwards' outputs
            outputs = model(**model_inputs)
        if len(hidden) != self.num_layers:
            raise RuntimeError(f"expected {self.num_layers} block outputs, recorded {len(hidden)}")
        return outputs, hidden, HeadContext(model_inputs.get("input_ids"), model_inputs.get("attention_mask"))

    def _problem_type(self, labels: torch.Tensor) -> str:
        config = self.layer_view.hf_model.config
        if config.problem_type is not None:
            return config.problem_type
        if config.num_labels == 1:
            return "regression"
        return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"

    def _classification_loss(self, logits, labels, num_items):
        """The model's own classification loss (transformers' rules for problem_type), on any layer's logits."""
        problem = self._problem_type(labels)
        labels = labels.to(logits.device)
        if problem == "regression":
            if logits.shape[-1] == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        smoothing = self.args.label_smoothing_factor
        logits = logits.view(-1, logits.shape[-1])
        if num_items is None:
            return F.cross_entropy(logits, labels.view(-1), ignore_index=-100, label_smoothing=smoothing)
        total = F.cross_entropy(logits, labels.view(-1), ignore_index=-100, reduction="sum", label_smoothing=smoothing)
        return total / torch.as_tensor(num_items, device=total.device)

    def _lm_chunk_loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor,
                           teacher: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.layer_view.head(hidden.unsqueeze(0), HeadContext()).squeeze(0).float()  # (n, V)
        total = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=self.args.label_smoothing_factor)
        if teacher is not None:  # + beta * sum_tokens KL(p_L || p_l), the last block's distribution held fixed
            log_p = F.log_softmax(logits, dim=-1)
            log_t = F.log_softmax(teacher.float(), dim=-1)
            total = total + self.args.layer_distillation * (log_t.exp() * (log_t - log_p)).sum()
        return total

    def _lm_loss(self, hidden, labels, num_items, logits=None, teacher=None):
        """Next-token CE through the shared LM head: sum over tokens / num_items (or the token count).

        For intermediate layers the head runs on chunks of ``lm_loss_chunk_size`` tokens under activation
        checkpointing, so no layer's (tokens x vocab) logits are kept for backward. With ``teacher`` (the last
        block's logits; ``layer_distillation = beta > 0``) each token's term is
        ``CE(p_l, y) + beta * KL(stopgrad(p_L) || p_l)``.
        """
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)  # (B, T): token t predicts t+1
        keep = shifted != -100
        denominator = torch.as_tensor(num_items if num_items is not None else keep.sum().clamp(min=1), device=hidden.device)
        if logits is not None:  # the model's own logits (last layer): exactly transformers' ForCausalLMLoss
            flat = logits.float().view(-1, logits.shape[-1])
            total = F.cross_entropy(flat, shifted.reshape(-1), ignore_index=-100, reduction="sum",
                                    label_smoothing=self.args.label_smoothing_factor)
            return total / denominator.to(total.dtype)
        tokens, targets = hidden[keep], shifted[keep]  # (n, D), (n,)
        # self-distillation: the last block's logits at the same tokens, detached (a target, not a path for gradients)
        flat = keep.reshape(-1).nonzero().squeeze(1) if teacher is not None else None
        size = self.args.lm_loss_chunk_size
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, tokens.shape[0], size):
            chunk, chunk_targets = tokens[start:start + size], targets[start:start + size]
            extra = () if teacher is None else (
                teacher.detach().reshape(-1, teacher.shape[-1]).index_select(0, flat[start:start + size].to(teacher.device)),)
            if torch.is_grad_enabled():
                total = total + checkpoint(self._lm_chunk_loss_sum, chunk, chunk_targets, *extra, use_reentrant=False)
            else:
                total = total + self._lm_chunk_loss_sum(chunk, chunk_targets, *extra)
        return total / denominator

    def current_layer_weights(self, step: int | None = None) -> list[float]:
        """The loss weights at optimizer step ``step`` (default: the trainer's ``global_step``).

        Without a curriculum these are ``layer_loss_weights``. With ``early_exit_curriculum``, the blocks carrying
        the loss at this step are those of the curriculum (see :mod:`hf_align.trainers.curricula`) plus the last
        block; named weight schemes are renormalised over them, explicit lists are used as given on them.
        """
        args, L = self.args, self.num_layers
        if args.early_exit_curriculum is None:
            return self.layer_loss_weights
        step = self.state.global_step if step is None else step
        if args.aligned_layers:
            initial = [layer in set(args.aligned_layers) for layer in range(1, L + 1)]
        elif args.early_exit_curriculum == "rotational":
            initial = every_rth_layer(L, args.early_exit_every)
        else:
            initial = [True] * L
        if args.early_exit_curriculum == "rotational":
            active = rotational_layers(initial, step)
        else:
            max_steps = self.state.max_steps if self.state.max_steps > 0 else args.max_steps
            active = gradual_layers(initial, step, max_steps, args.early_exit_gradual_fraction)
        active[-1] = True
        layers = [layer for layer in range(1, L + 1) if active[layer - 1]]
        if isinstance(args.layer_weights, str):
            return layer_weights(args.layer_weights, L, layers)
        return [w if active[i] else 0.0 for i, w in enumerate(self.layer_loss_weights)]

    def layer_losses(self, hidden, logits, context, labels, num_items=None, weights=None) -> list[torch.Tensor | None]:
        """Per-block losses ``[loss_1, ..., loss_L]`` (None where the weight is 0); the last uses the model's logits."""
        losses: list[torch.Tensor | None] = []
        weights = self.layer_loss_weights if weights is None else weights
        for layer, (h, w) in enumerate(zip(hidden, weights), start=1):
            if w == 0:
                losses.append(None)
                continue
            last = layer == self.num_layers
            if self.layer_view.task == "causal-lm":
                teacher = logits if (not last and self.args.layer_distillation > 0) else None
                losses.append(self._lm_loss(h, labels, num_items, logits=logits if last else None, teacher=teacher))
            else:
                layer_logits = logits if last else self.layer_view.head(h, context, layer=layer)
                losses.append(self._classification_loss(layer_logits, labels, num_items))
        return losses

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``sum_l w_l * loss_l`` from one forward; mirrors the stock Trainer's ``num_items_in_batch`` handling."""
        labels = next((inputs[k] for k in _LABEL_KEYS if k in inputs), None)
        if labels is None:
            raise ValueError(f"the batch has no labels (got keys {sorted(inputs)}); AlignedTrainer needs 'labels'")
        if self._check_batch_labels and not labels.is_floating_point() and self._single_label_classes():
            check_labels(labels, self._single_label_classes())
        num_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        outputs, hidden, context = self._forward_layers(model, inputs)
        weights = self.current_layer_weights() if model.training else self.layer_loss_weights
        losses = self.layer_losses(hidden, outputs.logits, context, labels, num_items, weights)
        loss = sum(w * l for w, l in zip(weights, losses) if l is not None)
        aux = router_aux_loss(self.layer_view.hf_model, outputs)
        if aux is not None:  # mixture of experts: the load-balancing loss, added once as the model's own loss adds it
            loss = loss + aux.to(loss.device)
        scale = 1
        if self.args.average_tokens_across_devices and num_items is not None:
            scale = self.accelerator.num_processes  # as the stock Trainer does (DDP averages gradients)
            loss = loss * scale
        if model.training and self.args.log_layer_losses:
            # per-layer values on the same footing as the logged loss: the mean over the optimizer step
            values = torch.tensor([0.0 if l is None else l.item() for l in losses], dtype=torch.float64)
            present = torch.tensor([l is not None for l in losses], dtype=torch.float64)
            accumulation = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            self._layer_loss_sum += values * scale if num_items is not None else values / accumulation
            self._layer_loss_steps += present / accumulation
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._layer_loss_steps.sum() > 0 and self.args.log_layer_losses:
            # mean over the optimizer steps in which each layer carried the loss (curricula switch layers off)
            per_layer = self._layer_loss_sum / self._layer_loss_steps.clamp(min=1e-12)
            per_layer = self.accelerator.reduce(per_layer.to(self.args.device), reduction="mean").cpu()
            for layer, (value, steps) in enumerate(zip(per_layer.tolist(), self._layer_loss_steps.tolist()), start=1):
                if steps > 0:
                    logs[f"layer_{layer}_loss"] = round(value, 6)
            self._layer_loss_sum.zero_()
            self._layer_loss_steps.zero_()
        super().log(logs, start_time)

    # -- evaluation ------------------------------------------------------------------------------------

    def _per_sample_layer_stats(self, hidden, logits, context, labels) -> torch.Tensor:
        """(B, 2L+1): correct predictions per layer, loss sums per layer, and the number of scored items."""
        rows = []
        if self.layer_view.task == "causal-lm":
            # per sample: sum over its scored tokens of [argmax == next token] and of -log p(next token), through
            # the shared head in chunks of lm_loss_chunk_size tokens (no layer's (B, T, V) logits are built)
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)
            keep = shifted != -100
            count = keep.sum(-1).double()
            flat = keep.reshape(-1).nonzero().squeeze(1)  # positions of the scored tokens in (B*T)
            sample, targets = flat // keep.shape[1], shifted.reshape(-1)[flat]
            size = self.args.lm_loss_chunk_size
            L = self.num_layers
            # per layer and sample: correct predictions, NLL sum, greedy agreement and sampling overlap with block L
            corrects, losses, agreements, acceptances = (
                [torch.zeros(keep.shape[0], dtype=torch.float64, device=logits.device) for _ in range(L)]
                for _ in range(4))
            flat_logits = logits.reshape(-1, logits.shape[-1])
            for start in range(0, flat.shape[0], size):
                part = flat[start:start + size]
                rows_of = sample[start:start + size]
                last = flat_logits.index_select(0, part)  # the last block's logits, once per chunk for every exit
                last_top, last_p = last.argmax(-1), last.double().softmax(-1)
                t = targets[start:start + size].to(last.device)
                for layer, h in enumerate(hidden, start=1):
                    if layer == L:
                        lg = last
                    else:
                        rows_h = h.reshape(-1, h.shape[-1]).index_select(0, part.to(h.device))
                        lg = self.layer_view.head(rows_h.unsqueeze(0), HeadContext()).squeeze(0).to(last.device)
                    i = layer - 1
                    ce = F.cross_entropy(lg.float(), t, reduction="none").double()
                    losses[i].index_add_(0, rows_of, ce.to(logits.device))
                    top = lg.argmax(-1)
                    corrects[i].index_add_(0, rows_of, (top == t).double().to(logits.device))
                    # draft acceptance of this exit against the last block: greedy, argmax_l = argmax_L; sampling at
                    # T = 1, sum_v min(p_l(v), p_L(v)) (the chance that one drafted token is accepted)
                    agreements[i].index_add_(0, rows_of, (top == last_top).double().to(logits.device))
                    overlap = torch.minimum(lg.double().softmax(-1), last_p).sum(-1)
                    acceptances[i].index_add_(0, rows_of, overlap.to(logits.device))
            rows = corrects + losses + [count] + agreements + acceptances
        else:
            single = self._problem_type(labels) == "single_label_classification"
            # the one label rule: a sample labelled -100 has no target and is not scored (nor counted)
            scored = labelled(labels).double() if single else torch.ones(labels.shape[0], dtype=torch.float64,
                                                                           device=labels.device)
            corrects, losses = [], []
            for layer, h in enumerate(hidden, start=1):
                lg = logits if layer == self.num_layers else self.layer_view.head(h, context, layer=layer)
                if single:
                    corrects.append((lg.argmax(-1) == labels).double() * scored)
                    losses.append(F.cross_entropy(lg.float(), labels, reduction="none",
                                                  ignore_index=IGNORE_INDEX).double())
                else:  # accuracy is undefined for regression / multi-label: reported as absent
                    nan = torch.full((lg.shape[0],), float("nan"), dtype=torch.float64, device=lg.device)
                    corrects.append(nan)
                    losses.append(nan)
            rows = corrects + losses + [scored]
        return torch.stack(rows, dim=1)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not self.args.eval_layers or not any(k in inputs for k in _LABEL_KEYS):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = next(inputs[k] for k in _LABEL_KEYS if k in inputs)
        with torch.no_grad():
            outputs, hidden, context = self._forward_layers(model, inputs)
            losses = self.layer_losses(hidden, outputs.logits, context, labels)
            loss = sum(w * l for w, l in zip(self.layer_loss_weights, losses) if l is not None).detach()
            stats = self._per_sample_layer_stats(hidden, outputs.logits, context, labels)
        if self._eval_stats is not None:
            self._eval_stats.append(self.accelerator.gather_for_metrics(stats).cpu())
        if prediction_loss_only:
            return loss, None, None
        return loss, outputs.logits.detach(), labels

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_stats = []
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
            if self._eval_stats:
                output.metrics.update(self.layer_metrics(torch.cat(self._eval_stats), metric_key_prefix))
        finally:
            self._eval_stats = None
        return output

    def layer_metrics(self, stats: torch.Tensor, prefix: str = "eval") -> dict[str, float]:
        """Layer-wise accuracy/loss, minimal depth and monotonicity from the gathered per-sample stats."""
        L = self.num_layers
        totals = stats.sum(0)
        count = totals[2 * L].item()
        metrics: dict[str, float] = {}
        accuracies = []
        for layer in range(1, L + 1):
            acc, loss = totals[layer - 1].item() / count, totals[L + layer - 1].item() / count
            if not math.isnan(acc):
                metrics[f"{prefix}_layer_{layer}_accuracy"] = acc
                accuracies.append(acc)
            if not math.isnan(loss):
                metrics[f"{prefix}_layer_{layer}_loss"] = loss
                if self.layer_view.task == "causal-lm":  # exp of the token-weighted mean NLL over the eval set
                    metrics[f"{prefix}_layer_{layer}_perplexity"] = math.exp(loss)
        if self.layer_view.task == "causal-lm" and f"{prefix}_layer_{L}_perplexity" in metrics:
            metrics[f"{prefix}_perplexity"] = metrics[f"{prefix}_layer_{L}_perplexity"]
        if stats.shape[1] >= 4 * L + 1:  # causal LMs: teacher-forced draft acceptance of every exit
            for layer in range(1, L):
                metrics[f"{prefix}_layer_{layer}_greedy_acceptance"] = totals[2 * L + layer].item() / count
                metrics[f"{prefix}_layer_{layer}_sampling_acceptance"] = totals[3 * L + layer].item() / count
        if len(accuracies) == L:
            metrics[f"{prefix}_minimal_depth"] = float(minimal_depth(accuracies, self.args.minimal_depth_tolerance))
            metrics[f"{prefix}_monotone"] = float(is_monotone(accuracies))
        return metrics

    # -- saving ----------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        card = os.path.join(output_dir, "README.md")
        # a README this save is about to write (PEFT writes its template card for adapters) may be replaced by
        # ours; one that was there before and is not ours is the user's and is kept
        replaceable = not os.path.exists(card) or _is_hf_align_card(card)
        had_args_bin = os.path.exists(os.path.join(output_dir, "training_args.bin"))
        super()._save(output_dir, state_dict)
        if self.layer_view.task == "causal-lm" and self._peft_base() is None and self.args.should_save:
            from ..hub import write_custom_generate

            # transformers' custom_generate/: the saved LM decodes self-speculatively with trust_remote_code=True,
            # by default with the measured recommendation (profile_speculative), if there is one that beats plain
            best = self.speculative_recommendation or {}
            faster = best and not best.get("plain_is_faster") and (best.get("speedup") or 0) > 1
            write_custom_generate(output_dir, best.get("exit_layer") if faster else None,
                                  best.get("num_draft_tokens") if faster else None)
        if self.args.should_save:
            # the arguments as JSON, like DREAMTrainer: no pickle in the folder (or on the Hub)
            args_bin = os.path.join(output_dir, "training_args.bin")
            if os.path.exists(args_bin) and not had_args_bin:
                os.remove(args_bin)
            with open(os.path.join(output_dir, "training_args.json"), "w") as f:
                f.write(self.args.to_json_string())
        if self.args.write_model_card and self.args.should_save:
            self._write_card(output_dir, force=replaceable)

    # layer-dropout draws continue where they stopped when a run resumes (saved beside the Trainer's RNG states)
    def _dropout_rng_file(self, folder: str) -> str:
        return os.path.join(folder, f"layer_dropout_rng_{self.args.process_index}.safetensors")

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.args.layer_dropout > 0:
            from safetensors.torch import save_file

            save_file({"state": self._dropout_generator.get_state()}, self._dropout_rng_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and self.args.layer_dropout > 0 and os.path.isfile(self._dropout_rng_file(checkpoint)):
            from safetensors.torch import load_file

            self._dropout_generator.set_state(load_file(self._dropout_rng_file(checkpoint))["state"])

    def create_model_card(self, language: str | None = None, license: str | None = None, tags=None,
                          model_name: str | None = None, finetuned_from: str | None = None, tasks=None,
                          dataset_tags=None, dataset=None, dataset_args=None, *, datasets=None, base_model=None,
                          card_data=None) -> None:
        """Write hf-align's model card (layer-wise table, plot, recipe, usage, tags) into ``args.output_dir``.

        Takes the stock ``Trainer.create_model_card`` arguments (so ``trainer.push_to_hub(license=..., language=...,
        dataset=..., finetuned_from=..., tags=...)`` reaches it) and the ``huggingface_hub`` names ``datasets``,
        ``base_model``, ``card_data``. The metadata is kept by later saves of the card."""
        from ..hub import user_metadata

        datasets = datasets if datasets is not None else (dataset if dataset is not None else dataset_tags)
        self._card_metadata = {**getattr(self, "_card_metadata", {}),
                               **user_metadata(card_data, license=license, language=language, datasets=datasets,
                                               base_model=base_model or finetuned_from, tags=tags,
                                               model_name=model_name)}
        if self.is_world_process_zero():
            self._write_card(self.args.output_dir, force=self._own_readme(self.args.output_dir))

    def _own_readme(self, output_dir) -> bool:
        """Whether README.md in output_dir may be replaced: ours, absent, or PEFT's template for the adapter."""
        card = os.path.join(output_dir, "README.md")
        if not os.path.exists(card) or _is_hf_align_card(card):
            return True
        return self._peft_base() is not None and _is_peft_template(card)

    def _peft_base(self) -> str | None:
        """The base model of a PEFT adapter being trained ('' if unnamed), or None if the model is no adapter."""
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        config = getattr(model, "peft_config", None)
        if not isinstance(config, dict) or not config:
            return None
        active = getattr(model, "active_adapter", None)
        active = active() if callable(active) else active
        active = active if isinstance(active, str) else (list(active)[0] if active else next(iter(config)))
        return getattr(config.get(active), "base_model_name_or_path", None) or ""

    def _write_card(self, output_dir: str, force: bool = False) -> None:
        from ..hub import aligned_model_card

        repo = self.hub_model_id if getattr(self, "hub_model_id", None) else None
        aligned_model_card(
            output_dir,
            model=self.layer_view.hf_model,
            layer_view=self.layer_view,
            log_history=self.state.log_history,
            recipe=self._recipe(),
            metadata=getattr(self, "_card_metadata", None),
            repo=repo,
            peft_base=self._peft_base(),
            force=force,
            speculative=self.speculative_recommendation,
        )

    def _recipe(self) -> dict[str, Any]:
        args = self.args
        return {
            "layer_weights": args.layer_weights if isinstance(args.layer_weights, str) else list(args.layer_weights),
            "weights": [round(w, 6) for w in self.layer_loss_weights],
            "aligned_layers": args.aligned_layers or "all",
            "learning_rate": args.learning_rate,
            "train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_steps": args.max_steps if args.max_steps > 0 else None,
            "num_train_epochs": args.num_train_epochs,
            "global_step": self.state.global_step,
            "seed": args.seed,
            "world_size": args.world_size,
            **({"layer_dropout": args.layer_dropout, "layer_dropout_scale": args.layer_dropout_scale}
               if args.layer_dropout > 0 else {}),
            **({"early_exit_curriculum": args.early_exit_curriculum} if args.early_exit_curriculum else {}),
        }


def _is_hf_align_card(path: str) -> bool:
    from ..hub import CARD_MARKER

    with open(path, encoding="utf-8") as f:
        return CARD_MARKER in f.read()


def _is_peft_template(path: str) -> bool:
    """PEFT's generic adapter card (its template's first comment), as written by ``PeftModel.save_pretrained``."""
    with open(path, encoding="utf-8") as f:
        return "<!-- Provide a quick summary of what the model is/does. -->" in f.read()
