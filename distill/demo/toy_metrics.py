"""Scores of 2-D student samples against the true mixture of distill/data/toy.py (known truth, no judge network).

* mode coverage: a sample belongs to mode k when it lies within `radius_stds` standard deviations of mode k's
  mean; a mode is covered when it holds at least `min_share` of its expected share of the samples;
* mode-weight KL: KL(true weights || student's mode shares), the shares of on-mode samples (smoothed); forward
  KL on the weights, so it grows when a student drops or starves a light mode;
* precision and recall: improved precision/recall (Kynkaanniemi et al. 2019, `distill.evaluation.metrics.precision_recall`)
  of the samples against as many true samples, in data space;
* NLL: -mean log p(x) of the samples under the true mixture (nats; the true samples' own NLL, the mixture's
  entropy estimate, is reported beside it: lower than that means samples crowded on the densest modes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.data.toy import GaussianMixture
from distill.evaluation.metrics import precision_recall


def mode_assignment(mixture: GaussianMixture, points: Tensor, radius_stds: float = 3.0) -> Tensor:
    """Index of the mode within `radius_stds` std of each point, or -1 (off every mode), shape (N,)."""
    d = torch.cdist(points.double(), mixture.means.double())  # (N, K)
    nearest = d.argmin(dim=1)
    inside = d.gather(1, nearest[:, None]).squeeze(1) <= radius_stds * mixture.stds.double()[nearest]
    return torch.where(inside, nearest, torch.full_like(nearest, -1))


def toy_report(mixture: GaussianMixture, samples: Tensor, seed: int = 0, radius_stds: float = 3.0,
               min_share: float = 0.1) -> dict[str, float]:
    """Every toy metric of `samples` (N, 2)."""
    if samples.ndim != 2 or samples.shape[1] != mixture.dim:
        raise ValueError(f"samples must have shape (N, {mixture.dim}), got {tuple(samples.shape)}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("samples contain non-finite values")
    n = len(samples)
    modes = mode_assignment(mixture, samples, radius_stds)
    counts = torch.bincount(modes[modes >= 0], minlength=mixture.num_modes).double()
    expected = mixture.weights.double() * n
    shares = (counts + 0.5) / (counts.sum() + 0.5 * mixture.num_modes)
    w = mixture.weights.double()
    real, _ = mixture.sample(n, torch.Generator().manual_seed(seed))
    precision, recall = precision_recall(real.double(), samples.double())
    return {
        "modes_covered": float((counts >= min_share * expected).sum()),
        "num_modes": float(mixture.num_modes),
        "on_mode": float((modes >= 0).double().mean()),
        "mode_weight_kl": float((w * (w / shares).log()).sum()),
        "precision": precision,
        "recall": recall,
        "nll": float(-mixture.log_prob(samples.double()).mean()),
        "nll_true_samples": float(-mixture.log_prob(real.double()).mean()),
    }
