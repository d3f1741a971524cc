"""The k-step sampler a student trains with, which is its export target's sampler: the times it visits and its
re-noising rule (the stock pipeline's), and the rollouts recipes run through it.

* :class:`StudentSchedule`: the pixel UNet2DModel's `ConsistencyModelPipeline` (CMStochasticIterativeScheduler);
* :class:`NoisingSchedule`: the latent families' pipelines (`distill.families.target`: LCMScheduler without its
  boundary, FlowMatchEulerDiscreteScheduler with stochastic sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.base.batch import Condition
from distill.families.target import Target, pipeline_class, target_for
from distill.models.denoiser import Denoiser
from distill.parametrization import EDMProcess


@dataclass(frozen=True)
class KStepSchedule:
    """What every k-step student sampler shares: the native times it visits, noisiest first; the subclasses add
    where step 0 starts and how step i >= 1 re-noises the previous step's x0 (the exported scheduler's rule)."""

    times: Tensor  # (k,), noisiest first

    @property
    def num_steps(self) -> int:
        return int(self.times.shape[0])

    def t(self, i: int, n: int, device: torch.device) -> Tensor:
        return self.times[i].to(device).expand(n)


@dataclass(frozen=True)
class StudentSchedule(KStepSchedule):
    """The pixel UNet2DModel's sampler: ConsistencyModelPipeline's CMStochasticIterativeScheduler."""

    sigma_min: float
    clip_x0: bool = True

    def start(self, noise: Tensor) -> Tensor:
        """The input of step 0 (CMStochasticIterativeScheduler: init_noise_sigma = sigma_max)."""
        return noise * float(self.times[0])

    def renoise_time(self, i: int) -> float:
        """The native time (EDM sigma) whose noise `renoise(x0, i, .)` adds: sqrt(sigma_i^2 - sigma_min^2)."""
        return (float(self.times[i]) ** 2 - self.sigma_min**2) ** 0.5

    def renoise(self, x0: Tensor, i: int, noise: Tensor) -> Tensor:
        """The input of step i >= 1 from the previous step's x0 (CMStochasticIterativeScheduler.step)."""
        return x0 + noise * self.renoise_time(i)

    def noise_like(self, x0: Tensor) -> Tensor:
        """Fresh noise for :meth:`renoise`, as the scheduler's `step` draws it."""
        return torch.randn_like(x0)


@dataclass(frozen=True)
class NoisingSchedule(KStepSchedule):
    """The latent families' sampler: step 0 starts from pure noise (init_noise_sigma = 1), step i >= 1 from
    alpha(t_i) x0 + sigma(t_i) noise, x0 the previous step's output (not clipped: latents)."""

    process: Any
    clip_x0: bool = False
    packed: bool = False  # Flux: the pipeline's latents (and its step's noise) are 2x2-patch tokens

    def start(self, noise: Tensor) -> Tensor:
        return noise

    def renoise_time(self, i: int) -> float:
        """The native time whose (alpha, sigma) `renoise(x0, i, .)` uses: the trained time of step i."""
        return float(self.times[i])

    def renoise(self, x0: Tensor, i: int, noise: Tensor) -> Tensor:
        alpha, sigma = self.process.alpha_sigma(self.times[i : i + 1].to(x0.device))
        return alpha.to(x0.dtype) * x0 + sigma.to(x0.dtype) * noise

    def noise_like(self, x0: Tensor) -> Tensor:
        """Fresh noise for :meth:`renoise`, drawn as the pipeline's `scheduler.step` draws it: in the packed token
        layout for Flux (then unpacked), so the same seed gives the same noise."""
        if not self.packed:
            return torch.randn_like(x0)
        from distill.families.flux import pack, unpack

        return unpack(torch.randn_like(pack(x0)), *x0.shape[-2:])


def student_times(target: Target, scheduler_config: dict, num_steps: int, image_seq_len: int) -> Tensor:
    scheduler = target.scheduler(scheduler_config, num_steps)
    target.set_timesteps(scheduler, num_steps, image_seq_len)
    return target.times(scheduler, num_steps)


