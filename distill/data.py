"""Data the project can use without a network: scikit-learn's digits (1,797 real 8x8 images)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_DIGIT_CLASSES = 10


def load_digits(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float32 images in [-1, 1] of shape (N, 1, resolution, resolution), and int64 labels.

    The 8x8 originals (grey levels 0..16) are upsampled bilinearly (align_corners=False) when resolution > 8.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        if resolution < 8:
            raise ValueError(f"data.resolution must be >= 8 for digits, got {resolution}")
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = (images * 2.0 - 1.0).clamp(-1.0, 1.0)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def split_halves(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint index sets covering range(n) (sizes ceil(n/2), floor(n/2)), fixed by `seed`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = (n + 1) // 2
    return perm[:half], perm[half:]


class DigitsDataset:
    """Class-conditional digits for training: random batches drawn with an explicit torch.Generator.

    Conditioning is `{"class_labels": int64 (N,)}`; `num_classes` excludes the null class used for CFG.
    """

    num_classes = NUM_DIGIT_CLASSES

    def __init__(self, resolution: int = 16):
        self.images, self.labels = load_digits(resolution)
        self.image_shape = tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator):
        from distill.trainer import Batch

        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return Batch(self.images[idx], {"class_labels": self.labels[idx]})

    def grid_condition(self, n: int) -> dict[str, torch.Tensor]:
        """Labels 0, 1, ..., 9, 0, 1, ... so each grid column shows one digit."""
        return {"class_labels": torch.arange(n) % self.num_classes}


def make_dataset(name: str, resolution: int) -> DigitsDataset:
    if name == "digits":
        return DigitsDataset(resolution)
    raise ValueError(f"data.name: unknown dataset {name!r}; available: ['digits']")
