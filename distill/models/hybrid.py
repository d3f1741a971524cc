"""Diversity distillation (Gandikota & Bau 2025, arXiv 2503.10637): the teacher for the first part of the trajectory,
the distilled student for the rest. A sampling mode over two trained networks; nothing is trained.

The paper runs the base model for the first timestep only and the distilled model for the rest. Here the hand-over is
a noise level on the student's schedule: with the student's k-step schedule sigma_0 > ... > sigma_{k-1} (its stock
pipeline's levels, :func:`distill.models.schedules.student_schedule`) and n teacher steps,

* the teacher integrates its probability-flow ODE (the teacher's own DPM-Solver++(2M), `distill.models.sampling`)
  from sigma_max down to sigma_n, over `teacher_steps` solver steps evenly spaced on its Karras ramp;
* the student's pipeline starts at its step n with the teacher's state as that step's input, and runs steps
  n..k-1 exactly as the pipeline does (re-noising between steps, clipping x0).

n = 0 is the student alone (its rollout); n = k is the teacher's sampler alone (hand-over level 0: the ODE to the
data). The paper gives no equation for the hand-over; this construction (the ODE state at the student's level as
the student's input at that level) is derived here: a multi-step student's step-n input is a sample of the noisy
marginal at sigma_n, and the teacher's ODE state at sigma_n is one (docs/diversity_control.md).

Scope: an EDM teacher (the digits teacher) and a student exported as `ConsistencyModelPipeline`
(:class:`~distill.models.schedules.StudentSchedule`). `distill.export.hybrid.export_hybrid` writes both pipelines and a
model card whose code (diffusers and torch only) reproduces :func:`hybrid_sample`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from distill.base.batch import Condition
from distill.models.denoiser import Denoiser
from distill.models.sampling import SOLVERS, dpm_solver_2m, sample, unit_grid
from distill.models.schedules import StudentSchedule
from distill.parametrization import EDMProcess

# ---------------------------------------------------------------------------------------------------------------
# The hand-over level
# ---------------------------------------------------------------------------------------------------------------


def handover_sigma(schedule: StudentSchedule, n: int) -> float:
    """The hand-over level after n teacher steps: the student's level sigma_n, or 0 (the teacher to the data) for
    n = k."""
    k = schedule.num_steps
    if not 0 <= n <= k:
        raise ValueError(f"teacher steps n={n}: expected 0..{k} for a {k}-step student")
    return 0.0 if n == k else float(schedule.times[n])


def handover_step(schedule: StudentSchedule, sigma: float) -> int:
    """The student step whose input level is `sigma` (k for 0: the teacher all the way); any other level is an
    error naming it and the schedule's levels."""
    k = schedule.num_steps
    if sigma == 0.0:
        return k
    levels = [float(s) for s in schedule.times]
    for i, level in enumerate(levels):
        if math.isclose(sigma, level, rel_tol=1e-6):
            return i
    raise ValueError(f"hand-over level sigma={sigma!r} is not on the student's schedule: its levels are "
                     f"{[round(s, 6) for s in levels]} (or 0 for the teacher all the way)")


def check_pair(teacher: Denoiser, student: Denoiser, schedule: StudentSchedule) -> None:
    """The teacher and the student sample the same space from the same start; otherwise an error naming the
    mismatch."""
    if not isinstance(teacher.process, EDMProcess):
        raise NotImplementedError(f"the hybrid sampler needs an EDM teacher; got {type(teacher.process).__name__}")
    if not isinstance(schedule, StudentSchedule):
        raise NotImplementedError("the hybrid sampler supports ConsistencyModelPipeline students (StudentSchedule) "
                                  f"only; got {type(schedule).__name__}")
    for key in ("in_channels", "out_channels", "sample_size"):
        a, b = getattr(teacher.model.config, key, None), getattr(student.model.config, key, None)
        if a != b:
            raise ValueError(f"teacher and student differ in {key}: teacher {a}, student {b}")
    start, top = float(schedule.times[0]), teacher.process.sigma_max
    if not math.isclose(start, top, rel_tol=1e-5):
        raise ValueError(f"the student's first level {start} is not the teacher's sigma_max {top}")


# ---------------------------------------------------------------------------------------------------------------
# The teacher's part and the student's part
# ---------------------------------------------------------------------------------------------------------------


def teacher_grid(process: EDMProcess, sigma_end: float, num_steps: int) -> Tensor:
    """The teacher's `num_steps` + 1 native times from sigma_max to `sigma_end` > 0, evenly spaced in the unit time
    of its Karras ramp (what `sampling.sample` spaces over the whole range), the last one exactly `sigma_end`."""
    if num_steps < 1:
        raise ValueError(f"teacher_steps must be >= 1, got {num_steps}")
    lo, hi = process.sigma_min ** (1 / process.rho), process.sigma_max ** (1 / process.rho)
    u_end = (sigma_end ** (1 / process.rho) - lo) / (hi - lo)  # the inverse of karras_sigmas (Karras eq. 5)
    ts = process.from_unit(unit_grid(num_steps, 1.0, u_end))
    ts[-1] = sigma_end
    return ts


