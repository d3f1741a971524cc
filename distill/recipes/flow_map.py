"""Flow maps learned by self-distillation (Boffi, Albergo & Vanden-Eijnden 2025, "How to build a consistency model:
Learning flow maps via self-distillation", arXiv 2505.18825; the flow map of Boffi et al. 2024, arXiv 2406.07507).

Coordinates. Flow time s in [0, 1], x_s = (1 - s) x0 + s z (diffusers' direction: 0 data, 1 noise; the paper runs
the other way, its t is our 1 - s), the teacher's EDM state y = x_s / (1 - s) at sigma = s / (1 - s)
(`distill.parametrization.flow_to_native`). The network covers [s_min, s_max] = `flow_range` (sigma_min = 0.002 to
sigma_max = 80). The PF-ODE is dx_s/ds = b_s(x) = (x - E[x0 | x_s = x]) / s; a teacher gives b through its x0.

The flow map X_{s,t} takes the state at s to the state at t along the PF-ODE (X_{s,s} = id); the paper's
parametrisation (its eq. for X) is  X_{s,t}(x) = x + (t - s) v_{s,t}(x),  so the tangent condition
d/dt X_{s,t}|_{t=s} = v_{s,s} = b_s ties the diagonal of v to the velocity. Here v comes from an x0-style network,
the teacher's consistency-model (CM) network with a second time (derivation ours, see below):

    v_{s,t}(x) = (x - (1 - t0) D(x, s, t)) / (s - t0),   i.e.   X_{s,t}(x) = x~ + (t - t0) / (s - t0) (x - x~),      (1)

x~ = (1 - t0) D, t0 = s_min. D(x, s, t) is the CM student (EDM state and sigma of x_s in, the consistency
function's x0 out, c_skip = 1 and c_out = 0 at sigma_min) whose time embedding gets d(t) added: Fourier features of
the end time t -> MLP, its last layer zero, so training starts from the teacher's network. (1) puts X_{s,t} on the
straight flow line through x at time s and x~ at time t0 (a DDIM step with the x0 estimate D). Why t0 = s_min and
not 0: the CM network's clean end is sigma_min (f(x, sigma_min) = x), and a CM student initialised from an EDM
teacher has (x - (1 - t0) D(x, s, s)) / (s - t0) = the teacher's velocity up to its c_skip terms (O(sigma^2)),
where the line through 0 would be off by (s - t0) / s near s_min. Consequences, all exact:

* X_{s,t0}(x) = (1 - t0) D(x, s, t0): in EDM coordinates (divide by 1 - t0) it is D itself, the consistency
  function at sigma_min. ConsistencyModelPipeline's sampler (predict x0 at sigma_i, re-noise to sigma_{i+1} with
  fresh noise) only ever asks for X_{s_i, t0}, where the second time is a constant: the export adds d(t0) to the
  bias that already adds to the time embedding (UNet2DModel: `time_embedding.linear_2.bias`; the toy MLP:
  `input.bias`), and the exported stock network is the two-time network at t = t0 (tests/test_flow_map.py).
* the map's diagonal velocity is v_{s,s}(x) = (x - (1 - t0) D(x, s, s)) / (s - t0).

Objectives (the paper's L_SD = L_b + L_D, sec. 3): the batch is split, `diagonal_fraction` of it on the diagonal
t = s with the flow-matching loss L_b = |v_{s,s}(I_s) - target|^2 (paper: target dI_s/ds = z - x0 from the
interpolant I_s = (1 - s) x0 + s z; with a teacher: the teacher's velocity b_s(I_s)), the rest off the diagonal,
s > t >= t0 at x = I_s, with one of the residuals (b: the teacher's velocity, distillation, or the student's own
diagonal v_{t,t} with stop-gradient, self-distillation without a teacher):

    LSD (Lagrangian):  R = d/dt X_{s,t}(x) - sg(b_t(X_{s,t}(x)))
    ESD (Eulerian):    R = d/ds X_{s,t}(x) + grad_x X_{s,t}(x) sg(b_s(x))   ( = d/de X_{s+e,t}(x + e b_s(x)) )
    PSD (progressive): R = X_{s,t}(x) - sg(X_{u,t}(X_{s,u}(x))),  u in (t, s): the midpoint or uniform (PSD-M/-U)

`gradient: residual` is the paper's loss |R|^2 with the gradient through the derivative: the derivative is a central
difference of step h along the residual's direction ((0, 0, 1) in (x, s, t) for LSD, (b_s, 1, 0) for ESD), both
sides in the one pass with gradient; LSD's b is evaluated at the sides' detached mean (X_{s,t} + O(h^2)).
`gradient: target` (derivation ours, in the manner of sCM and Align Your Flow's continuous-time LMD/EMD, arXiv
2410.11081, 2506.14603) keeps the derivative out of the gradient: one forward-mode JVP of the stop-gradient student
(`distill.models.jvp.jvp`, exact or central difference) gives R, and the student's map X_theta is pulled toward

    LSD:  sg(X^- + g)        ESD:  sg(X^- - g),        g = R / (||R|| + c)  (sCM's tangent normalisation),

so the gradient is -+2 g^T grad X_theta / D. The signs are not free: each loss must bootstrap from the side of its
boundary X_{s,s} = x. LSD's boundary is t -> s (t < s), and X_{s,t+e} - e b_{t+e}(X_{s,t+e}) = X_{s,t} + e R + O(e^2);
ESD's is s -> t, X_{s-e,t}(x - e b_s(x)) = X_{s,t} - e R + O(e^2). (The other signs make information flow away from
the boundary and diverge; tests/test_flow_map.py trains a Gaussian toy with each objective.) PSD has no derivative:
its target is the composition itself, in both modes. Both modes vanish exactly where R = 0.

Sampling and export: `generate` is the export target's k-step CM sampler on the two-time network at t = t0
(`distill.models.schedules`), i.e. X_{s_i, t0} and fresh noise, which the exported pipeline reproduces. Any-step
sampling with deterministic jumps X_{s_i, s_{i+1}} on any grid (:func:`sample_flow_map`) needs the second time, so it
is the trained network's, not the stock pipeline's: scripts/flow_map_any_step.py shows it on the toy.

Left out: the paper's (s, t) weighting w_{s,t} (uniform here) and its learned loss weights. Its networks embed both
times and train from scratch; ours adds the end time to the teacher's one-time network and starts from the
teacher's weights (`init: scratch` starts from a fresh network of the teacher's design: with `mode: training` the
paper's direct training, the teacher then serving as nothing but the architecture).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition, concat_conditions, index_condition
from distill.base.errors import ConfigError
from distill.base.paths import resolve_path
from distill.config import Config as RunConfig
from distill.config import Section, require, require_images
from distill.export.checks import check_custom_timesteps
from distill.models.denoiser import Denoiser
from distill.models.jvp import jvp
from distill.models.schedules import rollout, student_from_teacher, student_schedule
from distill.parametrization import _bcast, flow_interpolate, flow_range, flow_to_native
from distill.recipes.scm import normalize_tangent
from distill.training.recipe import Nets, Recipe


class Config(Section):
    mode: Literal["distillation", "training"] = Field(
        "distillation", description="distillation: the velocity (diagonal target, LSD/ESD's b) is the teacher's "
                                    "PF-ODE; training: the diagonal is flow-matched on data and b is the student's "
                                    "own diagonal (self-distillation, no teacher call)")
    init: Literal["teacher", "scratch"] = Field(
        "teacher", description="the student's network: the teacher's weights, or a fresh one of its design (the "
                               "paper's direct training; with mode: training the teacher is then not used at all)")
    objective: Literal["lsd", "esd", "psd"] = Field("lsd", description="off-diagonal residual: Lagrangian, Eulerian "
                                                                       "or progressive self-distillation")
    gradient: Literal["residual", "target"] = Field(
        "residual", description="residual: the paper's |R|^2, gradient through a central difference; target: "
                                "pull X toward sg(X -+ R / (||R|| + c)), R from one JVP (sCM-style)")
    jvp: Literal["exact", "finite_difference"] = Field("exact", description="gradient: target: forward AD (JVP "
                                                                            "kernel for attention) or a central "
                                                                            "difference")
    fd_step: float = Field(1e-3, gt=0.0, lt=0.05, description="central-difference step in flow time (gradient: "
                                                               "residual, and jvp: finite_difference)")
    tangent_normalization: Literal["normalize", "clip", "none"] = Field(
        "normalize", description="gradient: target: R / (||R|| + c) per sample, clipping, or none (sCM sec. 4.3)")
    tangent_norm_c: float = Field(0.1, gt=0.0, description="c in R / (||R|| + c)")
    tangent_clip: float = Field(1.0, gt=0.0, description="bound of tangent_normalization: clip")
    diagonal_fraction: float = Field(0.25, ge=0.0, lt=1.0, description="share of the batch on the diagonal t = s "
                                                                       "(flow-matching loss L_b)")
    clean_end_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of the off-diagonal samples with "
                                                                       "t = t0 exactly (the edge the export uses)")
    psd_split: Literal["midpoint", "uniform"] = Field("uniform", description="PSD's intermediate time u: (s + t) / 2 "
                                                                             "or uniform in (t, s)")
    time_sampler: Literal["uniform", "lognormal", "schedule"] = Field(
        "uniform", description="off-diagonal first time s: uniform in flow time, lognormal EDM sigma (sCM's "
                               "proposal), or one of the student's k sampling times (LSD only: the map at those s "
                               "is all its pipeline uses); the end time t is uniform in [t0, s]")
    p_mean: float = Field(-1.0, ge=-5.0, le=5.0, description="time_sampler: lognormal: mean of log sigma")
    p_std: float = Field(1.4, gt=0.0, le=5.0, description="time_sampler: lognormal: std of log sigma")
    end_embedding_gain: float = Field(1.0, gt=0.0, le=1000.0, description="fixed output scale of the end-time "
                                                                          "embedding d(t); under Adam it learns "
                                                                          "this many times faster")
    timesteps: list[int] | None = Field(
        None, description="custom intermediate times of a multi-step student: the pipeline's `timesteps=` "
                          "(descending indices into its Karras grid, last 0); null = `num_inference_steps` spacing")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.mode == "distillation" or self.diagonal_fraction > 0, "diagonal_fraction",
                "must be > 0 with recipe.mode: training: without a teacher the diagonal, the velocity the map is "
                "distilled from, is learnt by flow matching on it")
        require(not (self.objective == "lsd" and self.mode == "training" and self.clean_end_fraction > 0),
                "clean_end_fraction", "must be 0 for lsd with recipe.mode: training: LSD evaluates the student's "
                "diagonal velocity at the end time, (x - (1 - t0) D) / (t - t0), which is 0 / 0 at t = t0")
        require(self.time_sampler != "schedule" or self.objective == "lsd", "time_sampler",
                f"schedule needs recipe.objective: lsd, whose residual at (s, t) involves the map at that s alone; "
                f"{self.objective} couples other first times (ESD by its s-derivative, PSD by its compositions)")
        check_descending_timesteps(self.timesteps)
        return self

    def check_run(self, cfg: RunConfig) -> None:
        require_images(cfg, "data.name", "the map is trained at interpolants I_s = (1 - s) x0 + s z of data x0")
        check_two_time_run(cfg, self.timesteps, "flow_map")


def check_descending_timesteps(ts: list[float] | None) -> None:
    """recipe.timesteps, where given: strictly descending and ending with 0 (the export's custom schedule)."""
    if ts is not None:
        require(len(ts) >= 1 and all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] == 0, "timesteps",
                f"must be strictly descending and end with 0, got {ts}")


