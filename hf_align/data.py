"""Embedded real data that ships with a dependency (scikit-learn), as `datasets.Dataset` objects."""

from __future__ import annotations

import numpy as np


def load_digits_dataset(test_size: float = 0.25, seed: int = 0, image_size: int = 8):
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, 10 classes) as a ``DatasetDict``.

    Columns: ``pixel_values`` (1, image_size, image_size) float32 scaled to [-1, 1] and ``labels`` (int).
    The split is stratified and seeded, so the same call gives the same train/test sets.
    """
    from datasets import Dataset, DatasetDict
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # (N, 8, 8) in [-1, 1]
    if image_size != 8:
        import torch
        import torch.nn.functional as F

        images = F.interpolate(torch.from_numpy(images)[:, None], size=(image_size, image_size), mode="bilinear",
                               align_corners=False)[:, 0].numpy()
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_size, random_state=seed,
                                           stratify=labels)

    def build(idx):
        return Dataset.from_dict({"pixel_values": images[idx][:, None], "labels": labels[idx]}).with_format("torch")

    return DatasetDict(train=build(idx_train), test=build(idx_test))
