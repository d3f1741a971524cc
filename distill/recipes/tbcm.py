"""TBCM: continuous-time consistency distillation on the teacher's own trajectories, without a data set (Tang et al.
2025, "Image-Free Timestep Distillation via Continuous-Time Consistency with Trajectory-Sampled Pairs",
arXiv 2511.20410; the Trajectory-Backward Consistency Model).

sCM (`distill.recipes.scm`, Lu & Song 2024) trains the consistency function at x_t = cos(t) x0 + sin(t) z built from
data images x0. TBCM keeps sCM's objective and replaces the data: its training points are states of the teacher's
own sampling trajectories started from noise ("generation space" instead of the noised data's "diffusion space"),
which needs no image, no VAE encoding, and is what a few-step student meets at inference. Sources: the paper's
abstract and summary, and its authors' code (github.com/hustvl/TBCM: train_scripts/train_tbcm.py,
diffusion/utils/tbcm_utils.py); the body of the paper was not readable here, so every equation below is as that code
computes it, in our notation, unless marked as ours.

The route (tbcm_utils.compute_refer_route, sample_ordered_timesteps_from_ref). Reference TrigFlow times
r_0 > r_1 > ... > r_{K-1} are the levels of the teacher's K-step sampler (theirs: Sana's flow grid with shift 2.5,
K = 16, r_0 = pi/2; ours: `reference_route`, the levels `distill.models.sampling` visits, e.g. the Karras ramp of an
EDM teacher, r_0 = arctan(sigma_max / sd); a choice of ours: their route is their teacher's inference grid, this is
ours). A jittered route draws t_0 = r_0 and t_k ~ U[r_k, r_{k-1}), k >= 1; a fixed route is t_k = r_k (it never
trains above r_1, so not at r_0 where a one-step student samples: on the toy it fails, docs/tbcm.md). The
trajectory (train_tbcm.py, without gradient) starts at x_{t_0} = sd sin(t_0) eps, eps ~ N(0, I) (an EDM teacher's
sigma_max eps, in TrigFlow coordinates), and steps

    x_{t_{k+1}} = cos(t_k - t_{k+1}) x_{t_k} - sin(t_k - t_{k+1}) dx/dt(x_{t_k}, t_k),    t_K = 0,
    dx/dt = sd F_teacher = (cos t x_t - x0_teacher(x_t, t)) / sin t          (with the teacher's CFG),

the TrigFlow DDIM step (= sin(s)/sin(t) x_t + sin(t - s)/sin(t) x0_teacher, DDIM in every parametrization:
`ddim_step`). Training points are (x_{t_k}, t_k, dx/dt at it) for k = 1 .. K - 1: every state of the route but the
pure-noise start, K - 1 points per trajectory, and the teacher velocity computed to move along the route is the
dx_t/dt of sCM's tangent (no further teacher call). There is no data-side x0: the loss needs (x_t, t, dx_t/dt) only,
and the route's end x_{t_K} is not used (their code uses it only to drop trajectories that end near an all-black
image, a text-to-image filter left out here).

The loss is sCM's (imported: `scm_tangent`, `normalize_tangent`, `scm_loss`): tangent g (sCM eq. 9 with warmup r),
normalised g / (||g|| + c), adaptive log-variance u(t), and the prior weighting of their code (as Sana-Sprint's)
w(t) = 1 / (sd tan t) = 1 / sigma_EDM:

    loss = w(t) exp(-u(t)) ||F_theta - sg(F^- + g)||^2 / D + u(t)                            (`tbcm_loss`)

computed as sCM's loss with u' = u - log w (exp(-u') mse + u' = w exp(-u) mse + u - log w: the same value up to the
constant log w, the same gradients). The shipped configs turn w off (`prior_weighting: none`): at 400 updates the
log-variance head cannot undo its 1e4 range, and the levels a one-step student samples at starve (docs/tbcm.md).
Their Sana-Sprint code also decays r to 0.75 after 15k steps; runs here are far shorter, so it is left out.

Where the points come from (`trajectories`):

* "online": the route above, run for every batch with the teacher (the paper's procedure): ceil(B / (K - 1))
  trajectories of the batch's conditions, B of their (K - 1) points drawn at random.
* "store" (the configs; ours): the pair store (`distill.data.pairs.PathPairsConfig`) keeps the input states of
  the teacher sampler's steps with its x0 estimates there, made once before training. A fixed route trains on
  stored points k = 1 .. P - 1 at their stored levels, with dx/dt from the stored x0 estimate: no teacher call
  while training. A jittered route (derivation ours) takes a stored point k in 0 .. P - 2, draws
  t ~ U[t_{k+1}, t_k) as above, and moves there by the route's own step from the stored state,
  x_t = ddim_step(x_{t_k}, dx/dt(x_{t_k}), t_k, t), the state at t of the online route that passes through
  x_{t_k}; then one teacher call gives dx/dt at (x_t, t), as the online route computes it for its next step.

The student is sCM's: the teacher's network as a consistency model (EDM teacher -> CM boundary scalings, exported as
a stock ConsistencyModelPipeline) with a log-variance head that is trained, checkpointed, never exported. Sampling is
the export target's k-step sampler. No step of training reads a data image: `dataset` is the store's points or
conditions drawn uniformly (the store's own conditions: `pairs.labels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition, index_condition
from distill.base.errors import ConfigError
from distill.config import Config as RunConfig
from distill.config import Section, require
from distill.data.pairs import (
    PROMPT_INDEX,
    PairStore,
    PathPairsConfig,
    check_prompts,
    check_store_matches,
    draw_conditions,
)
from distill.export.checks import check_custom_timesteps
from distill.models.denoiser import Denoiser
from distill.models.sampling import sample, unit_grid
from distill.models.schedules import rollout, student_from_teacher, student_schedule
from distill.parametrization import _bcast, trigflow_from_x0, trigflow_to_native
from distill.recipes.scm import (
    StudentWithLogVariance,
    normalize_tangent,
    scm_loss,
    scm_tangent,
    teacher_velocity,
    trigflow_view,
)
from distill.training.recipe import Nets, Recipe


def _default_pairs() -> PathPairsConfig:
    return PathPairsConfig(path="runs/pairs/digits_tbcm", num_pairs=2048, num_steps=20, path_points=20,
                           labels="uniform")


class Config(Section):
    trajectories: Literal["store", "online"] = Field(
        "store", description="store: points of the teacher ODE paths kept in the pair store (recipe.pairs), "
                             "made once before training; online: the teacher's route run for every "
                             "batch, as the paper's code does (recipe.pairs: null)")
    pairs: PathPairsConfig | None = Field(default_factory=_default_pairs, description="the pair store whose paths "
                                          "are trained on; null with trajectories: online")
    route: Literal["jittered", "fixed"] = Field(
        "jittered", description="jittered: each point's time uniform between two route levels (TBCM's "
                                "sample_ordered_timesteps_from_ref); fixed: the route's levels themselves (never "
                                "the top level a one-step student samples at)")
    route_steps: int = Field(16, ge=2, le=1000, description="K, levels of the online route (TBCM: 16); the store's "
                                                            "route is its solver's pairs.num_steps")
    prior_weighting: Literal["inverse_sigma", "none"] = Field(
        "inverse_sigma", description="w(t) in w exp(-u) mse + u: 1 / (sd tan t) as TBCM's code, or 1 (sCM recipe)")
    jvp: Literal["exact", "finite_difference"] = Field("exact", description="forward AD through the JVP kernel, or "
                                                                            "a central finite difference")
    jvp_eps: float = Field(5e-4, gt=0.0, lt=0.1, description="finite-difference step in TrigFlow time")
    tangent_normalization: Literal["normalize", "clip", "none"] = Field(
        "normalize", description="g / (||g|| + c) per sample (TBCM, sCM sec. 4.3), clip to [-clip, clip], or none")
    tangent_norm_c: float = Field(0.1, gt=0.0, description="c in g / (||g|| + c); TBCM: 0.1")
    tangent_clip: float = Field(1.0, gt=0.0, description="bound of tangent_normalization: clip, g in [-clip, clip]")
    tangent_warmup_steps: int = Field(100, ge=0, description="H in r = min(1, step / H); 0 = no warmup "
                                                             "(TBCM: 4000)")
    adaptive_weighting: bool = Field(True, description="learned log-variance u(t): w exp(-u) mse + u")
    timesteps: list[int] | None = Field(
        None, description="custom intermediate times of a multi-step student: the pipeline's `timesteps=` "
                          "(descending indices into its Karras grid, last 0); null = `num_inference_steps` spacing")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        if self.trajectories == "online":
            require(self.pairs is None, "trajectories", "online runs the teacher's route for every batch and reads "
                                                        "no pair store: set recipe.pairs: null, or trajectories: store")
        else:
            require(self.pairs is not None, "pairs", "trajectories: store trains on the ODE paths of a pair store: "
                                                     "set recipe.pairs (or trajectories: online)")
            require(self.pairs.path_points >= 2, "pairs.path_points",
                    f"must be >= 2 with trajectories: store (the first point, pure noise, is never a training "
                    f"point), got {self.pairs.path_points}")
        if self.timesteps is not None:
            ts = self.timesteps
            require(len(ts) >= 1 and all(a > b for a, b in zip(ts, ts[1:])), "timesteps",
                    f"must be strictly descending, got {ts}")
            require(ts[-1] == 0, "timesteps", f"must end with 0 (the first step starts at sigma_max), got {ts}")
        return self

    def check_run(self, cfg: RunConfig) -> None:
        check_custom_timesteps(cfg, self.timesteps)  # and no data images needed: the point of the method


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces (tested against closed forms on a Gaussian toy)
# ---------------------------------------------------------------------------------------------------------------

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_trig, t) -> dx/dt


def trigflow_time(process, t_native: Tensor, sigma_data: float) -> Tensor:
    """The TrigFlow time of a native time: t = arctan(sigma / (alpha sd)) (inverse of the time map of
    `distill.parametrization.trigflow_to_native`)."""
    alpha, sigma = process.alpha_sigma(t_native)
    return torch.atan(sigma / (alpha * sigma_data))


def native_to_trigflow(process, x_native: Tensor, t_native: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """(x_trig, t) of a native state: x_native / alpha is the EDM state, and x_trig = cos(t) x_edm."""
    alpha, _ = process.alpha_sigma(t_native)
    t = trigflow_time(process, t_native, sigma_data)
    return x_native * _bcast((torch.cos(t) / alpha).to(x_native.dtype), x_native), t


def velocity_from_x0(x0: Tensor, x_trig: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """dx_t/dt = sd F = (cos t x_t - x0) / sin t: the PF-ODE velocity of a (teacher's) x0 estimate."""
    return sigma_data * trigflow_from_x0(x0, x_trig, t, sigma_data)


def ddim_step(x_t: Tensor, dxt_dt: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """TBCM's route step from t to s: cos(t - s) x_t - sin(t - s) dx/dt (= TrigFlow DDIM, sin s / sin t x_t +
    sin(t - s) / sin t x0)."""
    return _bcast(torch.cos(t - s), x_t) * x_t - _bcast(torch.sin(t - s), x_t) * dxt_dt


def reference_route(process, num_levels: int, sigma_data: float) -> Tensor:
    """r_0 > ... > r_{K-1}: the TrigFlow times of the levels a `num_levels`-step teacher sampler
    (`distill.models.sampling`) feeds its network, noisiest first."""
    t_native = process.from_unit(unit_grid(num_levels))[:num_levels]
    return trigflow_time(process, t_native, sigma_data).float()


def jitter_route(ref: Tensor, n: int) -> Tensor:
    """(n, K) route times: t_0 = r_0 and t_k ~ U[r_k, r_{k-1}) for k >= 1, per trajectory (TBCM's
    sample_ordered_timesteps_from_ref)."""
    u = torch.rand(n, ref.shape[0] - 1, device=ref.device)
    return torch.cat([ref[:1].expand(n, 1), ref[1:] + (ref[:-1] - ref[1:]) * u], dim=1)


@torch.no_grad()
def trace_route(velocity: VelocityFn, start: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
    """States and teacher velocities along a route: (n, K, ...) each, state k at times[:, k], stepped with
    :func:`ddim_step` (the route's end, after the last level, is not needed)."""
    states, velocities, x = [], [], start
    for k in range(times.shape[1]):
        v = velocity(x, times[:, k])
        states.append(x)
        velocities.append(v)
        if k + 1 < times.shape[1]:
            x = ddim_step(x, v, times[:, k], times[:, k + 1])
    return torch.stack(states, dim=1), torch.stack(velocities, dim=1)


def stored_points(states: Tensor, times: Tensor, teacher_x0: Tensor, next_times: Tensor, process, sigma_data: float,
                  route: str, velocity: VelocityFn) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, dx_t/dt) in TrigFlow from stored path points (native states at native `times`, the teacher's x0
    estimates there): as stored with dx/dt from the stored estimate (fixed route, no teacher call), or one route step
    from the stored state to t ~ U[t_next, t_k) with `velocity` (the teacher) at the new point (jittered route)."""
    x_k, t_k = native_to_trigflow(process, states, times, sigma_data)
    v_k = velocity_from_x0(teacher_x0, x_k, t_k, sigma_data)
    if route == "fixed":
        return x_k, t_k, v_k
    t_next = trigflow_time(process, next_times, sigma_data)
    t = t_next + (t_k - t_next) * torch.rand_like(t_k)
    x_t = ddim_step(x_k, v_k, t_k, t)
    return x_t, t, velocity(x_t, t)


def online_points(velocity: VelocityFn, ref: Tensor, n: int, image_shape: tuple[int, ...], sigma_data: float,
                  route: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_t, t, dx_t/dt, trajectory index) of `n` points of ceil(n / (K - 1)) routes over the reference levels
    `ref`, run now (TBCM's training loop): K - 1 points per route (not the pure-noise start), n drawn of them."""
    K = ref.shape[0]
    trajectories = -(-n // (K - 1))
    times = jitter_route(ref, trajectories) if route == "jittered" else ref.expand(trajectories, K)
    eps = torch.randn((trajectories, *image_shape), device=ref.device)
    start = _bcast(sigma_data * torch.sin(times[:, 0]), eps) * eps
    states, velocities = trace_route(velocity, start, times)
    keep = torch.randperm(trajectories * (K - 1), device=ref.device)[:n]
    owner = torch.arange(trajectories, device=ref.device).repeat_interleave(K - 1)[keep]
    return states[:, 1:].flatten(0, 1)[keep], times[:, 1:].flatten()[keep], velocities[:, 1:].flatten(0, 1)[keep], owner


def prior_weight(t: Tensor, sigma_data: float, kind: str) -> Tensor:
    """w(t) = 1 / (sd tan t), the EDM noise level's inverse (TBCM's and Sana-Sprint's code), or 1."""
    if kind == "inverse_sigma":
        return 1.0 / (sigma_data * torch.tan(t))
    if kind == "none":
        return torch.ones_like(t)
    raise ValueError(f"unknown prior weighting {kind!r}")


def tbcm_loss(F_theta: Tensor, F_minus: Tensor, g: Tensor, t: Tensor, sigma_data: float,
              logvar: Tensor | None = None, weighting: str = "inverse_sigma") -> Tensor:
    """Per-sample w(t) exp(-u) ||F_theta - sg(F^- + g)||^2 / D + u (w alone without `logvar`): sCM's loss with
    u - log w in place of u, plus the constant log w."""
    w = prior_weight(t, sigma_data, weighting).to(F_theta.dtype)
    if logvar is None:
        return w * scm_loss(F_theta, F_minus, g)
    return scm_loss(F_theta, F_minus, g, logvar - torch.log(w)) + torch.log(w)


# ---------------------------------------------------------------------------------------------------------------
# What the trainer draws: points of stored teacher paths, or conditions only (online); never a data image
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrajectoryBatch(Batch):
    """Points of stored teacher ODE paths: `states` at native `times`, the teacher's x0 estimates there, and each
    point's next stored (lower) level `next_times`. `images` stays None."""

    states: Tensor | None = None
    times: Tensor | None = None
    teacher_x0: Tensor | None = None
    next_times: Tensor | None = None

    def to(self, device: torch.device) -> "TrajectoryBatch":
        return TrajectoryBatch(None, {k: v.to(device) for k, v in self.cond.items()}, None, self.states.to(device),
                               self.times.to(device), self.teacher_x0.to(device), self.next_times.to(device))


class TrajectoryDataset:
    """A pair store's paths as the trainer's data (`sample(batch_size, generator)`): each batch from one shard
    (chosen in proportion to its size), rows with replacement, one path point per row: k in 1 .. P - 1 for a fixed
    route, k in 0 .. P - 2 (the start of the interval below it) for a jittered one."""

    def __init__(self, pc: PathPairsConfig, dataset, route: str, guidance_scale: float):
        self.store = PairStore(pc.path, pc.cache_shards)
        spec = self.store.spec
        if not spec.get("path_points"):
            raise ConfigError(f"recipe.pairs.path: the pair store {pc.path!r} keeps no ODE paths (made without "
                              "pairs.path_points); make one with path_points at another recipe.pairs.path")
        if spec["guidance_scale"] != guidance_scale:  # a jittered route's teacher calls would mix two guidances
            raise ConfigError(f"recipe.pairs.path: the pair store {pc.path!r} holds x0 estimates at guidance "
                              f"{spec['guidance_scale']}, teacher.guidance_scale is {guidance_scale}")
        prompts = getattr(dataset, "prompts", None)
        if prompts is not None or "prompts_sha256" in spec:
            check_prompts(spec, prompts, "recipe.pairs.path")
        check_store_matches(self.store, dataset.image_shape, "recipe.pairs.path")
        self.prompt_conditions = dataset.cond if prompts is not None else None
        self.image_shape = self.store.image_shape
        self.num_classes = int(spec["num_classes"])
        self.latent = bool(spec.get("latent", False))
        self.jittered = route == "jittered"

    def __len__(self) -> int:
        return len(self.store)

    def sample(self, batch_size: int, generator: torch.Generator) -> TrajectoryBatch:
        shard = self.store.shard(int(torch.multinomial(self.store.counts, 1, generator=generator).item()))
        rows = torch.randint(0, shard["noise"].shape[0], (batch_size,), generator=generator)
        points = shard["path_times"].shape[1]
        k = torch.randint(0, points - 1, (batch_size,), generator=generator) + (0 if self.jittered else 1)
        times = shard["path_times"]
        next_times = times[rows, (k + 1).clamp(max=points - 1)]
        if PROMPT_INDEX in shard:
            cond = {key: v[shard[PROMPT_INDEX][rows]] for key, v in self.prompt_conditions.items()}
        else:
            cond = {key[len("cond."):]: v[rows] for key, v in shard.items() if key.startswith("cond.")}
        return TrajectoryBatch(None, cond, None, shard["path"][rows, k], times[rows, k], shard["path_x0"][rows, k],
                               next_times)

    def grid_condition(self, n: int) -> Condition:
        if self.prompt_conditions is not None:
            return {k: v[torch.arange(n) % v.shape[0]] for k, v in self.prompt_conditions.items()}
        return {"class_labels": torch.arange(n) % self.num_classes}


class ConditionDataset:
    """Conditions only (online routes): class labels uniform over the classes, or prompts uniform over the data's
    prompts (their cached embeddings); the data set's images are never drawn."""

    def __init__(self, dataset):
        self.image_shape = tuple(dataset.image_shape)
        self.num_classes = int(getattr(dataset, "num_classes", 0))
        self.prompt_conditions = dataset.cond if getattr(dataset, "prompts", None) is not None else None
        self.latent = bool(getattr(dataset, "latent", False))

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        drawn = draw_conditions(None, self.num_classes, batch_size, "uniform", generator, self.prompt_conditions)
        if self.prompt_conditions is None:
            return Batch(None, drawn)
        return Batch(None, {k: v[drawn[PROMPT_INDEX]] for k, v in self.prompt_conditions.items()})

    def grid_condition(self, n: int) -> Condition:
        if self.prompt_conditions is not None:
            return {k: v[torch.arange(n) % v.shape[0]] for k, v in self.prompt_conditions.items()}
        return {"class_labels": torch.arange(n) % self.num_classes}


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class TBCM(Recipe):
    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int, dataset):
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.guidance_scale = guidance_scale
        self.generator = StudentWithLogVariance(student_from_teacher(teacher))  # sCM's student and u(t) head
        self.sigma_data = float(getattr(teacher.process, "sigma_data", 1.0))
        self.export_timesteps = cfg.timesteps
        self.schedule = student_schedule(self.generator.student, num_steps, cfg.timesteps)
        self.dataset = dataset  # the trainer draws path points (or conditions) from here, never data images
        self.image_shape = tuple(dataset.image_shape)
        self.route = reference_route(teacher.process, cfg.route_steps, self.sigma_data)

    def export_model(self, generator: nn.Module) -> Denoiser:
        return generator.student

    def warmup(self, step: int) -> float:
        """Tangent warmup r = min(1, step / H) (sCM sec. 4.3, TBCM's code)."""
        return 1.0 if self.cfg.tangent_warmup_steps == 0 else min(1.0, step / self.cfg.tangent_warmup_steps)

    def _teacher_velocity(self, cond: Condition) -> VelocityFn:
        return lambda x, t: teacher_velocity(self.teacher, x, t, cond, self.sigma_data, self.guidance_scale)

    @torch.no_grad()
    def training_points(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Condition]:
        """(x_t, t, dx_t/dt, cond) in TrigFlow, no gradient: stored path points, or points of routes run now."""
        sd, cfg = self.sigma_data, self.cfg
        if cfg.trajectories == "store":
            x_t, t, v = stored_points(batch.states, batch.times, batch.teacher_x0, batch.next_times,
                                      self.teacher.process, sd, cfg.route, self._teacher_velocity(batch.cond))
            return x_t, t, v, batch.cond
        n = next(iter(batch.cond.values())).shape[0]
        ref = self.route.to(next(iter(batch.cond.values())).device)
        cond = index_condition(batch.cond, slice(0, -(-n // (cfg.route_steps - 1))))  # one per route
        x_t, t, v, owner = online_points(self._teacher_velocity(cond), ref, n, self.image_shape, sd, cfg.route)
        return x_t, t, v, index_condition(cond, owner)

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg, sd = self.cfg, self.sigma_data
        x_t, t, dxt_dt, cond = self.training_points(batch)
        student = self.export_model(nets.generator)
        F_student = trigflow_view(student, student.process, cond, sd)
        F_minus, g = scm_tangent(F_student, x_t, t, dxt_dt, sd, self.warmup(step), cfg.jvp, cfg.jvp_eps)
        g_norm = g.flatten(1).norm(dim=1).mean().item()
        g = normalize_tangent(g, cfg.tangent_normalization, cfg.tangent_norm_c, cfg.tangent_clip)
        # The student's own output, with gradient, from a separate pass through the trained generator.
        x_native, t_native = trigflow_to_native(student.process, x_t, t, sd)
        x0_theta, logvar = nets.trained(x_native, t_native, cond, with_logvar=True)
        F_theta = trigflow_from_x0(x0_theta, x_t, t, sd)
        per_sample = tbcm_loss(F_theta, F_minus, g, t, sd, logvar if cfg.adaptive_weighting else None,
                               cfg.prior_weighting)
        loss = per_sample.mean()
        return loss, {"loss": loss.item(), "tangent_norm": g_norm, "logvar": logvar.mean().item(),
                      "mean_sigma": (sd * torch.tan(t)).mean().item()}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(self.export_model(generator), self.schedule, cond, noise)

    @torch.no_grad()
    def diagnostics(self, generator: nn.Module, cond: Condition, noise: Tensor) -> dict[str, float]:
        """ode_gap_rms: RMS distance between the student's first step from `noise` and the teacher ODE's sample of
        the same noise (the store's solver and steps, or DDIM over the online route's levels): the consistency
        function's error at the start of the trajectories it was trained on."""
        student = self.export_model(generator)
        n = noise.shape[0]
        first = student(self.schedule.start(noise), self.schedule.t(0, n, noise.device), cond)
        pc = self.cfg.pairs
        steps, solver = (pc.num_steps, pc.solver) if pc is not None else (self.cfg.route_steps, "ddim")
        ode = sample(self.teacher, cond, noise, num_steps=steps, guidance_scale=self.guidance_scale, solver=solver)
        return {"ode_gap_rms": (first - ode).pow(2).flatten(1).mean(1).sqrt().mean().item()}


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> TBCM:
    rc = cfg.recipe
    if rc.trajectories == "store":
        data = TrajectoryDataset(rc.pairs, dataset, rc.route, cfg.teacher.guidance_scale)
    else:
        data = ConditionDataset(dataset)
    return TBCM(rc, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, data)
