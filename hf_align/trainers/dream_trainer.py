"""DREAMTrainer: a ``transformers.Trainer`` that trains a diffusers UNet for SR3-style super-resolution with DREAM.

Per step (``a = alphas_cumprod[t]``; ``up = bicubic_up(bicubic_down(hr))``)::

    x0          = residual_scale * (hr - up)      if residual else hr
    x_hat, tgt  = dream_rectify(unet, scheduler, x0, eps, t, condition=up, detail_preservation=p)
    loss        = mean |tgt - unet(cat[x_hat, up], t)|      (l1)   or   mean (...)**2  (mse)

``p = inf`` is standard diffusion training (no extra forward), so the same trainer gives the baseline.
Evaluation samples held-out crops with a few-step scheduler through :class:`SuperResolutionPipeline` (EMA weights
when kept) and reports PSNR and SSIM from scikit-image, beside the bicubic up-sample and a least-squares linear
filter fitted on the training data (:class:`~hf_align.diffusion.linear_filter.LinearSRFilter`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from transformers import Trainer, TrainerCallback

from hf_align.diffusion.dream import dream_rectify
from hf_align.diffusion.images import _image_to_chw, bicubic_downsample, bicubic_upsample
from hf_align.diffusion.linear_filter import LinearSRFilter
from hf_align.pipelines.super_resolution import SuperResolutionPipeline, target_bound, truncating_clip_range

from .dream_config import DREAMTrainingArguments

__all__ = ["DREAMTrainer", "SRPairCollator", "EMACallback", "sr_metrics", "target_range", "gradient_energy",
           "CROP_SAMPLING"]

_EMA_STATE = "ema_state.json"
_TRAIN_UNET = "unet_train"
_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _column(features: list[dict[str, Any]], column: str) -> list[Any]:
    """The images of a batch of dataset rows, with a clear error for an empty batch or a missing column."""
    if len(features) == 0:
        raise ValueError("empty batch")
    if column not in features[0]:
        raise KeyError(f"column {column!r} not in dataset features {sorted(features[0])}")
    return [f[column] for f in features]


CROP_SAMPLING = ("gradient", "uniform")


def gradient_energy(crop: np.ndarray) -> float:
    """Mean squared finite difference of an ``(H, W, C)`` crop in [0, 1]:
    ``E = (mean (x[i+1, j] - x[i, j])^2 + mean (x[i, j+1] - x[i, j])^2) / 2`` over pixels and channels, in float64.
    0 for a flat crop; what bicubic up-sampling cannot restore grows with it."""
    x = np.asarray(crop, dtype=np.float64)
    return float(0.5 * (np.mean(np.diff(x, axis=0) ** 2) + np.mean(np.diff(x, axis=1) ** 2)))


class SRPairCollator:
    """Make (LR, HR) pairs on the fly: a crop of ``crop_size`` (random, or centred when ``random_crop=False``),
    HR in [-1, 1], LR = anti-aliased bicubic down-sample by ``scale_factor``, ``up`` = bicubic up-sample of LR.

    Random crops (``crop_sampling``):

    - ``"gradient"`` (the trainer's default): ``crop_candidates`` uniformly placed candidates are drawn and one is
      kept with probability ``p_i = E_i / sum_j E_j``, ``E`` = :func:`gradient_energy` (uniform among them if all
      are flat). Flat crops (sky, water, bokeh) are rarely trained on, textured ones more often, and every crop
      still has a chance: with n candidates a crop's probability rises from the uniform ``q`` to at most ``n q``.
    - ``"uniform"``: one uniformly placed crop.

    Returns ``{"hr": (B, C, S, S), "lr": (B, C, S/s, S/s), "up": (B, C, S, S)}``. Random crops draw from
    ``generator`` when one is given (``collator(features, generator=g)`` or :meth:`pairs`), else from torch's
    global RNG. :class:`DREAMTrainer` crops inside its training step with a generator seeded per step, so that
    resuming from a checkpoint repeats the uninterrupted run exactly.
    """

    def __init__(self, crop_size: int, scale_factor: int, image_column: str = "image", random_crop: bool = True,
                 channels: int = 3, crop_sampling: str = "uniform", crop_candidates: int = 8):
        if crop_size % scale_factor:
            raise ValueError(f"crop_size ({crop_size}) must be divisible by scale_factor ({scale_factor})")
        if crop_sampling not in CROP_SAMPLING:
            raise ValueError(f"crop_sampling must be one of {CROP_SAMPLING}, got {crop_sampling!r}")
        if isinstance(crop_candidates, bool) or not isinstance(crop_candidates, int) or crop_candidates < 1:
            raise ValueError(f"crop_candidates must be a positive int, got {crop_candidates!r}")
        self.crop_size, self.scale_factor = int(crop_size), int(scale_factor)
        self.image_column, self.random_crop, self.channels = image_column, random_crop, channels
        self.crop_sampling, self.crop_candidates = crop_sampling, int(crop_candidates)

    def _crop(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        s = self.crop_size
        if isinstance(img, PIL.Image.Image):
            w, h = img.size
        else:
            shape = np.shape(img) if not isinstance(img, torch.Tensor) else tuple(img.shape)
            h, w = shape[0], shape[1]
        if h < s or w < s:
            raise ValueError(f"image of size {h}x{w} is smaller than crop_size={s}")
        if not self.random_crop:
            top, left = (h - s) // 2, (w - s) // 2
            return self._cut(img, top, left)
        n = self.crop_candidates if self.crop_sampling == "gradient" else 1
        places = [(int(torch.randint(0, h - s + 1, (), generator=generator).item()),
                   int(torch.randint(0, w - s + 1, (), generator=generator).item())) for _ in range(n)]
        if n == 1:
            return self._cut(img, *places[0])
        crops = [self._cut(img, top, left) for top, left in places]
        energy = torch.tensor([gradient_energy(c.permute(1, 2, 0).numpy()) for c in crops], dtype=torch.float64)
        weights = energy if float(energy.sum()) > 0 else torch.ones(n, dtype=torch.float64)
        return crops[int(torch.multinomial(weights, 1, generator=generator).item())]

    def _cut(self, img: Any, top: int, left: int) -> torch.Tensor:
        s = self.crop_size
        if isinstance(img, PIL.Image.Image):
            return _image_to_chw(img.crop((left, top, left + s, top + s)), self.channels)
        return _image_to_chw(np.asarray(img)[top : top + s, left : left + s], self.channels)

    def __call__(self, features: list[dict[str, Any]], generator: torch.Generator | None = None
                 ) -> dict[str, torch.Tensor]:
        return self.pairs(_column(features, self.image_column), generator)

    def pairs(self, images: list[Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Crop ``images`` (PIL / HWC arrays / ``(C, H, W)`` tensors in [0, 1]) and build the (LR, HR, up) batch."""
        hr = torch.stack([self._crop(self._hwc(img), generator) for img in images]) * 2.0 - 1.0
        lr = bicubic_downsample(hr, self.scale_factor)
        up = bicubic_upsample(lr, self.scale_factor)
        return {"hr": hr, "lr": lr, "up": up}

    def _hwc(self, img: Any) -> Any:
        if isinstance(img, torch.Tensor) and img.ndim == 3 and img.shape[0] == self.channels:
            return img.permute(1, 2, 0).numpy()  # (C, H, W) from the deferred-crop collator
        return img


class _UncroppedImages:
    """The trainer's default training collator: only decodes the images (``{"images": [(C, H, W) in [0, 1]]}``);
    the random crops are drawn in :meth:`DREAMTrainer.training_step` from a generator seeded per step."""

    def __init__(self, image_column: str, channels: int):
        self.image_column, self.channels = image_column, channels

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, list[torch.Tensor]]:
        return {"images": [_image_to_chw(img, self.channels) for img in _column(features, self.image_column)]}


