"""LCM-style discrete consistency distillation (Song et al. 2023, arXiv 2303.01469 Alg. 2; Luo et al. 2023,
arXiv 2310.04378 Alg. 1): the baseline users know from diffusers' examples.

On a grid of `num_timesteps` noise levels, evenly spaced in the teacher's unit time (EDM: the Karras grid of the
export target's scheduler; VP: integer timesteps from 0 to T - 1, LCM's DDIM grid; flow: shifted times from 0 to
1), pick n and the skipped level n - k. Noise data to x_n; one *skipping-step* teacher solver step (DDIM, the first-order
DPM-Solver++ step, with the teacher's classifier-free guidance) gives x_{n-k}; the student's x0 at (x_n, n) is
pulled toward the EMA *target network*'s x0 at (x_{n-k}, n - k) with a pseudo-Huber loss
sqrt(||a - b||^2 / D + c^2) - c (iCT, Song & Dhariwal 2023; LCM's diffusers example uses c = 0.001).

Boundary condition f(x, t_0) = x at the grid's clean end: the target at level 0 is x_0 itself. An EDM student is
the export target's consistency-model network, x0 = c_skip x + c_out F with CMStochasticIterativeScheduler's
scalings (c_skip = 1, c_out = 0 at sigma_min), which gives exactly that. A VP or flow student keeps its teacher's
prediction, as its export target samples it (LCMScheduler with the boundary scalings off, stochastic
FlowMatchEulerDiscreteScheduler; distill/families/target.py), so the boundary is imposed on the target instead. (LCM's
`timestep_scaling` = 10 builds it into SD's network; the export's own sampler is the one that must hold here.)

Guidance: the teacher's guidance w is fixed (`teacher.guidance_scale`) and distilled in. LCM feeds w as an input
embedding so one student serves a range of w; a stock `ConsistencyModelPipeline` has no input through which a
user could pass w, so such a student could only be exported at one baked w anyway. We keep one w per student.

The EMA target network is the trainer's (`target_decay`, handed to the loss as `nets.target` and checkpointed
with the run), separate from the exported EMA. Sampling is the export target's k-step schedule, exactly as the pipeline samples.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.base.errors import ConfigError
from distill.config import Config as RunConfig
from distill.config import Section, require, require_images
from distill.export.checks import check_custom_timesteps
from distill.models.denoiser import Denoiser
from distill.models.schedules import rollout, student_from_teacher, student_schedule
from distill.parametrization import _bcast, add_noise
from distill.training.recipe import Nets, Recipe


class Config(Section):
    num_timesteps: int = Field(40, ge=2, le=1000, description="levels of the discretisation grid, evenly spaced "
                                                              "in unit time (EDM: the export scheduler's "
                                                              "num_train_timesteps is 40; LCM on SD: 50)")
    skip_steps: int = Field(1, ge=1, description="k: the teacher solver jumps k grid levels (LCM: 20 of 1000)")
    target_decay: float = Field(0.95, ge=0.0, lt=1.0, description="EMA target network decay (LCM: 0.95); 0 = the "
                                                                  "student itself (stop-gradient)")
    huber_c: float = Field(0.001, gt=0.0, description="pseudo-Huber c (LCM: 0.001)")
    timesteps: list[int] | None = Field(None, description="custom pipeline timesteps of a multi-step student "
                                                          "(see recipe scm); null = `num_inference_steps` spacing")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.skip_steps < self.num_timesteps, "skip_steps",
                f"must be < recipe.num_timesteps ({self.num_timesteps}), got {self.skip_steps}")
        if self.timesteps is not None:
            ts = self.timesteps
            require(all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] == 0, "timesteps",
                    f"must be strictly descending and end with 0, got {ts}")
        return self

    def check_run(self, cfg: RunConfig) -> None:
        require_images(cfg, "data.name", "data samples are noised to x_n before the teacher's solver step, LCM "
                                         "Alg. 1")
        check_custom_timesteps(cfg, self.timesteps)


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------------------


def ddim_step(x_s: Tensor, x0_hat: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """One deterministic DDIM step s -> t (Song et al. 2021 eq. 12): x_t = alpha_t x0_hat + sigma_t eps_hat, with
    eps_hat = (x_s - alpha_s x0_hat) / sigma_s. Per-sample (N,) alpha/sigma broadcast against x."""
    a_s, s_s, a_t, s_t = (_bcast(v, x_s).to(x_s.dtype) for v in (alpha_s, sigma_s, alpha_t, sigma_t))
    return a_t * x0_hat + s_t * (x_s - a_s * x0_hat) / s_s


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample sqrt(||a - b||^2 / D + c^2) - c: quadratic near 0, linear far away."""
    return torch.sqrt((a - b).pow(2).flatten(1).mean(1) + c * c) - c


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class LCM(Recipe):
    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int):
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.guidance_scale = guidance_scale
        self.generator = student_from_teacher(teacher)
        self.target_decay = cfg.target_decay  # the trainer keeps the EMA target network (nets.target)
        self.export_timesteps = cfg.timesteps
        self.schedule = student_schedule(self.generator, num_steps, cfg.timesteps)
        # index 0 is the clean end (EDM: sigma_min); from_unit is the Karras ramp for EDM
        self.grid = teacher.process.from_unit(torch.linspace(0, 1, cfg.num_timesteps))
        if len(set(self.grid.tolist())) < cfg.num_timesteps:
            raise ConfigError(f"recipe.num_timesteps: {cfg.num_timesteps} levels repeat native times of the "
                              f"teacher's {type(teacher.process).__name__} (VP: at most T distinct timesteps)")

    def teacher_solver(self, x_n: Tensor, t_n: Tensor, t_m: Tensor, cond: Condition) -> Tensor:
        """The skipping-step teacher solver: one guided DDIM step from t_n to t_m (native times)."""
        with torch.no_grad():
            x0 = self.teacher(x_n, t_n, cond, guidance_scale=self.guidance_scale)
            a_n, s_n = self.teacher.process.alpha_sigma(t_n)
            a_m, s_m = self.teacher.process.alpha_sigma(t_m)
            return ddim_step(x_n, x0, a_n, s_n, a_m, s_m)

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if batch.images is None:
            raise ValueError("lcm needs data images in the batch")
        if nets.target is None:
            raise RuntimeError("lcm needs the trainer's EMA target network (nets.target is None)")
        x0, cond = batch.images, batch.cond
        n, k = x0.shape[0], self.cfg.skip_steps
        idx = torch.randint(k, self.cfg.num_timesteps, (n,), device=x0.device)
        grid = self.grid.to(x0.device)
        t_n, t_m = grid[idx], grid[idx - k]
        x_n = add_noise(self.teacher.process, x0, torch.randn_like(x0), t_n)
        x_m = self.teacher_solver(x_n, t_n, t_m, cond)
        with torch.no_grad():
            target = nets.target(x_m, t_m, cond)
            clean_end = (idx == k).view(-1, *[1] * (x0.ndim - 1))  # level n - k = 0: the boundary f(x, t_0) = x
            target = torch.where(clean_end, x_m, target)
        pred = nets.trained(x_n, t_n, cond)
        loss = pseudo_huber(pred, target, self.cfg.huber_c).mean()
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> LCM:
    return LCM(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps)
