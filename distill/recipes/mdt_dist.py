"""MDT-dist: few-step flow distillation by learning the marginal-data transport (Zhou, Yi, Fang, Yang, Xie, Wang,
Shen, Tian 2025, "Few-step Flow for 3D Generation via Marginal-Data Transport Distillation", arXiv 2509.04406;
official code github.com/Zanue/MDT-dist, `trainers/flow_matching/flow_matching_mdt.py`, read for the equations).

Flow coordinates (diffusers' convention, as distill/recipes/reflow.py): x_s = (1 - s) x0 + s z, s = 0 data, s = 1
noise; the teacher's velocity is v(x, s) = (x - x0_teacher(x, s)) / s. Any network is viewed as a flow through
the flow view's coordinate maps (`distill.parametrization.flow_to_native`, `flow_velocity`: an EDM teacher at sigma = s / (1 - s)), so the toy and the
EDM digits teacher run the same objective as a rectified-flow teacher.

The student u_theta(x, s) is a velocity whose one Euler step to s = 0 is the *marginal-data transport*: the map
T(x_s, s) = x_s - s u_theta(x_s, s) should send a sample of the teacher's marginal at s to the endpoint of the
teacher's ODE from it. Here the student's velocity is the one implied by its x0 output, u = (x_s - x0_student) / s,
so T is simply the student's x0 prediction, and the student keeps its family's export parametrisation
(`student_from_teacher`: EDM teacher -> a consistency-model student for ConsistencyModelPipeline).

Velocity Matching (VM; paper sec. 3.2, code `distill_type: discrete`). T is constant along the teacher's ODE
dx/ds = v, so 0 = dT/ds = v - u - s du/ds with the total derivative du/ds = d_x u . v + d_s u:

    u = v - s du/ds,    L_VM = || u_theta(x_s, s) - sg(v(x_s, s) - s D(x_s, s)) ||^2                    (VM)

with the derivative taken by a finite difference along one teacher Euler step of size Delta (the code's default):
D = (u_theta(x_s, s) - u_theta(x_s - Delta v, s - Delta)) / Delta, both without gradient, and normalised per
sample as the code does (`d_norm`): D <- D / (||D||_2 + c), c = 0.1 (`norm_c`; null = unnormalised). The states
x_s interpolate data (the code: `x_0` are data latents; `vm_states: data`) or the student's own samples
(`vm_states: student`, data-free; what text data allows). s ~ logit-normal(mean 1, std 1) mapped into
[s_min + Delta, s_max] (the code's `logitNormal` t_schedule and its shift by the interval).

Velocity Distillation (VD; paper sec. 3.3). A student sample x (the code: the one-step sample z - u(z, 1); here
the uniformly chosen step of the k-step sampler with backward simulation, DMD2 sec. 4.4) is re-noised,
x_s = (1 - s) sg(x) + s eps, and moved by the difference of two velocity fields at x_s:

    grad_x L_VD = v_real(x_s, s) - v_fake(x_s, s),   implemented as dmd_loss(x, v_real - v_fake)       (VD)

(the code writes this as || u(x_s) - target + u_fake - sg(u_fake) ||^2 with x = z - u_fake, whose gradient in x
is 2 (target - u(x_s)); the factor 2 is absorbed by the weight). Two choices of the pair (`vd_fake`):

* `student` (the official code): v_fake = the student's own velocity u_theta, v_real = the VM target
  v - s D at that point; VD pushes the student's samples along the VM residual measured on them.
* `critic` (default; DMD's reading of "probability density distillation with the velocity fields"):
  v_real = the teacher's velocity, v_fake = the velocity of a fake-score network (DMD2's `FakeScore`, a copy of the
  teacher) fitted to the student's samples by denoising (DMD2's `denoising_loss`). Derivation (ours, not in the
  paper): v_fake - v_real = (x0_real - x0_fake) / s, so this is DMD's score-difference gradient
  (`dmd_gradient` without its per-sample normalisation) weighted by 1 / s; its expectation vanishes when the
  student's marginals equal the teacher's and otherwise points, for Gaussians, along the mean difference
  (tests/test_mdt_dist.py checks both against closed forms).

Total: L = vm_weight L_VM + vd_weight L_VD (paper: lambda_vm = lambda_vd = 1). Teacher guidance: the teacher's
velocity uses teacher.guidance_scale (the code's cfg_teacher_vm / cfg_teacher_vd, one scale here).

Left out: the code's continuous-time variant (JVP for du/ds) and its multi-phase targets (`distill_type: cm`,
`multiphase`); the student's k-step sampler is its export target's (re-noising between steps; the paper samples
with plain Euler steps on the same velocity, the same map for one step).

Export: through the student's family target (`student_from_teacher`, `student_schedule`, `rollout`): an EDM
teacher's student is a consistency-model student exported as ConsistencyModelPipeline (re-noising between steps);
a latent flow family's (SD3, Flux) is its stock pipeline with FlowMatchEulerDiscreteScheduler (stochastic
sampling). A rectified-flow *pixel* UNet2DModel (builtin:digits_flow_teacher) has no target and cannot be
`teacher.path`: `student_schedule` raises, and the config is refused when loaded (distill/export/checks.py): the
only stock pipeline that feeds class labels to a UNet2DModel is ConsistencyModelPipeline, which needs EDM
preconditioning (and calls `scheduler.scale_model_input`, which FlowMatchEulerDiscreteScheduler lacks). Nor can
the flow network itself become a consistency-model student: the stock UNet2DModel embeds its time input with
sinusoids, and ConsistencyModelPipeline feeds 250 log sigma where the flow network was trained on 1000 s =
1000 sigma / (1 + sigma), so no rescaling of weights reproduces it.

Such a teacher is distilled as `recipe.velocity_teacher` (ours, not in the paper): VM's and VD's teacher velocity
and the critic's initial weights come from it (DMD2 initialises the fake score from the real one), while
teacher.path (an EDM teacher of the same classes and channels, builtin:digits_teacher) only gives the student its
initial weights and its export target. Both are views of the same flow coordinates (`flow_to_native` per network), so
the objective is unchanged; s is drawn where both networks are defined. The headline digits config distills the
EDM digits teacher itself (comparable with every other table row); recipes/digits/mdt_dist_variants/
flow_teacher.yaml distills the flow teacher.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition, concat_conditions
from distill.base.errors import ConfigError
from distill.base.paths import resolve_path
from distill.config import PATH_PATTERN, Section, require, require_images
from distill.config import Config as RunConfig
from distill.families.target import is_flow_scheduler, read_json
from distill.models.denoiser import Denoiser, load_denoiser
from distill.models.schedules import rollout, step_input, student_from_teacher, student_schedule
from distill.parametrization import flow_interpolate, flow_range, flow_to_native, flow_velocity
from distill.recipes.dmd2 import FakeScore, denoising_loss, dmd_loss
from distill.training.recipe import Nets, Recipe


class Config(Section):
    vm_weight: float = Field(1.0, ge=0.0, description="weight of velocity matching, L_VM (paper: lambda_vm = 1); "
                                                      "0 = VD only")
    vd_weight: float = Field(1.0, ge=0.0, description="weight of velocity distillation, L_VD (paper: lambda_vd = "
                                                      "1); 0 = VM only")
    vd_fake: Literal["critic", "student"] = Field(
        "critic", description="VD's fake velocity: critic = a fake-score network fitted to the student's samples "
                              "(DMD2's), real = the teacher; student = the student's own velocity, real = the VM "
                              "target (the official code, no critic)")
    vm_states: Literal["data", "student"] = Field(
        "data", description="what VM's states x_s interpolate: data images (the official code) or the student's "
                            "own samples (data-free)")
    interval: float = Field(0.01, gt=0.0, le=0.2, description="Delta, the teacher Euler step of VM's finite-"
                                                              "difference derivative du/ds, in flow time (code: 0.01)")
    norm_c: float | None = Field(0.1, gt=0.0, description="du/ds is divided by its per-sample L2 norm + norm_c "
                                                          "(code: d_norm with c = 0.1); null = unnormalised")
    t_mean: float = Field(1.0, ge=-5.0, le=5.0, description="mean of the logit-normal flow time s (code: 1.0)")
    t_std: float = Field(1.0, gt=0.0, le=5.0, description="std of the logit-normal flow time s (code: 1.0)")
    velocity_teacher: str | None = Field(
        None, min_length=1, pattern=PATH_PATTERN,
        description="a flow-matching pixel teacher folder (e.g. builtin:digits_flow_teacher) whose velocity VM and "
                    "VD match and whose copy is the critic; teacher.path (an EDM teacher of the same classes) then "
                    "only initialises the student and sets its export; null = teacher.path's own velocity")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.vm_weight + self.vd_weight > 0, "vm_weight",
                "recipe.vm_weight and recipe.vd_weight are both 0: nothing to train")
        return self

    def check_run(self, cfg: RunConfig) -> None:
        if self.vm_weight > 0 and self.vm_states == "data":
            require_images(cfg, "recipe.vm_states", "VM interpolates data images; vm_states: student is data-free")
        if self.velocity_teacher is not None:
            check_velocity_teacher(cfg, resolve_path(self.velocity_teacher))


def check_velocity_teacher(cfg: RunConfig, folder: Path, key: str = "recipe.velocity_teacher") -> None:
    """A second teacher must be a flow-matching UNet2DModel folder with the classes and channels of teacher.path's
    network (the student's conditions and samples are fed to both), under DDP (it is loaded whole beside the first;
    FSDP2 would shard only teacher.path's)."""
    net, sched = read_json(folder / "unet" / "config.json"), read_json(folder / "scheduler" / "scheduler_config.json")
    if not net or not sched or not any((folder / "unet").glob("*.safetensors")):
        raise ConfigError(f"{key}: {str(folder)!r} is not a UNet2DModel teacher folder (unet/config.json with "
                          "safetensors weights, scheduler/scheduler_config.json)")
    if net.get("_class_name") != "UNet2DModel" or not is_flow_scheduler(sched):
        raise ConfigError(f"{key}: {str(folder)!r} holds a {net.get('_class_name')} with a "
                          f"{sched.get('_class_name')}; a second teacher is a flow-matching UNet2DModel (a pixel "
                          "flow teacher without an export target of its own; any other teacher is teacher.path)")
    own = read_json(resolve_path(cfg.teacher.path) / "unet" / "config.json")
    if own.get("_class_name") != "UNet2DModel":
        raise ConfigError(f"{key}: a second teacher needs a UNet2DModel teacher.path (an EDM pixel teacher whose "
                          "consistency-model student is exported); got a folder without unet/")
    keys = ("num_class_embeds", "in_channels", "out_channels")
    if any(net.get(k) != own.get(k) for k in keys):
        raise ConfigError(f"{key}: its network ({', '.join(f'{k}={net.get(k)}' for k in keys)}) does not match "
                          f"teacher.path's ({', '.join(f'{k}={own.get(k)}' for k in keys)}): both see the "
                          "student's samples and class labels")
    if cfg.trainer.parallel == "fsdp2":
        raise ConfigError(f"{key}: not supported with trainer.parallel: fsdp2 (the second teacher is not sharded); "
                          "use ddp")


# ---------------------------------------------------------------------------------------------------------------
# Objective pieces (pure functions; tests/test_mdt_dist.py checks them against Gaussian closed forms)
# ---------------------------------------------------------------------------------------------------------------


def sample_flow_time(n: int, lo: float, hi: float, interval: float, mean: float, std: float,
                     device: torch.device | None = None) -> Tensor:
    """s = lo + Delta + (hi - lo - Delta) sigmoid(mean + std N(0, 1)): the code's logit-normal time, kept Delta
    above the network's lowest time so that the finite-difference step s - Delta stays in range."""
    u = torch.sigmoid(torch.randn(n, device=device) * std + mean)
    return lo + interval + (hi - lo - interval) * u


def total_derivative(u: Tensor, u_prev: Tensor, interval: float, norm_c: float | None) -> Tensor:
    """du/ds along the teacher's flow by a backward difference, (u(x_s, s) - u(x_s - Delta v, s - Delta)) / Delta,
    divided by its per-sample L2 norm + norm_c when norm_c is set (the code's d_norm)."""
    d = (u - u_prev) / interval
    if norm_c is not None:
        d = d / (d.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (d.ndim - 1)) + norm_c)
    return d


