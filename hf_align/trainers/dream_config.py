"""Training arguments for DREAM diffusion super-resolution (:class:`~hf_align.trainers.dream_trainer.DREAMTrainer`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

__all__ = ["DREAMTrainingArguments"]


def _has_accelerator() -> bool:
    """Whether torch sees an accelerator (CUDA, MPS, XPU, ...): the DataLoader's own test for pinning memory."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


@dataclass
class DREAMTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the DREAM / SR3 options.

    The loss per step is ``|| target - eps_theta(x_hat_t, up(y), t) ||`` (L1 or squared L2, mean over elements)
    with ``(x_hat_t, target)`` from :func:`hf_align.diffusion.dream_rectify` and
    ``lambda_t = sqrt(1 - a_t) ** dream_detail_preservation``; ``dream_detail_preservation = inf`` is standard
    diffusion training, so the same trainer is the baseline.
    """

    learning_rate: float = field(
        default=3e-4,
        metadata={"help": "AdamW learning rate (TrainingArguments' 5e-5 is tuned for fine-tuning transformers). The SR3 "
                  "UNet learned 0.35 dB over bicubic in 100 steps at 3e-4 and nothing at 1e-3 or 3e-3 "
                  "(benchmarks/results/dream_sr.md)."},
    )
    dream_detail_preservation: float = field(
        default=1.0,
        metadata={"help": "DREAM exponent p in lambda_t = sqrt(1 - alphas_cumprod[t]) ** p. 1 = the paper; "
                  "0 = full rectification; inf = standard training (no extra forward)."},
    )
    loss_type: str = field(
        default="l1", metadata={"help": "Regression loss: 'l1' (official SR3/DREAM code) or 'mse' (diffusers)."}
    )
    scale_factor: int = field(default=4, metadata={"help": "Super-resolution factor (HR size / LR size)."})
    crop_size: int = field(
        default=32, metadata={"help": "Side of the random high-resolution training crops (LR side = crop / scale)."}
    )
    crop_sampling: str = field(
        default="gradient",
        metadata={"help": "How training crops are placed: 'gradient' draws crop_candidates uniform candidates and keeps "
                  "one with probability proportional to its gradient energy (flat sky, water and bokeh are rarely "
                  "trained on); 'uniform' draws one uniform crop. Both are seeded per step, so resuming is exact."},
    )
    crop_candidates: int = field(
        default=8, metadata={"help": "Candidates per training crop for crop_sampling='gradient'."}
    )
    linear_baseline: bool = field(
        default=True,
        metadata={"help": "Also report a least-squares linear filter (per sub-pixel phase, on the bicubic up-sample) "
                  "fitted on uniform random crops of the training data, as eval_linear_psnr / eval_linear_ssim: "
                  "what diffusion must beat to earn its cost."},
    )
    linear_baseline_crops: int = field(
        default=1024,
        metadata={"help": "Random training crops the linear baseline is fitted on (one pass; 48x48 crops at 2x: "
                  "~7 s on one CPU thread, PSNR spread over seeds 0.01-0.02 dB, 0.1 dB with 256 crops)."},
    )
    linear_baseline_kernel: int = field(
        default=7, metadata={"help": "Side of the linear baseline's filter (odd)."}
    )
    image_column: str = field(default="image", metadata={"help": "Dataset column holding the images."})
    residual: bool = field(
        default=True,
        metadata={"help": "Diffuse the residual HR - bicubic_up(LR) (SRDiff/ResShift) instead of the HR image."},
    )
    residual_scale: float = field(
        default=8.0,
        metadata={"help": "The residual is multiplied by this before diffusion (and divided after). Residuals of 2x-4x "
                  "bicubic SR have a standard deviation of 0.06-0.15 in [-1, 1] units; 8 brings them near unit scale."},
    )
    use_ema: bool = field(default=True, metadata={"help": "Keep an EMA of the weights (diffusers EMAModel)."})
    ema_decay: float = field(default=0.999, metadata={"help": "Maximum EMA decay."})
    ema_use_warmup: bool = field(
        default=True,
        metadata={"help": "EMA warm-up: decay = 1 - (1 + step / ema_inv_gamma) ** -ema_power (capped)."},
    )
    ema_inv_gamma: float = field(default=1.0, metadata={"help": "EMA warm-up inverse multiplicative factor."})
    ema_power: float = field(default=0.75, metadata={"help": "EMA warm-up exponent."})
    num_train_timesteps: int = field(
        default=1000, metadata={"help": "Diffusion steps of the training DDPMScheduler (if none is passed)."}
    )
    beta_schedule: str = field(
        default="linear", metadata={"help": "Beta schedule of the training DDPMScheduler (if none is passed)."}
    )
    beta_start: float = field(default=1e-4, metadata={"help": "First beta of the training DDPMScheduler."})
    beta_end: float = field(default=2e-2, metadata={"help": "Last beta of the training DDPMScheduler."})
    timestep_spacing: str = field(
        default="trailing",
        metadata={"help": "How the sampling schedulers space few steps: 'trailing' starts at the last training step "
                  "(x_T is pure noise there, so 1-2 step sampling is sound); diffusers' default 'leading' starts at "
                  "T - T/n (1 step would evaluate the model at t = 0 on pure noise)."},
    )
    prediction_type: str = field(
        default="sample",
        metadata={"help": "What the UNet predicts: 'epsilon', 'v_prediction' or 'sample' (x0; if no scheduler passed). "
                  "'sample' is the measured default (benchmarks/results/sr_prediction_types.md)."},
    )
    eval_scheduler: str = field(
        default="ddim", metadata={"help": "Sampler used in evaluation: 'ddim', 'ddpm' or 'dpm' (DPM-Solver++)."}
    )
    eval_num_inference_steps: int = field(
        default=2,
        metadata={"help": "Sampling steps in evaluation (trailing spacing: 1 step is the model's x0 estimate from pure noise, "
                  "the PSNR-oriented end; more steps add sampled detail, see benchmarks/results/dream_sr.md)."},
    )
    eval_max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N eval images only (None = all)."}
    )
    eval_seed: int = field(default=0, metadata={"help": "Seed of the sampling noise in evaluation."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator needs the raw image column."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.dataloader_pin_memory and not _has_accelerator():
            self.dataloader_pin_memory = False  # nothing to pin for: the DataLoader would only warn on every run
        p = float(self.dream_detail_preservation)
        if math.isnan(p) or p < 0:
            raise ValueError(f"dream_detail_preservation must be >= 0 or inf, got {self.dream_detail_preservation}")
        if self.loss_type not in ("l1", "mse"):
            raise ValueError(f"loss_type must be 'l1' or 'mse', got {self.loss_type!r}")
        if self.scale_factor < 1:
            raise ValueError(f"scale_factor must be >= 1, got {self.scale_factor}")
        if self.crop_size % self.scale_factor:
            raise ValueError(f"crop_size ({self.crop_size}) must be divisible by scale_factor ({self.scale_factor})")
        if self.crop_sampling not in ("gradient", "uniform"):
            raise ValueError(f"crop_sampling must be 'gradient' or 'uniform', got {self.crop_sampling!r}")
        for name in ("crop_candidates", "linear_baseline_crops", "linear_baseline_kernel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.linear_baseline_kernel % 2 == 0:
            raise ValueError(f"linear_baseline_kernel must be odd, got {self.linear_baseline_kernel}")
        if self.linear_baseline and self.crop_size <= self.linear_baseline_kernel // 2:
            raise ValueError(f"linear_baseline_kernel={self.linear_baseline_kernel} needs crops larger than "
                             f"{self.linear_baseline_kernel // 2} pixels, got crop_size={self.crop_size}: pass a smaller "
                             "odd kernel or linear_baseline=False")
        if self.eval_scheduler not in ("ddim", "ddpm", "dpm"):
            raise ValueError(f"eval_scheduler must be 'ddim', 'ddpm' or 'dpm', got {self.eval_scheduler!r}")
        if self.timestep_spacing not in ("trailing", "leading", "linspace"):
            raise ValueError(f"timestep_spacing must be trailing, leading or linspace, got {self.timestep_spacing!r}")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {self.prediction_type!r}")
        if self.residual_scale <= 0:
            raise ValueError(f"residual_scale must be > 0, got {self.residual_scale}")
        if self.remove_unused_columns:
            raise ValueError("DREAMTrainingArguments needs remove_unused_columns=False (the collator reads images)")
        if self.load_best_model_at_end:
            raise ValueError("load_best_model_at_end is not supported by DREAMTrainer")
