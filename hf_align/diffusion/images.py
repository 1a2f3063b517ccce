"""Image helpers shared by the DREAM trainer and the super-resolution pipeline: bicubic resampling of
``(B, C, H, W)`` tensors in [-1, 1] and conversion of user images to ``(C, H, W)`` tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

__all__ = ["bicubic_downsample", "bicubic_upsample"]


def bicubic_upsample(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Bicubic up-sampling of ``(B, C, h, w)`` to ``(B, C, s*h, s*w)`` (``align_corners=False``), clamped to [-1, 1]."""
    return F.interpolate(x, scale_factor=scale_factor, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def bicubic_downsample(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """Anti-aliased bicubic down-sampling (as PIL/MATLAB ``imresize``) of ``(B, C, H, W)`` by ``scale_factor``."""
    h, w = x.shape[-2:]
    if h % scale_factor or w % scale_factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the scale factor {scale_factor}")
    return F.interpolate(
        x, size=(h // scale_factor, w // scale_factor), mode="bicubic", align_corners=False, antialias=True
    ).clamp(-1.0, 1.0)


def _image_to_chw(img: Any, channels: int) -> torch.Tensor:
    """PIL image / HWC array (uint8 or float in [0, 1]) / nested list -> float32 ``(C, H, W)`` in [0, 1]."""
    if isinstance(img, PIL.Image.Image):
        img = np.asarray(img.convert("RGB" if channels == 3 else "L"))
    elif isinstance(img, torch.Tensor):
        img = img.numpy()
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"images must be (H, W) or (H, W, C), got shape {arr.shape}")
    if arr.shape[-1] != channels:
        if channels == 3 and arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        elif channels == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        else:
            raise ValueError(f"expected {channels}-channel images (H, W, {channels}), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    else:
        arr = arr.astype(np.float32)
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"float images must be in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
