"""What every judge of generated images shares: features of a small convolutional classifier
(`distill.models.classifier`), the Fréchet
distance of its features, improved precision and recall (k-NN manifolds), and `FrechetJudge`, which puts them
together for a fixed reference set. The digits judge (FD-digits) and the shapes judge are demo fixtures built on
it (`distill/demo/digits_judge.py`, `distill/demo/shapes_judge.py`)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from distill.models.classifier import ConvClassifier

PR_NEIGHBOURS = 3  # k of the k-NN manifolds of precision and recall (Kynkaanniemi et al. 2019)


class ClassifierFeatureNet(nn.Module):
    """Feature extractor for torchmetrics' `FrechetInceptionDistance(feature=...)`: a judge classifier's
    penultimate features (`classifier.features`) as float64.

    Takes float images (N, C, R, R) in [-1, 1] (C = `classifier.channels_in`, R = `classifier.resolution`).
    torchmetrics 1.9.0 passes a custom module's input through unchanged (its `normalize` flag only converts
    images for the built-in Inception), reads `num_features` instead of probing the module with a dummy uint8
    image (so `input_img_size` is unused), accumulates float64 statistics, and casts the final distance to the
    feature dtype: returning float64 features keeps the distance in float64. Never leaves eval mode; parameters
    are frozen.
    """

    def __init__(self, classifier: ConvClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.classifier.requires_grad_(False)
        self.num_features = self.classifier.num_features
        self.resolution = self.classifier.resolution
        self.channels = self.classifier.channels_in

    def train(self, mode: bool = True) -> ClassifierFeatureNet:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.resolution, channels=self.channels)
        return self.classifier.features(images.float()).double()


def check_images(images: torch.Tensor, resolution: int = 16, count: int | None = None, channels: int = 1) -> None:
    """Raise ValueError unless `images` is a float tensor of shape (count or any, channels, resolution, resolution)."""
    expected = f"({count if count is not None else 'N'}, {channels}, {resolution}, {resolution})"
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor of shape {expected}, got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.ndim != 4 or shape[1:] != (channels, resolution, resolution) or (count is not None and shape[0] != count):
        raise ValueError(f"expected images of shape {expected}, got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"expected float images in [-1, 1], got dtype {images.dtype} (uint8 in [0, 255]? use x / 127.5 - 1)"
        )
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")


def frechet_distance(
    feature_net: ClassifierFeatureNet, images: torch.Tensor, reference: torch.Tensor, batch_size: int
) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=feature_net).to(next(feature_net.parameters()).device)
    for start in range(0, len(reference), batch_size):
        fid.update(reference[start : start + batch_size], real=True)
    for start in range(0, len(images), batch_size):
        fid.update(images[start : start + batch_size], real=False)
    return float(fid.compute())


def knn_radii(features: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Distance of each feature vector to its k-th nearest neighbour within the same set (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"need more than k={k} feature vectors for k-NN radii, got {len(features)}")
    d = torch.cdist(features, features)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (distance 0)


def manifold_coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `points` inside the union of balls B(centres[j], radii[j])."""
    d = torch.cdist(points, centres)
    return float((d <= radii[None, :]).any(dim=1).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, arXiv 1904.06991, eq. 1-3) of feature sets.

    Each set's manifold is the union of balls around its points with radius the distance to the point's k-th
    nearest neighbour in that set. Precision: the fraction of `fake` inside the real manifold (fidelity);
    recall: the fraction of `real` inside the fake manifold (coverage; mode-dropping shows here).
    """
    real, fake = real.double(), fake.double()
    precision = manifold_coverage(fake, real, knn_radii(real, k))
    recall = manifold_coverage(real, fake, knn_radii(fake, k))
    return precision, recall


class ClassifierScore(NamedTuple):
    accuracy: float  # fraction whose argmax class is the intended label
    confidence: float  # mean softmax probability of the intended label


class FrechetJudge:
    """A Frechet distance judge with a protocol: a fixed reference set, a fixed count, and a floor.

    `judge(images)` is the Frechet distance, in `feature_net`'s features, between exactly `judge.count` images
    and `reference`; `floor()` is the same figure for `held_out`, real images the generators never scored
    against (real against real at the same count). Fréchet distances are biased by the sample count, so any
    other count raises. Reference statistics are computed once and cached. Subclasses set the data
    (FD-digits: `FDDigits`; FD-shapes: `distill.demo.shapes_judge.ShapesJudge`).
    """

    def __init__(self, feature_net: ClassifierFeatureNet, reference: torch.Tensor, held_out: torch.Tensor,
                 batch_size: int = 512, device: str | torch.device = "cpu") -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.feature_net = feature_net.to(device)
        self.resolution = feature_net.resolution
        self.channels = feature_net.channels
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.reference, self.held_out = reference, held_out
        self.count = len(held_out)
        self._floor: float | None = None
        self._floor_pr: tuple[float, float] | None = None
        self._reference_features: torch.Tensor | None = None
        # reset_real_features=False: reset() clears only the generated-side statistics.
        self._fid = FrechetInceptionDistance(feature=self.feature_net, reset_real_features=False).to(self.device)
        for start in range(0, len(self.reference), batch_size):
            self._fid.update(self.reference[start : start + batch_size].to(self.device), real=True)

    def check(self, images: torch.Tensor, count: int | None = None) -> None:
        check_images(images, self.resolution, count=count, channels=self.channels)

    def __call__(self, images: torch.Tensor) -> float:
        """The Frechet distance of exactly `self.count` float images in [-1, 1] (clamped, as saving to PNG would)
        against the reference."""
        self.check(images, count=self.count)
        images = images.to(self.device).clamp(-1.0, 1.0)
        self._fid.reset()
        for start in range(0, len(images), self.batch_size):
            self._fid.update(images[start : start + self.batch_size], real=False)
        return float(self._fid.compute())

    def floor(self) -> float:
        """Real against real at the protocol count: `held_out` against the reference."""
        if self._floor is None:
            self._floor = self(self.held_out)
        return self._floor

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The judge's features (N, num_features) of float images in [-1, 1] (clamped)."""
        self.check(images)
        return torch.cat([
            self.feature_net(images[start : start + self.batch_size].to(self.device).clamp(-1.0, 1.0))
            for start in range(0, len(images), self.batch_size)
        ]).cpu()  # fmt: skip

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's logits of float images in [-1, 1] (clamped), any count."""
        self.check(images)
        classifier = self.feature_net.classifier
        return torch.cat([
            classifier(images[start : start + self.batch_size].to(self.device).float().clamp(-1.0, 1.0))
            for start in range(0, len(images), self.batch_size)
        ]).cpu()  # fmt: skip

    def precision_recall(self, images: torch.Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
        """Improved precision and recall (k = 3) of exactly `self.count` images against the reference, in the
        judge's features. The real `held_out` set gives the protocol's reference values (`floor_precision_recall`)."""
        self.check(images, count=self.count)
        if self._reference_features is None:
            self._reference_features = self.features(self.reference)
        return precision_recall(self._reference_features, self.features(images), k)

    def floor_precision_recall(self) -> tuple[float, float]:
        """Precision and recall of the real `held_out` set against the reference: what a perfect generator would
        score."""
        if self._floor_pr is None:
            self._floor_pr = self.precision_recall(self.held_out)
        return self._floor_pr
