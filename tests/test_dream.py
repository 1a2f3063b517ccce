"""DREAM step: checked against float64 numpy formulas written here and against diffusers' implementation."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.training_utils import compute_dream_and_update_latents

from hf_align.diffusion import dream_rectify, sr_unet

B, C, H = 3, 3, 8


def _data(seed=0, cond_channels=C):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, H, H, generator=g) * 2 - 1
    noise = torch.randn(B, C, H, H, generator=g)
    cond = torch.rand(B, cond_channels, H, H, generator=g) * 2 - 1 if cond_channels else None
    t = torch.tensor([5, 400, 999])
    return x0, noise, cond, t


def _sched(ptype="epsilon"):
    return DDPMScheduler(num_train_timesteps=1000, prediction_type=ptype)


def _np(x):
    return x.detach().double().numpy()


def _reference(pred, x0, noise, t, sched, p, ptype):
    """Independent float64 numpy version of the formulas in PAPERS.md section 3 (paper form, with divisions)."""
    a = sched.alphas_cumprod.double().numpy()[t.numpy()][:, None, None, None]
    x0, eps, pred = _np(x0), _np(noise), _np(pred)
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    lam = np.sqrt(1 - a) ** p
    if ptype == "epsilon":
        eps_hat = pred
    elif ptype == "v_prediction":
        eps_hat = np.sqrt(a) * pred + np.sqrt(1 - a) * x_t
    else:  # sample: eps implied by the predicted x0
        eps_hat = (x_t - np.sqrt(a) * pred) / np.sqrt(1 - a)
    delta = lam * (eps - eps_hat)
    x_hat = x_t + np.sqrt(1 - a) * delta
    if ptype == "epsilon":
        target = eps + delta
    elif ptype == "v_prediction":
        target = (np.sqrt(a) * eps - np.sqrt(1 - a) * x0) + np.sqrt(a) * delta
    else:
        target = x0
    return x_t, x_hat, target


def _unet_pred(model, x_t_np, t, cond=None, **kw):
    """The model's own output on x_t (the estimate pass), in eval mode."""
    x = torch.from_numpy(x_t_np).float()
    if cond is not None:
        x = torch.cat([x, cond], 1)
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x, t, **kw).sample
    model.train(was)
    return out


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("p", [1.0, 0.0, 2.5])
def test_matches_independent_formulas_concat_condition(ptype, p):
    torch.manual_seed(0)
    model = sr_unet(image_channels=C, block_out_channels=(8, 16), norm_num_groups=4)
    sched = _sched(ptype)
    x0, noise, cond, t = _data()
    a = sched.alphas_cumprod.double().numpy()[t.numpy()][:, None, None, None]
    x_t = np.sqrt(a) * _np(x0) + np.sqrt(1 - a) * _np(noise)
    pred = _unet_pred(model, x_t, t, cond)
    _, x_hat_ref, target_ref = _reference(pred, x0, noise, t, sched, p, ptype)

    out = dream_rectify(model, sched, x0, noise, t, condition=cond, detail_preservation=p)
    assert out.model_input.shape == (B, 2 * C, H, H)
    np.testing.assert_allclose(_np(out.model_input[:, :C]), x_hat_ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(_np(out.model_input[:, C:]), _np(cond))
    np.testing.assert_allclose(_np(out.target), target_ref, atol=2e-5, rtol=1e-5)
    # the rectification really moved the input (the test is not vacuous)
    assert np.abs(_np(out.model_input[:, :C]) - x_t).max() > 1e-3
    # shared identity: x_hat = sqrt(a) x0 + sqrt(1-a) (eps + delta)
    if ptype == "epsilon":
        np.testing.assert_allclose(
            x_hat_ref, np.sqrt(a) * _np(x0) + np.sqrt(1 - a) * target_ref, atol=1e-10
        )


def test_equals_diffusers_unconditional_epsilon():
    torch.manual_seed(1)
    unet = UNet2DModel(
        sample_size=H, in_channels=C, out_channels=C, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, add_attention=False,
    ).eval()
    sched = _sched()
    x0, noise, _, t = _data(cond_channels=0)
    noisy = sched.add_noise(x0, noise, t)
    ref_in, ref_target = compute_dream_and_update_latents(unet, sched, t, noise, noisy, noise.clone(), None, 1.0)
    ours = dream_rectify(unet, sched, x0, noise, t, detail_preservation=1.0)
    torch.testing.assert_close(ours.model_input, ref_in, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.target, ref_target, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_p_inf_is_standard_training_and_skips_estimate(ptype):
    model = sr_unet(image_channels=C, block_out_channels=(8, 16), norm_num_groups=4)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    sched = _sched(ptype)
    x0, noise, cond, t = _data()
    out = dream_rectify(model, sched, x0, noise, t, condition=cond, detail_preservation=math.inf)
    assert calls == []  # no extra forward for standard training
    std_in = sched.add_noise(x0, noise, t)
    std_target = {"epsilon": noise, "v_prediction": sched.get_velocity(x0, noise, t), "sample": x0}[ptype]
    torch.testing.assert_close(out.model_input, torch.cat([std_in, cond], 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.target, std_target, atol=1e-6, rtol=1e-6)


def test_estimate_pass_is_eval_no_grad_and_mode_restored():
    torch.manual_seed(2)
    model = sr_unet(image_channels=C, block_out_channels=(8, 16), norm_num_groups=4, dropout=0.5)
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.is_grad_enabled())))
    sched = _sched()
    x0, noise, cond, t = _data()
    r1 = dream_rectify(model, sched, x0, noise, t, condition=cond)
    r2 = dream_rectify(model, sched, x0, noise, t, condition=cond)
    assert seen == [(False, False), (False, False)]
    assert model.training
    torch.testing.assert_close(r1.model_input, r2.model_input)  # dropout off -> deterministic estimate
    assert not r1.model_input.requires_grad and not r1.target.requires_grad
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    dream_rectify(model, sched, x0, noise, t, condition=cond)
    assert not model.training


