"""Super-resolution exactness: an oracle residual predictor gives back HR through the pipeline (no silent
clipping of residual targets), and resuming DREAMTrainer from a checkpoint repeats the uninterrupted run."""

import logging

import datasets
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput
from safetensors.torch import load_file
from skimage import data as skdata

from hf_align.diffusion import sr_unet
from hf_align.diffusion.images import bicubic_downsample, bicubic_upsample
from hf_align.trainers.dream_config import DREAMTrainingArguments
from hf_align.trainers.dream_trainer import DREAMTrainer


def _photos(n=4, size=32, seed=0):
    """Textured crops of real photographs (uint8 HWC)."""
    rng = np.random.default_rng(seed)
    srcs = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), np.repeat(skdata.brick()[..., None], 3, -1)]
    out = []
    for k in range(n):
        im = srcs[k % len(srcs)]
        i, j = rng.integers(0, im.shape[0] - size), rng.integers(0, im.shape[1] - size)
        out.append(np.ascontiguousarray(im[i : i + size, j : j + size]))
    return out


def _ds(imgs):
    return datasets.Dataset.from_dict({"image": imgs}, features=datasets.Features({"image": datasets.Image()}))


def _unet():
    torch.manual_seed(0)
    return sr_unet(block_out_channels=(8, 16), norm_num_groups=4)


def _oracle(unet, hr: torch.Tensor, scheduler, residual_scale: float):
    """Replace the UNet's output by the exact target for the true residual x0 = s (hr - up), in the
    scheduler's parameterisation (float64 coefficients)."""
    pred_type = scheduler.config.prediction_type
    a_all = scheduler.alphas_cumprod.double()

    def hook(module, args, output):
        model_in, t = args[0], args[1]
        x_t, up = model_in[:, :3].double(), model_in[:, 3:].double()
        x0 = residual_scale * (hr.double() - up)
        a = a_all[torch.as_tensor(t).long().reshape(-1)].reshape(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        target = {"sample": x0, "epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[pred_type]
        return UNet2DOutput(sample=target.to(output.sample.dtype))

    return unet.register_forward_hook(hook)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("residual_scale", [1.0, 3.0])
def test_oracle_residual_reproduces_hr_through_the_pipeline(tmp_path, prediction_type, residual_scale):
    imgs = _photos()
    args = DREAMTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, crop_size=32, scale_factor=4,
                                  residual_scale=residual_scale, prediction_type=prediction_type, max_steps=1)
    tr = DREAMTrainer(model=_unet(), args=args, train_dataset=_ds(imgs))
    hr = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1 for im in imgs])
    lr = bicubic_downsample(hr, 4)
    up = bicubic_upsample(lr, 4)
    # the residuals are large enough that the old [-1, 1] clip would truncate them at residual_scale 3
    assert (residual_scale * (hr - up)).abs().max() > 1.2 or residual_scale == 1.0
    for sampler in ("ddpm", "ddim"):
        for steps in (1, 10):
            pipe = tr.pipeline(sampler)
            handle = _oracle(pipe.unet, hr, pipe.scheduler, residual_scale)
            try:
                out = pipe((lr + 1) / 2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                           output_type="np").images
            finally:
                handle.remove()
            ref = ((hr + 1) / 2).permute(0, 2, 3, 1).double().numpy()
            assert np.abs(out - ref).max() < 1e-4, (sampler, steps, np.abs(out - ref).max())


def test_few_step_sampling_starts_from_the_last_training_step(tmp_path):
    """trailing spacing: one sampling step evaluates the model at t = T - 1, where x_T is pure noise (diffusers'
    'leading' default would evaluate it at t = 0)."""
    args = DREAMTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, crop_size=16, scale_factor=4,
                                  max_steps=1, num_train_timesteps=1000)
    tr = DREAMTrainer(model=_unet(), args=args, train_dataset=_ds(_photos(2)))
    for sampler in ("ddim", "ddpm"):
        sched = tr.pipeline(sampler).scheduler
        sched.set_timesteps(1)
        assert sched.timesteps.tolist() == [999]
        sched.set_timesteps(2)
        assert sched.timesteps.tolist() == [999, 499]
    with pytest.raises(ValueError, match="timestep_spacing"):
        DREAMTrainingArguments(output_dir=str(tmp_path), timestep_spacing="first")


def test_saved_checkpoint_scheduler_does_not_clip_residuals(tmp_path):
    args = DREAMTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, crop_size=16, scale_factor=4,
                                  residual_scale=3.0, max_steps=1, per_device_train_batch_size=2, disable_tqdm=True)
    tr = DREAMTrainer(model=_unet(), args=args, train_dataset=_ds(_photos(2)))
    tr.save_model(str(tmp_path / "saved"))
    cfg = DDPMScheduler.from_pretrained(tmp_path / "saved" / "scheduler").config
    assert not cfg.clip_sample or cfg.clip_sample_range >= 6.0