def vm_target(v_teacher: Tensor, du_ds: Tensor, s: Tensor) -> Tensor:
    """The transport velocity u = v - s du/ds (dT/ds = 0 along the teacher's ODE for T = x - s u); pass
    detached values."""
    return v_teacher - s.reshape((-1,) + (1,) * (v_teacher.ndim - 1)).to(v_teacher.dtype) * du_ds


def vm_loss(u: Tensor, target: Tensor) -> Tensor:
    """Per-sample ||u - sg(target)||^2 / D."""
    return (u - target.detach()).pow(2).flatten(1).mean(1)


def vd_gradient(v_real: Tensor, v_fake: Tensor) -> Tensor:
    """VD's gradient on the student sample: v_real - v_fake (= (x0_fake - x0_real) / s, DMD's direction / s);
    `dmd_loss(x, vd_gradient(...))` descends it, moving x along v_fake - v_real."""
    return v_real - v_fake


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class MDTDist(Recipe):
    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int,
                 image_shape: tuple[int, ...], velocity_teacher: Denoiser | None = None):
        self.cfg = cfg
        self.image_shape = image_shape
        # the velocity VM and VD match (teacher.path's, or recipe.velocity_teacher's) and the student, each in its
        # own native coordinates (flow_to_native / flow_velocity with its own process)
        self.teacher = (teacher if velocity_teacher is None else velocity_teacher).eval().requires_grad_(False)
        self.guided_teacher = functools.partial(self.teacher, guidance_scale=guidance_scale)
        self.generator = student_from_teacher(teacher)
        self.student_process = self.generator.process
        ranges = [flow_range(self.teacher.process), flow_range(self.student_process)]
        self.s_lo, self.s_hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
        self.schedule = student_schedule(self.generator, num_steps)  # the export target's k-step sampler
        needs_critic = cfg.vd_weight > 0 and cfg.vd_fake == "critic"
        # DMD2: the fake score starts as a copy of the real one
        self.critic = FakeScore(self.teacher.copy(trainable=True), gan=False) if needs_critic else None

    def sample_s(self, n: int, device: torch.device) -> Tensor:
        c = self.cfg
        return sample_flow_time(n, self.s_lo, self.s_hi, c.interval, c.t_mean, c.t_std, device)

    def teacher_velocity(self, x_s: Tensor, s: Tensor, cond: Condition) -> Tensor:
        return flow_velocity(self.guided_teacher, self.teacher.process, x_s, s, cond)

    @torch.no_grad()
    def transport_target(self, student: nn.Module, x_s: Tensor, s: Tensor, u: Tensor, cond: Condition) -> Tensor:
        """VM's target v - s D at (x_s, s), D the finite difference of the student's velocity `u` (at x_s) along
        one teacher Euler step of size Delta."""
        v = self.teacher_velocity(x_s, s, cond)
        delta = self.cfg.interval
        u_prev = flow_velocity(student, self.student_process, x_s - delta * v, s - delta, cond)
        return vm_target(v, total_derivative(u, u_prev, delta, self.cfg.norm_c), s)

    def student_input(self, nets: Nets, cond: Condition, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(x, t): the input and native time of a uniformly chosen student step, earlier steps the student's own
        rollout without gradient (backward simulation)."""
        i = int(torch.randint(0, self.schedule.num_steps, ()).item())
        noise = torch.randn((n, *self.image_shape), device=device)
        return step_input(nets.generator, self.schedule, cond, noise, i), self.schedule.t(i, n, device)

    @torch.no_grad()
    def student_sample(self, nets: Nets, cond: Condition, n: int, device: torch.device) -> Tensor:
        x, t = self.student_input(nets, cond, n, device)
        x0 = nets.generator(x, t, cond)
        return x0.clamp(-1, 1) if self.schedule.clip_x0 else x0

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg, cond = self.cfg, batch.cond
        first = next(iter(cond.values()))
        n, device = first.shape[0], first.device
        inputs, times, conds = [], [], []
        if cfg.vm_weight > 0:
            if cfg.vm_states == "data":
                if batch.images is None:
                    raise ValueError("mdt_dist with vm_states: data needs data images in the batch")
                x0 = batch.images
            else:
                x0 = self.student_sample(nets, cond, n, device)
            s = self.sample_s(n, device)
            x_s = flow_interpolate(x0, torch.randn_like(x0), s)
            x_t, t = flow_to_native(self.student_process, x_s, s)
            inputs.append(x_t), times.append(t), conds.append(cond)
        if cfg.vd_weight > 0:
            x_in, t_in = self.student_input(nets, cond, n, device)
            inputs.append(x_in), times.append(t_in), conds.append(cond)
        # one pass with gradient through the trained student (DDP: one forward per backward)
        cat_cond = conds[0] if len(conds) == 1 else concat_conditions(*conds)
        out = nets.trained(torch.cat(inputs), torch.cat(times), cat_cond).split(n)
        loss, logs = 0.0, {}
        if cfg.vm_weight > 0:
            u = (x_s - out[0]) / s.reshape((-1,) + (1,) * (x_s.ndim - 1))  # flow_velocity of the pass's x0
            target = self.transport_target(nets.generator, x_s, s, u.detach(), cond)
            loss_vm = vm_loss(u, target).mean()
            loss = loss + cfg.vm_weight * loss_vm
            logs["vm_loss"] = loss_vm.item()
        if cfg.vd_weight > 0:
            x = out[-1]
            if self.schedule.clip_x0:
                x = x.clamp(-1, 1)
            s2 = self.sample_s(n, device)
            x_s2 = flow_interpolate(x.detach(), torch.randn_like(x), s2)
            with torch.no_grad():
                if cfg.vd_fake == "critic":
                    v_real = self.teacher_velocity(x_s2, s2, cond)
                    v_fake = flow_velocity(nets.critic.denoiser, self.teacher.process, x_s2, s2, cond)
                else:
                    v_fake = flow_velocity(nets.generator, self.student_process, x_s2, s2, cond)
                    v_real = self.transport_target(nets.generator, x_s2, s2, v_fake, cond)
                grad = vd_gradient(v_real, v_fake)
            loss_vd = dmd_loss(x, grad).mean()
            loss = loss + cfg.vd_weight * loss_vd
            logs.update(vd_loss=loss_vd.item(), vd_grad_abs=grad.abs().mean().item())
        logs["loss"] = float(loss.item())
        return loss, logs

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """DMD2's fake-score update: denoising on detached student samples, in the network's own output space."""
        cond = batch.cond
        first = next(iter(cond.values()))
        x = self.student_sample(nets, cond, first.shape[0], first.device)
        s = self.sample_s(x.shape[0], x.device)
        # the critic's coordinates
        x_t, t = flow_to_native(self.teacher.process, flow_interpolate(x, torch.randn_like(x), s), s)
        x0_hat, _ = nets.trained(x_t, t, cond)
        fake = nets.critic.denoiser
        loss = denoising_loss(fake.to_native(x0_hat, x_t, t), fake.to_native(x, x_t, t)).mean()
        return loss, {"denoise_loss": loss.item(), "loss": loss.item()}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)

    @torch.no_grad()
    def diagnostics(self, generator: nn.Module, cond: Condition, noise: Tensor) -> dict[str, float]:
        """The VM residual ||u - (v - s D)||^2 / D on the student's own one-step samples re-noised at s = 0.5."""
        x0 = rollout(generator, self.schedule, cond, noise, steps=1)
        s = torch.full((x0.shape[0],), 0.5, device=x0.device).clamp(self.s_lo + self.cfg.interval, self.s_hi)
        x_s = flow_interpolate(x0, torch.randn_like(x0), s)
        u = flow_velocity(generator, self.student_process, x_s, s, cond)
        return {"vm_residual": float(vm_loss(u, self.transport_target(generator, x_s, s, u, cond)).mean())}


def load_velocity_teacher(cfg: RunConfig, teacher: Denoiser) -> Denoiser:
    """recipe.velocity_teacher, loaded as teacher.path was (dtype, resolution) and placed beside it: the registry
    moves only the teacher it loads and the recipe's trained networks. Where teacher.path's network was built
    without weights (`distill plan`) this one keeps its weights on the CPU: the plan's traced passes take it as
    constants and do not count its memory (FSDP2, whose other processes build without weights, is refused)."""
    weight = next(teacher.model.parameters())
    second = load_denoiser(resolve_path(cfg.recipe.velocity_teacher), resolution=cfg.data.resolution,
                           dtype=weight.dtype)
    return second if weight.is_meta else second.to(weight.device)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> MDTDist:
    second = None if cfg.recipe.velocity_teacher is None else load_velocity_teacher(cfg, teacher)
    return MDTDist(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, dataset.image_shape,
                   velocity_teacher=second)
