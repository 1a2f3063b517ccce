"""Choosing an exit threshold: the accuracy / exit depth / latency trade-off over thresholds, on validation data.

One full-depth pass over the validation set stores every block's logits (N x L x C, small for classifiers);
each threshold's exits are then simulated exactly (the same rule as :class:`EarlyExitModel`), so the curve
costs one pass however many thresholds are tried. Latency is measured by really running the early-exit model
on a subset at each threshold (optional).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import (
    LABEL_KEYS,
    check_dataset_labels,
    check_labels,
    iter_batches,
    labelled,
    pad_token_id,
    split_labels,
    to_device,
)
from ..layers import eval_mode
from .early_exit import EarlyExitConfig, EarlyExitModel, _exit_mask

__all__ = ["ExitCurve", "accuracy_loss_upper_bound", "collect_layer_logits", "exit_curve", "calibrate", "simulate_exits"]


def _batches(model: EarlyExitModel, data, batch_size: int, collate_fn):
    """The data layer's batches (padding collate, every process sees all the data: calibration is not sharded)."""
    it, _ = iter_batches(data, batch_size, collate_fn=collate_fn, pad_token_id=pad_token_id(model.view.hf_model),
                         shard=False)
    return it


@torch.no_grad()
def collect_layer_logits(model: EarlyExitModel, data, batch_size: int = 64, collate_fn=None, progress: bool = True):
    """Every block's logits and the labels over a labelled dataset: ``(N, L, C)`` float32 and ``(N,)``.

    Labels must be class ids in [0, num_labels) or -100 (checked before any forward; samples labelled -100 are left
    out, as everywhere in hf-align); the model runs in eval mode and
    gets its own train/eval flags back afterwards."""
    num_labels = int(model.config.num_labels)
    check_dataset_labels(data, num_labels, name="calibration data")
    all_logits, all_labels = [], []
    with eval_mode(model.model):
        for batch in tqdm(_batches(model, data, batch_size, collate_fn), desc="layer logits", disable=not progress):
            inputs, labels = split_labels(batch)
            if labels is None:
                raise ValueError(f"the calibration data needs labels (one of {LABEL_KEYS}); got {sorted(batch)}")
            check_labels(labels, num_labels, what="calibration labels")
            per_layer = model.view.layer_logits(**to_device(inputs, model.view.device))
            labels = torch.as_tensor(labels).cpu().reshape(-1)
            keep = labelled(labels)  # the one label rule: samples labelled -100 are not scored
            all_logits.append(torch.stack(per_layer, dim=1).float().cpu()[keep])
            all_labels.append(labels[keep])
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def _labelled(layer_logits: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The rows whose label is not -100 (the ignore index): unlabelled rows are neither right nor wrong."""
    logits, labels = layer_logits
    labels = np.asarray(labels)
    keep = labels != -100
    if not keep.any():
        raise ValueError("the calibration data has no labelled rows (every label is -100, the ignore index)")
    return (logits, labels) if keep.all() else (np.asarray(logits)[keep], labels[keep])


def simulate_exits(layer_logits: np.ndarray, settings: EarlyExitConfig) -> np.ndarray:
    """Exit block (1-based) of each sample under ``settings``, from (N, L, C) logits, with the very rule
    :class:`EarlyExitModel` applies after each block (``_exit_mask``)."""
    logits = torch.as_tensor(layer_logits)
    N, L, _ = logits.shape
    exits = torch.full((N,), L, dtype=torch.long)
    undecided = torch.ones(N, dtype=torch.bool)
    previous = torch.full((N,), -1, dtype=torch.long)
    streak = torch.zeros(N, dtype=torch.long)
    for layer in range(1, L):  # block L: everyone left exits
        prediction = logits[:, layer - 1].argmax(-1)
        streak = torch.where(prediction == previous, streak + 1, torch.ones_like(streak))
        previous = prediction
        if layer < settings.min_layer:
            continue
        hit = _exit_mask(settings, logits[:, layer - 1], layer, streak) & undecided
        exits[hit] = layer
        undecided &= ~hit
    return exits.numpy()


def _default_thresholds(policy: str, num_classes: int, num_layers: int) -> list:
    if policy == "confidence":
        return [round(float(t), 4) for t in np.unique(np.concatenate([np.linspace(0.3, 0.95, 14), [0.97, 0.98, 0.99, 0.995, 0.999]]))]
    if policy == "entropy":
        return [round(float(t), 4) for t in math.log(num_classes) * np.linspace(0.0, 0.8, 17)]
    if policy == "patience":
        return list(range(1, num_layers + 1))
    return list(range(1, num_layers + 1))


@dataclass
class ExitCurve:
    """Accuracy, mean exit block, compute fraction and (optionally) latency for each setting of one policy."""

    policy: str
    values: list  # thresholds (confidence/entropy), patience values, or exit layers
    accuracy: list[float]
    mean_exit_layer: list[float]
    num_layers: int
    full_accuracy: float
    latency_ms: list[float] | None = None
    chosen: Any = None
    # set by calibrate(confidence=...): upper confidence bound on the accuracy lost at each setting
    loss_upper_bound: list[float] | None = None
    confidence: float | None = None

    def to_markdown(self) -> str:
        key = {"confidence": "threshold", "entropy": "entropy threshold", "patience": "patience", "fixed": "exit layer"}[self.policy]
        head = f"| {key} | accuracy | mean exit block | compute (blocks run / L) |" + (" latency ms |" if self.latency_ms else "")
        lines = [head, "| ---: | ---: | ---: | ---: |" + (" ---: |" if self.latency_ms else "")]
        for i, v in enumerate(self.values):
            value = f"{v} **chosen**" if v == self.chosen else f"{v}"  # in the value cell: 4 (5) columns
            row = f"| {value} | {100 * self.accuracy[i]:.2f}% | {self.mean_exit_layer[i]:.2f} | {self.mean_exit_layer[i] / self.num_layers:.2f} |"
            if self.latency_ms:
                row += f" {self.latency_ms[i]:.2f} |"
            lines.append(row)
        lines.append(f"\nfull depth ({self.num_layers} blocks): {100 * self.full_accuracy:.2f}%")
        return "\n".join(lines)

    def plot(self, path):
        from matplotlib.figure import Figure  # no pyplot: the user's global backend is left alone

        fig = Figure(figsize=(5.2, 3.4), dpi=120)
        ax = fig.subplots()
        ax.plot(self.mean_exit_layer, [100 * a for a in self.accuracy], marker="o", label=f"{self.policy} exit")
        ax.axhline(100 * self.full_accuracy, color="gray", ls="--", label="full depth")
        if self.chosen is not None and self.chosen in self.values:
            i = self.values.index(self.chosen)
            ax.plot([self.mean_exit_layer[i]], [100 * self.accuracy[i]], "r*", ms=14, label=f"chosen {self.chosen}")
        ax.set_xlabel("mean exit block (compute)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
        if self.latency_ms:
            top = ax.secondary_xaxis("top", functions=(lambda x: x, lambda x: x))
            top.set_xlabel("(latency per threshold in the table)")
        fig.tight_layout()
        fig.savefig(path)
        return path


def exit_curve(model: EarlyExitModel, data, policy: str | None = None, values=None, batch_size: int = 64,
               collate_fn=None, min_layer: int | None = None, measure_latency: bool = False,
               latency_samples: int = 64, latency_batch_size: int = 1, progress: bool = True,
               layer_logits: tuple[np.ndarray, np.ndarray] | None = None) -> ExitCurve:
    """The accuracy / mean exit depth (/ latency) curve of one policy over its settings, on labelled data
    (rows labelled -100, the ignore index, are left out)."""
    policy = policy or model.settings.policy
    logits, labels = _labelled(layer_logits if layer_logits is not None else collect_layer_logits(model, data, batch_size, collate_fn, progress))
    N, L, C = logits.shape
    values = list(values) if values is not None else _default_thresholds(policy, C, L)
    min_layer = model.settings.min_layer if min_layer is None else min_layer
    accuracy, depth, latency = [], [], []
    pred = logits.argmax(-1)  # (N, L)
    for v in values:
        settings = _settings_for(policy, v, min_layer).validate(L)
        exits = simulate_exits(logits, settings)
        accuracy.append(float((pred[np.arange(N), exits - 1] == labels).mean()))
        depth.append(float(exits.mean()))
        if measure_latency:
            latency.append(_latency_ms(model, data, settings, latency_samples, latency_batch_size, collate_fn))
    return ExitCurve(policy=policy, values=values, accuracy=accuracy, mean_exit_layer=depth, num_layers=L,
                     full_accuracy=float((pred[:, -1] == labels).mean()), latency_ms=latency or None)


def _settings_for(policy: str, value, min_layer: int) -> EarlyExitConfig:
    if policy in ("confidence", "entropy"):
        return EarlyExitConfig(policy=policy, threshold=float(value), min_layer=min_layer)
    if policy == "patience":
        return EarlyExitConfig(policy=policy, patience=int(value), threshold=None, min_layer=min_layer)
    if policy == "fixed":
        return EarlyExitConfig(policy=policy, exit_layer=int(value), threshold=None, min_layer=min_layer)
    raise ValueError(f"unknown exit policy {policy!r}")


def _latency_ms(model: EarlyExitModel, data, settings, samples: int, batch_size: int, collate_fn) -> float:
    times = []
    for i, batch in enumerate(_batches(model, data, batch_size, collate_fn)):
        if i * batch_size >= samples:
            break
        batch, _ = split_labels(batch)
        start = time.perf_counter()
        model(**batch, **vars(settings))  # this call's settings: the model's own are not touched
        times.append((time.perf_counter() - start) * 1e3 / batch_size)
    return statistics.median(times)


def accuracy_loss_upper_bound(full_correct, exit_correct, confidence: float) -> float:
    """One-sided upper confidence bound on the accuracy lost by exiting early, from paired per-sample results.

    With ``N`` samples, ``n_h`` that full depth gets right and the exit gets wrong and ``n_g`` the other way
    round, the loss is ``delta = (n_h - n_g) / N``. The bound is the Agresti-Min adjusted Wald interval for a
    paired difference of proportions (half a count added to each cell of the 2x2 table):

        p_h = (n_h + 1/2) / (N + 2),   p_g = (n_g + 1/2) / (N + 2),   d = p_h - p_g,
        upper = d + z * sqrt((p_h + p_g - d^2) / (N + 2)),   z = Phi^-1(confidence).
    """
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    full_correct, exit_correct = np.asarray(full_correct, dtype=bool), np.asarray(exit_correct, dtype=bool)
    if full_correct.shape != exit_correct.shape or full_correct.ndim != 1 or full_correct.size == 0:
        raise ValueError(f"expected two equal-length 1-d arrays, got shapes {full_correct.shape} and {exit_correct.shape}")
    from scipy.stats import norm

    n = full_correct.size + 2.0
    p_h = (np.sum(full_correct & ~exit_correct) + 0.5) / n
    p_g = (np.sum(exit_correct & ~full_correct) + 0.5) / n
    d = p_h - p_g
    return float(d + norm.ppf(confidence) * math.sqrt(max(p_h + p_g - d * d, 0.0) / n))


def calibrate(model: EarlyExitModel, data, tolerance: float = 0.01, policy: str | None = None, values=None,
              confidence: float | None = None, **kwargs) -> ExitCurve:
    """Pick the setting with the lowest mean exit block whose accuracy is within ``tolerance`` (absolute, e.g.
    0.01 = 1 point) of full depth on ``data``; apply it to ``model`` and return the curve (``curve.chosen``).

    ``confidence`` (e.g. 0.95): accept a setting only if the one-sided upper confidence bound on its accuracy
    loss (:func:`accuracy_loss_upper_bound`, paired per sample) is within ``tolerance``, so the tolerance is
    meant to hold on new data from the same distribution, not just on ``data``. The bounds are in
    ``curve.loss_upper_bound``."""
    if not 0 <= tolerance <= 1:
        raise ValueError(f"tolerance must be in [0, 1] (absolute accuracy), got {tolerance}")
    if confidence is not None and not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1) or None, got {confidence}")
    if confidence is None:
        curve = exit_curve(model, data, policy=policy, values=values, **kwargs)
        ok = [i for i, acc in enumerate(curve.accuracy) if acc >= curve.full_accuracy - tolerance]
    else:
        if kwargs.get("layer_logits") is None:
            keys = ("batch_size", "collate_fn", "progress")
            kwargs["layer_logits"] = collect_layer_logits(model, data, **{k: kwargs[k] for k in keys if k in kwargs})
        curve = exit_curve(model, data, policy=policy, values=values, **kwargs)
        logits, labels = _labelled(kwargs["layer_logits"])
        pred = logits.argmax(-1)
        full_correct = pred[:, -1] == labels
        min_layer = model.settings.min_layer if kwargs.get("min_layer") is None else kwargs["min_layer"]
        bounds = []
        for v in curve.values:
            exits = simulate_exits(logits, _settings_for(curve.policy, v, min_layer).validate(logits.shape[1]))
            bounds.append(accuracy_loss_upper_bound(full_correct, pred[np.arange(len(labels)), exits - 1] == labels, confidence))
        curve.loss_upper_bound, curve.confidence = bounds, confidence
        ok = [i for i, bound in enumerate(bounds) if bound <= tolerance]
    if not ok:
        raise ValueError("no setting keeps accuracy within the tolerance; widen `values` or the tolerance")
    best = min(ok, key=lambda i: (curve.mean_exit_layer[i], -curve.accuracy[i]))
    curve.chosen = curve.values[best]
    chosen = _settings_for(curve.policy, curve.chosen, model.settings.min_layer)
    model.set_exit(**vars(chosen))
    model.calibration = curve  # shown in the model card when the model is saved or pushed
    return curve