def sr_metrics(sr: np.ndarray, hr: np.ndarray) -> tuple[float, float]:
    """Mean PSNR and SSIM (scikit-image; data range 1, Gaussian window sigma 1.5 as the paper) over a batch of
    ``(B, H, W, C)`` images in [0, 1], accumulated in float64."""
    psnr, ssim = [], []
    for a, b in zip(sr.astype(np.float64), hr.astype(np.float64)):
        psnr.append(peak_signal_noise_ratio(b, a, data_range=1.0))
        ssim.append(structural_similarity(b, a, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False))
    return float(np.mean(psnr)), float(np.mean(ssim))


def target_range(args: DREAMTrainingArguments) -> float:
    """Largest |x0| the UNet is trained on (:func:`~hf_align.pipelines.super_resolution.target_bound`)."""
    return target_bound(args.residual, args.residual_scale)


def check_scheduler_range(config, bound: float, name: str) -> None:
    """Refuse a scheduler that clips the predicted x0 to less than the target range (it would silently truncate
    residual targets in sampling)."""
    rng = truncating_clip_range(config, bound)
    if rng is not None:
        raise ValueError(
            f"{name} clips the predicted x0 to [-{rng:g}, {rng:g}] but the targets span [-{bound:g}, {bound:g}] "
            f"(2 * residual_scale for residuals): pass clip_sample=False or clip_sample_range >= {bound:g} to the "
            "scheduler"
        )


