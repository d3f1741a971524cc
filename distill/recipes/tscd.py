"""TSCD: trajectory segmented consistency distillation (Ren et al. 2024, "Hyper-SD: Trajectory Segmented
Consistency Model for Efficient Image Synthesis", arXiv 2404.13686, sec. 3.1).

The paper. The time range [0, T] is cut into k segments; consistency distillation is enforced only within each
segment, a segment's lower end acting as its boundary condition: the student maps x_t to the segment's lower end
t_end (the paper carries its prediction there with DDIM, x_end = DDIM(x_t, f_theta(x_t, t), t, t_end)), and its
target is the EMA target network's prediction at the teacher's solver point x_t' (t' < t, in the same segment),
carried to the same t_end. Training runs in stages of k = 8, 4, 2, 1 segments, each stage initialised from the
previous stage's student; k = 1 is ordinary consistency distillation over the whole range. The paper's distance
is MSE plus an adversarial loss. (The stored copies of the paper readable here held its abstract, Fig. 2 and
summaries, not sec. 3.1's equations; the segment rule below is derived, not transcribed.)

Here: LCM (`distill.recipes.lcm`) holds what TSCD shares with consistency distillation and is used, not copied:
the student, the export target's k-step schedule, the grid of levels, the guided DDIM teacher solver
(`LCM.teacher_solver`, `ddim_step`), `pseudo_huber` and the trainer's EMA target network (`target_decay`).
TSCD adds the segments.

Segments. A k-step student's export visits the noise levels b_k > ... > b_1 (`student_schedule`, custom
`timesteps` included); with b_0 the grid's clean end (EDM: sigma_min), segment j is (b_j, b_{j+1}], j = 0..k-1.
Pipeline step i runs the student at the upper end of a segment and re-noises its x0 to the next export level, the
segment's lower end. The boundaries are levels of the training grid (`grid_with_boundaries` inserts any the grid
lacks; the default spacings of k = 8, 4, 2, 1 lie on the 40-level grid and nest). A level n >= 1 is drawn
uniformly; the solver jumps `skip_steps` levels but stops at the lower end of n's segment,
n' = max(n - skip, lower(n)), so a pair (n, n') never straddles an export level.

Derivation (ours): the segment's boundary condition under the export's stochastic sampler. The export is
ConsistencyModelPipeline (CMStochasticIterativeScheduler): x_{b_j} = x0 + sqrt(b_j^2 - sigma_min^2) z with
fresh z, x0 = f(x_{b_{j+1}}, b_{j+1}). For this step to carry the marginal p_{b_{j+1}} to p_{b_j}, the law of
x0 convolved with N(0, b_j^2 - sigma_min^2) must equal p_{b_j} = p_{sigma_min} * N(0, b_j^2 - sigma_min^2), and
Gaussian convolution is injective (its characteristic function never vanishes), so x0 must be distributed as
p_{sigma_min}: f(., b_{j+1}) must carry p_{b_{j+1}} to clean data, not to the segment's end. The paper's form,
whose x0 is the one whose DDIM step lands on the ODE point Phi_{t->b_j}(x_t),
    x0*(x_t) = (Phi_{t->b_j}(x_t) - (b_j / t) x_t) / (1 - b_j / t)   (EDM, alpha = 1, sigma = t),
tends to the teacher's Tweedie estimate D(x_{b_j}, b_j) as t -> b_j (first order in t - b_j), and on
x0 ~ N(mu, c^2) that x0 has variance c^4 / (c^2 + b_j^2) < c^2: re-noised with fresh noise instead of DDIM's
own eps_hat it under-disperses (tests/test_tscd.py measures it through the rollout). So the segment's x0 map is
consistent along the teacher's ODE inside the segment, and at the lower end b_j its value is the boundary point's
own x0 estimate as the stochastic sampler uses it: the student's x0 at (x_{b_j}, b_j), the level where the
pipeline runs it next (b_j is the upper end of segment j - 1). In the loss

    pred   = f_theta(x_t, t),                     t in (b_j, b_{j+1}]
    target = f_theta^-(x_t', t'),                 t' = max(t - skip, b_j) on the grid, x_t' the teacher's DDIM step,
    target = x_t'                                 where t' = b_0 (the clean end: f(x, sigma_min) = x, CM),
    loss   = pseudo_huber(pred, target, c).

The exact segment map is f(x_t, t) = f(Phi_{t->b_j}(x_t), b_j), and by induction over the segments the fixed
point is the full consistency function Phi_{t->sigma_min} for every k (a Gaussian toy checks it in closed form:
zero loss for it, nonzero for a perturbed map and for the segment-local map anchored at the Tweedie estimate,
only on pairs that land on a boundary). What the k segments change is which pairs are trained: each export
level b_{j+1} is tied to the next one b_j through teacher steps inside its segment only, the last landing exactly
on b_j, where the pipeline evaluates the student next; stages of fewer segments then merge segments, and at
k = 1 this is LCM's loss (solver steps stopped at the clean end rather than never drawn there).

Stages: one config per stage (recipes/digits/tscd_stages/stage_<k>.yaml, student.num_steps = k);
scripts/tscd_chain.py runs 8 -> 4 -> 2 -> 1, each stage's student (and the trainer's EMA target network and
exported EMA, copies of it) loaded from the previous stage's EMA student through the public Trainer API before
`train()`; the solver is always the original teacher. The one-step score distillation (sec. 3.3) is DMD2 started
the same way from the last stage's student (`--dmd2-budget`); docs/tscd.md.

Left out: the adversarial part of the distance and its schedule, the noise perturbation, the guidance range of
the paper's training (one fixed w, as LCM), human feedback learning (sec. 3.2).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.base.errors import ConfigError
from distill.config import Config as RunConfig
from distill.models.denoiser import Denoiser
from distill.models.schedules import rollout, step_input
from distill.parametrization import _bcast, add_noise
from distill.recipes.lcm import LCM, pseudo_huber
from distill.recipes.lcm import Config as LCMConfig
from distill.training.recipe import Nets, Recipe


class Config(LCMConfig):
    """LCM's fields; the student's k-step export levels are the segment boundaries (k = student.num_steps)."""

    boundary_rtol: float = Field(1e-5, gt=0.0, lt=1e-2, description="a boundary within this relative distance of "
                                                                     "a grid level replaces it (the scheduler's and "
                                                                     "the grid's floats differ in the last bits); "
                                                                     "farther, it is inserted")

    def check_run(self, cfg: RunConfig) -> None:
        super().check_run(cfg)
        k = cfg.student.num_steps
        if k >= self.num_timesteps:
            raise ConfigError(f"recipe.num_timesteps: must exceed student.num_steps ({k}): each of the {k} segments "
                              f"needs a grid level inside it, got {self.num_timesteps}")


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces: segments, solver levels, the target
# ---------------------------------------------------------------------------------------------------------------


def segment_boundaries(times: Tensor, clean_end: float) -> Tensor:
    """b_0 < b_1 < ... < b_k: the grid's clean end, then the k export levels (`times`, noisiest first)."""
    return torch.cat([torch.tensor([clean_end], dtype=times.dtype), times.flip(0)])


