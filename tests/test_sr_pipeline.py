"""SuperResolutionPipeline: IO formats, schedulers, save/reload determinism, errors."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from hf_align.diffusion import sr_unet
from hf_align.pipelines.super_resolution import SuperResolutionPipeline


def _pipe(scale=4, residual=True, blocks=(8, 16, 16), sched=None, residual_scale=1.0):
    torch.manual_seed(0)
    unet = sr_unet(image_channels=3, block_out_channels=blocks, norm_num_groups=4)
    p = SuperResolutionPipeline(unet, sched or DDPMScheduler(num_train_timesteps=100), scale_factor=scale,
                                residual=residual, residual_scale=residual_scale)
    p.set_progress_bar_config(disable=True)
    return p


def _lr(b=2, h=8, seed=0):
    return np.random.default_rng(seed).random((b, h, h, 3)).astype(np.float32)


def test_output_is_scale_times_input_for_all_input_types():
    pipe = _pipe(scale=4)
    x = _lr(b=2, h=8)
    g = lambda: torch.Generator().manual_seed(0)
    out_pil = pipe(x, num_inference_steps=2, generator=g()).images
    assert len(out_pil) == 2 and all(isinstance(i, PIL.Image.Image) and i.size == (32, 32) for i in out_pil)
    out_np = pipe(x, num_inference_steps=2, generator=g(), output_type="np").images
    assert out_np.shape == (2, 32, 32, 3) and out_np.min() >= 0 and out_np.max() <= 1
    out_pt = pipe(torch.from_numpy(x).permute(0, 3, 1, 2), num_inference_steps=2, generator=g(), output_type="pt").images
    assert out_pt.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(out_pt.permute(0, 2, 3, 1).numpy(), out_np, atol=1e-6)  # same input, same draw
    pil_in = [PIL.Image.fromarray((x[i] * 255).astype(np.uint8)) for i in range(2)]
    out = pipe(pil_in, num_inference_steps=2, generator=g(), output_type="np").images
    assert out.shape == (2, 32, 32, 3)
    gray = PIL.Image.fromarray((x[0, :, :, 0] * 255).astype(np.uint8), mode="L").resize((12, 8))
    assert pipe(gray, num_inference_steps=1).images[0].size == (48, 32)  # non-square, grey -> RGB


def test_zero_residual_model_returns_bicubic_upsample():
    """A model predicting x0 = 0 for the residual must give exactly the bicubic up-sample (reference: F.interpolate)."""
    pipe = _pipe(scale=4, residual=True, sched=DDIMScheduler(num_train_timesteps=100, prediction_type="sample"))
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    x = _lr(b=3, h=8)
    out = pipe(x, num_inference_steps=4, output_type="np").images
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).double() * 2 - 1, scale_factor=4, mode="bicubic",
                        align_corners=False).clamp(-1, 1)
    ref = ((ref + 1) / 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    pipe_img = _pipe(scale=4, residual=False, sched=DDIMScheduler(num_train_timesteps=100, prediction_type="sample"))
    torch.nn.init.zeros_(pipe_img.unet.conv_out.weight)
    torch.nn.init.zeros_(pipe_img.unet.conv_out.bias)
    np.testing.assert_allclose(pipe_img(x, num_inference_steps=4, output_type="np").images, 0.5, atol=1e-6)


def test_any_scheduler_runs():
    x = _lr(b=1, h=8)
    outs = []
    for sched_cls in (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler):
        pipe = _pipe(scale=2, sched=sched_cls(num_train_timesteps=100))
        outs.append(pipe(x, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images)
        assert outs[-1].shape == (1, 16, 16, 3)
    assert np.abs(outs[0] - outs[1]).max() > 1e-4  # the scheduler really changes the sampling


def test_save_reload_identical(tmp_path):
    sched_cls = DPMSolverMultistepScheduler
    pipe = _pipe(scale=2, residual=True, residual_scale=3.0, sched=sched_cls(num_train_timesteps=100))
    x = _lr(b=2, h=8)
    a = pipe(x, num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    pipe.save_pretrained(tmp_path)
    assert os.path.exists(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scale_factor"] == 2 and index["residual"] is True and index["residual_scale"] == 3.0
    re = SuperResolutionPipeline.from_pretrained(tmp_path)
    re.set_progress_bar_config(disable=True)
    assert isinstance(re.scheduler, sched_cls) and re.config.scale_factor == 2 and re.config.residual_scale == 3.0
    b = re(x, num_inference_steps=3, generator=torch.Generator().manual_seed(7), output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 16, 16, 3)
    c = re(x, num_inference_steps=3, generator=torch.Generator().manual_seed(8), output_type="np").images
    assert np.abs(c - b).max() > 1e-4  # the generator really drives sampling


def test_per_image_generators_make_batch_consistent():
    pipe = _pipe(scale=4)
    x = _lr(b=2, h=8)
    both = pipe(x, num_inference_steps=2, output_type="np",
                generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]).images
    second = pipe(x[1:], num_inference_steps=2, output_type="np", generator=[torch.Generator().manual_seed(2)]).images
    np.testing.assert_allclose(both[1], second[0], atol=1e-5)


def test_clear_errors():
    pipe = _pipe(scale=2, blocks=(8, 16, 16))  # the UNet down-samples by 4
    with pytest.raises(ValueError, match="channels"):
        pipe(np.random.rand(1, 8, 8, 4).astype(np.float32), num_inference_steps=1)
    with pytest.raises(ValueError, match="channels"):
        pipe(torch.rand(1, 1, 8, 8), num_inference_steps=1)
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe(np.random.rand(1, 5, 5, 3).astype(np.float32), num_inference_steps=1)
    with pytest.raises(ValueError, match="empty"):
        pipe(np.zeros((0, 8, 8, 3), np.float32), num_inference_steps=1)
    with pytest.raises(ValueError, match="empty"):
        pipe([], num_inference_steps=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe(np.full((1, 8, 8, 3), 3.0, np.float32), num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe(_lr(1), num_inference_steps=1, output_type="latent")
    with pytest.raises(TypeError, match="PIL image, numpy array"):
        pipe("an image", num_inference_steps=1)
    with pytest.raises(ValueError, match="in_channels == 2"):
        SuperResolutionPipeline(UNet2DModel(in_channels=3, out_channels=3, block_out_channels=(8, 8),
                                            down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                            norm_num_groups=4), DDPMScheduler())