class EMACallback(TrainerCallback):
    """Update a diffusers ``EMAModel`` after every optimizer step."""

    def __init__(self, ema: EMAModel, trainer: DREAMTrainer):
        self.ema, self.trainer = ema, trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.ema.to(device=self.trainer._unet().device)

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.step(self.trainer._unet().parameters())


class DREAMTrainer(Trainer):
    """Train a diffusers ``UNet2DModel`` (``in_channels = 2 * out_channels``, SR3 concat) with DREAM.

    Args:
        model: the UNet (e.g. :func:`hf_align.diffusion.sr_unet`).
        args: :class:`DREAMTrainingArguments`.
        train_dataset / eval_dataset: ``datasets.Dataset`` with an image column (PIL or HWC arrays); images
            are cropped (``args.crop_sampling``: gradient-energy sampling by default) and down-sampled on the fly
            by :class:`SRPairCollator` inside the training step, from a generator seeded per step
            (:meth:`step_generator`), so resuming is exact; centre crops for evaluation, where the linear
            baseline (:meth:`fit_linear_baseline`) is reported beside bicubic.
        noise_scheduler: the training scheduler (default: a ``DDPMScheduler`` built from ``args``, clipping x0 to
            the target range :func:`target_range` and with ``args.timestep_spacing``; one that clips to less is
            refused).
    Other keyword arguments go to ``transformers.Trainer``.

    Checkpoints are :class:`SuperResolutionPipeline` folders (``model_index.json``, ``unet/`` with the EMA
    weights when kept, ``scheduler/``), plus ``unet_train/`` (the raw weights) and ``ema_state.json``.
    """

    def __init__(self, model=None, args: DREAMTrainingArguments | None = None, train_dataset=None,
                 eval_dataset=None, noise_scheduler=None, data_collator=None, **kwargs):
        if args is None:
            raise ValueError("DREAMTrainer needs args=DREAMTrainingArguments(...)")
        if not isinstance(args, DREAMTrainingArguments):
            raise TypeError(f"args must be DREAMTrainingArguments, got {type(args).__name__}")
        if model is None or not hasattr(model, "config") or not hasattr(model.config, "in_channels"):
            raise TypeError("model must be a diffusers UNet2DModel (see hf_align.diffusion.sr_unet)")
        if model.config.in_channels != 2 * model.config.out_channels:
            raise ValueError(
                f"the UNet must take the noisy sample concatenated with the condition: in_channels == "
                f"2 * out_channels, got {model.config.in_channels} and {model.config.out_channels}"
            )
        self.image_channels = int(model.config.out_channels)
        if noise_scheduler is None:
            noise_scheduler = DDPMScheduler(
                num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                beta_start=args.beta_start, beta_end=args.beta_end, prediction_type=args.prediction_type,
                clip_sample=True, clip_sample_range=target_range(args), timestep_spacing=args.timestep_spacing,
            )
        check_scheduler_range(noise_scheduler.config, target_range(args), "noise_scheduler")
        self.noise_scheduler = noise_scheduler
        self.pair_collator = SRPairCollator(args.crop_size, args.scale_factor, args.image_column, True,
                                            self.image_channels, crop_sampling=args.crop_sampling,
                                            crop_candidates=args.crop_candidates)
        if data_collator is None:
            data_collator = _UncroppedImages(args.image_column, self.image_channels)
        self.eval_collator = SRPairCollator(args.crop_size, args.scale_factor, args.image_column, False,
                                            self.image_channels)
        self.ema = None
        if args.use_ema:
            self.ema = EMAModel(model.parameters(), decay=args.ema_decay, use_ema_warmup=args.ema_use_warmup,
                                inv_gamma=args.ema_inv_gamma, power=args.ema_power, model_cls=type(model),
                                model_config=model.config)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=data_collator, **kwargs)
        if self.ema is not None:
            self.add_callback(EMACallback(self.ema, self))
        self.train_wall_time = 0.0  # seconds spent in training steps only (no evaluation), for wall-clock plots
        self.linear_filter: LinearSRFilter | None = None  # fitted on first use (fit_linear_baseline)
        self._step_rng: torch.Generator | None = None
        self._rng_step = (-1, 0)  # (global_step, micro-batch index) of the last seeded generator

    # ------------------------------------------------------------------ helpers
    def _unet(self):
        return self.accelerator.unwrap_model(self.model)

    def step_generator(self) -> torch.Generator:
        """The CPU generator of this micro-batch: seeded from ``(args.seed, global_step, micro-batch index,
        process index)`` so that crops, timesteps and noise depend only on the step, not on RNG history, and a
        run resumed from a checkpoint draws exactly what the uninterrupted run drew."""
        step = int(self.state.global_step)
        micro = self._rng_step[1] + 1 if self._rng_step[0] == step else 0
        self._rng_step = (step, micro)
        seed = np.random.SeedSequence([int(self.args.seed), step, micro, int(self.args.process_index)])
        self._step_rng = torch.Generator(device="cpu").manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))
        return self._step_rng

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        gen = self.step_generator()
        if "images" in inputs and "hr" not in inputs:  # the default collator defers the random crops to here
            inputs = self._prepare_inputs(self.pair_collator.pairs([im.cpu() for im in inputs["images"]], gen))
        out = super().training_step(model, inputs, num_items_in_batch)
        self.train_wall_time += time.perf_counter() - start
        return out

    def model_input_target(self, model, inputs: dict[str, torch.Tensor]):
        """Draw ``(t, eps)`` and return ``(model_input, target, t)`` after DREAM rectification."""
        args: DREAMTrainingArguments = self.args
        hr, up = inputs["hr"], inputs["up"]
        x0 = args.residual_scale * (hr - up) if args.residual else hr
        gen = self._step_rng if model.training and self._step_rng is not None else None
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],),
                          generator=gen).to(x0.device)
        rect = dream_rectify(model, self.noise_scheduler, x0, noise, t, condition=up,
                             detail_preservation=args.dream_detail_preservation)
        return rect.model_input, rect.target, t

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_input, target, t = self.model_input_target(model, inputs)
        pred = model(model_input, t).sample
        if self.args.loss_type == "l1":
            loss = F.l1_loss(pred.float(), target.float())
        else:
            loss = F.mse_loss(pred.float(), target.float())
        return (loss, pred) if return_outputs else loss

    def pipeline(self, scheduler: str | None = None) -> SuperResolutionPipeline:
        """A :class:`SuperResolutionPipeline` around the current (raw) UNet and a sampler built from the training
        scheduler's config (``'ddim'``, ``'ddpm'`` or ``'dpm'``). Use :meth:`ema_weights` for the EMA weights."""
        name = scheduler or self.args.eval_scheduler
        cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}.get(name)
        if cls is None:
            raise ValueError(f"scheduler must be 'ddim', 'ddpm' or 'dpm', got {name!r}")
        sched = cls.from_config(self.noise_scheduler.config)
        pipe = SuperResolutionPipeline(self._unet(), sched, scale_factor=self.args.scale_factor,
                                       residual=self.args.residual, residual_scale=self.args.residual_scale)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    class _EMAWeights:
        def __init__(self, trainer):
            self.trainer = trainer

        def __enter__(self):
            ema = self.trainer.ema
            if ema is not None:
                params = list(self.trainer._unet().parameters())
                ema.store(params)
                ema.copy_to(params)

        def __exit__(self, *exc):
            if self.trainer.ema is not None:
                self.trainer.ema.restore(list(self.trainer._unet().parameters()))

    def ema_weights(self):
        """Context manager: the UNet holds the EMA weights inside (no-op without EMA)."""
        return self._EMAWeights(self)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def fit_linear_baseline(self, dataset=None) -> LinearSRFilter:
        """Fit the linear baseline (:class:`~hf_align.diffusion.linear_filter.LinearSRFilter`, kernel
        ``args.linear_baseline_kernel``) on ``args.linear_baseline_crops`` uniform random crops of ``dataset``
        (default: the training set), drawn from a generator seeded by ``args.seed`` alone, so the fit is the same
        whenever it happens and the training step's RNG is untouched. Kept as ``self.linear_filter``."""
        args: DREAMTrainingArguments = self.args
        ds = dataset if dataset is not None else self.train_dataset
        if ds is None or not hasattr(ds, "__len__") or len(ds) == 0:
            raise ValueError("the linear baseline is fitted on a map-style training dataset with at least one row")
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(args.seed), 0x11AEA5]).generate_state(1)[0]))
        uniform = SRPairCollator(args.crop_size, args.scale_factor, args.image_column, True, self.image_channels,
                                 crop_sampling="uniform")
        rows = torch.randint(0, len(ds), (int(args.linear_baseline_crops),), generator=gen).tolist()

        def batches(size=32):
            for start in range(0, len(rows), size):
                images = _column([ds[i] for i in rows[start : start + size]], args.image_column)
                yield uniform.pairs(images, gen)["hr"]

        self.linear_filter = LinearSRFilter.fit(batches(), args.scale_factor, args.linear_baseline_kernel)
        return self.linear_filter

    @torch.no_grad()
    def evaluate_sr(self, eval_dataset=None, num_inference_steps: int | None = None, scheduler: str | None = None,
                    max_samples: int | None = None, use_ema: bool = True) -> dict[str, float]:
        """Sample SR images for the eval crops and return PSNR/SSIM of the model, of bicubic and (with
        ``args.linear_baseline`` and a map-style training set) of the linear baseline, fitted on first use; no
        logging."""
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("no eval_dataset given to evaluate")
        n = len(ds) if max_samples is None else min(len(ds), int(max_samples))
        if n == 0:
            raise ValueError("eval_dataset is empty")
        steps = int(num_inference_steps or self.args.eval_num_inference_steps)
        linear = self.linear_filter
        if linear is None and self.args.linear_baseline and hasattr(self.train_dataset, "__len__"):
            linear = self.fit_linear_baseline()
        pipe = self.pipeline(scheduler)
        unet = self._unet()
        was_training = unet.training
        unet.eval()
        gen = torch.Generator(device="cpu").manual_seed(self.args.eval_seed)
        bs = self.args.per_device_eval_batch_size
        sr_all, hr_all, up_all, lin_all = [], [], [], []
        ctx = self.ema_weights() if use_ema else contextlib.nullcontext()
        try:
            with ctx:
                for start in range(0, n, bs):
                    batch = self.eval_collator([ds[i] for i in range(start, min(n, start + bs))])
                    lr01 = ((batch["lr"] + 1) / 2).clamp(0, 1)
                    sr_all.append(pipe(lr01, num_inference_steps=steps, generator=gen, output_type="np").images)
                    hr_all.append(((batch["hr"] + 1) / 2).permute(0, 2, 3, 1).numpy())
                    up_all.append(((batch["up"] + 1) / 2).permute(0, 2, 3, 1).numpy())
                    if linear is not None:
                        lin_all.append(((linear(batch["up"]) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy())
        finally:
            unet.train(was_training)
        sr, hr, up = np.concatenate(sr_all), np.concatenate(hr_all), np.concatenate(up_all)
        psnr, ssim = sr_metrics(sr, hr)
        bpsnr, bssim = sr_metrics(up, hr)
        out = {"psnr": psnr, "ssim": ssim, "bicubic_psnr": bpsnr, "bicubic_ssim": bssim}
        if lin_all:
            out["linear_psnr"], out["linear_ssim"] = sr_metrics(np.concatenate(lin_all), hr)
        return {**out, "num_samples": n, "num_inference_steps": steps}

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval",
                 num_inference_steps: int | None = None):
        """Sample the eval crops with ``args.eval_scheduler`` for ``args.eval_num_inference_steps`` steps and log
        ``{prefix}_psnr``, ``{prefix}_ssim``, ``{prefix}_bicubic_psnr``, ``{prefix}_bicubic_ssim`` and, with the
        linear baseline, ``{prefix}_linear_psnr``, ``{prefix}_linear_ssim``."""
        start = time.time()
        res = self.evaluate_sr(eval_dataset, num_inference_steps=num_inference_steps,
                               max_samples=self.args.eval_max_samples)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in res.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save a :class:`SuperResolutionPipeline` (EMA weights in ``unet/`` when kept, raw in ``unet_train/``)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        unet = self._unet()
        pipe = SuperResolutionPipeline(unet, DDPMScheduler.from_config(self.noise_scheduler.config),
                                       scale_factor=self.args.scale_factor, residual=self.args.residual,
                                       residual_scale=self.args.residual_scale)
        card = self._card_kwargs()
        if self.ema is not None:
            unet.save_pretrained(os.path.join(output_dir, _TRAIN_UNET))
            with self.ema_weights():
                pipe.save_pretrained(output_dir, **card)
            with open(os.path.join(output_dir, _EMA_STATE), "w") as f:
                json.dump({"optimization_step": int(self.ema.optimization_step), "decay": float(self.ema.decay)}, f)
        else:
            pipe.save_pretrained(output_dir, **card)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())

    def _card_kwargs(self) -> dict[str, Any]:
        """What the saved pipeline's model card shows: the latest PSNR/SSIM, the DREAM recipe, the user metadata."""
        metrics = {}
        for entry in reversed(self.state.log_history):
            if "eval_psnr" in entry:
                metrics = {k[len("eval_"):]: v for k, v in entry.items() if k.startswith("eval_")}
                break
        args = self.args
        recipe = {"dream_detail_preservation": args.dream_detail_preservation, "loss_type": args.loss_type,
                  "residual": args.residual, "residual_scale": args.residual_scale, "crop_size": args.crop_size,
                  "crop_sampling": args.crop_sampling,
                  "learning_rate": args.learning_rate, "train_batch_size": args.per_device_train_batch_size,
                  "global_step": self.state.global_step, "use_ema": args.use_ema,
                  "num_train_timesteps": self.noise_scheduler.config.num_train_timesteps,
                  "eval_sampler": f"{args.eval_scheduler}, {args.eval_num_inference_steps} steps"}
        repo = self.hub_model_id if getattr(self, "hub_model_id", None) else None
        return {"_card_extra": {"metrics": metrics or None, "recipe": recipe}, "_card_repo": repo,
                "card_data": getattr(self, "_card_metadata", None) or None}

    def create_model_card(self, language: str | None = None, license: str | None = None, tags=None,
                          model_name: str | None = None, finetuned_from: str | None = None, tasks=None,
                          dataset_tags=None, dataset=None, dataset_args=None, *, datasets=None, base_model=None,
                          card_data=None) -> None:
        """Write the super-resolution model card into ``args.output_dir`` (``Trainer.push_to_hub`` calls this with
        its keyword arguments: ``license``, ``language``, ``dataset``, ``finetuned_from``, ``tags``...). The metadata
        is kept by later saves."""
        from ..hub import super_resolution_card, user_metadata

        datasets = datasets if datasets is not None else (dataset if dataset is not None else dataset_tags)
        self._card_metadata = {**getattr(self, "_card_metadata", {}),
                               **user_metadata(card_data, license=license, language=language, datasets=datasets,
                                               base_model=base_model or finetuned_from, tags=tags,
                                               model_name=model_name)}
        if not self.is_world_process_zero():
            return
        card = self._card_kwargs()
        pipe = self.pipeline("ddpm")
        super_resolution_card(self.args.output_dir, pipe, metadata=self._card_metadata, repo=card["_card_repo"],
                              **card["_card_extra"])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume from a folder written by :meth:`_save` (safetensors only)."""
        model = self._unet() if model is None else model
        train_path = os.path.join(resume_from_checkpoint, _TRAIN_UNET, _WEIGHTS)
        ema_path = os.path.join(resume_from_checkpoint, "unet", _WEIGHTS)
        if not os.path.isfile(ema_path):
            raise ValueError(f"no diffusers UNet found in {resume_from_checkpoint} (expected unet/{_WEIGHTS})")
        raw = load_file(train_path if os.path.isfile(train_path) else ema_path)
        model.load_state_dict(raw)
        if self.ema is not None:
            ema_sd = load_file(ema_path)
            names = [name for name, _ in model.named_parameters()]
            self.ema.shadow_params = [ema_sd[name].clone().to(p.device) for name, p in zip(names, model.parameters())]
            state_file = os.path.join(resume_from_checkpoint, _EMA_STATE)
            if os.path.isfile(state_file):
                with open(state_file) as f:
                    self.ema.optimization_step = json.load(f)["optimization_step"]

    def _load_rng_state(self, checkpoint):  # rng_state.pth is pickled; fall back to the Trainer's seed instead
        if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, "rng_state.pth")):
            return
        super()._load_rng_state(checkpoint)
