"""A 2-D toy with known truth: a mixture of isotropic Gaussians, its exact density and score at every noise level.

Under the EDM corruption x = x0 + sigma eps, a mixture sum_k w_k N(mu_k, s_k^2 I) stays a mixture:
p_sigma(x) = sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I), so its log-density, its score

    grad log p_sigma(x) = sum_k r_k(x) (mu_k - x) / (s_k^2 + sigma^2),   r_k = responsibility of component k,

and the exact denoiser (Tweedie) E[x0 | x] = x + sigma^2 grad log p_sigma(x) are closed forms. The toy teacher
(`distill/assets/toy_teacher`, a :class:`distill.families.toy.ToyMLP`) is trained on samples of
:data:`RING`; the recipes distil it, and :mod:`distill.demo.toy_metrics` scores students against the true mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GaussianMixture:
    """sum_k weights[k] N(means[k], stds[k]^2 I) in `means.shape[1]` dimensions (weights sum to 1)."""

    means: Tensor  # (K, D)
    stds: Tensor  # (K,)
    weights: Tensor  # (K,)

    def __post_init__(self):
        k = self.means.shape[0]
        if self.means.ndim != 2 or self.stds.shape != (k,) or self.weights.shape != (k,):
            raise ValueError(f"means (K, D), stds (K,), weights (K,) expected, got {tuple(self.means.shape)}, "
                             f"{tuple(self.stds.shape)}, {tuple(self.weights.shape)}")
        if abs(float(self.weights.sum()) - 1.0) > 1e-6 or bool((self.weights <= 0).any()):
            raise ValueError(f"weights must be positive and sum to 1, got {self.weights.tolist()}")

    @property
    def num_modes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _log_components(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """log(w_k N(x; mu_k, (s_k^2 + sigma^2) I)) of shape (N, K); `sigma` a float or (N,)."""
        x = x.to(self.means.dtype)
        var = self.stds[None, :] ** 2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2  # (N or 1, K)
        sq = (x[:, None, :] - self.means[None]).pow(2).sum(-1)  # (N, K)
        return self.weights.log()[None] - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """log p_sigma(x), shape (N,): the density of x0 + sigma eps."""
        return torch.logsumexp(self._log_components(x, sigma), dim=1)

    def responsibilities(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """r_k(x) = P(component k | x) under p_sigma, shape (N, K)."""
        return self._log_components(x, sigma).softmax(dim=1)

    def score(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """grad_x log p_sigma(x), shape (N, D)."""
        x = x.to(self.means.dtype)
        var = self.stds[None, :] ** 2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2
        r = self.responsibilities(x, sigma)
        return ((r / var)[:, :, None] * (self.means[None] - x[:, None, :])).sum(1)

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """The exact denoiser E[x0 | x0 + sigma eps = x] (Tweedie: x + sigma^2 score)."""
        s2 = torch.as_tensor(sigma, dtype=self.means.dtype).reshape(-1, 1) ** 2
        return x.to(self.means.dtype) + s2 * self.score(x, sigma)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples (N, D) and their component indices (N,)."""
        comp = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[comp] + self.stds[comp, None] * noise, comp


def ring(num_modes: int = 8, radius: float = 0.7, std: float = 0.05, weights: list[float] | None = None,
         dtype: torch.dtype = torch.float32) -> GaussianMixture:
    """`num_modes` Gaussians evenly on a circle (inside [-1, 1]^2, where students' x0 is clipped)."""
    angle = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    w = torch.full((num_modes,), 1.0 / num_modes, dtype=torch.float64) if weights is None \
        else torch.as_tensor(weights, dtype=torch.float64) / sum(weights)
    return GaussianMixture(means.to(dtype), torch.full((num_modes,), std, dtype=dtype), w.to(dtype))


#: the toy's data distribution: 8 modes on a ring of radius 0.7, std 0.05, UNEQUAL weights (0.2 down to 0.05) so
#: that mode-seeking (reverse KL) and mode-covering (forward KL) students differ on the light modes.
RING_WEIGHTS = [0.2, 0.2, 0.15, 0.15, 0.1, 0.1, 0.05, 0.05]


def toy_mixture(dtype: torch.dtype = torch.float32) -> GaussianMixture:
    return ring(8, 0.7, 0.05, RING_WEIGHTS, dtype=dtype)


class ToyDataset:
    """Samples of :func:`toy_mixture` for training (data.name: toy). One class (label 0) plus the null class of
    the ToyMLP, so recipes that read the batch size and CFG from the condition run unchanged."""

    num_classes = 1
    image_shape = (2,)

    def __init__(self):
        self.mixture = toy_mixture()

    def sample(self, batch_size: int, generator: torch.Generator):
        from distill.base.batch import Batch

        points, _ = self.mixture.sample(batch_size, generator)
        return Batch(points, {"class_labels": torch.zeros(batch_size, dtype=torch.int64)})

    def grid_condition(self, n: int) -> dict[str, Tensor]:
        return {"class_labels": torch.zeros(n, dtype=torch.int64)}