def matching_teacher_steps(process: EDMProcess, sigma: float, full_steps: int) -> int:
    """The teacher's steps to the hand-over level `sigma` as the paper's code counts them: the index of the level of
    the teacher's own `full_steps`-step grid closest to `sigma` (at least 1; `full_steps` for sigma = 0), i.e. the
    share of its full sampler that lies above the hand-over."""
    if sigma == 0.0:
        return full_steps
    ts = process.from_unit(unit_grid(full_steps))
    return max(1, int((ts - sigma).abs().argmin()))


@torch.no_grad()
def teacher_state(teacher: Denoiser, cond: Condition, noise: Tensor, sigma_end: float, teacher_steps: int,
                  guidance_scale: float = 1.0, solver: str = "dpm_solver_2m") -> Tensor:
    """The teacher's ODE state at level `sigma_end` from `noise` (standard normal, started at sigma_max); for
    `sigma_end` = 0 its sampler's x0 (`sampling.sample` with `teacher_steps` steps)."""
    if sigma_end == 0.0:
        return sample(teacher, cond, noise, teacher_steps, guidance_scale, batch_size=noise.shape[0], solver=solver)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {list(SOLVERS)}")
    ts = teacher_grid(teacher.process, sigma_end, teacher_steps)
    alphas, sigmas = (v.double() for v in teacher.process.alpha_sigma(ts))

    def x0_fn(x: Tensor, t: Tensor) -> Tensor:
        return teacher(x, t, cond, want="x0", guidance_scale=guidance_scale)

    return dpm_solver_2m(x0_fn, noise, alphas, sigmas, ts, order=SOLVERS[solver])


@torch.no_grad()
def continue_rollout(student: torch.nn.Module, schedule: StudentSchedule, cond: Condition, x: Tensor, start: int,
                     generator: torch.Generator | None = None) -> Tensor:
    """The student's pipeline from step `start` with `x` as that step's input (`schedules.rollout`'s loop from
    there); re-noising draws from `generator` as the pipeline's `scheduler.step(generator=)` does, or, without one,
    as `schedule.noise_like` does."""
    n = x.shape[0]
    x0 = x
    for i in range(start, schedule.num_steps):
        if i > start:
            noise = (schedule.noise_like(x0) if generator is None
                     else torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device))
            x = schedule.renoise(x0, i, noise)
        x0 = student(x, schedule.t(i, n, x.device), cond)
        if schedule.clip_x0:
            x0 = x0.clamp(-1, 1)
    return x0


@torch.no_grad()
def hybrid_sample(teacher: Denoiser, student: Denoiser, schedule: StudentSchedule, cond: Condition, noise: Tensor,
                  handover: float, teacher_steps: int = 1, guidance_scale: float = 1.0,
                  solver: str = "dpm_solver_2m", generator: torch.Generator | None = None) -> Tensor:
    """x0 of the hybrid: the teacher's ODE from sigma_max to the level `handover` (on the student's schedule, or 0)
    in `teacher_steps` solver steps, then the student's pipeline from the step of that level.

    `noise` is standard normal (both start at sigma_max * noise); `generator` draws the student's re-noising as the
    exported pipeline does (None: the global generator, as `schedules.rollout`)."""
    check_pair(teacher, student, schedule)
    n = handover_step(schedule, handover)
    if n == 0:
        return continue_rollout(student, schedule, cond, schedule.start(noise), 0, generator)
    x = teacher_state(teacher, cond, noise, handover, teacher_steps, guidance_scale, solver)
    if n == schedule.num_steps:
        return x
    return continue_rollout(student, schedule, cond, x, n, generator)


# ---------------------------------------------------------------------------------------------------------------
# Export: both pipelines and a model card whose plain-diffusers code reproduces hybrid_sample
# ---------------------------------------------------------------------------------------------------------------

#: The hybrid's sampling code, written into the model card and run by the tests in a process without `distill`.
def load_pair(teacher_folder: str | Path, student_folder: str | Path) -> tuple[Denoiser, Denoiser, StudentSchedule,
                                                                                dict]:
    """(teacher, student, the student's schedule, its pipeline's set_timesteps arguments) from a teacher folder and
    an exported student pipeline folder (its distill.json gives the step count and any custom timesteps)."""
    from distill.base.paths import resolve_path
    from distill.models.denoiser import load_denoiser
    from distill.models.schedules import student_schedule

    teacher = load_denoiser(resolve_path(str(teacher_folder)), prediction="edm")
    student = load_denoiser(student_folder)
    info_file = Path(student_folder) / "distill.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    timesteps = info.get("timesteps")
    k = len(timesteps) if timesteps else int(info.get("num_inference_steps", 1))
    call = {"timesteps": list(timesteps)} if timesteps else {"num_inference_steps": k}
    return teacher, student, student_schedule(student, k, timesteps), call
