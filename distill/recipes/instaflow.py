"""InstaFlow: a one-step student regressed on a (reflowed) flow's ODE pairs (Liu et al. 2023, arXiv 2309.06380,
sec. 3, "distillation"; Liu et al. 2022, arXiv 2209.03003, sec. 2.3).

With pairs (z, x1) from the flow's ODE (distill.data.pairs, teacher.path = the flow), the student G is trained so that
G(z) = x1:  loss = d(G(z), x1)  with d = L2, pseudo-Huber, or a perceptual network (LPIPS in the papers).

The student is the flow's network in the export target's parametrization (EDM -> "cm",
distill.models.schedules.student_from_teacher), and G(z) is its single step from sigma_max z: exactly what the stock
ConsistencyModelPipeline computes (its output is then clipped to [-1, 1], as `rollout` does), so the exported
sampler is the function that was regressed. The first-order flow step from s_max is the same x0 estimate, so the
student starts as the flow's one-step Euler sampler.

SlimFlow's flow-guided distillation (Zhu et al. 2024, arXiv 2407.12718, sec. 3.3) is `flow_guidance_weight > 0`:
a second regression on fresh noise z' whose target is the flow's own two-step Euler sample with a random
intermediate time (made online, without gradient), so the student also learns the flow away from the stored
pairs: loss = d(G(z), x1) + w d(G(z'), Euler2(z')).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.base.batch import Batch, Condition, concat_conditions
from distill.base.errors import ConfigError
from distill.config import Config as RunConfig
from distill.config import Section
from distill.data.pairs import PairDataset, PairsConfig, RegressionConfig, open_pairs
from distill.models.denoiser import Denoiser
from distill.models.schedules import rollout, student_from_teacher, student_schedule
from distill.parametrization import flow_range, flow_velocity
from distill.recipes.reflow import parameter_count, vp_latent_teacher
from distill.training.recipe import Nets, Recipe


class Config(Section):
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="the flow's ODE pairs (made with "
                                                                        "teacher.path = the flow)")
    regression: RegressionConfig = Field(default_factory=RegressionConfig, description="the regression's "
                                         "distance on the stored pairs")
    flow_guidance_weight: float = Field(0.0, ge=0.0, description="SlimFlow's flow-guided distillation: weight "
                                                                 "of the regression on the flow's online 2-step "
                                                                 "samples; 0 = plain InstaFlow")

    def check_run(self, cfg: RunConfig) -> None:
        pipeline = vp_latent_teacher(cfg)
        if self.flow_guidance_weight > 0 and pipeline is not None:
            raise ConfigError(f"recipe.flow_guidance_weight: the flow's two-step Euler target needs a flow-matching "
                              f"teacher (SD3, Flux, Wan); {pipeline} is a VP family (not implemented)")


# ---------------------------------------------------------------------------------------------------------------
# The flow's two-step Euler sample with a random intermediate time (SlimFlow sec. 3.3's guidance target)
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def two_step_euler(x0_net, process, z: Tensor, cond: Condition, s_mid: Tensor) -> Tensor:
    """x_s_max = s_max z, one Euler step to s_mid (per sample), one to 0 (which lands on the x0 estimate)."""
    _, s_max = flow_range(process)
    s0 = torch.full((z.shape[0],), s_max, device=z.device)
    x = z * s_max
    x = x + (s_mid - s0).reshape(-1, *([1] * (z.ndim - 1))) * flow_velocity(x0_net, process, x, s0, cond)
    return x - s_mid.reshape(-1, *([1] * (z.ndim - 1))) * flow_velocity(x0_net, process, x, s_mid, cond)


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class InstaFlow(Recipe):
    def __init__(self, cfg: Config, flow: Denoiser, guidance_scale: float, dataset: PairDataset):
        self.cfg = cfg
        self.flow = flow.eval().requires_grad_(False)
        self.guidance_scale = guidance_scale
        self.dataset = dataset  # the trainer draws (noise, flow sample, condition) batches from the store
        self.generator = student_from_teacher(flow)
        self.schedule = student_schedule(self.generator, 1)
        self.distance = cfg.regression.distance()

    def _flow_x0(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        return self.flow(x_t, t, cond, guidance_scale=self.guidance_scale)

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if batch.noise is None:
            raise ValueError("instaflow trains on a pair store: the batch has no noise")
        z, x1, cond = batch.noise, batch.images, batch.cond
        n = z.shape[0]
        inputs, targets = self.schedule.start(z), x1
        if self.cfg.flow_guidance_weight > 0:
            z_fresh = torch.randn_like(z)
            _, s_max = flow_range(self.flow.process)
            s_mid = torch.rand(n, device=z.device) * s_max
            guide = two_step_euler(self._flow_x0, self.flow.process, z_fresh, cond, s_mid)
            inputs, targets = torch.cat([inputs, self.schedule.start(z_fresh)]), torch.cat([x1, guide])
            cond = concat_conditions(cond, cond)
        # One pass with gradient through the trained generator: the student's single step, unclipped.
        out = nets.trained(inputs, self.schedule.t(0, inputs.shape[0], z.device), cond)
        per_sample = self.distance(out, targets)
        loss_pairs = per_sample[:n].mean()
        loss = loss_pairs
        logs = {"regression_loss": loss_pairs.item()}
        if self.cfg.flow_guidance_weight > 0:
            loss_guide = per_sample[n:].mean()
            loss = loss + self.cfg.flow_guidance_weight * loss_guide
            logs["flow_guidance_loss"] = loss_guide.item()
        logs["loss"] = loss.item()
        return loss, logs

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> InstaFlow:
    import logging

    if cfg.student.num_steps != 1:
        raise ConfigError(f"student.num_steps: instaflow trains one-step students (its single step is regressed "
                          f"on the stored sample), got {cfg.student.num_steps}")
    pairs = open_pairs(cfg.recipe.pairs, dataset)
    recipe = InstaFlow(cfg.recipe, teacher, cfg.teacher.guidance_scale, pairs)
    logging.getLogger("distill").info("instaflow student: %s with %d parameters",
                                      type(recipe.generator.model).__name__, parameter_count(recipe.generator.model))
    return recipe