def check_two_time_run(cfg: RunConfig, timesteps: list[float] | None, recipe: str) -> None:
    """A two-time network's run: its custom export timesteps fit the export, and teacher.path is a network whose time
    embedding takes the end time (one of EMBEDDING_SITES), exported as ConsistencyModelPipeline."""
    check_custom_timesteps(cfg, timesteps)
    from distill.families.target import teacher_target

    target, net, _ = teacher_target(resolve_path(cfg.teacher.path), cfg.teacher.prediction)
    if target is not None or net.get("_class_name") not in EMBEDDING_SITES:
        raise ConfigError(f"teacher.path: {recipe} adds the end time to the time embedding of a "
                          f"{' or '.join(EMBEDDING_SITES)} exported as ConsistencyModelPipeline; this teacher "
                          f"is a {net.get('_class_name')}" + (f" exported as {target.pipeline}" if target else ""))


# ---------------------------------------------------------------------------------------------------------------
# The two-time network: the teacher's CM network plus an embedding of the end time
# ---------------------------------------------------------------------------------------------------------------

#: network class -> (the module whose output is the time embedding d(t) is added to, the bias that adds a
#: constant to that same output: where the export folds d(t0)). The toy MLP has no separate time embedding: its
#: time features enter its input layer, whose output then takes d(t) like an extra input.
EMBEDDING_SITES = {"UNet2DModel": ("time_embedding", "time_embedding.linear_2.bias"),
                   "ToyMLP": ("input", "input.bias")}


