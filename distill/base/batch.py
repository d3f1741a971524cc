"""What flows between data, models and recipes: a condition (a dict of tensors) and a batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Condition = dict[str, Tensor]


@dataclass
class Batch:
    """One micro-batch: real images (may be None for image-free recipes) and their conditioning; from a pair
    store (distill.data.pairs), `images` are teacher samples and `noise` the noise each was integrated from."""

    images: Tensor | None
    cond: dict[str, Tensor] = field(default_factory=dict)
    noise: Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        return Batch(None if self.images is None else self.images.to(device), {k: v.to(device) for k, v in self.cond.items()},
                     None if self.noise is None else self.noise.to(device))


def concat_conditions(a: Condition, b: Condition) -> Condition:
    """Stack two conditions along the batch (for one batched guided call)."""
    if a.keys() != b.keys():
        raise ValueError(f"condition keys differ: {sorted(a)} vs {sorted(b)}")
    return {k: torch.cat([a[k], b[k]]) for k in a}


def repeat_condition(cond: Condition, n: int) -> Condition:
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


def index_condition(cond: Condition, index: Any) -> Condition:
    return {k: v[index] for k, v in cond.items()}
