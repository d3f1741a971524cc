"""rCM: sCM regularised by distribution matching (Zheng et al. 2025, arXiv 2510.08431).

The generator loss is sCM's continuous-time consistency loss (`distill.recipes.scm`, forward consistency, which
keeps diversity) plus `dmd_weight` times DMD's reverse-divergence term (mode seeking, which sharpens few-step
samples): the student's own k-step rollout (backward simulation, gradient through the last step only, as the
exported pipeline samples) is re-noised at a time from the DMD term's own sampler (uniform in unit time with a
shift, rCM: shift 5) and pushed along the normalised DMD gradient (x0_fake - x0_real) / mean|x - x0_real| with the
teacher's CFG as the real score and a trainable fake score (DMD2's `FakeScore`) fitted to the student's samples,
`trainer.critic_steps` critic updates per student update (rCM: 5). The DMD losses and the critic are DMD2's,
imported, never copied. Both terms share one forward of the wrapped student (its sCM input and its rollout
input concatenated), so DDP sees one forward per backward.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.config import Config as RunConfig
from distill.config import require
from distill.models.denoiser import Denoiser
from distill.models.schedules import rollout, step_input
from distill.parametrization import add_noise, flow_shift, trigflow_from_x0, trigflow_to_native
from distill.recipes.dmd2 import FakeScore, denoising_loss, dmd_gradient, dmd_loss
from distill.recipes.scm import SCM, scm_loss
from distill.recipes.scm import Config as SCMConfig
from distill.training.recipe import Nets, Recipe


class Config(SCMConfig):
    dmd_weight: float = Field(1.0, ge=0.0, description="weight of the DMD regulariser; 0 = plain sCM")
    dmd_min_t: float = Field(0.02, ge=0.0, le=1.0, description="DMD term and fake score: lowest unit time")
    dmd_max_t: float = Field(0.98, ge=0.0, le=1.0, description="highest unit time")
    dmd_shift: float = Field(1.0, gt=0.0, description="shift u -> k u / (1 + (k - 1) u) of the DMD time "
                                                      "sampler (rCM: 5 on Wan); 1 = none")

    @model_validator(mode="after")
    def _dmd_relations(self) -> "Config":
        require(self.dmd_min_t < self.dmd_max_t, "dmd_min_t",
                f"must be < recipe.dmd_max_t ({self.dmd_max_t}), got {self.dmd_min_t}")
        return self


class RCM(Recipe):
    """sCM (its recipe object, held: the generator, the stop-gradient target, the schedule) plus the DMD term."""

    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int,
                 image_shape: tuple[int, ...]):
        self.cfg = cfg
        self.scm = SCM(cfg, teacher, guidance_scale, num_steps)
        self.teacher, self.guidance_scale, self.image_shape = self.scm.teacher, guidance_scale, image_shape
        self.generator = self.scm.generator  # the CM student and its log-variance head
        self.critic = FakeScore(teacher.copy(trainable=True), gan=False)  # DMD2's fake score
        self.schedule, self.export_timesteps, self.sigma_data = self.scm.schedule, cfg.timesteps, self.scm.sigma_data

    def export_model(self, generator: nn.Module) -> Denoiser:
        return generator.student

    def sample_dmd_time(self, n: int, device: torch.device) -> Tensor:
        """The DMD term's own sampler: shifted uniform unit time, mapped to the teacher's native time."""
        u = torch.rand(n, device=device) * (self.cfg.dmd_max_t - self.cfg.dmd_min_t) + self.cfg.dmd_min_t
        return self.teacher.process.from_unit(flow_shift(u, self.cfg.dmd_shift))

    def rollout_input(self, nets: Nets, cond: Condition, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(x, t) of a uniformly chosen student step; earlier steps are the student's rollout without gradient."""
        sched = self.schedule
        noise = torch.randn((n, *self.image_shape), device=device)
        i = int(torch.randint(0, sched.num_steps, ()).item())
        x = step_input(self.export_model(nets.generator), sched, cond, noise, i)
        return x, sched.t(i, n, device)

    def dmd_term(self, nets: Nets, x: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        """Per-sample DMD loss of student samples `x` (with grad) and the DMD gradient it applies."""
        t = self.sample_dmd_time(x.shape[0], x.device)
        x_t = add_noise(self.teacher.process, x.detach(), torch.randn_like(x), t)
        with torch.no_grad():
            x0_real = self.teacher(x_t, t, cond, guidance_scale=self.guidance_scale)
            x0_fake = nets.critic.denoiser(x_t, t, cond)
            grad = dmd_gradient(x.detach(), x0_real, x0_fake)
        return dmd_loss(x, grad), grad

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg, sd = self.cfg, self.sigma_data
        x0_data, cond = batch.images, batch.cond
        n = x0_data.shape[0]
        student = self.export_model(nets.generator)
        # sCM part: the stop-gradient target (teacher velocity, one JVP), as in the sCM recipe.
        x_t, t, F_minus, g, g_norm = self.scm.consistency_target(nets, batch, step)
        x_native, t_native = trigflow_to_native(student.process, x_t, t, sd)
        # DMD part: the input of the student's last (gradient) step.
        x_roll, t_roll = self.rollout_input(nets, cond, n, x0_data.device)
        both = {k: torch.cat([v, v]) for k, v in cond.items()}
        x0_both, logvar_both = nets.trained(torch.cat([x_native, x_roll]), torch.cat([t_native, t_roll]), both,
                                              with_logvar=True)
        x0_theta, x_student = x0_both[:n], x0_both[n:]
        F_theta = trigflow_from_x0(x0_theta, x_t, t, sd)
        loss_scm = scm_loss(F_theta, F_minus, g, logvar_both[:n] if cfg.adaptive_weighting else None).mean()
        loss_dmd, grad = self.dmd_term(nets, x_student, cond)
        loss_dmd = loss_dmd.mean()
        loss = loss_scm + cfg.dmd_weight * loss_dmd
        return loss, {"loss": loss.item(), "scm_loss": loss_scm.item(), "dmd_loss": loss_dmd.item(),
                      "dmd_grad_abs": grad.abs().mean().item(), "tangent_norm": g_norm}

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """The fake score's denoising loss on the student's (detached) rollout samples (DMD2 sec. 4.2)."""
        cond = batch.cond
        n = next(iter(cond.values())).shape[0]
        device = next(iter(cond.values())).device
        x_in, t_in = self.rollout_input(nets, cond, n, device)
        with torch.no_grad():
            x = self.export_model(nets.generator)(x_in, t_in, cond)
        t = self.sample_dmd_time(n, device)
        x_t = add_noise(self.teacher.process, x, torch.randn_like(x), t)
        x0_hat, _ = nets.trained(x_t, t, cond)
        fake_score = nets.critic.denoiser
        loss = denoising_loss(fake_score.to_native(x0_hat, x_t, t), fake_score.to_native(x, x_t, t)).mean()
        return loss, {"loss": loss.item(), "denoise_loss": loss.item()}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(self.export_model(generator), self.schedule, cond, noise)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> RCM:
    return RCM(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, tuple(dataset.image_shape))
