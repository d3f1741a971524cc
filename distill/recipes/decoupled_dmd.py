"""Decoupled DMD: CFG augmentation as the spear, distribution matching as the shield (Liu et al. 2025,
arXiv 2511.22677).

With a CFG teacher (guidance w, convention uncond + w (cond - uncond)) the real score is
s_real^w = s_real^cond + (w - 1)(s_real^cond - s_real^uncond), so DMD's gradient s_real^w - s_fake splits into

    distribution matching (DM):  s_real^cond - s_fake^cond
    CFG augmentation (CA):       (w - 1) (s_real^cond - s_real^uncond)

(paper sec. 3). The paper finds CA drives few-step quality and DM regularises, and re-noises the student's
sample at separately sampled noise levels for each term. Here each term has its own noise-level range (unit
time, uniform) and weight. In x0 form (x0 = x_t + sigma^2 s for EDM; affine in the score for every process) the
terms, pointing away from the teacher as DMD's gradient does, are

    DM = (x0_fake - x0_cond) / n,   CA = -(w - 1) (x0_cond - x0_uncond) / n,

with DMD's per-sample normaliser n = mean |x - x0_real^w| at each term's own x_t, so DM + CA is DMD2's gradient
when both terms share one noise draw. When the two ranges are equal the recipe draws once and is DMD2 exactly
(with dm_weight = ca_weight = 1); plain DMD2 is that special case.

The fake score, the GAN head and backward simulation are DMD2's (recipes/dmd2.py).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from distill.base.batch import Batch, Condition, concat_conditions
from distill.config import Config as RunConfig
from distill.config import require
from distill.models.denoiser import Denoiser
from distill.parametrization import add_noise
from distill.recipes import dmd2
from distill.recipes.dmd2 import DMD2, dmd_loss
from distill.training.recipe import Nets


class Config(dmd2.Config):
    # min_t / max_t (inherited) are the DM term's range and the fake score's.
    ca_min_t: float = Field(0.02, ge=0.0, le=1.0, description="lowest noise level of the CA term, unit time")
    ca_max_t: float = Field(0.98, ge=0.0, le=1.0, description="highest noise level of the CA term, unit time")
    dm_weight: float = Field(1.0, ge=0.0, description="weight of the distribution-matching term")
    ca_weight: float = Field(1.0, ge=0.0, description="weight of the CFG-augmentation term")

    @model_validator(mode="after")
    def _ca_range(self) -> "Config":
        require(self.ca_min_t < self.ca_max_t, "ca_min_t", f"must be < recipe.ca_max_t ({self.ca_max_t}), "
                                                            f"got {self.ca_min_t}")
        require(self.dm_weight + self.ca_weight > 0, "dm_weight", "dm_weight and ca_weight cannot both be 0")
        require(self.regression_weight == 0, "regression_weight", "DMD (v1)'s regression is a dmd2 option; must be 0 here")
        return self


# ---------------------------------------------------------------------------------------------------------------
# The two terms (pure function; tested to sum to DMD2's gradient)
# ---------------------------------------------------------------------------------------------------------------


def decoupled_gradients(x: Tensor, x0_cond: Tensor, x0_uncond: Tensor, x0_fake: Tensor,
                        guidance_scale: float) -> tuple[Tensor, Tensor]:
    """(DM, CA) in x0 form at one x_t, each normalised by DMD's mean |x - x0_real^w| (paper sec. 3 eq. for
    grad L_DMD = grad L_DM + (w - 1) grad L_CA). Pass detached estimates."""
    dims = tuple(range(1, x.ndim))
    x0_real = x0_uncond + guidance_scale * (x0_cond - x0_uncond)
    norm = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    dm = (x0_fake - x0_cond) / norm
    ca = -(guidance_scale - 1.0) * (x0_cond - x0_uncond) / norm
    return dm, ca


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class DecoupledDMD(DMD2):
    def _sample_ca_t(self, n: int, device: torch.device) -> Tensor:
        u = torch.rand(n, device=device) * (self.cfg.ca_max_t - self.cfg.ca_min_t) + self.cfg.ca_min_t
        return self.teacher.process.from_unit(u)

    def _teacher_cond_uncond(self, x_t: Tensor, t: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        """The teacher's conditional and unconditional x0 estimates from one batched call."""
        null = self.teacher.family.null_condition(self.teacher.model, cond)
        both = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), concat_conditions(cond, null))
        return both.chunk(2)

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg, w = self.cfg, self.guidance_scale
        cond = batch.cond
        x, t, x_t = self.noised_student_sample(nets, cond, grad=True)
        n, device = x.shape[0], x.device
        shared = (cfg.ca_min_t, cfg.ca_max_t) == (cfg.min_t, cfg.max_t)  # one draw: DMD2's gradient, split
        with torch.no_grad():
            x0_cond, x0_uncond = self._teacher_cond_uncond(x_t.detach(), t, cond)
            x0_fake = nets.critic.denoiser(x_t.detach(), t, cond)
            dm, ca = decoupled_gradients(x.detach(), x0_cond, x0_uncond, x0_fake, w)
            if not shared:
                t_ca = self._sample_ca_t(n, device)
                x_t_ca = add_noise(self.teacher.process, x.detach(), torch.randn_like(x), t_ca)
                x0_cond_ca, x0_uncond_ca = self._teacher_cond_uncond(x_t_ca, t_ca, cond)
                _, ca = decoupled_gradients(x.detach(), x0_cond_ca, x0_uncond_ca, x0_cond_ca, w)
        loss_dm, loss_ca = dmd_loss(x, dm).mean(), dmd_loss(x, ca).mean()
        loss = cfg.dmd_weight * (cfg.dm_weight * loss_dm + cfg.ca_weight * loss_ca)
        logs = {"dm_loss": loss_dm.item(), "ca_loss": loss_ca.item(), "dm_grad_abs": dm.abs().mean().item(),
                "ca_grad_abs": ca.abs().mean().item()}
        if cfg.gan:
            _, logits = nets.critic(x_t, t, cond)  # gradient reaches x through the frozen critic
            loss_gan = F.softplus(-logits).mean()  # non-saturating generator loss, as in DMD2
            loss = loss + cfg.gan_generator_weight * loss_gan
            logs["gan_loss"] = loss_gan.item()
        logs["loss"] = loss.item()
        return loss, logs


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> DecoupledDMD:
    if cfg.teacher.guidance_scale == 1.0:
        logging.getLogger("distill").warning("decoupled_dmd with teacher.guidance_scale=1.0: the CFG-augmentation "
                                             "term is zero and the recipe is DMD2 with the DM term alone")
    return DecoupledDMD(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, dataset.image_shape)