class EndTimeEmbedding(nn.Module):
    """d(t) = gain * MLP(cos, sin of t w_k), w_k geometric in [1, 64] rad per unit flow time; the last layer starts at
    zero, so d = 0 and the two-time network is the one-time network it was made from."""

    def __init__(self, width: int, gain: float = 1.0, num_frequencies: int = 16, hidden: int = 128):
        super().__init__()
        self.register_buffer("frequencies", torch.logspace(0.0, math.log10(64.0), num_frequencies),
                             persistent=False)
        self.gain = gain
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, hidden), nn.SiLU(), nn.Linear(hidden, width))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: Tensor) -> Tensor:
        angles = t.float()[:, None] * self.frequencies[None]
        return self.gain * self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class TwoTimeStudent(nn.Module):
    """The generator: the CM `student` (a Denoiser) and the end-time embedding, one module so one wrapped forward
    (DDP) trains both. `forward(x, t, cond, end)` is D(x, t, end): the student's x0 at its native (x, t) with d(end)
    added to its time embedding for that call; `end` None is the clean end t0, so called like a Denoiser it is the
    exported network (rollouts, sampling)."""

    def __init__(self, student: Denoiser, clean_end: float, gain: float = 1.0):
        super().__init__()
        name = type(student.model).__name__
        if name not in EMBEDDING_SITES:
            raise ConfigError(f"teacher.path: flow_map has no end-time embedding for a {name} (supported: "
                              f"{sorted(EMBEDDING_SITES)})")
        self.site, self.bias = EMBEDDING_SITES[name]
        site = student.model.get_submodule(self.site)
        if getattr(site, "post_act", None) is not None:  # a nonlinearity after the bias: the fold would not be exact
            raise ConfigError(f"teacher.path: the {name}'s time embedding ends in an activation; flow_map folds the "
                              "end time into its last bias, which needs a linear end")
        self.student = student
        self.clean_end = clean_end
        self.end_embedding = EndTimeEmbedding(student.model.get_parameter(self.bias).shape[0], gain)

    def forward(self, x: Tensor, t: Tensor, cond: Condition, end: Tensor | None = None) -> Tensor:
        if end is None:
            end = torch.full_like(t, self.clean_end, dtype=torch.float32)
        d = self.end_embedding(end)
        # added to the time embedding for this call only (a hook held by no copy: EMA swaps and deep copies of the
        # module never carry it)
        handle = self.student.model.get_submodule(self.site).register_forward_hook(
            lambda module, args, out: out + d.to(out.dtype))
        try:
            return self.student(x, t, cond)
        finally:
            handle.remove()


