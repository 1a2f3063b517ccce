"""Diffusion: DREAM training step, an SR UNet factory and the least-squares linear SR baseline."""

from .dream import DREAMRectified, dream_lambda, dream_rectify, model_prediction
from .linear_filter import LinearSRFilter
from .unet import sr_unet

__all__ = ["DREAMRectified", "LinearSRFilter", "dream_lambda", "dream_rectify", "model_prediction", "sr_unet"]
