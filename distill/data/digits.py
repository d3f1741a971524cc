"""Data the project can use without a network: scikit-learn's digits (1,797 real 8x8 images).

The digits protocol splits the 1,797 digits once, here, into two disjoint halves (`split_halves(1797, seed=0)`):

* half A (899 images), the **reference**: only the FD-digits judge reads it (`digits_split("reference")`);
* half B (898 images), the **train** half: everything a generator learns from -- the teacher, students'
  real-data terms, GAN heads, pair stores -- reads this half and nothing else (`digits_split("train")`).

A generator that saw half A could score below the real-vs-real floor by copying it, so no training path may
reach it (tests/test_data_split.py poisons half A and runs every training path). The classifier behind the
judge keeps its own stratified split: it is a feature network (like Inception for FID), not the generator's
training data, and its features must know every digit style to measure fidelity and diversity fairly.
"""

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


#: the protocol's split of the 1,797 digits: half A (first) is the FD reference, half B (second) the train half.
PROTOCOL_SPLIT_SEED = 0
DIGITS_SPLITS = ("train", "reference")


def digits_split(split: str, resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one half of the protocol split: "train" (half B, 898 images: every training path)
    or "reference" (half A, 899 images: the FD-digits judge only)."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"digits split must be one of {list(DIGITS_SPLITS)}, got {split!r}")
    images, labels = load_digits(resolution)
    half_a, half_b = split_halves(len(images), seed=PROTOCOL_SPLIT_SEED)
    idx = half_b if split == "train" else half_a
    return images[idx], labels[idx]


class DigitsDataset:
    """Class-conditional digits for training (the train half B only): random batches drawn with an explicit
    torch.Generator.

    Conditioning is `{"class_labels": int64 (N,)}`; `num_classes` excludes the null class used for CFG.
    """

    num_classes = NUM_DIGIT_CLASSES

    def __init__(self, resolution: int = 16):
        self.images, self.labels = digits_split("train", resolution)
        self.image_shape = tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator):
        from distill.base.batch import Batch

        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return Batch(self.images[idx], {"class_labels": self.labels[idx]})

    def grid_condition(self, n: int) -> dict[str, torch.Tensor]:
        """Labels 0, 1, ..., 9, 0, 1, ... so each grid column shows one digit."""
        return {"class_labels": torch.arange(n) % self.num_classes}


