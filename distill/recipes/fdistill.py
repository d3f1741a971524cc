"""f-distill: one-step diffusion models with f-divergence distribution matching (Xu, Nie, Vahdat 2025,
arXiv 2502.15681).

DMD/VSD minimise the reverse KL between the student's and the teacher's noisy marginals, which is mode-seeking.
f-distill minimises any f-divergence D_f(p || q) = E_q[f(p / q)] (p teacher, q student). Its gradient (sec. 3,
eq. 6) is the VSD/DMD gradient, per sample, weighted by

    h(r) = f''(r) r^2,   r = p_t(x_t) / q_t(x_t),

so samples where the teacher is denser than the student count more for less mode-seeking divergences. The
density ratio comes from a discriminator on the fake score's bottleneck features (DMD2's GAN head, trained with
the logistic loss whose optimal logit is log p_t / q_t): r = exp(logit), logit clamped to [-10, 10]. As in the
paper's two-stage normalisation, the score difference is normalised per sample (DMD's mean |x - x0_real|) and
h by its mean over the batch. With reverse KL h = 1 and the recipe is DMD2 with its GAN head, exactly.

Everything but the generator's gradient (backward simulation, the fake score's and discriminator's update) is
DMD2's (recipes/dmd2.py).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from distill.base.batch import Batch
from distill.config import Config as RunConfig
from distill.config import require
from distill.models.denoiser import Denoiser
from distill.recipes import dmd2
from distill.recipes.dmd2 import DMD2, dmd_gradient, dmd_loss
from distill.training.recipe import Nets

Divergence = Literal["reverse_kl", "forward_kl", "jensen_shannon", "squared_hellinger", "jeffreys", "neyman"]


class Config(dmd2.Config):
    divergence: Divergence = Field("jensen_shannon", description="the f-divergence D_f(teacher || student); "
                                                                 "reverse_kl is DMD2 (paper's best: jensen_shannon)")
    gan: bool = Field(True, description="the discriminator that estimates the density ratio (required)")
    max_abs_logit: float = Field(10.0, gt=0.0, description="the discriminator logit is clamped to [-this, this] "
                                                           "before r = exp(logit) (paper: 10)")

    @model_validator(mode="after")
    def _needs_discriminator(self) -> "Config":
        require(self.gan, "gan", "f-distill estimates the density ratio with the GAN head; must be true")
        require(self.regression_weight == 0, "regression_weight", "DMD (v1)'s regression is a dmd2 option; must be 0 here")
        return self


# ---------------------------------------------------------------------------------------------------------------
# The divergences: f (for reference and tests) and h(r) = f''(r) r^2 (Xu et al. 2025, Table 1)
# ---------------------------------------------------------------------------------------------------------------

#: f(r) with D_f(p || q) = E_q f(p / q); each is convex with f(1) = 0.
F_OF_R: dict[str, Callable[[Tensor], Tensor]] = {
    "reverse_kl": lambda r: -torch.log(r),                                            # KL(q || p)
    "forward_kl": lambda r: r * torch.log(r),                                         # KL(p || q)
    "jensen_shannon": lambda r: r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2),  # 2 JS(p, q)
    "squared_hellinger": lambda r: (torch.sqrt(r) - 1) ** 2,
    "jeffreys": lambda r: (r - 1) * torch.log(r),                                     # KL(p || q) + KL(q || p)
    "neyman": lambda r: (1 - r) ** 2 / r,                                             # Neyman chi^2
}

#: h(r) = f''(r) r^2, the per-sample weight of the score difference (paper eq. 6).
H_OF_R: dict[str, Callable[[Tensor], Tensor]] = {
    "reverse_kl": lambda r: torch.ones_like(r),
    "forward_kl": lambda r: r,
    "jensen_shannon": lambda r: r / (1 + r),
    "squared_hellinger": lambda r: 0.5 * torch.sqrt(r),
    "jeffreys": lambda r: 1 + r,
    "neyman": lambda r: 2 / r,
}


def density_ratio(logits: Tensor, max_abs_logit: float = 10.0) -> Tensor:
    """r = p_teacher / p_student from the discriminator's logit (optimal logit of the logistic loss: log r)."""
    return torch.exp(logits.clamp(-max_abs_logit, max_abs_logit))


def f_weights(logits: Tensor, divergence: str, max_abs_logit: float = 10.0) -> Tensor:
    """h(r) per sample, normalised by its batch mean (the paper's second normalisation stage). Pass detached
    logits."""
    h = H_OF_R[divergence](density_ratio(logits.float(), max_abs_logit))
    return h / h.mean()


# ---------------------------------------------------------------------------------------------------------------
# The recipe: DMD2 with the weighted gradient
# ---------------------------------------------------------------------------------------------------------------


class FDistill(DMD2):
    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cond = batch.cond
        x, t, x_t = self.noised_student_sample(nets, cond, grad=True)
        with torch.no_grad():
            x0_real = self.teacher(x_t.detach(), t, cond, guidance_scale=self.guidance_scale)
        # One pass of the frozen critic: the fake score's x0 and the discriminator's logit; the logit's graph
        # carries the GAN generator loss to x (when weighted), the detached outputs make the f-weighted gradient.
        gan_to_x = self.cfg.gan_generator_weight > 0
        with torch.set_grad_enabled(gan_to_x):
            x0_fake, logits = nets.critic(x_t if gan_to_x else x_t.detach(), t, cond)
        grad = dmd_gradient(x.detach(), x0_real, x0_fake.detach())
        weights = f_weights(logits.detach(), self.cfg.divergence, self.cfg.max_abs_logit)
        loss_dmd = (weights * dmd_loss(x, grad)).mean()
        loss_gan = F.softplus(-logits).mean()  # non-saturating generator loss, as in DMD2
        loss = self.cfg.dmd_weight * loss_dmd + self.cfg.gan_generator_weight * loss_gan
        ratio = density_ratio(logits.detach(), self.cfg.max_abs_logit)
        logs = {"dmd_loss": loss_dmd.item(), "dmd_grad_abs": grad.abs().mean().item(), "gan_loss": loss_gan.item(),
                "log_ratio_mean": ratio.log().mean().item(), "weight_max": weights.max().item(), "loss": loss.item()}
        return loss, logs


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> FDistill:
    return FDistill(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, dataset.image_shape)
