"""SR3-style diffusion super-resolution as a diffusers ``DiffusionPipeline``."""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from .._registration import DIFFUSERS, when_imported
from ..diffusion.images import bicubic_downsample, bicubic_upsample

logger = logging.get_logger(__name__)

__all__ = ["SuperResolutionPipeline", "SuperResolutionPipelineOutput", "bicubic_upsample", "bicubic_downsample",
           "register_diffusers_pipeline", "REMOTE_CODE_FILE", "REMOTE_CLASS_NAME", "write_remote_code"]

# For users who do not import hf-align: diffusers' own convention for a pipeline class defined outside diffusers is a
# `pipeline.py` beside model_index.json whose `_class_name` is the pair ["pipeline", "SuperResolutionPipeline"]. Without
# hf-align imported, `DiffusionPipeline.from_pretrained(folder_or_repo)` then stops with diffusers' own message (the
# folder holds custom code: pass trust_remote_code=True) before any work, and with `trust_remote_code=True` it runs the
# file, which only imports the installed hf-align. After `import hf_align` the pair resolves to the installed class
# without running the file or asking for trust (see `register_diffusers_pipeline`).
REMOTE_CODE_FILE = "pipeline.py"
REMOTE_CLASS_NAME = ["pipeline", "SuperResolutionPipeline"]  # model_index.json's `_class_name`: [file, class]
_REMOTE_CODE = '''"""hf-align's super-resolution pipeline, for users who do not import hf-align:

    DiffusionPipeline.from_pretrained(<this folder or repo>, trust_remote_code=True)

This file only imports the installed hf-align package (pip install hf-align). With hf-align imported, prefer
`import hf_align; DiffusionPipeline.from_pretrained(<this folder or repo>)`, which runs no code from the repo and
needs no trust_remote_code.
"""

try:
    from hf_align.pipelines.super_resolution import SuperResolutionPipeline  # noqa: F401
except ImportError as error:
    raise ImportError(
        "This super-resolution pipeline is part of hf-align, which is not installed: pip install hf-align"
    ) from error
'''


