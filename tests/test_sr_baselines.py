"""Informative training crops (gradient-energy sampling) and the least-squares linear SR baseline, against
independent references: the closed-form probability of a flat crop, float64 finite differences, numpy lstsq."""

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from hf_align.diffusion import LinearSRFilter, sr_unet
from hf_align.trainers.dream_config import DREAMTrainingArguments
from hf_align.trainers.dream_trainer import DREAMTrainer, SRPairCollator, gradient_energy


def _half_flat(h=40, w=80, seed=0):
    """Left half constant grey, right half uniform noise (uint8 HWC)."""
    rng = np.random.default_rng(seed)
    im = np.full((h, w, 3), 128, dtype=np.uint8)
    im[:, w // 2 :] = rng.integers(0, 256, size=(h, w - w // 2, 3))
    return im


def test_gradient_energy_is_the_mean_squared_difference():
    rng = np.random.default_rng(1)
    x = rng.random((7, 9, 3))
    ref = 0.5 * (sum((x[i + 1, j, c] - x[i, j, c]) ** 2 for i in range(6) for j in range(9) for c in range(3)) / 162
                 + sum((x[i, j + 1, c] - x[i, j, c]) ** 2 for i in range(7) for j in range(8) for c in range(3)) / 168)
    assert gradient_energy(x) == pytest.approx(ref, rel=1e-12)
    assert gradient_energy(np.full((5, 5, 3), 0.3)) == 0.0


@pytest.mark.parametrize("candidates", [1, 4, 8])
def test_a_flat_crop_is_kept_only_when_every_candidate_is_flat(candidates):
    """On a half-flat image a 16x16 crop is flat iff its left edge is <= 40 - 16 = 24 among the 65 places, so
    q = 25/65 and gradient sampling keeps a flat crop with probability q^n (n candidates): a binomial check."""
    im = _half_flat()
    col = SRPairCollator(crop_size=16, scale_factor=4, crop_sampling="gradient", crop_candidates=candidates)
    gen = torch.Generator().manual_seed(0)
    trials = 1500
    flat = sum(float(col.pairs([im], gen)["hr"].std()) == 0.0 for _ in range(trials))
    p = (25 / 65) ** candidates
    sd = np.sqrt(trials * p * (1 - p))
    assert abs(flat - trials * p) <= 4.5 * sd + 1, (flat, trials * p)


def test_gradient_crops_are_deterministic_real_subimages_and_differ_from_uniform():
    src = skdata.astronaut()[100:160, 200:260]
    grad = SRPairCollator(crop_size=16, scale_factor=4, crop_sampling="gradient")
    a = grad.pairs([src] * 6, torch.Generator().manual_seed(7))["hr"]
    b = grad.pairs([src] * 6, torch.Generator().manual_seed(7))["hr"]
    assert torch.equal(a, b)
    uni = SRPairCollator(crop_size=16, scale_factor=4, crop_sampling="uniform")
    assert not torch.equal(a, uni.pairs([src] * 6, torch.Generator().manual_seed(7))["hr"])
    for hr in a:
        crop = np.round(((hr.permute(1, 2, 0).numpy() + 1) / 2) * 255).astype(np.uint8)
        assert any(np.array_equal(src[i : i + 16, j : j + 16], crop) for i in range(45) for j in range(45))
    for bad in ({"crop_sampling": "edges"}, {"crop_candidates": 0}, {"crop_candidates": True}):
        with pytest.raises(ValueError, match="crop_sampling|crop_candidates"):
            SRPairCollator(crop_size=16, scale_factor=4, **bad)


def test_textured_crops_are_drawn_more_often_on_a_real_photo():
    """Mean gradient energy of the kept crops rises with the candidates, on a photo with sky and texture."""
    photo = skdata.rocket()  # sky, smoke and structures
    energy = {}
    for name, kw in {"uniform": {"crop_sampling": "uniform"}, "gradient": {"crop_sampling": "gradient"}}.items():
        col = SRPairCollator(crop_size=32, scale_factor=2, **kw)
        gen = torch.Generator().manual_seed(0)
        crops = [col.pairs([photo], gen)["hr"][0] for _ in range(200)]
        energy[name] = np.mean([gradient_energy(((c + 1) / 2).permute(1, 2, 0).numpy()) for c in crops])
    assert energy["gradient"] > 1.5 * energy["uniform"], energy


# ------------------------------------------------------------------------------------------ linear baseline


def _np_features(up: np.ndarray, k: int) -> np.ndarray:
    """(C, H, W) -> (H, W, C k^2 + 1), written independently with numpy's reflect padding."""
    c, h, w = up.shape
    r = k // 2
    p = np.pad(up, ((0, 0), (r, r), (r, r)), mode="reflect")
    cols = [p[ch, di : di + h, dj : dj + w] for ch in range(c) for di in range(k) for dj in range(k)]
    return np.stack(cols + [np.ones((h, w))], -1)


def _np_up(hr: np.ndarray, s: int) -> np.ndarray:
    x = torch.from_numpy(hr)[None].float()
    lr = F.interpolate(x, size=(hr.shape[1] // s, hr.shape[2] // s), mode="bicubic", antialias=True,
                       align_corners=False).clamp(-1, 1)
    return F.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False).clamp(-1, 1)[0].double().numpy()


@pytest.mark.parametrize("scale,k", [(2, 5), (3, 3)])
def test_linear_filter_equals_numpy_lstsq_per_phase(scale, k):
    rng = np.random.default_rng(0)
    photo = skdata.chelsea().astype(np.float64) / 127.5 - 1
    side = 12 * scale
    crops = []
    for _ in range(12):
        i, j = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crops.append(photo[i : i + side, j : j + side].transpose(2, 0, 1))
    crops = np.stack(crops)
    fit = LinearSRFilter.fit([torch.tensor(crops[:5]).float(), torch.tensor(crops[5:]).float()], scale, k, ridge=0.0)
    # reference: one lstsq per phase over the same pixels, residual targets
    X = {(p, q): [] for p in range(scale) for q in range(scale)}
    Y = {key: [] for key in X}
    for hr in crops.astype(np.float32).astype(np.float64):
        up = _np_up(hr, scale)
        feats = _np_features(up, k)
        for p in range(scale):
            for q in range(scale):
                X[p, q].append(feats[p::scale, q::scale].reshape(-1, feats.shape[-1]))
                Y[p, q].append((hr - up)[:, p::scale, q::scale].reshape(3, -1).T)
    test = photo[100 : 100 + side, 50 : 50 + side].transpose(2, 0, 1)
    up_t = _np_up(test, scale)
    ref_out = np.empty_like(up_t)
    for (p, q), xs in X.items():
        w = np.linalg.lstsq(np.concatenate(xs), np.concatenate(Y[p, q]), rcond=None)[0]
        # normal equations square the condition number of correlated neighbourhoods: weights agree to ~1e-4
        np.testing.assert_allclose(fit.weights[p, q].numpy(), w, rtol=2e-3, atol=2e-4)
        f = _np_features(up_t, k)[p::scale, q::scale]
        ref_out[:, p::scale, q::scale] = (up_t[:, p::scale, q::scale] + (f @ w).transpose(2, 0, 1))
    got = fit(torch.tensor(up_t)[None].float())[0].double().numpy()
    np.testing.assert_allclose(got, np.clip(ref_out, -1, 1), atol=1e-5)


def test_linear_filter_beats_bicubic_on_a_photo_it_never_saw():
    """Fitted on 256 random 48x48 crops of the astronaut, 2x, 7x7: more than 0.3 dB over bicubic on the coffee
    photo (the benchmark's whole-photo gains are 0.6-1.0 dB)."""
    photo = torch.tensor(skdata.astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    gen = torch.Generator().manual_seed(0)
    places = torch.randint(0, 512 - 48, (256, 2), generator=gen).tolist()
    crops = torch.stack([photo[:, i : i + 48, j : j + 48] for i, j in places])
    fit = LinearSRFilter.fit(crops.split(32), 2, 7)
    hr = (torch.tensor(skdata.coffee()).permute(2, 0, 1).float() / 127.5 - 1)[None, :, :400, :600]
    up = torch.tensor(_np_up(hr[0].double().numpy(), 2))[None].float()
    psnr = lambda x: 10 * np.log10(4 / float(((x.double() - hr.double()) ** 2).mean()))  # noqa: E731
    assert psnr(fit(up)) - psnr(up) > 0.3


def test_linear_filter_refuses_bad_input():
    fit = LinearSRFilter.fit([torch.rand(2, 3, 16, 16) * 2 - 1], 2, 3)
    with pytest.raises(ValueError, match="3-channel"):
        fit(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple of the scale factor"):
        fit(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="no training crops"):
        LinearSRFilter.fit([], 2, 3)
    with pytest.raises(ValueError, match="odd"):
        LinearSRFilter.fit([torch.zeros(1, 3, 16, 16)], 2, 4)


def _ds(photos, size=40, n=6, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        im = photos[k % len(photos)]
        i, j = rng.integers(0, im.shape[0] - size), rng.integers(0, im.shape[1] - size)
        out.append(np.ascontiguousarray(im[i : i + size, j : j + size]))
    return datasets.Dataset.from_dict({"image": out}, features=datasets.Features({"image": datasets.Image()}))


def test_trainer_reports_the_linear_baseline_fitted_on_its_training_crops(tmp_path):
    train = _ds([skdata.astronaut(), skdata.chelsea()], n=8)
    held = _ds([skdata.coffee()], size=16, n=4, seed=3)
    kw = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, per_device_eval_batch_size=4,
              report_to=[], save_strategy="no", crop_size=16, scale_factor=2, use_cpu=True, num_train_timesteps=20,
              disable_tqdm=True, seed=0, eval_num_inference_steps=1, linear_baseline_crops=24, linear_baseline_kernel=5)
    args = DREAMTrainingArguments(**kw)
    torch.manual_seed(0)
    tr = DREAMTrainer(model=sr_unet(block_out_channels=(8, 16), norm_num_groups=4), args=args, train_dataset=train,
                      eval_dataset=held)
    m = tr.evaluate()
    assert {"eval_linear_psnr", "eval_linear_ssim"} <= set(m)
    # the same fit by hand: 24 uniform crops of the training rows drawn from the documented seed
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([0, 0x11AEA5]).generate_state(1)[0]))
    rows = torch.randint(0, len(train), (24,), generator=gen).tolist()
    uni = SRPairCollator(16, 2, crop_sampling="uniform")
    hr = torch.cat([uni.pairs([train[i]["image"] for i in rows[s : s + 32]], gen)["hr"] for s in range(0, 24, 32)])
    ref = LinearSRFilter.fit([hr], 2, 5)
    np.testing.assert_allclose(tr.linear_filter.weights.numpy(), ref.weights.numpy(), rtol=1e-9, atol=1e-12)
    # PSNR of the baseline on the centre crops, by the definition
    psnr = []
    for i in range(len(held)):
        x = torch.from_numpy(np.asarray(held[i]["image"], dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
        up = F.interpolate(F.interpolate(x, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
                           .clamp(-1, 1), scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1)
        out = (ref(up).double() + 1) / 2
        psnr.append(10 * np.log10(1 / float(((out - (x.double() + 1) / 2) ** 2).mean())))
    assert m["eval_linear_psnr"] == pytest.approx(np.mean(psnr), abs=1e-3)
    off = DREAMTrainer(model=sr_unet(block_out_channels=(8, 16), norm_num_groups=4),
                       args=DREAMTrainingArguments(**kw, linear_baseline=False),
                       train_dataset=train, eval_dataset=held)
    assert "eval_linear_psnr" not in off.evaluate()


def test_arguments_are_checked(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, crop_size=16, scale_factor=2)
    for bad, match in [({"crop_sampling": "sobel"}, "crop_sampling"), ({"crop_candidates": 0}, "crop_candidates"),
                       ({"linear_baseline_kernel": 4}, "odd"), ({"linear_baseline_crops": -1}, "linear_baseline_crops"),
                       ({"linear_baseline_kernel": 41}, "needs crops larger than 20 pixels")]:
        with pytest.raises(ValueError, match=match):
            DREAMTrainingArguments(**base, **bad)
