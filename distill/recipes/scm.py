"""sCM: continuous-time consistency models in TrigFlow (Lu & Song 2024, arXiv 2410.11081).

TrigFlow (sec. 2): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2]; PF-ODE dx_t/dt = sd F_teacher;
consistency function f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t, t) (eq. 6). The continuous-time consistency loss
has the gradient (eq. 8)  grad_theta E[ -w(t) sd sin(t) F_theta^T df_theta^-/dt ],  with the total derivative
taken along the PF-ODE. With the paper's weighting it is the gradient of the mean squared error
||F_theta - sg(F_theta^- + g)||^2 with the tangent (eq. 9, with warmup r)

    g = -cos^2(t) (sd F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sd dF^-/dt)   ( = cos(t) df^-/dt when r = 1 ).

sd dF^-/dt comes from ONE forward-mode JVP of the stop-gradient student with tangents (dx_t/dt, 1), both
multiplied by cos(t) sin(t) ("JVP rearrangement", sec. 4.2, keeps half precision finite), through
`distill.models.jvp.jvp` (exact forward AD with attention through the JVP kernel, or a central finite difference). The
student's output with gradient comes from a separate forward. Stabilisers (sec. 4.2-4.3): tangent normalisation
g / (||g|| + c) or clipping; tangent warmup r = min(1, step / H); adaptive weighting with a learned log-variance
u(t):  loss = exp(-u) ||F_theta - F^- - g||^2 / D + u  (the paper's exp(w)/D ||.||^2 - w with w = -u).

The student keeps its export target's parametrization. The shipped teachers and exports are EDM / consistency
models (`ConsistencyModelPipeline`: x0 = c_skip(sigma) x + c_out(sigma) F_cm(c_in x, 250 log sigma), boundary
scalings with c_skip = 1, c_out = 0 at sigma_min). We do not retrain it as a TrigFlow network; we derive the sCM
objective for it. The TrigFlow state and time of an EDM state are x_trig = cos(t) x_edm with
t = arctan(sigma / sd), and the consistency function is the x0 estimate in every parametrization, so the student
*seen as* a TrigFlow network is

    F_theta(x_trig, t) = (cos(t) x_trig - f_theta^cm(x_trig / cos t, sd tan t)) / (sd sin t)         (*)

(`trigflow_to_native` + `trigflow_from_x0`; any process works through its EDM noise level). (*) is affine in
F_cm at fixed (x_trig, t): grad F_theta = -c_out / (sd sin t) grad F_cm, so sCM's loss on (*) trains the CM
network with exactly sCM's gradient, now in CM coordinates: -2 g^T grad F_theta = 2 c_out / (sd sin t)
g^T grad F_cm. The JVP differentiates (*) as a whole, so the tangent of t passes through c_skip, c_out, c_in and
c_noise = 250 log(sd tan t). The target F^- + g is the TrigFlow target of the CM student; in x0 terms it asks
f_theta to move against cos(t) df^-/dt, the drift of the consistency function along the PF-ODE, which is zero
exactly for the true consistency function (tests/test_scm.py checks this on a Gaussian toy in closed form).

The teacher is any wrapped denoiser (EDM, VP, rectified flow, TrigFlow) seen as TrigFlow through the same maps:
dx_t/dt = sd F_teacher = (cos t x_trig - x0_teacher) / sin t, with classifier-free guidance w, which the
(unguided) student absorbs. Without a teacher (`mode: training`, sCT) dx_t/dt = cos(t) z - sin(t) x0 from data.

Sampling is the export target's: k steps at the pipeline's sigmas (`student.num_steps`, optionally custom
intermediate `timesteps`), exactly what `ConsistencyModelPipeline` does.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.config import Config as RunConfig
from distill.config import Section, require, require_images
from distill.export.checks import check_custom_timesteps
from distill.models.denoiser import Denoiser
from distill.models.jvp import jvp
from distill.models.schedules import rollout, student_from_teacher, student_schedule
from distill.parametrization import _bcast, edm_sigma_range, trigflow_from_x0, trigflow_to_native
from distill.training.recipe import Nets, Recipe


class Config(Section):
    mode: Literal["distillation", "training"] = Field(
        "distillation", description="distillation: dx_t/dt from the teacher's PF-ODE (sCD); training: from the "
                                    "data pair, no teacher call (sCT)")
    jvp: Literal["exact", "finite_difference"] = Field("exact", description="forward AD through the JVP kernel, or "
                                                                            "a central finite difference")
    jvp_eps: float = Field(5e-4, gt=0.0, lt=0.1, description="finite-difference step in TrigFlow time (the "
                                                             "tangents carry cos t sin t)")
    tangent_normalization: Literal["normalize", "clip", "none"] = Field(
        "normalize", description="g / (||g|| + c) per sample (sCM sec. 4.3), clip to [-clip, clip], or none")
    tangent_norm_c: float = Field(0.1, gt=0.0, description="c in g / (||g|| + c); sCM: 0.1")
    tangent_clip: float = Field(1.0, gt=0.0, description="bound of tangent_normalization: clip, g in [-clip, clip]")
    tangent_warmup_steps: int = Field(100, ge=0, description="H in r = min(1, step / H); 0 = no warmup (sCM: 10k)")
    adaptive_weighting: bool = Field(True, description="learned log-variance u(t): exp(-u) mse + u (sCM sec. 4.3)")
    time_sampler: Literal["lognormal", "uniform"] = Field(
        "lognormal", description="lognormal: sd tan t = exp(N(p_mean, p_std^2)) (sCM's proposal); uniform in t")
    p_mean: float = Field(-1.0, ge=-5.0, le=5.0, description="sCM CIFAR-10: -1.0")
    p_std: float = Field(1.4, gt=0.0, le=5.0, description="sCM CIFAR-10: 1.4")
    min_sigma: float = Field(0.002, gt=0.0, description="lowest EDM noise level trained (sd tan t)")
    max_sigma: float = Field(80.0, gt=0.0, description="highest EDM noise level trained")
    timesteps: list[int] | None = Field(
        None, description="custom intermediate times of a multi-step student: the pipeline's `timesteps=` "
                          "(descending indices into its Karras grid, last 0); null = `num_inference_steps` spacing")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.min_sigma < self.max_sigma, "min_sigma", f"must be < recipe.max_sigma ({self.max_sigma}), "
                                                              f"got {self.min_sigma}")
        if self.timesteps is not None:
            ts = self.timesteps
            require(len(ts) >= 1 and all(a > b for a, b in zip(ts, ts[1:])), "timesteps",
                    f"must be strictly descending, got {ts}")
            require(ts[-1] == 0, "timesteps", f"must end with 0 (the first step starts at sigma_max), got {ts}")
        return self

    def check_run(self, cfg: RunConfig) -> None:
        require_images(cfg, "data.name", "x_t = cos(t) x0 + sin(t) z is built from data samples x0, sCM eq. 8")
        check_custom_timesteps(cfg, self.timesteps)


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces (tested against closed forms on a Gaussian toy)
# ---------------------------------------------------------------------------------------------------------------

TrigFlowFn = Callable[[Tensor, Tensor], Tensor]  # (x_trig, t) -> F


def sample_trigflow_time(n: int, cfg: Config, sigma_data: float, device: torch.device,
                         reach: tuple[float, float] = (0.0, math.inf)) -> Tensor:
    """TrigFlow times t = arctan(sigma / sd); lognormal sigma (sCM sec. 4.4) or uniform t, within the range
    [min_sigma, max_sigma] cut to the noise levels `reach` the network's native times cover
    (`distill.parametrization.edm_sigma_range`: a VP teacher's timesteps 0 to T - 1)."""
    lo, hi = max(cfg.min_sigma, reach[0]), min(cfg.max_sigma, reach[1])
    t_lo, t_hi = math.atan(lo / sigma_data), math.atan(hi / sigma_data)
    if cfg.time_sampler == "lognormal":
        sigma = torch.exp(cfg.p_mean + cfg.p_std * torch.randn(n, device=device))
        return torch.atan(sigma / sigma_data).clamp(t_lo, t_hi)
    return t_lo + (t_hi - t_lo) * torch.rand(n, device=device)


def trigflow_view(denoiser: nn.Module, process, cond: Condition, sigma_data: float) -> TrigFlowFn:
    """A denoiser (returning x0 at native (x, t)) seen as a TrigFlow network F(x_trig, t), eq. (*) above."""

    def F(x_trig: Tensor, t: Tensor) -> Tensor:
        x_native, t_native = trigflow_to_native(process, x_trig, t, sigma_data)
        return trigflow_from_x0(denoiser(x_native, t_native, cond), x_trig, t, sigma_data)

    return F


@torch.no_grad()
def teacher_velocity(teacher: Denoiser, x_trig: Tensor, t: Tensor, cond: Condition, sigma_data: float,
                     guidance_scale: float = 1.0) -> Tensor:
    """dx_t/dt = sd F_teacher = (cos t x_t - x0_teacher) / sin t: the teacher's PF-ODE in TrigFlow, with CFG."""
    x_native, t_native = trigflow_to_native(teacher.process, x_trig, t, sigma_data)
    x0 = teacher(x_native, t_native, cond, guidance_scale=guidance_scale)
    return sigma_data * trigflow_from_x0(x0, x_trig, t, sigma_data)


def data_velocity(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """dx_t/dt of x_t = cos t x0 + sin t z for a fixed data pair (consistency training, sCT)."""
    return _bcast(torch.cos(t), x0) * z - _bcast(torch.sin(t), x0) * x0


def scm_tangent(F_student: TrigFlowFn, x_t: Tensor, t: Tensor, dxt_dt: Tensor, sigma_data: float,
                warmup: float = 1.0, method: str = "exact", eps: float = 5e-4) -> tuple[Tensor, Tensor]:
    """(F^-, g): the stop-gradient student output and sCM's tangent (eq. 9 with warmup r, before normalisation).

    One JVP with the rearranged tangents (cos t sin t dx_t/dt, cos t sin t) gives cos t sin t dF^-/dt."""
    cs = torch.cos(t) * torch.sin(t)
    F_minus, cs_dF_dt = jvp(F_student, (x_t, t), (_bcast(cs, x_t) * dxt_dt, cs), method=method, eps=eps)
    cos_t, cs_b = _bcast(torch.cos(t), x_t), _bcast(cs, x_t)
    g = -cos_t**2 * (sigma_data * F_minus - dxt_dt) - warmup * (cs_b * x_t + sigma_data * cs_dF_dt)
    return F_minus, g


def normalize_tangent(g: Tensor, mode: str, c: float = 0.1, clip: float = 1.0) -> Tensor:
    """sCM sec. 4.3: g / (||g|| + c) per sample (L2 over all elements), or clipping to [-clip, clip]."""
    if mode == "normalize":
        norm = torch.linalg.vector_norm(g.double(), dim=tuple(range(1, g.ndim)), keepdim=True)  # fp64, as rCM
        return (g.double() / (norm + c)).to(g.dtype)
    if mode == "clip":
        return g.clamp(-clip, clip)
    if mode == "none":
        return g
    raise ValueError(f"unknown tangent normalisation {mode!r}")


def scm_loss(F_theta: Tensor, F_minus: Tensor, g: Tensor, logvar: Tensor | None = None) -> Tensor:
    """Per-sample sCM loss ||F_theta - sg(F^- + g)||^2 / D, adaptively weighted when `logvar` (u(t)) is given:
    exp(-u) mse + u (sCM eq. 11). Its gradient in F_theta is -2 g / D (times exp(-u)) where F_theta = F^-."""
    mse = (F_theta - (F_minus + g).detach()).pow(2).flatten(1).mean(1)
    if logvar is None:
        return mse
    return torch.exp(-logvar) * mse + logvar


# ---------------------------------------------------------------------------------------------------------------
# The generator: the CM student plus its learned log-variance head (trained, checkpointed, never exported)
# ---------------------------------------------------------------------------------------------------------------


#: |log sigma| fed to the log-variance head at most (sigma e^20 is pure noise for every process).
LOG_SIGMA_BOUND = 20.0


class LogVarianceHead(nn.Module):
    """u(t): a linear layer on Fourier features of log(sigma) (sCM: a linear layer on the time embedding).
    Starts at u = 0 (weight one)."""

    def __init__(self, num_frequencies: int = 16):
        super().__init__()
        self.register_buffer("frequencies", torch.logspace(-2, 1, num_frequencies), persistent=False)
        self.linear = nn.Linear(2 * num_frequencies, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, log_sigma: Tensor) -> Tensor:
        angles = log_sigma.float()[:, None] * self.frequencies[None]
        # a new tensor, not a view: under FSDP2 the head is a root whose output takes a backward hook, which an
        # in-place op on a view would drop (FSDP2 warns at every call)
        return self.linear(torch.cat([angles.cos(), angles.sin()], dim=1)).squeeze(1).clone()


class StudentWithLogVariance(nn.Module):
    """What the trainer trains: `student` (the exported Denoiser) and the head, so one wrapped forward (DDP) gives
    both. Called like a Denoiser it returns x0 (rollouts, sampling)."""

    def __init__(self, student: Denoiser):
        super().__init__()
        self.student = student
        self.logvar = LogVarianceHead()

    def forward(self, x: Tensor, t: Tensor, cond: Condition, with_logvar: bool = False):
        x0 = self.student(x, t, cond)
        if not with_logvar:
            return x0
        alpha, sigma = self.student.process.alpha_sigma(t)
        # log of the EDM sigma, bounded: pure noise (a flow's s = 1, alpha = 0) would give inf, whose NaN
        # derivative reaches the head's weights even from rows whose log-variance is not used (rCM's rollout rows)
        return x0, self.logvar(torch.log(sigma / alpha).clamp(-LOG_SIGMA_BOUND, LOG_SIGMA_BOUND))


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class SCM(Recipe):
    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int):
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.guidance_scale = guidance_scale
        self.generator = StudentWithLogVariance(student_from_teacher(teacher))
        self.sigma_data = float(getattr(teacher.process, "sigma_data", 1.0))
        self.export_timesteps = cfg.timesteps
        self.schedule = student_schedule(self.generator.student, num_steps, cfg.timesteps)

    def export_model(self, generator: nn.Module) -> Denoiser:
        return generator.student

    def warmup(self, step: int) -> float:
        """Tangent warmup r = min(1, step / H) (sCM sec. 4.3)."""
        return 1.0 if self.cfg.tangent_warmup_steps == 0 else min(1.0, step / self.cfg.tangent_warmup_steps)

    def consistency_target(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
        """(x_t, t, F^-, g normalised, mean raw ||g||): everything of the sCM loss that carries no gradient."""
        cfg, sd = self.cfg, self.sigma_data
        if batch.images is None:
            raise ValueError("scm needs data images in the batch (x_t is built from data x0)")
        x0, cond = batch.images, batch.cond
        t = sample_trigflow_time(x0.shape[0], cfg, sd, x0.device, edm_sigma_range(self.teacher.process))
        z = sd * torch.randn_like(x0)
        x_t = _bcast(torch.cos(t), x0) * x0 + _bcast(torch.sin(t), x0) * z
        if cfg.mode == "distillation":
            dxt_dt = teacher_velocity(self.teacher, x_t, t, cond, sd, self.guidance_scale)
        else:
            dxt_dt = data_velocity(x0, z, t)
        student = self.export_model(nets.generator)
        F_student = trigflow_view(student, student.process, cond, sd)
        F_minus, g = scm_tangent(F_student, x_t, t, dxt_dt, sd, self.warmup(step), cfg.jvp, cfg.jvp_eps)
        g_norm = g.flatten(1).norm(dim=1).mean().item()
        g = normalize_tangent(g, cfg.tangent_normalization, cfg.tangent_norm_c, cfg.tangent_clip)
        return x_t, t, F_minus, g, g_norm

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        sd = self.sigma_data
        x_t, t, F_minus, g, g_norm = self.consistency_target(nets, batch, step)
        # The student's own output, with gradient, from a separate pass through the trained generator.
        x_native, t_native = trigflow_to_native(self.export_model(nets.generator).process, x_t, t, sd)
        x0_theta, logvar = nets.trained(x_native, t_native, batch.cond, with_logvar=True)
        F_theta = trigflow_from_x0(x0_theta, x_t, t, sd)
        loss = scm_loss(F_theta, F_minus, g, logvar if self.cfg.adaptive_weighting else None).mean()
        return loss, {"loss": loss.item(), "tangent_norm": g_norm, "logvar": logvar.mean().item()}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(self.export_model(generator), self.schedule, cond, noise)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> SCM:
    return SCM(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps)