def test_a_scheduler_that_clips_residual_targets_is_refused(tmp_path):
    args = DREAMTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, crop_size=16, scale_factor=4,
                                  residual_scale=3.0, max_steps=1)
    with pytest.raises(ValueError, match=r"clip_sample_range >= 6"):
        DREAMTrainer(model=_unet(), args=args, train_dataset=_ds(_photos(2)), noise_scheduler=DDPMScheduler())
    # an explicit range that covers the targets, or no clipping, is accepted
    DREAMTrainer(model=_unet(), args=args, train_dataset=_ds(_photos(2)),
                 noise_scheduler=DDPMScheduler(clip_sample_range=6.0))
    DREAMTrainer(model=_unet(), args=args, train_dataset=_ds(_photos(2)), noise_scheduler=DDPMScheduler(clip_sample=False))


def test_pipeline_warns_when_its_scheduler_clips_residuals(caplog):
    from hf_align.pipelines.super_resolution import SuperResolutionPipeline

    pipe = SuperResolutionPipeline(_unet(), DDPMScheduler(num_train_timesteps=10), scale_factor=4, residual_scale=3.0)
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING):
        pipe(np.zeros((1, 4, 4, 3), np.float32), num_inference_steps=1, output_type="np")
    assert "clip_sample_range=6" in caplog.text


def _resume_args(out, max_steps, **kw):
    return DREAMTrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
        logging_steps=1, save_strategy="steps", save_steps=2, crop_size=16, scale_factor=4, use_cpu=True,
        num_train_timesteps=100, disable_tqdm=True, seed=0, dream_detail_preservation=1.0, ema_decay=0.9,
        dataloader_num_workers=0, **kw)


@pytest.mark.parametrize("grad_accum,crop_sampling", [(1, "gradient"), (2, "gradient"), (1, "uniform")])
def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path, grad_accum, crop_sampling):
    ds = _ds(_photos(6, size=40))  # 40x40 photos, 16x16 random crops: the crops really are random
    full = DREAMTrainer(model=_unet(), args=_resume_args(tmp_path / "full", 5, gradient_accumulation_steps=grad_accum,
                                                         crop_sampling=crop_sampling), train_dataset=ds)
    full.train()
    torch.manual_seed(12345)  # a different global RNG state must not matter
    resumed = DREAMTrainer(model=_unet(), args=_resume_args(tmp_path / "resumed", 5, crop_sampling=crop_sampling,
                                                            gradient_accumulation_steps=grad_accum), train_dataset=ds)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    def losses(tr):
        return {e["step"]: e["loss"] for e in tr.state.log_history if "loss" in e}

    lf, lr_ = losses(full), losses(resumed)
    assert sorted(lr_) == [1, 2, 3, 4, 5]  # steps 1-2 come back from the checkpoint's trainer_state.json
    for step in (3, 4, 5):
        assert lr_[step] == pytest.approx(lf[step], rel=1e-6, abs=1e-9), step
    assert len(set(lf.values())) == len(lf)  # the losses do vary from step to step
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        np.testing.assert_allclose(q.detach().numpy(), p.detach().numpy(), rtol=0, atol=1e-6, err_msg=n)
    for a, b in zip(full.ema.shadow_params, resumed.ema.shadow_params):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=1e-6)
    # and the final checkpoints agree (EMA weights in unet/, raw in unet_train/)
    for sub in ("unet", "unet_train"):
        fa = load_file(tmp_path / "full" / "checkpoint-5" / sub / "diffusion_pytorch_model.safetensors")
        fb = load_file(tmp_path / "resumed" / "checkpoint-5" / sub / "diffusion_pytorch_model.safetensors")
        for n in fa:
            np.testing.assert_allclose(fb[n].numpy(), fa[n].numpy(), rtol=0, atol=1e-6, err_msg=f"{sub}/{n}")


def test_crops_depend_on_the_step_not_on_the_global_rng(tmp_path):
    ds = _ds(_photos(4, size=40))
    tr = DREAMTrainer(model=_unet(), args=_resume_args(tmp_path, 1), train_dataset=ds)
    batch = tr.data_collator([ds[i] for i in range(2)])
    torch.manual_seed(1)
    a = tr.pair_collator.pairs(batch["images"], tr.step_generator())["hr"]
    torch.manual_seed(2)
    tr._rng_step = (-1, 0)
    b = tr.pair_collator.pairs(batch["images"], tr.step_generator())["hr"]
    torch.equal(a, b) or pytest.fail("same step, different crops")
    c = tr.pair_collator.pairs(batch["images"], tr.step_generator())["hr"]  # next micro-batch: new draws
    assert not torch.equal(a, c)


def test_sr_unet_starts_from_the_condition_and_still_learns_to_read_x_t():
    unet = sr_unet(block_out_channels=(8, 16), norm_num_groups=4)
    w = unet.conv_in.weight
    assert torch.count_nonzero(w[:, :3]) == 0 and torch.count_nonzero(w[:, 3:]) > 0
    up = torch.rand(2, 3, 16, 16)
    a = unet(torch.cat([torch.randn(2, 3, 16, 16), up], 1), torch.tensor([999, 999])).sample
    b = unet(torch.cat([torch.randn(2, 3, 16, 16), up], 1), torch.tensor([999, 999])).sample
    torch.testing.assert_close(a, b)  # the noisy sample does not reach the output at init
    a.sum().backward()
    assert torch.count_nonzero(w.grad[:, :3]) > 0  # ... but its weights do get gradients
    default = sr_unet(block_out_channels=(8, 16), norm_num_groups=4, zero_init_noisy_input=False)
    assert torch.count_nonzero(default.conv_in.weight[:, :3]) > 0
