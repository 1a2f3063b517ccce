"""DREAM: Diffusion Rectification and Estimation-Adaptive Models (Zhou et al., CVPR 2024, arXiv 2312.00210).

One training step of DREAM as a small pure function, in the style of diffusers' ``training_utils``.

With ``a_t = alphas_cumprod[t]`` and ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (the condition ``y`` is
either concatenated to the model input along channels, SR3-style, or passed as class labels / encoder
hidden states):

1. ``eps_hat = stopgrad(eps_theta(x_t, y, t))``  -- one extra forward, no grad, dropout off (``eval()``)
2. ``lambda_t = sqrt(1 - a_t) ** p``              -- ``p`` = detail preservation; ``p = inf`` is standard
                                                     training, ``p = 0`` full rectification
3. ``delta = lambda_t * (eps - eps_hat)``
4. ``x_hat_t = x_t + sqrt(1 - a_t) * delta``       -- rectified input
5. target (epsilon)  = ``eps + delta``
   target (v)        = ``v + sqrt(a_t) * delta``   with ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` and
                       ``eps_hat = sqrt(a_t) v_hat + sqrt(1 - a_t) x_t``
   target (sample)   = ``x0``                      with ``x_hat_t = x_t + lambda_t sqrt(a_t) (x0_hat - x0)``
                       (the same ``x_hat_t`` written without dividing by ``sqrt(1 - a_t)``)

All three parameterisations share one fact: ``x_hat_t = sqrt(a_t) x0 + sqrt(1 - a_t) (eps + delta)``, i.e.
the rectified input is the forward process driven by the rectified noise ``eps + delta``; each target is
that parameterisation's regression target for this rectified noise.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

__all__ = ["DREAMRectified", "dream_rectify", "dream_lambda", "model_prediction"]

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class DREAMRectified(NamedTuple):
    """What :func:`dream_rectify` returns.

    Attributes:
        model_input: the rectified input to feed the model, ``x_hat_t`` with the channel-concatenated
            condition appended when one was given (shape ``(B, C + C_cond, H, W)``), else ``x_hat_t``.
        target: the rectified regression target for the scheduler's ``prediction_type``.
    """

    model_input: torch.Tensor
    target: torch.Tensor


def _broadcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1))).to(dtype=like.dtype, device=like.device)


def dream_lambda(alphas_cumprod_t: torch.Tensor, detail_preservation: float) -> torch.Tensor:
    """``lambda_t = sqrt(1 - a_t) ** p``, computed in float64; ``p = inf`` gives exactly 0 (standard training)."""
    one_minus = (1.0 - alphas_cumprod_t.double()).clamp_min(0.0)
    if math.isinf(detail_preservation):
        return torch.zeros_like(one_minus)
    return one_minus.sqrt() ** float(detail_preservation)


def model_prediction(
    model: torch.nn.Module,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    condition: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run a diffusers UNet (or any module returning ``.sample`` or a tensor) on ``sample``.

    ``condition`` is concatenated along channels (SR3); ``class_labels`` and ``encoder_hidden_states``
    are passed as keyword arguments only when given, so ``UNet2DModel`` and ``UNet2DConditionModel``
    both work.
    """
    model_input = sample if condition is None else torch.cat([sample, condition], dim=1)
    kwargs = dict(model_kwargs or {})
    if class_labels is not None:
        kwargs["class_labels"] = class_labels
    if encoder_hidden_states is not None:
        kwargs["encoder_hidden_states"] = encoder_hidden_states
    out = model(model_input, timesteps, **kwargs)
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _check_inputs(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, condition) -> None:
    if not isinstance(x0, torch.Tensor) or not isinstance(noise, torch.Tensor):
        raise TypeError(f"x0 and noise must be torch.Tensor, got {type(x0).__name__} and {type(noise).__name__}")
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must have the same shape, got {tuple(x0.shape)} and {tuple(noise.shape)}")
    if x0.ndim < 2:
        raise ValueError(f"x0 must be batched (B, C, ...), got shape {tuple(x0.shape)}")
    if not isinstance(timesteps, torch.Tensor) or timesteps.ndim != 1 or timesteps.shape[0] != x0.shape[0]:
        raise ValueError(
            f"timesteps must be a 1-D tensor with one entry per sample ({x0.shape[0]}), got "
            f"{tuple(timesteps.shape) if isinstance(timesteps, torch.Tensor) else type(timesteps).__name__}"
        )
    if condition is not None:
        if condition.shape[0] != x0.shape[0] or condition.shape[2:] != x0.shape[2:]:
            raise ValueError(
                f"condition must match x0 in batch and spatial size for channel concatenation: "
                f"x0 {tuple(x0.shape)}, condition {tuple(condition.shape)}"
            )