def cm_scheduler(process: EDMProcess):
    from diffusers import CMStochasticIterativeScheduler

    return CMStochasticIterativeScheduler(
        sigma_min=process.sigma_min, sigma_max=process.sigma_max, sigma_data=process.sigma_data, rho=process.rho
    )


def latent_target(student: Denoiser):
    """The export target (distill.families.target) of a latent family's student loaded from a pipeline folder; None
    for a pixel family's (UNet2DModel, ToyMLP: no latent target)."""
    src = student.source
    if src is None or not student.family.latent:
        return None
    return target_for(src["network_config"], src["scheduler_config"], student.prediction,
                      pipeline_class(Path(src["folder"])))


def student_schedule(student: Denoiser, num_steps: int, timesteps: list[int] | None = None):
    """The schedule of `student`'s export target for `num_steps` steps.

    `timesteps` (optional) are the pipeline's own custom timesteps (`ConsistencyModelPipeline(timesteps=...)`:
    descending indices into the scheduler's `num_train_timesteps`-point Karras grid, the last one 0 so that the
    first step starts at sigma_max); they set the intermediate noise levels of a multi-step student, and the
    exported pipeline reproduces them when called with the same `timesteps=`.
    """
    target = latent_target(student)
    if target is not None:
        if timesteps is not None:
            raise NotImplementedError("custom timesteps are supported for the ConsistencyModelPipeline target only")
        from distill.models.schedules import NoisingSchedule, student_times

        src = student.source
        seq = target.image_seq_len(Path(src["folder"]), src["network_config"], src["resolution"] or 0)
        times = student_times(target, src["scheduler_config"], num_steps, seq)
        return NoisingSchedule(times=times, process=student.process, packed=target.packed)
    if isinstance(student.process, EDMProcess) and student.prediction == "cm":
        sched = cm_scheduler(student.process)
        if timesteps is None:
            sched.set_timesteps(num_inference_steps=num_steps)
        else:
            if len(timesteps) != num_steps:
                raise ValueError(f"{len(timesteps)} custom timesteps {timesteps} for a {num_steps}-step student")
            sched.set_timesteps(timesteps=list(timesteps))
        return StudentSchedule(times=torch.as_tensor(sched.sigmas[:num_steps], dtype=torch.float32),
                               sigma_min=student.process.sigma_min)
    raise NotImplementedError(
        f"no export target yet for a {type(student.model).__name__} student with {type(student.process).__name__} "
        f"and prediction {student.prediction!r}")


def rollout(
    student: torch.nn.Module,
    schedule: KStepSchedule,
    cond: Condition,
    noise: Tensor,
    steps: int | None = None,
) -> Tensor:
    """x0 after `steps` (default: all) student steps; the caller decides about gradients (torch.no_grad)."""
    steps = schedule.num_steps if steps is None else steps
    n = noise.shape[0]
    x = schedule.start(noise)
    x0 = x
    for i in range(steps):
        if i > 0:
            x = schedule.renoise(x0, i, schedule.noise_like(x0))
        x0 = student(x, schedule.t(i, n, x.device), cond)
        if schedule.clip_x0:
            x0 = x0.clamp(-1, 1)
    return x0


@torch.no_grad()
def step_input(student: torch.nn.Module, schedule: KStepSchedule, cond: Condition, noise: Tensor, i: int) -> Tensor:
    """The input of student step `i` as the pipeline makes it: the start for i = 0, else the student's own
    i-step rollout re-noised to step i's level (backward simulation, DMD2 sec. 4.4); no gradient."""
    if i == 0:
        return schedule.start(noise)
    x0_prev = rollout(student, schedule, cond, noise, steps=i)
    return schedule.renoise(x0_prev, i, schedule.noise_like(x0_prev))


def student_prediction(teacher: Denoiser) -> str:
    """The output kind of a student of `teacher` under its export target (EDM teacher -> "cm")."""
    return "cm" if isinstance(teacher.process, EDMProcess) else teacher.prediction


def student_from_teacher(teacher: Denoiser) -> Denoiser:
    """A trainable copy of the teacher whose output kind is the export target's (EDM teacher -> "cm")."""
    student = teacher.copy(trainable=True)
    student.prediction = student_prediction(teacher)
    return student
