"""Diffusion: DREAM training step and an SR UNet factory."""

from .dream import DREAMRectified, dream_lambda, dream_rectify, model_prediction
from .unet import sr_unet

__all__ = ["DREAMRectified", "dream_lambda", "dream_rectify", "model_prediction", "sr_unet"]