def test_class_label_conditioning():
    torch.manual_seed(3)
    unet = UNet2DModel(
        sample_size=H, in_channels=C, out_channels=C, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, add_attention=False, num_class_embeds=4,
    )
    sched = _sched()
    x0, noise, _, t = _data(cond_channels=0)
    labels = torch.tensor([0, 1, 3])
    a = sched.alphas_cumprod.double().numpy()[t.numpy()][:, None, None, None]
    x_t = np.sqrt(a) * _np(x0) + np.sqrt(1 - a) * _np(noise)
    pred = _unet_pred(unet, x_t, t, class_labels=labels)
    _, x_hat_ref, target_ref = _reference(pred, x0, noise, t, sched, 1.0, "epsilon")
    out = dream_rectify(unet, sched, x0, noise, t, class_labels=labels)
    np.testing.assert_allclose(_np(out.model_input), x_hat_ref, atol=2e-5)
    np.testing.assert_allclose(_np(out.target), target_ref, atol=2e-5)
    other = dream_rectify(unet, sched, x0, noise, t, class_labels=torch.tensor([2, 2, 2]))
    assert (other.target - out.target).abs().max() > 1e-4  # labels really reached the model


def test_encoder_hidden_states_conditioning():
    torch.manual_seed(4)
    unet = UNet2DConditionModel(
        sample_size=H, in_channels=C, out_channels=C, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=8, attention_head_dim=2,
    )
    sched = _sched("v_prediction")
    x0, noise, _, t = _data(cond_channels=0)
    ehs = torch.randn(B, 5, 8, generator=torch.Generator().manual_seed(9))
    a = sched.alphas_cumprod.double().numpy()[t.numpy()][:, None, None, None]
    x_t = np.sqrt(a) * _np(x0) + np.sqrt(1 - a) * _np(noise)
    pred = _unet_pred(unet, x_t, t, encoder_hidden_states=ehs)
    _, x_hat_ref, target_ref = _reference(pred, x0, noise, t, sched, 1.0, "v_prediction")
    out = dream_rectify(unet, sched, x0, noise, t, encoder_hidden_states=ehs)
    np.testing.assert_allclose(_np(out.model_input), x_hat_ref, atol=2e-5)
    np.testing.assert_allclose(_np(out.target), target_ref, atol=2e-5)


def test_bad_inputs_raise_clear_errors():
    model = sr_unet(image_channels=C, block_out_channels=(8, 16), norm_num_groups=4)
    sched = _sched()
    x0, noise, cond, t = _data()
    with pytest.raises(ValueError, match="same shape"):
        dream_rectify(model, sched, x0, noise[:, :2], t, condition=cond)
    with pytest.raises(ValueError, match="detail_preservation"):
        dream_rectify(model, sched, x0, noise, t, condition=cond, detail_preservation=-1)
    with pytest.raises(ValueError, match="prediction_type"):
        dream_rectify(model, sched, x0, noise, t, condition=cond, prediction_type="flow")
    with pytest.raises(ValueError, match="timesteps"):
        dream_rectify(model, sched, x0, noise, torch.tensor([0, 1, 1000]), condition=cond)
    with pytest.raises(ValueError, match="condition"):
        dream_rectify(model, sched, x0, noise, t, condition=cond[:, :, :4])
    with pytest.raises(ValueError, match="out_channels"):
        # an unconditional 3->3 net fed a 6-channel input is a model/channels mismatch
        dream_rectify(sr_unet(image_channels=6, block_out_channels=(8, 16), norm_num_groups=4), sched, x0, noise, t,
                      condition=torch.cat([cond, cond, cond], 1))
