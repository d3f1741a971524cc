"""Phased DMD: few-step distribution matching with one expert per SNR phase (Fan et al. 2025, arXiv 2510.27684).

A K-step student is a mixture of K experts over time (full copies of the teacher): expert k takes the sample at
the noise level t_k where phase k starts and hands the next phase a sample at level s (the last expert hands over
clean data). The phase boundaries are the k-step student's own sampler (`student_schedule`, i.e. the exported
scheduler's timesteps), so the experts meet exactly where the stock scheduler switches steps:

    phase k:  input x_{t_k}  --expert k-->  x0_hat  --scheduler step-->  x_s = alpha_s x0_hat + sigma_s eps

with s the level the scheduler's step re-noises to (`schedule.renoise_time(k + 1)`): for
CMStochasticIterativeScheduler (EDM, alpha = 1) sigma_s^2 = sigma_{k+1}^2 - sigma_min^2; for the latent families'
schedulers (LCMScheduler, stochastic FlowMatchEulerDiscreteScheduler; distill.families.target) s = t_{k+1} itself; after
the last step the sample is clean (alpha_s = 1, sigma_s = 0).

Two ideas of the paper, as implemented here:

* **Progressive distribution matching** (sec. 3.2): training runs phase by phase from the noisiest; run.max_steps
  is split evenly and phase k trains expert k only, its input made by the frozen experts 0..k-1 (their own
  rollout, without gradient). Expert k matches the distribution of its output x_s to the teacher's marginal at
  noise levels t above sigma_s only (`recipe.noise_range: above`, the default: matching p_s implies matching every
  p_t, t > s, since noising is Markov), or within the phase (sigma_s, sigma_k] (`phase`). The DMD gradient is
  DMD2's (x0_fake - x0_real) / mean|x0_hat - x0_real| at x_t, re-noised from x_s by the forward transition.
* **Score matching within the subinterval** (sec. 3.3): the generator's phase-k samples are x_s, not clean data,
  so the fake score of p_t (t > s) is fitted by denoising score matching on the transition x_s -> x_t:
  x_t = a x_s + sigma_{t|s} eps with a = alpha_t / alpha_s, sigma_{t|s}^2 = sigma_t^2 - a^2 sigma_s^2 and
  grad log p(x_t | x_s) = -(x_t - a x_s) / sigma_{t|s}^2, whose conditional mean over x_s given x_t is the marginal
  score (the Markov property). Through Tweedie (x0 = (x_t + sigma_t^2 score) / alpha_t) the x0 regression target is

      x0_target(x_t, x_s) = (x_t - sigma_t^2 (x_t - a x_s) / sigma_{t|s}^2) / alpha_t          (`subinterval_x0_target`)

  which is x_s itself when s = 0 (ordinary denoising). Its variance grows as t -> s, so t is drawn at least
  `recipe.subinterval_margin` above s in unit time. tests/test_phased_dmd.py checks the target against the exact
  posterior mean on a Gaussian toy.

The export writes the experts as stock diffusers parts and the loop that runs expert k at step k (export.py,
`export_experts`): a stock pipeline holds one network, so no stock pipeline can switch experts between steps, and
a custom pipeline class would need remote code. A latent family's experts are its pipeline (expert 0) plus one
network folder per later expert, switched by the pipeline's own `callback_on_step_end`.

Limits: experts are full copies (no per-phase adapters yet); in a phase only its expert receives gradients, so a
multi-process (DDP) run would need `find_unused_parameters` (untested here); the experts switch exactly at the
trained sigmas, so the export is sampled at its trained step count only.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.base.paths import resolve_path
from distill.config import Config as RunConfig
from distill.config import Section, require
from distill.export.checks import check_expert_export
from distill.export.pipeline import export_experts
from distill.models.denoiser import Denoiser
from distill.models.schedules import KStepSchedule, rollout, student_from_teacher, student_schedule
from distill.parametrization import Process, _bcast, log_snr
from distill.recipes.dmd2 import denoising_loss, dmd_gradient, dmd_loss
from distill.training.recipe import Nets, Recipe


class Config(Section):
    min_t: float = Field(0.02, ge=0.0, le=1.0, description="lowest noise level of the last (clean) phase, unit "
                                                           "time (0 clean, 1 noisiest; DMD2: 0.02 T); below "
                                                           "recipe.max_t")
    max_t: float = Field(0.98, ge=0.0, le=1.0, description="highest noise level of the DMD gradient and the "
                                                           "fake-score loss, unit time; above recipe.min_t")
    noise_range: Literal["above", "phase"] = Field(
        "above", description="noise levels of phase k: 'above' every level above the phase's output level "
                             "(up to recipe.max_t), 'phase' only the phase's own subinterval (its output level to "
                             "its input level)")
    subinterval_margin: float = Field(0.02, ge=0.0, lt=0.5, description="unit time kept between a phase's output "
                                                                        "level s and the lowest t drawn (the "
                                                                        "subinterval target's variance grows as "
                                                                        "t -> s); 0 = none")
    dmd_weight: float = Field(1.0, gt=0.0, description="weight of the distribution matching loss; > 0")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.min_t < self.max_t, "min_t", f"must be < recipe.max_t ({self.max_t}), got {self.min_t}")
        return self

    def check_run(self, cfg: RunConfig) -> None:
        check_expert_export(resolve_path(cfg.teacher.path), cfg.teacher.prediction)


# ---------------------------------------------------------------------------------------------------------------
# Phases and the subinterval target (pure functions; tested against closed forms)
# ---------------------------------------------------------------------------------------------------------------


def subinterval_x0_target(x_t: Tensor, x_s: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor,
                          sigma_s: Tensor) -> Tensor:
    """The x0 regression target of score matching within a subinterval (Phased DMD sec. 3.3): from the transition
    score grad log p(x_t | x_s) = -(x_t - a x_s) / sigma_{t|s}^2 (a = alpha_t / alpha_s) through Tweedie.
    Requires t > s (sigma_{t|s} > 0); sigma_s = 0 gives x_s (ordinary denoising). Coefficients broadcast."""
    a = alpha_t / alpha_s
    var_ts = sigma_t**2 - a**2 * sigma_s**2
    return (x_t - sigma_t**2 * (x_t - a * x_s) / var_ts) / alpha_t


def transition(process: Process, x_s: Tensor, alpha_s: Tensor, sigma_s: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t from x_s by the forward process: x_t = (alpha_t / alpha_s) x_s + sigma_{t|s} eps (per-sample t)."""
    alpha_t, sigma_t = (_bcast(v, x_s).to(x_s.dtype) for v in process.alpha_sigma(t))
    a = alpha_t / alpha_s
    return a * x_s + (sigma_t**2 - a**2 * sigma_s**2).clamp_min(0).sqrt() * noise