@torch.no_grad()
def fold_end_time(generator: TwoTimeStudent) -> Denoiser:
    """The exported network: a copy of the student with d(t0) added to the bias that adds to its time embedding,
    which is the two-time network at end time t0 (exact up to the order of one float addition)."""
    folded = generator.student.copy(trainable=False)
    bias = folded.model.get_parameter(generator.bias)
    end = torch.full((1,), generator.clean_end, device=bias.device)
    bias.add_(generator.end_embedding(end)[0].to(bias.dtype))
    return folded


# ---------------------------------------------------------------------------------------------------------------
# The flow map in flow coordinates (pure pieces, tested against a Gaussian toy's closed-form map)
# ---------------------------------------------------------------------------------------------------------------

MapFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, s, t) -> X_{s,t}(x)
VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x, s) -> b_s(x)


def map_from_x0(x: Tensor, x0: Tensor, s: Tensor, t: Tensor, t0: float) -> Tensor:
    """Eq. (1): X_{s,t}(x) = x~ + (t - t0) / (s - t0) (x - x~), x~ = (1 - t0) x0 (x0 in EDM scale)."""
    x_end = (1 - t0) * x0
    return x_end + _bcast((t - t0) / (s - t0), x).to(x.dtype) * (x - x_end)


def velocity_from_x0(x: Tensor, x0: Tensor, s: Tensor, t0: float) -> Tensor:
    """v_{s,t}(x) = (x - (1 - t0) x0) / (s - t0); on the diagonal (x0 = D(x, s, s)) the map's velocity."""
    return (x - (1 - t0) * x0) / _bcast(s - t0, x).to(x.dtype)


