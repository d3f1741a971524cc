"""The judge of the text-to-image task: a small classifier of a caption's attributes (shape, colour, position) on
24x24 captioned shapes (distill/demo/shapes.py), giving text-image agreement and FD-shapes.

* **Agreement**: the fraction of images whose three predicted attributes all match their caption's (per-attribute
  accuracies beside it). Real reference images score 1.000 (docs/text_to_image.md).
* **FD-shapes**: a Frechet distance in the classifier's 64 penultimate features (`distill.evaluation.metrics.FrechetJudge`,
  the machinery of FD-digits) of exactly 960 images (20 per caption) against the reference split (960 images
  that no generator trains on). The floor is the first 960 train images against it. FD-shapes is NOT Inception
  FID: its values are on their own scale.

The classifier is trained on the train split only (`scripts/train_shapes_judge.py`) and shipped in
`distill/assets/shapes_judge/`.

    judge = ShapesJudge()
    judge.report(images, captions)   # {"agreement", "shape", "colour", "position", "fd_shapes", ...}

`shapes_features` is the same feature network for the user-facing COCO-protocol script, so it scores a shapes
pipeline in FD-shapes features: `python scripts/eval_fid.py PIPELINE --prompts P --reference PNGS --resolution 24
--feature-module distill.demo.shapes_judge:shapes_features` (docs/evaluation.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.base.paths import ASSETS
from distill.demo.shapes import ATTRIBUTES, RESOLUTION, SPLITS, attributes_of, shapes_split
from distill.evaluation.metrics import ClassifierFeatureNet, FrechetJudge
from distill.models.classifier import ConvClassifier, load_classifier

SHAPES_JUDGE_DIR = ASSETS / "shapes_judge"
#: the protocol count: 20 images per caption, the size of the reference split
JUDGE_COUNT = SPLITS["reference"]
#: logits per attribute, in the order of an attribute row (shape, colour, position)
ATTRIBUTE_SIZES = tuple(len(v) for v in ATTRIBUTES.values())


class ShapesClassifier(ConvClassifier):
    """The shapes judge's classifier: a `ConvClassifier` for (N, 3, 24, 24) images whose 11 logits are split per
    attribute (shape 3, colour 4, position 4). The constructor arguments are exactly what `config.json` stores."""

    def __init__(self, resolution: int = RESOLUTION, channels: tuple[int, int] = (16, 32), num_features: int = 64,
                 dropout: float = 0.2) -> None:
        super().__init__(3, resolution, channels, num_features, sum(ATTRIBUTE_SIZES), dropout)


def split_logits(logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(shape, colour, position) logits from the concatenated head output."""
    return logits.split(ATTRIBUTE_SIZES, dim=-1)


def attribute_loss(logits: torch.Tensor, attributes: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The sum over the three attributes of their cross-entropies, mean over the batch."""
    return sum(F.cross_entropy(part, attributes[:, i], label_smoothing=label_smoothing)
               for i, part in enumerate(split_logits(logits)))


def predict_attributes(logits: torch.Tensor) -> torch.Tensor:
    """(N, 3) predicted attribute rows (shape, colour, position)."""
    return torch.stack([part.argmax(-1) for part in split_logits(logits)], dim=1)


def load_shapes_classifier(path: str | Path | None = None) -> ShapesClassifier:
    """The shipped shapes classifier (or the one in folder `path`), in eval mode, loaded with safetensors only."""
    folder = Path(path) if path is not None else SHAPES_JUDGE_DIR
    return load_classifier(folder, ShapesClassifier, "shapes classifier", "scripts/train_shapes_judge.py")


class ShapesJudge(FrechetJudge):
    """Agreement and FD-shapes (NOT Inception FID) of 24x24 text-to-image samples; see the module docstring.

    Reference: the reference split (960 images, 20 per caption); floor: the first 960 train images."""

    def __init__(self, classifier: ShapesClassifier | None = None, batch_size: int = 512,
                 device: str | torch.device = "cpu") -> None:
        feature_net = ClassifierFeatureNet(classifier if classifier is not None else load_shapes_classifier())
        reference = shapes_split("reference")[0]
        held_out = shapes_split("train", JUDGE_COUNT)[0]
        super().__init__(feature_net, reference, held_out, batch_size=batch_size, device=device)

    @staticmethod
    def protocol_captions() -> list[str]:
        """The captions of a protocol sample set: every caption 20 times, in caption order, repeated."""
        return shapes_split("reference")[2]

    def attribute_scores(self, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
        """Agreement (all three attributes right) and each attribute's accuracy, for any number of images."""
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        want = attributes_of(list(captions))
        right = predict_attributes(self.logits(images)) == want
        scores = {"agreement": float(right.all(dim=1).double().mean())}
        scores.update({name: float(right[:, i].double().mean()) for i, name in enumerate(ATTRIBUTES)})
        return scores

    def report(self, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
        """Agreement, per-attribute accuracies, FD-shapes, precision and recall of `self.count` images."""
        precision, recall = self.precision_recall(images)
        return {**self.attribute_scores(images, captions), "fd_shapes": self(images), "precision": precision,
                "recall": recall}


class ShapesFeatures(nn.Module):
    """The judge's 64 features of uint8 images (N, 3, 24, 24), mapped to [-1, 1] as the judge reads them: the
    `--feature-module` contract of scripts/eval_fid.py."""

    def __init__(self, classifier: ShapesClassifier | None = None) -> None:
        super().__init__()
        self.net = ClassifierFeatureNet(classifier if classifier is not None else load_shapes_classifier())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, RESOLUTION, RESOLUTION):
            raise ValueError(f"shapes features take uint8 images (N, 3, {RESOLUTION}, {RESOLUTION}); got "
                             f"{tuple(images.shape)} {images.dtype} (eval_fid.py: pass --resolution {RESOLUTION})")
        return self.net(images.float() / 127.5 - 1.0)


def shapes_features() -> ShapesFeatures:
    """The factory `scripts/eval_fid.py --feature-module distill.demo.shapes_judge:shapes_features` calls."""
    return ShapesFeatures().eval()
