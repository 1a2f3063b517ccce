"""DREAMTrainer: loss against a hand computation, EMA against a float64 recurrence, checkpoints, collator, metrics."""

import json
import math
import os

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from skimage import data as skdata
from transformers import TrainerCallback

from hf_align.diffusion import sr_unet
from hf_align.pipelines.super_resolution import SuperResolutionPipeline
from hf_align.trainers.dream_config import DREAMTrainingArguments
from hf_align.trainers.dream_trainer import DREAMTrainer, SRPairCollator


def _ds(n=2, size=48):
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea()]
    imgs = [photos[i % 3][40 : 40 + size, 60 : 60 + size] for i in range(n)]
    return datasets.Dataset.from_dict({"image": imgs}, features=datasets.Features({"image": datasets.Image()}))


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no", crop_size=16, scale_factor=4,
                use_cpu=True, eval_num_inference_steps=2, num_train_timesteps=100, disable_tqdm=True, seed=0)
    base.update(kw)
    return DREAMTrainingArguments(**base)


def _unet():
    torch.manual_seed(0)
    return sr_unet(block_out_channels=(8, 16), norm_num_groups=4)


@pytest.mark.parametrize("p,loss_type", [(1.0, "l1"), (math.inf, "mse")])
def test_compute_loss_matches_hand_computation(tmp_path, p, loss_type):
    args = _args(tmp_path, dream_detail_preservation=p, loss_type=loss_type, residual=True, residual_scale=2.0,
                 prediction_type="epsilon")
    unet = _unet()
    tr = DREAMTrainer(model=unet, args=args, train_dataset=_ds())
    g = torch.Generator().manual_seed(3)
    hr = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    up = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    torch.manual_seed(11)
    loss = tr.compute_loss(unet, {"hr": hr, "up": up, "lr": hr[:, :, ::4, ::4]})

    # reference, float64 coefficients, same random draws (noise then timesteps)
    torch.manual_seed(11)
    x0 = (2.0 * (hr - up)).double()
    eps = torch.randn_like(x0.float()).double()
    t = torch.randint(0, 100, (3,))
    a = tr.noise_scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    if math.isinf(p):
        x_hat, target = x_t, eps
    else:
        unet.eval()
        with torch.no_grad():
            eps_hat = unet(torch.cat([x_t.float(), up], 1), t).sample.double()
        unet.train()
        delta = (1 - a).sqrt() ** p * (eps - eps_hat)
        x_hat, target = x_t + (1 - a).sqrt() * delta, eps + delta
    with torch.no_grad():
        pred = unet(torch.cat([x_hat.float(), up], 1), t).sample.double()
    ref = (pred - target).abs().mean() if loss_type == "l1" else ((pred - target) ** 2).mean()
    assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, ref.item())


class _Snap(TrainerCallback):
    def __init__(self):
        self.snaps = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.snaps.append({k: v.detach().double().clone() for k, v in model.named_parameters()})


def test_training_ema_and_checkpoint_pipeline(tmp_path):
    args = _args(tmp_path, max_steps=5, save_strategy="steps", save_steps=5, ema_decay=0.9, ema_power=0.75,
                 lr_scheduler_type="cosine")
    unet = _unet()
    init = {k: v.detach().double().clone() for k, v in unet.named_parameters()}
    snap = _Snap()
    tr = DREAMTrainer(model=unet, args=args, train_dataset=_ds(), callbacks=[snap])
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 5 and all(np.isfinite(losses))

    # EMA by hand: shadow_0 = init; shadow_k = d_k shadow_{k-1} + (1 - d_k) theta_k,
    # d_k = min(0.9, 1 - (1 + (k - 1)) ** -0.75) (diffusers' warm-up, step counted from 0; d_1 = 0)
    ema = dict(init)
    for k, theta in enumerate(snap.snaps, start=1):
        s = max(0, k - 1)
        d = 0.0 if s <= 0 else min(0.9, 1 - (1 + s) ** -0.75)
        ema = {n: d * ema[n] + (1 - d) * theta[n] for n in ema}
    ckpt = tmp_path / "checkpoint-5"
    saved_ema = load_file(ckpt / "unet" / "diffusion_pytorch_model.safetensors")
    saved_raw = load_file(ckpt / "unet_train" / "diffusion_pytorch_model.safetensors")
    for n in ema:
        np.testing.assert_allclose(saved_ema[n].double().numpy(), ema[n].numpy(), atol=1e-6)
        np.testing.assert_allclose(saved_raw[n].double().numpy(), snap.snaps[-1][n].numpy(), atol=0)
    assert any((saved_ema[n].double() - snap.snaps[-1][n]).abs().max() > 1e-6 for n in ema)  # EMA != raw
    # the model itself still holds the raw weights after saving
    for n, p in tr.model.named_parameters():
        np.testing.assert_array_equal(p.detach().double().numpy(), snap.snaps[-1][n].numpy())

    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["scale_factor"] == 4 and index["residual"] is True
    assert json.loads((ckpt / "ema_state.json").read_text())["optimization_step"] == 5
    pipe = SuperResolutionPipeline.from_pretrained(ckpt)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(np.random.rand(1, 4, 4, 3).astype(np.float32), num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 16, 16, 3)

    # resume: weights and EMA come back from the checkpoint and training continues
    args2 = _args(tmp_path, max_steps=6, save_strategy="no", ema_decay=0.9)
    tr2 = DREAMTrainer(model=_unet(), args=args2, train_dataset=_ds())
    tr2._load_from_checkpoint(str(ckpt))
    for n, p in tr2.model.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), saved_raw[n].numpy())
    names = [n for n, _ in tr2.model.named_parameters()]
    for n, s in zip(names, tr2.ema.shadow_params):
        np.testing.assert_array_equal(s.numpy(), saved_ema[n].numpy())
    tr2.train(resume_from_checkpoint=str(ckpt))
    assert tr2.state.global_step == 6 and tr2.ema.optimization_step == 6


