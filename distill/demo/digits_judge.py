"""FD-digits: a Fréchet distance in the feature space of a small digits classifier, and that classifier.

FD-digits is NOT Inception FID. It uses the 64 penultimate features of a ~50k-parameter CNN trained on
scikit-learn's 1,797 digits at 16x16 (shipped in `distill/assets/digits_classifier/`, trained by
`scripts/train_digits_classifier.py`), not Inception-v3 pool3 features of 299x299 photographs. Its values
are on a different scale and must never be compared with, or reported as, FIDs from papers.

Protocol (see docs/fd_digits.md): `split_halves(1797, seed=0)` gives half A (899 real images), the reference
set, and half B (898 real images). A figure is computed from exactly 898 images against half A; the floor is
half B against half A ("real against real at the same count"). Fréchet distances are biased by the sample
count, so only figures at that count against that reference are comparable, and the floor goes beside them.

    judge = FDDigits(resolution=16)
    judge.floor()                      # real vs real at the protocol count
    judge(generated)                   # (898, 1, 16, 16) floats in [-1, 1]
    judge.accuracy(generated, labels)  # for class-conditional students
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.base.paths import ASSETS
from distill.data.digits import NUM_DIGIT_CLASSES, digits_split
from distill.evaluation.metrics import (
    ClassifierFeatureNet,
    ClassifierScore,
    FrechetJudge,
    check_images,
    frechet_distance,
)
from distill.models.classifier import ConvClassifier, load_classifier

DIGITS_CLASSIFIER_DIR = ASSETS / "digits_classifier"

# The protocol: reference = half A of split_halves(1797, seed=0) (899 images); figures use 898 images.
NUM_DIGITS = 1797

PROTOCOL_COUNT = NUM_DIGITS // 2  # 898, the size of half B


class DigitsClassifier(ConvClassifier):
    """The FD-digits classifier: a `ConvClassifier` for (N, 1, 16, 16) digits with 10 classes.
    The constructor arguments are exactly what `config.json` stores."""

    def __init__(self, resolution: int = 16, channels: tuple[int, int] = (16, 32), num_features: int = 64,
                 num_classes: int = NUM_DIGIT_CLASSES, dropout: float = 0.2) -> None:
        super().__init__(1, resolution, channels, num_features, num_classes, dropout)


def load_digits_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The shipped digits classifier (or the one in folder `path`), in eval mode, loaded with safetensors only."""
    folder = Path(path) if path is not None else DIGITS_CLASSIFIER_DIR
    return load_classifier(folder, DigitsClassifier, "digits classifier", "scripts/train_digits_classifier.py")


class DigitsFeatureNet(ClassifierFeatureNet):
    """`ClassifierFeatureNet` of the digits classifier (the shipped one unless given): FD-digits' features."""

    def __init__(self, classifier: DigitsClassifier | None = None) -> None:
        super().__init__(classifier if classifier is not None else load_digits_classifier())


def fd_digits(
    images: torch.Tensor,
    reference: torch.Tensor,
    batch_size: int = 512,
    feature_net: DigitsFeatureNet | None = None,
) -> float:
    """FD-digits (NOT Inception FID) between two sets of (N, 1, 16, 16) float images in [-1, 1], any counts >= 2.

    Images are clamped to [-1, 1] (as saving to PNG would). This is the raw distance with no protocol: figures
    are only comparable at the same count against the same reference, so prefer `FDDigits` for reporting.
    """
    feature_net = feature_net if feature_net is not None else DigitsFeatureNet()
    device = next(feature_net.parameters()).device
    for name, x in (("images", images), ("reference", reference)):
        check_images(x, feature_net.resolution)
        if len(x) < 2:
            raise ValueError(f"{name} needs at least 2 images for a covariance, got shape {tuple(x.shape)}")
    images, reference = (x.to(device).clamp(-1.0, 1.0) for x in (images, reference))
    return frechet_distance(feature_net, images, reference, batch_size)


def protocol_halves(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, held_out): half A (899 real images) and half B (898) of split_halves(1797, seed=0); half B is
    also the train half of every digits training path (`distill.data.digits.digits_split`)."""
    return digits_split("reference", resolution)[0], digits_split("train", resolution)[0]


class FDDigits(FrechetJudge):
    """The FD-digits judge (NOT Inception FID; not comparable to paper FIDs).

    Reference: half A (899 real digits). `judge(images)` needs exactly `judge.count` = 898 images so every
    figure has the same sample-count bias as `judge.floor()` (half B against half A); any other count raises.
    """

    def __init__(
        self,
        resolution: int = 16,
        classifier: DigitsClassifier | None = None,
        batch_size: int = 512,
        device: str | torch.device = "cpu",
    ) -> None:
        feature_net = DigitsFeatureNet(classifier)
        if resolution != feature_net.resolution:
            raise ValueError(
                f"FD-digits classifier works at resolution {feature_net.resolution}, got resolution={resolution}"
            )
        super().__init__(feature_net, *protocol_halves(resolution), batch_size=batch_size, device=device)

    def report(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """FD-digits, precision, recall and (with `labels`) classifier accuracy of `self.count` images."""
        precision, recall = self.precision_recall(images)
        out = {"fd_digits": self(images), "precision": precision, "recall": recall}
        if labels is not None:
            out["accuracy"] = self.accuracy(images, labels).accuracy
        return out

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> ClassifierScore:
        """How often the classifier recognises the intended `labels` in (N, 1, 16, 16) images (any N)."""
        self.check(images)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if tuple(labels.shape) != (len(images),):
            raise ValueError(f"expected labels of shape ({len(images)},), got {tuple(labels.shape)}")
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < NUM_DIGIT_CLASSES):
            low, high = int(labels.min()), int(labels.max())
            raise ValueError(f"labels must be in [0, {NUM_DIGIT_CLASSES}), got range [{low}, {high}]")
        probs = self.logits(images).softmax(dim=-1)
        correct = (probs.argmax(dim=-1) == labels).double().mean()
        confidence = probs.gather(1, labels[:, None]).double().mean()
        return ClassifierScore(accuracy=float(correct), confidence=float(confidence))


def fd_digits_floor(resolution: int = 16) -> float:
    """The protocol floor: FD-digits of half B (898 real images) against half A (899)."""
    return FDDigits(resolution=resolution).floor()