def dream_rectify(
    model: torch.nn.Module,
    scheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    condition: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    detail_preservation: float = 1.0,
    prediction_type: str | None = None,
) -> DREAMRectified:
    """DREAM's rectified model input and target for one batch.

    Formulas (``a = alphas_cumprod[t]``, ``x_t = sqrt(a) x0 + sqrt(1-a) eps``, ``lambda = sqrt(1-a)**p``)::

        eps_hat  = stopgrad(eps_theta(x_t, y, t))           # no-grad estimate pass, model.eval()
        delta    = lambda * (eps - eps_hat)
        x_hat_t  = x_t + sqrt(1-a) * delta
        target   = eps + delta                  (epsilon)
                 = v + sqrt(a) * delta          (v_prediction, eps_hat = sqrt(a) v_hat + sqrt(1-a) x_t)
                 = x0                           (sample; x_hat_t = x_t + lambda sqrt(a) (x0_hat - x0))

    Args:
        model: a diffusers UNet (``UNet2DModel``, ``UNet2DConditionModel``) or any module called as
            ``model(input, t, **kwargs)`` returning ``.sample`` or a tensor.
        scheduler: a diffusers scheduler with ``alphas_cumprod`` and ``config.prediction_type``
            (DDPM, DDIM, ...).
        x0: clean data (or the residual being diffused), shape ``(B, C, ...)``.
        noise: the Gaussian noise ``eps`` used for ``x_t``, same shape as ``x0``.
        timesteps: integer timesteps, shape ``(B,)``.
        condition: optional tensor concatenated to the model input along channels (SR3: the
            bicubic-upsampled low-resolution image), shape ``(B, C_cond, ...)``.
        class_labels / encoder_hidden_states / model_kwargs: optional conditioning passed to the model.
        detail_preservation: the exponent ``p``; ``float("inf")`` returns standard training (no extra
            forward pass is run); ``0`` is full rectification. The paper uses 1.
        prediction_type: override ``scheduler.config.prediction_type``.

    Returns:
        :class:`DREAMRectified` ``(model_input, target)``: feed ``model_input`` to the model (with the same
        class labels / hidden states) and regress its output onto ``target``. Both carry no gradient.

    The model's training mode is switched off (``eval()``) for the estimate pass only and then restored,
    so dropout does not perturb ``eps_hat`` (as the official code does).
    """
    _check_inputs(x0, noise, timesteps, condition)
    p = float(detail_preservation)
    if math.isnan(p) or p < 0:
        raise ValueError(f"detail_preservation (p) must be >= 0 or inf, got {detail_preservation}")
    ptype = prediction_type or getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if ptype not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {ptype!r}")
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise TypeError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod; use e.g. DDPMScheduler")
    t_idx = timesteps.long().cpu()
    if t_idx.min() < 0 or t_idx.max() >= alphas_cumprod.shape[0]:
        raise ValueError(
            f"timesteps must lie in [0, {alphas_cumprod.shape[0] - 1}], got [{int(t_idx.min())}, {int(t_idx.max())}]"
        )

    a64 = alphas_cumprod.detach().cpu().double()[t_idx]  # (B,), float64 coefficients
    sqrt_a = _broadcast(a64.sqrt(), x0)
    sqrt_1ma = _broadcast((1.0 - a64).sqrt(), x0)
    lam = _broadcast(dream_lambda(a64, p), x0)

    x0 = x0.detach()
    noise = noise.detach()
    x_t = sqrt_a * x0 + sqrt_1ma * noise

    if ptype == "epsilon":
        standard_target = noise
    elif ptype == "v_prediction":
        standard_target = sqrt_a * noise - sqrt_1ma * x0
    else:
        standard_target = x0

    def _with_condition(x: torch.Tensor) -> torch.Tensor:
        return x if condition is None else torch.cat([x, condition.detach().to(x.dtype)], dim=1)

    if math.isinf(p):  # lambda = 0: standard training, skip the estimate pass entirely
        return DREAMRectified(_with_condition(x_t), standard_target)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pred = model_prediction(
                model,
                x_t,
                timesteps,
                condition=None if condition is None else condition.detach().to(x_t.dtype),
                class_labels=class_labels,
                encoder_hidden_states=encoder_hidden_states,
                model_kwargs=model_kwargs,
            ).detach()
    finally:
        model.train(was_training)
    if pred.shape != x0.shape:
        raise ValueError(
            f"model output shape {tuple(pred.shape)} does not match x0 {tuple(x0.shape)}; the UNet's "
            "out_channels must equal the channels of x0"
        )
    pred = pred.to(x0.dtype)

    if ptype == "sample":
        # x_hat_t = x_t + lambda * sqrt(a) * (x0_hat - x0); target stays x0
        x_hat = x_t + lam * sqrt_a * (pred - x0)
        return DREAMRectified(_with_condition(x_hat), x0)

    if ptype == "epsilon":
        eps_hat = pred
    else:  # v_prediction
        eps_hat = sqrt_a * pred + sqrt_1ma * x_t
    delta = lam * (noise - eps_hat)
    x_hat = x_t + sqrt_1ma * delta
    if ptype == "epsilon":
        target = noise + delta
    else:
        target = standard_target + sqrt_a * delta
    return DREAMRectified(_with_condition(x_hat), target)
