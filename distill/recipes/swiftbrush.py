"""SwiftBrush: one-step text-to-image diffusion with variational score distillation (Nguyen & Tran 2024,
arXiv 2312.05239), here on class conditions.

Image-free: no real image is ever used (`batch.images` is ignored). Variational score distillation (VSD,
ProlificDreamer; SwiftBrush sec. 3-4) trains the student G with the gradient

    grad_x = w(t) (eps_teacher(x_t) - eps_lora(x_t)),   x_t = alpha_t G(z) + sigma_t eps,

where eps_lora is the student's score: a LoRA on the teacher, fitted to the student's samples by ordinary
denoising (alternating 1:1 with the student in the paper). The teacher's prediction is the base network with the
adapter off; the fake one has it on; classifier-free guidance is applied to both (paper: 4.5 on each). In x0
form eps_teacher - eps_lora = (alpha_t / sigma_t) (x0_lora - x0_teacher); with DMD's weighting
w(t) = sigma_t / (alpha_t mean |x - x0_teacher|) (DMD eq. 8) the gradient is DMD's `dmd_gradient`. The LoRA is
trained with label dropout to the null class so that its unconditional branch, used by its CFG, follows the
student too.

The student is a full copy of the teacher, or with `adapters: true` a second adapter on the same base (one
network in memory).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor

from distill.base.batch import Batch, Condition
from distill.config import Config as RunConfig
from distill.config import require
from distill.models.adapters import AdapterDenoiser, add_lora_adapters
from distill.models.denoiser import Denoiser
from distill.models.schedules import student_from_teacher, student_prediction, student_schedule
from distill.recipes import dmd2
from distill.recipes.dmd2 import DMD2, FakeScore, denoising_loss, dmd_gradient, dmd_loss
from distill.training.recipe import Nets


class Config(dmd2.Config):
    fake_guidance_scale: float | None = Field(None, ge=0.0, description="CFG of the LoRA fake score; null = the "
                                                                        "teacher's teacher.guidance_scale (paper: "
                                                                        "4.5 on both)")
    fake_label_dropout: float = Field(0.1, ge=0.0, le=1.0, description="share of the fake score's training "
                                                                       "labels replaced by the null class")

    @model_validator(mode="after")
    def _image_free(self) -> "Config":
        require(not self.gan, "gan", "SwiftBrush is image-free; the GAN head needs real images (must be false)")
        require(self.regression_weight == 0, "regression_weight", "DMD (v1)'s regression is a dmd2 option; must be 0 here")
        return self


class SwiftBrush(DMD2):
    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int,
                 image_shape: tuple[int, ...]):
        self.cfg = cfg
        self.guidance_scale = guidance_scale
        self.fake_guidance_scale = guidance_scale if cfg.fake_guidance_scale is None else cfg.fake_guidance_scale
        self.image_shape = image_shape
        if not cfg.adapters:
            self.generator = student_from_teacher(teacher)  # a full copy, made before the adapters exist
        add_lora_adapters(teacher, ["student", "fake_score"] if cfg.adapters else ["fake_score"], rank=cfg.lora_rank)
        if cfg.adapters:
            self.generator = AdapterDenoiser(teacher, "student", prediction=student_prediction(teacher))
        self.teacher = AdapterDenoiser(teacher, None)  # the base with every adapter off
        self.critic = FakeScore(AdapterDenoiser(teacher, "fake_score"), gan=False)
        self.schedule = student_schedule(self.generator, num_steps)

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cond = batch.cond  # batch.images is never read: image-free
        x, t, x_t = self.noised_student_sample(nets, cond, grad=True)
        with torch.no_grad():
            x0_teacher = self.teacher(x_t.detach(), t, cond, guidance_scale=self.guidance_scale)
            x0_lora = nets.critic.denoiser(x_t.detach(), t, cond, guidance_scale=self.fake_guidance_scale)
            grad = dmd_gradient(x.detach(), x0_teacher, x0_lora)  # VSD in x0 form (module docstring)
        loss = self.cfg.dmd_weight * dmd_loss(x, grad).mean()
        return loss, {"vsd_loss": loss.item(), "vsd_grad_abs": grad.abs().mean().item(), "loss": loss.item()}

    def _dropped_labels(self, cond: Condition) -> Condition:
        """`cond` with a `fake_label_dropout` share of the samples set to the null condition."""
        if self.cfg.fake_label_dropout == 0.0:
            return cond
        null = self.teacher.family.null_condition(self.teacher.model, cond)
        n = next(iter(cond.values())).shape[0]
        drop = torch.rand(n, device=next(iter(cond.values())).device) < self.cfg.fake_label_dropout
        return {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), null[k], v) for k, v in cond.items()}

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cond = batch.cond
        x, t, x_t = self.noised_student_sample(nets, cond, grad=False)  # detached student samples
        x0_hat, _ = nets.trained(x_t, t, self._dropped_labels(cond))
        fake_score = nets.critic.denoiser
        loss = denoising_loss(fake_score.to_native(x0_hat, x_t, t), fake_score.to_native(x, x_t, t)).mean()
        return loss, {"denoise_loss": loss.item(), "loss": loss.item()}


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> SwiftBrush:
    return SwiftBrush(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, dataset.image_shape)