def two_time_x0(net: nn.Module, process, x: Tensor, s: Tensor, t: Tensor, cond: Condition) -> Tensor:
    """D(x, s, t) of a two-time network at flow state x, flow times s (first) and t (end)."""
    y, sigma = flow_to_native(process, x, s)
    return net(y, sigma, cond, end=t)


def flow_map_view(net: nn.Module, process, cond: Condition, t0: float) -> MapFn:
    """A two-time network seen as its flow map X_{s,t}(x), eq. (1), differentiable in (x, s, t)."""
    return lambda x, s, t: map_from_x0(x, two_time_x0(net, process, x, s, t, cond), s, t, t0)


def diagonal_view(net: nn.Module, process, cond: Condition, t0: float) -> VelocityFn:
    """The map's own velocity v_{s,s}(x) (self-distillation's b)."""
    return lambda x, s: velocity_from_x0(x, two_time_x0(net, process, x, s, s, cond), s, t0)


def teacher_view(teacher: Denoiser, cond: Condition, guidance_scale: float = 1.0) -> VelocityFn:
    """The teacher's PF-ODE velocity in flow coordinates, b_s(x) = (x - x0_teacher) / s, with CFG w."""

    def b(x: Tensor, s: Tensor) -> Tensor:
        y, sigma = flow_to_native(teacher.process, x, s)
        return (x - teacher(y, sigma, cond, guidance_scale=guidance_scale)) / _bcast(s, x).to(x.dtype)

    return b