def grid_with_boundaries(grid: Tensor, boundaries: Tensor, rtol: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(grid, index of each boundary in it), the grid ascending: a boundary within `rtol` of a level replaces it,
    one farther from every level is inserted."""
    levels = grid.tolist()
    for b in boundaries.tolist():
        near = min(range(len(levels)), key=lambda i: abs(levels[i] - b))
        if abs(levels[near] - b) <= rtol * abs(b):
            levels[near] = b
        else:
            levels.append(b)
    merged = torch.tensor(sorted(levels), dtype=grid.dtype)
    return merged, torch.searchsorted(merged, boundaries.to(merged.dtype))


def lower_boundary(n: Tensor, boundary_levels: Tensor) -> Tensor:
    """Grid index of the lower end of the segment holding level n >= 1. Segments are (b_j, b_{j+1}]: an export
    level belongs to the segment below it (the pipeline runs the student there and steps down)."""
    levels = boundary_levels.to(n.device)
    return levels[torch.searchsorted(levels, n) - 1]


def solver_level(n: Tensor, skip: int, lower: Tensor) -> Tensor:
    """The teacher solver's landing level: `skip` levels down, stopped at the segment's lower end."""
    return torch.maximum(n - skip, lower)


def segment_target(x_m: Tensor, x0_target: Tensor, at_clean_end: Tensor) -> Tensor:
    """The target of f_theta(x_n): the target network's x0 at the solver's point x_m (at a boundary b_j >= b_1 this is
    the x0 the sampler takes there), and x_m itself where m is the clean end (f(x, sigma_min) = x)."""
    return torch.where(_bcast(at_clean_end, x_m), x_m, x0_target)


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class TSCD(Recipe):
    """LCM (held: the student, its schedule, the grid and the teacher solver) with solver steps kept in segments."""

    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int):
        self.cfg = cfg
        self.lcm = LCM(cfg, teacher, guidance_scale, num_steps)
        self.teacher, self.generator, self.schedule = self.lcm.teacher, self.lcm.generator, self.lcm.schedule
        self.target_decay = cfg.target_decay  # the trainer keeps the EMA target network (nets.target)
        self.export_timesteps = cfg.timesteps
        self.boundaries = segment_boundaries(self.schedule.times.float(), float(self.lcm.grid[0]))
        self.grid, self.boundary_levels = grid_with_boundaries(self.lcm.grid.float(), self.boundaries,
                                                               cfg.boundary_rtol)

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if batch.images is None:
            raise ValueError("tscd needs data images in the batch")
        if nets.target is None:
            raise RuntimeError("tscd needs the trainer's EMA target network (nets.target is None)")
        x0, cond = batch.images, batch.cond
        grid = self.grid.to(x0.device)
        n = torch.randint(1, len(grid), (x0.shape[0],), device=x0.device)
        lower = lower_boundary(n, self.boundary_levels)
        m = solver_level(n, self.cfg.skip_steps, lower)
        t_n, t_m = grid[n], grid[m]
        x_n = add_noise(self.teacher.process, x0, torch.randn_like(x0), t_n)
        x_m = self.lcm.teacher_solver(x_n, t_n, t_m, cond)
        with torch.no_grad():
            target = segment_target(x_m, nets.target(x_m, t_m, cond), m == 0)
        pred = nets.trained(x_n, t_n, cond)
        loss = pseudo_huber(pred, target, self.cfg.huber_c).mean()
        return loss, {"loss": loss.item(), "on_boundary": (m == lower).float().mean().item()}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)

    @torch.no_grad()
    def diagnostics(self, generator: nn.Module, cond: Condition, noise: Tensor) -> dict[str, float]:
        """segment_gap_<j>: per segment (b_j, b_{j+1}], the RMS gap between the student's x0 at the pipeline's own
        input at b_{j+1} and its x0 at the teacher's ODE solution at b_j (guided DDIM over every grid level in the
        segment; at the clean end the solution itself): the segment's consistency residual, 0 at the fixed point."""
        n, k, grid = noise.shape[0], self.schedule.num_steps, self.grid.to(noise.device)
        levels = self.boundary_levels.tolist()
        out = {}
        for i in range(k):  # pipeline step i runs the student at b_{k-i}, the upper end of segment k-1-i
            hi, lo = levels[k - i], levels[k - i - 1]
            x = step_input(generator, self.schedule, cond, noise, i)
            y = x
            for a in range(hi, lo, -1):
                y = self.lcm.teacher_solver(y, grid[a].expand(n), grid[a - 1].expand(n), cond)
            target = y if lo == 0 else generator(y, grid[lo].expand(n), cond)
            gap = (generator(x, grid[hi].expand(n), cond) - target).pow(2).mean().sqrt()
            out[f"segment_gap_{k - 1 - i}"] = gap.item()
        return out


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> TSCD:
    return TSCD(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps)
