"""The small convolutional classifier every judge of generated images is built on (digits, shapes; the judges
themselves in `distill.evaluation.metrics` and `distill/demo/`), and its loader: safetensors weights and a
`config.json` of constructor arguments. It sits with the networks so a recipe can use a shipped classifier as a
frozen reward model (`distill/recipes/crd.py`) without reaching up into evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

class ConvClassifier(nn.Module):
    """Small CNN for (N, in_channels, R, R) images in [-1, 1]: two conv blocks, a `num_features`-wide feature layer,
    a head of `num_classes` logits. The judges' classifiers (digits, shapes) are this network.

    `features(x)` returns the penultimate features of the Frechet distances (GELU, not ReLU: no unit dies and the
    feature covariance keeps full rank); `forward(x)` returns logits.
    """

    def __init__(self, in_channels: int, resolution: int, channels: tuple[int, int], num_features: int,
                 num_classes: int, dropout: float) -> None:
        super().__init__()
        if resolution % 4 != 0:
            raise ValueError(f"{type(self).__name__} resolution must be a multiple of 4, got {resolution}")
        c1, c2 = channels
        self.channels_in = in_channels
        self.resolution = resolution
        self.num_features = num_features
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.feature = nn.Linear(c2 * (resolution // 4) ** 2, num_features)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (N, num_features)."""
        return F.gelu(self.feature(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (N, num_classes)."""
        return self.head(self.dropout(self.features(x)))


def load_classifier(folder: Path, build, what: str, script: str,
                    tuple_keys: tuple[str, ...] = ("channels",)) -> nn.Module:
    """A judge's classifier from `folder` (`config.json`: the constructor arguments of `build`; `model.safetensors`),
    in eval mode, loaded with safetensors only; a missing or malformed file is an error naming it and `script`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{what} file missing: {file} (train it with {script})")
    try:
        config = json.loads(config_file.read_text())
        for key in tuple_keys:
            if key in config:
                config[key] = tuple(config[key])
        model = build(**config)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed {what} config {config_file}: {err}") from err
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"malformed {what} weights {weights_file}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights {weights_file} do not match config {config_file}: {err}") from err
    return model.eval()