def lsd_residual(X: MapFn, b: VelocityFn, x: Tensor, s: Tensor, t: Tensor, method: str = "exact",
                 eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(X_{s,t}(x), R = d/dt X_{s,t}(x) - b_t(X_{s,t}(x))), without gradient: one JVP with tangents (0, 0, 1)."""
    X_st, dX_dt = jvp(X, (x, s, t), (torch.zeros_like(x), torch.zeros_like(s), torch.ones_like(t)), method, eps)
    with torch.no_grad():
        return X_st, dX_dt - b(X_st, t)


def esd_residual(X: MapFn, b: VelocityFn, x: Tensor, s: Tensor, t: Tensor, method: str = "exact",
                 eps: float = 1e-3) -> tuple[Tensor, Tensor]:
    """(X_{s,t}(x), R = d/ds X_{s,t}(x) + grad_x X_{s,t}(x) b_s(x)), without gradient: one JVP along (b_s, 1, 0)."""
    with torch.no_grad():
        b_s = b(x, s)
    return jvp(X, (x, s, t), (b_s, torch.ones_like(s), torch.zeros_like(t)), method, eps)


@torch.no_grad()
def psd_target(X: MapFn, x: Tensor, s: Tensor, u: Tensor, t: Tensor) -> Tensor:
    """The semigroup's composition X_{u,t}(X_{s,u}(x)), without gradient."""
    return X(X(x, s, u), u, t)


#: the side each residual bootstraps from (see the module docstring): target = X^- + SIGN * g
TARGET_SIGN = {"lsd": 1.0, "esd": -1.0}


def map_loss(X_theta: Tensor, target: Tensor) -> Tensor:
    """Per-sample ||X_theta - sg(target)||^2 / D."""
    return (X_theta - target.detach()).pow(2).flatten(1).mean(1)


def residual_loss(R: Tensor) -> Tensor:
    """Per-sample ||R||^2 / D (the paper's L_D with uniform weight)."""
    return R.pow(2).flatten(1).mean(1)


def central_difference_points(x: Tensor, s: Tensor, t: Tensor, direction: tuple[Tensor, Tensor, Tensor],
                              h: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x, s, t) +- h direction, the + side first, stacked along the batch."""
    dx, ds, dt = direction
    return tuple(torch.cat([p + h * v, p - h * v]) for p, v in ((x, dx), (s, ds), (t, dt)))


# ---------------------------------------------------------------------------------------------------------------
# Times and sampling
# ---------------------------------------------------------------------------------------------------------------


def sample_times(n: int, cfg: Config, t0: float, s_max: float, device: torch.device,
                 schedule: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(s, t) with t0 <= t <= s <= s_max: s uniform in flow time, with lognormal sigma, or one of the flow times
    `schedule`; t | s uniform on [t0, s], or t0 exactly for a share `clean_end_fraction`."""
    if cfg.time_sampler == "schedule":
        s = schedule.to(device)[torch.randint(len(schedule), (n,), device=device)]
    elif cfg.time_sampler == "lognormal":
        sigma = torch.exp(cfg.p_mean + cfg.p_std * torch.randn(n, device=device))
        s = (sigma / (1 + sigma)).clamp(t0, s_max)
    else:
        s = t0 + (s_max - t0) * torch.rand(n, device=device)
    t = t0 + (s - t0) * torch.rand(n, device=device)
    clean = torch.rand(n, device=device) < cfg.clean_end_fraction
    return s, torch.where(clean, torch.full_like(t, t0), t)


def jump_grid(process, num_jumps: int) -> Tensor:
    """num_jumps + 1 flow times evenly spaced from the network's s_max down to its clean end t0 = s_min."""
    t0, s_max = flow_range(process)
    return torch.linspace(s_max, t0, num_jumps + 1, dtype=torch.float32)


@torch.no_grad()
def sample_flow_map(generator: TwoTimeStudent, cond: Condition, noise: Tensor, times: Tensor) -> Tensor:
    """Deterministic any-step sampling: jumps X_{s_i, s_{i+1}} down `times` (flow times, the first the network's
    s_max, the last its clean end t0), from the state the pipeline starts at (EDM sigma_max z, i.e. flow s_max z);
    returns the clean end in EDM scale, clipped to [-1, 1] as the pipeline clips its x0. One jump is the 1-step
    pipeline sample."""
    process, t0 = generator.student.process, generator.clean_end
    X = flow_map_view(generator, process, cond, t0)
    x = noise * float(times[0])
    for s, t in zip(times[:-1].tolist(), times[1:].tolist()):
        x = X(x, torch.full((x.shape[0],), s, device=x.device), torch.full((x.shape[0],), t, device=x.device))
    return (x / (1 - t0)).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class FlowMap(Recipe):
    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int):
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.guidance_scale = guidance_scale
        self.t0, self.s_max = flow_range(teacher.process)
        student = student_from_teacher(teacher)
        if cfg.init == "scratch":  # a freshly initialised network of the teacher's class and config
            config = {k: v for k, v in student.model.config.items() if not k.startswith("_")}
            student.model = type(student.model).from_config(config).to(next(student.model.parameters()).device).train()
        self.generator = TwoTimeStudent(student, self.t0, cfg.end_embedding_gain)
        self.process = teacher.process
        self.export_timesteps = cfg.timesteps
        self.schedule = student_schedule(self.generator.student, num_steps, cfg.timesteps)
        sigmas = self.schedule.times.double()
        self.schedule_flow_times = (sigmas / (1 + sigmas)).float()  # the first times the pipeline asks the map for

    def export_model(self, generator: nn.Module) -> Denoiser:
        return fold_end_time(generator)

    # -- the velocity the map is distilled from -----------------------------------------------------------------
    def velocity(self, nets: Nets, cond: Condition) -> VelocityFn:
        """b: the teacher's PF-ODE (distillation) or the student's own diagonal (training); called without gradient."""
        if self.cfg.mode == "distillation":
            return teacher_view(self.teacher, cond, self.guidance_scale)
        return diagonal_view(nets.generator, self.process, cond, self.t0)

    def diagonal_target(self, nets: Nets, x: Tensor, s: Tensor, dI_ds: Tensor, cond: Condition) -> Tensor:
        """L_b's target: the teacher's velocity at I_s, or the interpolant's dI_s/ds = z - x0 (flow matching)."""
        if self.cfg.mode == "training":
            return dI_ds
        with torch.no_grad():
            return teacher_view(self.teacher, cond, self.guidance_scale)(x, s)

    # -- the off-diagonal terms --------------------------------------------------------------------------------
    def off_diagonal_target(self, nets: Nets, x: Tensor, s: Tensor, t: Tensor,
                            cond: Condition) -> tuple[Tensor, Tensor | None]:
        """(the target of X_theta(x, s, t), the residual R of the stop-gradient student; None for PSD, whose R is
        X_theta - target) for PSD and `gradient: target`, without gradient."""
        cfg = self.cfg
        X = flow_map_view(nets.generator, self.process, cond, self.t0)
        if cfg.objective == "psd":
            u = (s + t) / 2 if cfg.psd_split == "midpoint" else t + (s - t) * torch.rand_like(s)
            return psd_target(X, x, s, u, t), None
        residual = lsd_residual if cfg.objective == "lsd" else esd_residual
        X_minus, R = residual(X, self.velocity(nets, cond), x, s, t, cfg.jvp, cfg.fd_step)
        g = normalize_tangent(R, cfg.tangent_normalization, cfg.tangent_norm_c, cfg.tangent_clip)
        return X_minus + TARGET_SIGN[cfg.objective] * g, R

    def difference_direction(self, nets: Nets, x: Tensor, s: Tensor, t: Tensor,
                             cond: Condition) -> tuple[Tensor, Tensor, Tensor]:
        """`gradient: residual`: the direction in (x, s, t) whose derivative of X is the residual's derivative."""
        if self.cfg.objective == "lsd":
            return torch.zeros_like(x), torch.zeros_like(s), torch.ones_like(t)
        with torch.no_grad():
            b_s = self.velocity(nets, cond)(x, s)
        return b_s, torch.ones_like(s), torch.zeros_like(t)

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg, t0 = self.cfg, self.t0
        if batch.images is None:
            raise ValueError("flow_map needs data images in the batch (the map is trained at interpolants of data)")
        x0, cond = batch.images, batch.cond
        n = x0.shape[0]
        k = min(round(n * cfg.diagonal_fraction), n - 1)  # the first k samples on the diagonal, at least one off it
        s, t = sample_times(n, cfg, t0, self.s_max, x0.device, self.schedule_flow_times)
        if cfg.time_sampler == "schedule":  # the diagonal is a velocity at every time
            s[:k] = t0 + (self.s_max - t0) * torch.rand(k, device=x0.device)
        t = torch.cat([s[:k], t[k:]])
        z = torch.randn_like(x0)
        x = flow_interpolate(x0, z, s)
        diag, off = slice(0, k), slice(k, n)
        cond_d, cond_o = index_condition(cond, diag), index_condition(cond, off)
        v_target = self.diagonal_target(nets, x[diag], s[diag], (z - x0)[diag], cond_d)

        # the off-diagonal inputs of the pass with gradient: (x, s, t) itself, or its two difference sides
        x_o, s_o, t_o = x[off], s[off], t[off]
        residual_form = cfg.gradient == "residual" and cfg.objective != "psd"
        if residual_form:
            h = cfg.fd_step
            pts = central_difference_points(x_o, s_o, t_o, self.difference_direction(nets, x_o, s_o, t_o, cond_o), h)
            cond_p = concat_conditions(cond_o, cond_o)
        else:
            target, R = self.off_diagonal_target(nets, x_o, s_o, t_o, cond_o)
            pts, cond_p = (x_o, s_o, t_o), cond_o

        # one pass with gradient (DDP: one forward per backward): the diagonal, then the off-diagonal inputs
        xs, ss, ts = (torch.cat([a[diag], p]) for a, p in zip((x, s, t), pts))
        D = two_time_x0(nets.trained, self.process, xs, ss, ts, concat_conditions(cond_d, cond_p))
        v = velocity_from_x0(x[diag], D[:k], s[diag], t0)
        loss_diag = residual_loss(v - v_target)
        X_theta = map_from_x0(xs[k:], D[k:], ss[k:], ts[k:], t0)
        if residual_form:
            X_plus, X_minus = X_theta.chunk(2)
            R = (X_plus - X_minus) / (2 * h)
            if cfg.objective == "lsd":  # b_t at the sides' mean, X_{s,t} + O(h^2), with stop-gradient
                with torch.no_grad():
                    b_t = self.velocity(nets, cond_o)((X_plus + X_minus) / 2, t_o)
                R = R - b_t
            loss_off = residual_loss(R)
        else:
            loss_off = map_loss(X_theta, target)
            R = X_theta - target if R is None else R
        loss = torch.cat([loss_diag, loss_off]).mean()
        residual_rms = R.detach().pow(2).flatten(1).mean(1).sqrt().mean().item()
        return loss, {"loss": loss.item(), "diagonal_loss": loss_diag.mean().item() if k else 0.0,
                      "off_diagonal_loss": loss_off.mean().item(), "residual_rms": residual_rms}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)

    @torch.no_grad()
    def diagnostics(self, generator: nn.Module, cond: Condition, noise: Tensor) -> dict[str, float]:
        """semigroup_gap: RMS (EDM scale) of X_{s,t0}(x) - X_{u,t0}(X_{s,u}(x)) at s = s_max, u its midpoint with t0,
        from the pipeline's start x = s_max z: 0 for an exact flow map, whatever its teacher."""
        n = noise.shape[0]
        X = flow_map_view(generator, self.process, cond, self.t0)
        s, t = (torch.full((n,), v, device=noise.device) for v in (self.s_max, self.t0))
        x = noise * self.s_max
        gap = X(x, s, t) - psd_target(X, x, s, (s + t) / 2, t)
        return {"semigroup_gap": float(gap.pow(2).flatten(1).mean(1).sqrt().mean() / (1 - self.t0))}


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> FlowMap:
    return FlowMap(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps)