def unit_time(process: Process, native: float) -> float:
    """The unit time u in [0, 1] at which `process.from_unit(u)` has the log-SNR of native time `native`
    (bisection: from_unit is monotone in noise level for every process)."""
    target = float(log_snr(*process.alpha_sigma(torch.tensor([native], dtype=torch.float64))))
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lam = float(log_snr(*process.alpha_sigma(process.from_unit(torch.tensor([mid], dtype=torch.float64)))))
        lo, hi = (mid, hi) if lam > target else (lo, mid)
    return 0.5 * (lo + hi)


def phase_boundaries(schedule: KStepSchedule) -> list[tuple[float, float | None]]:
    """(input level t_k, output level s) of each phase as native times, noisiest first: t_k is the sampler's k-th
    time; s is the level the scheduler's step re-noises x0 to (`schedule.renoise_time(k + 1)`; EDM:
    sqrt(sigma_{k+1}^2 - sigma_min^2), CMStochasticIterativeScheduler.step), None (clean) after the last step."""
    times = [float(t) for t in schedule.times]
    outs = [schedule.renoise_time(k) for k in range(1, len(times))] + [None]
    return list(zip(times, outs))


def output_level(process: Process, s: float | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """(alpha_s, sigma_s) of a phase's output level s (None: clean data, alpha 1 and sigma 0)."""
    if s is None:
        return torch.ones((), device=device), torch.zeros((), device=device)
    alpha, sigma = process.alpha_sigma(torch.tensor([s], device=device))
    return alpha[0], sigma[0]


def phase_at(step: int, max_steps: int, num_phases: int) -> int:
    """The phase trained at generator update `step`: run.max_steps split evenly, noisiest phase first."""
    return min(step * num_phases // max_steps, num_phases - 1)


# ---------------------------------------------------------------------------------------------------------------
# The student: one expert per phase
# ---------------------------------------------------------------------------------------------------------------


class PhasedExperts(nn.Module):
    """K experts; a call at the sampler's k-th sigma runs expert k (so `rollout` runs the right expert per step)."""

    def __init__(self, experts: list[Denoiser], times: Tensor):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.register_buffer("times", times.clone(), persistent=False)

    def expert_index(self, t: Tensor) -> int:
        if t.ndim != 1 or not bool((t == t[0]).all()):
            raise ValueError("a phased student is called with one noise level per batch (a sampler step)")
        k = int((self.times.to(t.device) - t[0]).abs().argmin())
        if not torch.isclose(self.times[k].to(t.device), t[0], rtol=1e-5):
            raise ValueError(f"noise level {float(t[0]):.6g} is none of the phases' {self.times.tolist()}")
        return k

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        return self.experts[self.expert_index(t)](x_t, t, cond)


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class PhasedDMD(Recipe):
    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int, max_steps: int,
                 image_shape: tuple[int, ...]):
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.guidance_scale = guidance_scale
        self.image_shape = image_shape
        self.max_steps = max_steps
        experts = [student_from_teacher(teacher) for _ in range(num_steps)]  # full copies, one per phase
        self.schedule = student_schedule(experts[0], num_steps)
        self.generator = PhasedExperts(experts, self.schedule.times)
        self.critic = teacher.copy(trainable=True)  # one fake score, refitted phase by phase
        self.phases = phase_boundaries(self.schedule)
        process = teacher.process
        u_max = cfg.max_t
        self.unit_ranges = []  # (lowest, highest) unit time of t in each phase
        for k, (t_in, t_out) in enumerate(self.phases):
            low = cfg.min_t if t_out is None else unit_time(process, t_out) + cfg.subinterval_margin
            high = u_max if cfg.noise_range == "above" or k == 0 else min(u_max, unit_time(process, t_in))
            if low >= high:
                raise ValueError(f"phase {k}: no noise level left between unit times {low:.4g} and {high:.4g}; "
                                 "lower recipe.subinterval_margin or recipe.min_t, or raise recipe.max_t")
            self.unit_ranges.append((low, high))

    def _sample_t(self, phase: int, n: int, device: torch.device) -> Tensor:
        low, high = self.unit_ranges[phase]
        return self.teacher.process.from_unit(torch.rand(n, device=device) * (high - low) + low)

    def _phase_output(self, nets: Nets, phase: int, cond: Condition, n: int, device: torch.device, grad: bool):
        """(x0_hat of expert `phase`, x_s = alpha_s x0_hat + sigma_s eps after its scheduler step, alpha_s, sigma_s).
        The input is made by the frozen earlier experts' own rollout (progressive training, without gradient)."""
        sched = self.schedule
        noise = torch.randn((n, *self.image_shape), device=device)
        with torch.no_grad():
            if phase == 0:
                x = sched.start(noise)
            else:
                x0_prev = rollout(nets.generator, sched, cond, noise, steps=phase)
                x = sched.renoise(x0_prev, phase, torch.randn_like(x0_prev))
        t_in = sched.t(phase, n, device)
        if grad:
            x0_hat = nets.trained(x, t_in, cond)
        else:
            with torch.no_grad():
                x0_hat = nets.generator(x, t_in, cond)
        if sched.clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        alpha_s, sigma_s = output_level(self.teacher.process, self.phases[phase][1], device)
        x_s = alpha_s.to(x0_hat.dtype) * x0_hat + sigma_s.to(x0_hat.dtype) * torch.randn_like(x0_hat)  # its step
        return x0_hat, x_s, alpha_s, sigma_s

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cond = batch.cond
        n, device = next(iter(cond.values())).shape[0], next(iter(cond.values())).device
        phase = phase_at(step, self.max_steps, len(self.phases))
        x0_hat, x_s, alpha_s, sigma_s = self._phase_output(nets, phase, cond, n, device, grad=True)
        t = self._sample_t(phase, n, device)
        x_t = transition(self.teacher.process, x_s.detach(), alpha_s, sigma_s, t, torch.randn_like(x_s))
        with torch.no_grad():
            x0_real = self.teacher(x_t, t, cond, guidance_scale=self.guidance_scale)
            x0_fake = nets.critic(x_t, t, cond)
            grad = dmd_gradient(x0_hat.detach(), x0_real, x0_fake)
        # d x_t / d x0_hat = alpha_t I: the DMD gradient reaches the expert through x0_hat (DMD2 sec. 3).
        loss_dmd = dmd_loss(x0_hat, grad).mean()
        loss = self.cfg.dmd_weight * loss_dmd
        return loss, {"dmd_loss": loss_dmd.item(), "dmd_grad_abs": grad.abs().mean().item(), "phase": float(phase),
                      "loss": loss.item()}

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cond = batch.cond
        n, device = next(iter(cond.values())).shape[0], next(iter(cond.values())).device
        phase = phase_at(step, self.max_steps, len(self.phases))
        _, x_s, alpha_s, sigma_s = self._phase_output(nets, phase, cond, n, device, grad=False)
        t = self._sample_t(phase, n, device)
        x_t = transition(self.teacher.process, x_s, alpha_s, sigma_s, t, torch.randn_like(x_s))
        alpha_t, sigma_t = (_bcast(v, x_s).to(x_s.dtype) for v in self.teacher.process.alpha_sigma(t))
        target = subinterval_x0_target(x_t, x_s, alpha_t, sigma_t, alpha_s, sigma_s)
        x0_pred = nets.trained(x_t, t, cond)
        loss = denoising_loss(nets.critic.to_native(x0_pred, x_t, t), nets.critic.to_native(target, x_t, t)).mean()
        return loss, {"denoise_loss": loss.item(), "phase": float(phase), "loss": loss.item()}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)

    def export(self, generator: nn.Module, out_dir, num_steps: int, config):
        """One stock diffusers folder per expert plus the loop that switches experts per step (export.py)."""
        return export_experts(list(generator.experts), out_dir, num_steps=num_steps, config=config)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> PhasedDMD:
    return PhasedDMD(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, cfg.run.max_steps,
                     dataset.image_shape)