def write_remote_code(folder) -> str:
    """Write :data:`REMOTE_CODE_FILE` and point ``model_index.json``'s ``_class_name`` at it
    (:data:`REMOTE_CLASS_NAME`), diffusers' layout for a pipeline class defined outside diffusers."""
    path = os.path.join(folder, REMOTE_CODE_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(_REMOTE_CODE)
    index = os.path.join(folder, "model_index.json")
    with open(index, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("_class_name") != REMOTE_CLASS_NAME:
        config["_class_name"] = list(REMOTE_CLASS_NAME)
        with open(index, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as diffusers' save_config writes it
    return path


def target_bound(residual: bool, residual_scale: float) -> float:
    """Largest |x0| the UNet diffuses: ``2 * residual_scale`` for residuals (``x - u`` lies in [-2, 2]), 1 for
    images in [-1, 1]."""
    return 2.0 * float(residual_scale) if residual else 1.0


def truncating_clip_range(scheduler_config, bound: float) -> float | None:
    """The scheduler's x0 clip range when it is smaller than ``bound`` (it would silently truncate targets;
    diffusers' default is [-1, 1]), else ``None``."""
    rng = float(scheduler_config.get("clip_sample_range", 1.0))
    return rng if scheduler_config.get("clip_sample", False) and rng < bound - 1e-12 else None


@dataclass
class SuperResolutionPipelineOutput(BaseOutput):
    """``images``: list of PIL images, a ``(B, H, W, C)`` numpy array or a ``(B, C, H, W)`` tensor in [0, 1]."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class SuperResolutionPipeline(DiffusionPipeline):
    """Super-resolve images with a UNet conditioned by channel concatenation (SR3).

    The low-resolution image ``y`` (in [-1, 1]) is up-sampled bicubically by ``scale_factor`` to ``u``; the UNet
    sees ``cat([x_t, u])`` (``in_channels = 2 * C``, ``out_channels = C``). Sampling runs the scheduler's reverse
    process from ``x_T ~ N(0, I)``. If ``residual`` is true the model diffuses ``r = residual_scale * (x - u)``
    (SRDiff/ResShift) and the output is ``u + r / residual_scale``; otherwise it diffuses the image ``x`` itself.

    Args:
        unet: a diffusers ``UNet2DModel`` with ``in_channels == 2 * out_channels``.
        scheduler: any diffusers scheduler (DDPM, DDIM, DPM-Solver, ...).
        scale_factor: the integer up-scaling factor (stored in ``model_index.json``).
        residual: whether the UNet was trained on the residual over the bicubic up-sample.
        residual_scale: the factor the residual was multiplied by in training.
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler,
        scale_factor: int = 4,
        residual: bool = True,
        residual_scale: float = 1.0,
    ):
        super().__init__()
        if int(scale_factor) != scale_factor or scale_factor < 1:
            raise ValueError(f"scale_factor must be a positive integer, got {scale_factor}")
        if residual_scale <= 0:
            raise ValueError(f"residual_scale must be > 0, got {residual_scale}")
        cfg = unet.config
        if cfg.in_channels != 2 * cfg.out_channels:
            raise ValueError(
                "SuperResolutionPipeline expects an SR3 UNet with in_channels == 2 * out_channels (noisy sample "
                f"concatenated with the up-sampled condition); got in_channels={cfg.in_channels}, "
                f"out_channels={cfg.out_channels}"
            )
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(scale_factor=int(scale_factor), residual=bool(residual),
                                residual_scale=float(residual_scale))
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    def _warn_if_scheduler_clips_targets(self) -> None:
        bound = target_bound(self.config.residual, self.config.residual_scale)
        rng = truncating_clip_range(self.scheduler.config, bound)
        if rng is not None:
            logger.warning(
                f"the scheduler clips the predicted x0 to [-{rng:g}, {rng:g}] but this pipeline's targets span "
                f"[-{bound:g}, {bound:g}]; large residuals are truncated. Set pipe.scheduler = "
                f"type(pipe.scheduler).from_config(pipe.scheduler.config, clip_sample_range={bound:g})."
            )

    # ------------------------------------------------------------------ inputs
    @property
    def image_channels(self) -> int:
        return int(self.unet.config.out_channels)

    def size_multiple(self) -> int:
        n_down = sum(1 for b in self.unet.down_blocks if getattr(b, "downsamplers", None))
        return 2**n_down

    def _to_tensor(self, image) -> torch.Tensor:
        """PIL / numpy / tensor (or a list of them) -> ``(B, C, h, w)`` float32 in [-1, 1]."""
        c = self.image_channels
        if isinstance(image, (list, tuple)):
            if len(image) == 0:
                raise ValueError("image is an empty list; pass at least one image")
            if all(isinstance(i, PIL.Image.Image) for i in image):
                parts = [self._to_tensor(i) for i in image]
                sizes = {tuple(p.shape[-2:]) for p in parts}
                if len(sizes) > 1:
                    raise ValueError(f"all images in a batch must have the same size, got {sorted(sizes)}")
                return torch.cat(parts)
            if all(isinstance(i, (np.ndarray, torch.Tensor)) for i in image):
                if all(isinstance(i, np.ndarray) for i in image):
                    return self._to_tensor(np.stack(image))
                return torch.cat([self._to_tensor(i if isinstance(i, torch.Tensor) else torch.from_numpy(i))
                                  for i in image])
            raise TypeError(f"a list of images must hold PIL images, numpy arrays or tensors, got "
                            f"{sorted({type(i).__name__ for i in image})}")
        if isinstance(image, PIL.Image.Image):
            mode = {1: "L", 3: "RGB"}.get(c)
            if mode is None:
                raise ValueError(f"the UNet works on {c}-channel images; pass numpy arrays or tensors, not PIL")
            arr = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
            if arr.ndim == 2:
                arr = arr[..., None]
            return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = image[..., None]
            if image.ndim == 3:
                image = image[None]
            if image.ndim != 4:
                raise ValueError(f"numpy images must be (H, W), (H, W, C) or (B, H, W, C); got shape {image.shape}")
            if image.shape[0] == 0:
                raise ValueError("image batch is empty; pass at least one image")
            if image.shape[-1] != c:
                raise ValueError(f"expected {c} channels last (B, H, W, {c}), got shape {image.shape}")
            if image.dtype == np.uint8:
                arr = image.astype(np.float32) / 255.0
            else:
                arr = image.astype(np.float32)
            return self._check_range(torch.from_numpy(arr).permute(0, 3, 1, 2)) * 2.0 - 1.0
        if isinstance(image, torch.Tensor):
            x = image
            if x.ndim == 3:
                x = x[None]
            if x.ndim != 4:
                raise ValueError(f"tensor images must be (C, H, W) or (B, C, H, W); got shape {tuple(image.shape)}")
            if x.shape[0] == 0:
                raise ValueError("image batch is empty; pass at least one image")
            if x.shape[1] != c:
                raise ValueError(f"expected {c} channels first (B, {c}, H, W), got shape {tuple(image.shape)}")
            return self._check_range(x.float()) * 2.0 - 1.0
        raise TypeError(f"image must be a PIL image, numpy array, torch tensor or a list of them; got "
                        f"{type(image).__name__}")

    @staticmethod
    def _check_range(x: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(x).all():
            raise ValueError("image contains NaN or inf values")
        if x.min() < -1e-3 or x.max() > 1 + 1e-3:
            raise ValueError(
                f"numpy/tensor images must be in [0, 1] (or uint8 numpy), got values in "
                f"[{float(x.min()):.3g}, {float(x.max()):.3g}]"
            )
        return x.clamp(0.0, 1.0)

    # ------------------------------------------------------------------ sharing
    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size=None, push_to_hub: bool = False, *, model_card: bool = True, card_data=None,
                        license: str | None = None, language=None, datasets=None, base_model=None, tags=None,
                        **kwargs):
        """diffusers' ``save_pretrained`` (safetensors) plus a model card (README.md; a README the user wrote is
        kept). ``DiffusionPipeline.from_pretrained(folder)`` loads the folder after ``import hf_align``; without it,
        ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` does (the folder's ``pipeline.py``,
        named by ``model_index.json``, only imports the installed hf-align).
        Card metadata: ``card_data`` and/or ``license``, ``language``, ``datasets``, ``base_model``, ``tags``."""
        from ..hub import super_resolution_card, user_metadata

        repo = kwargs.pop("_card_repo", None)
        card_extra = kwargs.pop("_card_extra", None) or {}
        metadata = user_metadata(card_data, license=license, language=language, datasets=datasets,
                                 base_model=base_model, tags=tags)
        if os.path.isfile(os.fspath(save_directory)):
            raise ValueError(f"save_directory must be a directory, got the file {os.fspath(save_directory)!r}")
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant,
                                max_shard_size=max_shard_size)
        write_remote_code(save_directory)
        if model_card:
            super_resolution_card(save_directory, self, metadata=metadata, repo=repo, **card_extra)
        if push_to_hub:
            return self.push_to_hub(kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory))),
                                    **kwargs, **metadata)
        return None

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, *, revision: str | None = None, commit_description: str | None = None,
                    **card_metadata: Any):
        """Push the pipeline (``model_index.json``, ``unet/``, ``scheduler/``) and its model card in one commit."""
        from ..hub import push_to_hub

        return push_to_hub(self, repo_id, default_message="Upload super-resolution pipeline",
                           save_kwargs={"safe_serialization": safe_serialization, "variant": variant},
                           commit_message=commit_message, commit_description=commit_description, private=private,
                           token=token, revision=revision, create_pr=create_pr, **card_metadata)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        eta: float | None = None,
    ):
        """Super-resolve ``image`` (low resolution) by ``scale_factor``.

        Args:
            image: a PIL image, a numpy array ``(H, W, C)``/``(B, H, W, C)`` (uint8 or float in [0, 1]), a tensor
                ``(C, H, W)``/``(B, C, H, W)`` in [0, 1], or a list of any of these (one batch).
            num_inference_steps: scheduler steps.
            generator: a ``torch.Generator`` (or one per image) for reproducible sampling.
            output_type: ``"pil"``, ``"np"`` (``(B, H, W, C)`` float in [0, 1]) or ``"pt"`` (``(B, C, H, W)``).
            eta: passed to ``scheduler.step`` when it takes one (DDIM).

        Returns:
            :class:`SuperResolutionPipelineOutput` (or a tuple ``(images,)`` if ``return_dict=False``).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        lr = self._to_tensor(image)
        batch = lr.shape[0]
        s = int(self.config.scale_factor)
        hr_h, hr_w = lr.shape[-2] * s, lr.shape[-1] * s
        m = self.size_multiple()
        if hr_h % m or hr_w % m:
            raise ValueError(
                f"the UNet down-samples by {m}, so the output size must be a multiple of {m}; input "
                f"{lr.shape[-2]}x{lr.shape[-1]} x{s} gives {hr_h}x{hr_w}. Pad or crop the input to a multiple of "
                f"{m // np.gcd(m, s)}."
            )
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} images")

        device = self._execution_device
        dtype = self.unet.dtype
        up = bicubic_upsample(lr, s).to(device=device, dtype=dtype)

        self._warn_if_scheduler_clips_targets()
        self.scheduler.set_timesteps(int(num_inference_steps), device=device)
        shape = (batch, self.image_channels, hr_h, hr_w)
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)
        step_kwargs = {}
        if eta is not None:
            step_kwargs["eta"] = eta
        if generator is not None:
            step_kwargs["generator"] = generator
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs = {k: v for k, v in step_kwargs.items() if k in accepted}

        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([self.scheduler.scale_model_input(x, t), up], dim=1)
            pred = self.unet(model_in, t).sample
            x = self.scheduler.step(pred, t, x, **step_kwargs).prev_sample

        if self.config.residual:
            out = up + x / float(self.config.residual_scale)
        else:
            out = x
        out = out.clamp(-1.0, 1.0).float()
        images = self.image_processor.postprocess(out, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return SuperResolutionPipelineOutput(images=images)


def _own_remote_entry(class_obj, config, custom_pipeline, class_name, trust_remote_code) -> bool:
    """Whether diffusers is resolving the ``pipeline.py`` entry hf-align writes (:data:`REMOTE_CLASS_NAME`), with no
    ``trust_remote_code`` and no other class asked for: then the installed class is the answer."""
    name = config.get("_class_name") if isinstance(config, dict) else None
    if trust_remote_code or not isinstance(name, (list, tuple)) or list(name) != REMOTE_CLASS_NAME:
        return False
    if class_name not in (None, REMOTE_CLASS_NAME[1]):
        return False
    if custom_pipeline is not None and os.path.basename(str(custom_pipeline)) not in ("pipeline", REMOTE_CODE_FILE):
        return False
    return class_obj is DiffusionPipeline or (isinstance(class_obj, type)
                                              and issubclass(class_obj, SuperResolutionPipeline))


def register_diffusers_pipeline() -> None:
    """Make ``DiffusionPipeline.from_pretrained(folder_or_id)`` find ``SuperResolutionPipeline`` (called by
    ``import hf_align``).

    - Folders saved by hf-align name the class by diffusers' [file, class] pair (:data:`REMOTE_CLASS_NAME`), which
      diffusers resolves by running ``pipeline.py`` when ``trust_remote_code=True``. After ``import hf_align``,
      diffusers' pipeline-class lookup (``pipeline_utils._get_pipeline_class``, used by ``from_pretrained`` and
      ``download``) returns the installed class for exactly that pair when trust was not given, so no file from the
      folder or repo runs and no trust is needed. Every other lookup goes to diffusers unchanged.
    - Older folders name the plain class, which diffusers looks up in its own namespace: the class is added there
      (an existing attribute of that name is kept)."""
    import diffusers
    from diffusers.pipelines import pipeline_utils

    if getattr(diffusers, "SuperResolutionPipeline", None) is None:
        diffusers.SuperResolutionPipeline = SuperResolutionPipeline
    original = pipeline_utils._get_pipeline_class
    if getattr(original, "_hf_align_wrapped", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _get_pipeline_class(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        a = bound.arguments
        if _own_remote_entry(a.get("class_obj"), a.get("config"), a.get("custom_pipeline"), a.get("class_name"),
                             a.get("trust_remote_code", False)):
            cls = a.get("class_obj")
            return cls if cls is not DiffusionPipeline else SuperResolutionPipeline
        return original(*args, **kwargs)

    _get_pipeline_class._hf_align_wrapped = True
    pipeline_utils._get_pipeline_class = _get_pipeline_class


# importing this module registers it: now, or once the target module is imported (it may be half-imported right now)
when_imported(DIFFUSERS, register_diffusers_pipeline)