def test_collator_crops_are_real_subimages_and_lr_is_bicubic():
    src = skdata.astronaut()[100:140, 200:240]  # 40x40 uint8
    col = SRPairCollator(crop_size=16, scale_factor=4)
    torch.manual_seed(0)
    batch = col([{"image": PIL.Image.fromarray(src)}, {"image": src}])
    assert batch["hr"].shape == (2, 3, 16, 16) and batch["lr"].shape == (2, 3, 4, 4) and batch["up"].shape == (2, 3, 16, 16)
    for b, hr in enumerate(batch["hr"]):
        crop = np.round(((hr.permute(1, 2, 0).numpy() + 1) / 2) * 255).astype(np.uint8)
        hits = [(i, j) for i in range(25) for j in range(25) if np.array_equal(src[i : i + 16, j : j + 16], crop)]
        assert len(hits) >= 1
        # LR against PIL's bicubic (antialiased) resize of the same crop
        pil_lr = np.asarray(PIL.Image.fromarray(crop).resize((4, 4), PIL.Image.BICUBIC), dtype=np.float64) / 255
        lr = ((batch["lr"][b] + 1) / 2).permute(1, 2, 0).double().numpy()
        assert np.abs(lr - pil_lr).max() < 0.03
    centre = SRPairCollator(crop_size=16, scale_factor=4, random_crop=False)([{"image": src}])
    np.testing.assert_allclose(((centre["hr"][0].permute(1, 2, 0).numpy() + 1) / 2), src[12:28, 12:28] / 255, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than crop_size"):
        col([{"image": src[:8, :8]}])


def test_evaluate_reports_psnr_ssim_and_bicubic_matches_formula(tmp_path):
    ds = _ds(n=3, size=24)
    tr = DREAMTrainer(model=_unet(), args=_args(tmp_path, eval_max_samples=3), train_dataset=ds, eval_dataset=ds)
    m = tr.evaluate()
    assert {"eval_psnr", "eval_ssim", "eval_bicubic_psnr", "eval_bicubic_ssim"} <= set(m)
    # bicubic PSNR by the definition 10 log10(1 / MSE), centre 16x16 crops, float64
    ref = []
    for i in range(3):
        img = np.asarray(ds[i]["image"], dtype=np.float64)[4:20, 4:20] / 255
        x = torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1
        lr = F.interpolate(x.float(), size=(4, 4), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
        up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
        up = ((up[0].permute(1, 2, 0).double().numpy()) + 1) / 2
        ref.append(10 * np.log10(1.0 / np.mean((up - img) ** 2)))
    assert abs(m["eval_bicubic_psnr"] - np.mean(ref)) < 1e-3
    assert 0 < m["eval_bicubic_ssim"] <= 1 and -1 <= m["eval_ssim"] <= 1 and np.isfinite(m["eval_psnr"])
    assert tr.evaluate()["eval_psnr"] == m["eval_psnr"]  # fixed eval seed -> reproducible


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        _args(tmp_path, loss_type="huber")
    with pytest.raises(ValueError, match="divisible"):
        _args(tmp_path, crop_size=18)
    with pytest.raises(ValueError, match="dream_detail_preservation"):
        _args(tmp_path, dream_detail_preservation=-1.0)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        _args(tmp_path, remove_unused_columns=True)
    with pytest.raises(ValueError, match="in_channels == 2"):
        from diffusers import UNet2DModel

        DREAMTrainer(model=UNet2DModel(in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=4,
                                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                     args=_args(tmp_path), train_dataset=_ds())
    assert os.path.isdir(tmp_path)
