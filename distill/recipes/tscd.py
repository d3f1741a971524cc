"""TSCD: trajectory segmented consistency distillation (Ren et al. 2024, "Hyper-SD: Trajectory Segmented
Consistency Model for Efficient Image Synthesis", arXiv 2404.13686, sec. 3.1 and Algorithm 1).

The paper. The time range is cut into k segments with boundaries b_0 < b_1 < ... < b_k. For x_t in the segment
(b_j, b_{j+1}] the segment's lower boundary t_end = b_j is the end of the trajectory: the student's prediction is
carried there with DDIM, x_hat_end = DDIM(x_t, f_theta(x_t, t), t -> t_end), and so is the EMA target network's
prediction at the teacher's solver point x_t' (t' < t, in the same segment),
x_end = DDIM(x_t', f_theta^-(x_t', t'), t' -> t_end); the loss is d(x_hat_end, x_end) (the paper's d is MSE plus
an adversarial loss, their weights moved from MSE toward adversarial as k falls). Training runs in stages of
k = 8, 4, 2, 1 segments; each stage resumes the previous stage's weights, k = 1 being ordinary consistency
distillation over the whole range. As we read sec. 3.1 and Algorithm 1, the ODE solver is the original teacher in
every stage (the previous stage initialises the student and its EMA target; it is not the teacher), and a
k-segment student is sampled with k deterministic steps at the segment boundaries. (Our reading: the stored
copies readable when this was written held the abstract and summaries, not the paper's body; docs/tscd.md.)

Here. LCM (`distill.recipes.lcm`) holds what TSCD shares with it: the student, the export target's k-step
schedule, the grid of levels and the guided DDIM teacher solver (`LCM.teacher_solver`, `ddim_step`,
`pseudo_huber`, the trainer's EMA target network through `target_decay`). TSCD adds the segments:

* The segments are the export's: for a k-step student, b_k > ... > b_1 are the k times its pipeline visits
  (`student_schedule`, with custom `timesteps` too) and b_0 is the grid's clean end (EDM: sigma_min). Pipeline
  step i runs the student at the upper boundary of one segment and re-noises its x0 to the next export time, that
  segment's lower boundary. The boundaries are levels of LCM's grid (moved onto the scheduler's exact values,
  inserted where the grid has no such level; `grid_with_boundaries`). Segments of k = 8, 4, 2, 1 steps nest (the
  default spacing of CMStochasticIterativeScheduler over its 40-point grid).
* Levels: n uniform over the grid levels above the clean end; the solver jumps `skip_steps` levels but never below
  the segment's lower boundary, n' = max(n - skip, lower boundary) (our reading of Alg. 1's "determine the segment
  given n"; a step that crossed the boundary would leave the segment).
* Boundary condition: DDIM(x, ., b -> b) = x, so when the solver lands on the boundary the target is the solver's
  point x_b itself, no network. In the lowest segment the boundary is the clean end, where the point is the clean
  sample (the CM boundary f(x, sigma_min) = x): prediction f_theta(x_t), target f^-(x_t') or the solver's x_0.
  That is LCM's loss exactly: with k = 1 segment TSCD is LCM (with solver steps stopped at the clean end).
* Distance: LCM's pseudo-Huber on the boundary points (the paper's MSE part; no adversarial term).

Derivation (ours; the paper states the loss on boundary points only). For EDM (alpha = 1, sigma = t)
DDIM(x_t, x0, t -> b) = (1 - b/t) x0 + (b/t) x_t, so the loss on boundary points is the x0 residual weighted by
(1 - b/t): pseudo_huber((1 - b/t) (f_theta - x0*)), x0* = (x_end - (b/t) x_t) / (1 - b/t), the x0 whose DDIM step
lands on the target point. With the exact segment map Phi_{t->b} of the teacher's PF-ODE, the student that
predicts x0*(x_t) = (Phi_{t->b}(x_t) - (b/t) x_t) / (1 - b/t) has zero loss (tests/test_tscd.py, Gaussian toy).

The export sampler. ConsistencyModelPipeline (CMStochasticIterativeScheduler) re-noises the clipped x0 with fresh
noise, x_next = x0 + sqrt(b^2 - sigma_min^2) z, where the paper's DDIM would add b eps_hat with the student's own
eps_hat = (x_t - x0*) / t; the latent families' exports (LCMScheduler without its boundary, stochastic
FlowMatchEuler) re-noise with fresh noise too. `generate` is this pipeline's rollout exactly, as exported. The
two samplers agree in the lowest segment (x0 is the clean sample) and so for k = 1; for k > 1 the fresh noise
loses the correlation of x0* with eps_hat and the samples are under-dispersed. Derived on x0 ~ N(mu, c^2),
c = 0.5 (the digits schedules): the exact k-segment map sampled by the pipeline gives std 0.488 (k = 2), 0.404
(k = 4), 0.374 (k = 8) for 0.5, and the one-segment map (a full consistency function) 0.5 at any number of steps
(tested). So in this project a k-segment stage is a stage of the paper's curriculum, and its last stage (k = 1) is
the student the stock pipeline samples exactly. The alternative reading, an x0-space consistency in each segment
with the boundary as the segment's clean end, makes the student output the boundary point itself as its "x0", to
which the pipeline would add the level b of noise a second time; and no deterministic x0 re-noised with fresh noise
lands on the boundary point's distribution but a clean sample (Gaussian deconvolution is unique), i.e. the full
consistency function. Hence the paper's own DDIM form here.

Stages: `init_from` names a previous stage's exported pipeline folder (`<run>/pipeline`: the EMA student); its
network weights initialise this stage's student (and so the trainer's EMA target network and exported EMA, both
copies of it), the teacher staying the original (scripts/tscd_chain.py, recipes/digits/tscd_stages/). The rows a
class-conditional export drops (the null class of classifier-free guidance, never trained in an unguided student)
keep the teacher's values.

Left out: the adversarial part of d and its schedule, the noise perturbation of sec. 3.1, the guidance range
[w_min, w_max] of Alg. 1 (one fixed w, as LCM), human feedback learning (sec. 3.2); the one-step score distillation
(sec. 3.3) is DMD2 started from a TSCD student (docs/tscd.md: dmd2 has no student initialisation yet).
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.base.errors import ConfigError
from distill.base.paths import resolve_path
from distill.config import PATH_PATTERN
from distill.config import Config as RunConfig
from distill.models.denoiser import Denoiser, load_denoiser
from distill.models.schedules import rollout
from distill.parametrization import Process, _bcast, add_noise
from distill.recipes.lcm import LCM, ddim_step, pseudo_huber
from distill.recipes.lcm import Config as LCMConfig
from distill.training.recipe import Nets, Recipe


class Config(LCMConfig):
    init_from: str | None = Field(None, min_length=1, pattern=PATH_PATTERN,
                                  description="a previous TSCD stage's exported pipeline folder (<run>/pipeline) "
                                              "whose student initialises this stage's (Hyper-SD's stages resume "
                                              "the previous stage's weights); null = the teacher's weights")

    def check_run(self, cfg: RunConfig) -> None:
        super().check_run(cfg)
        if self.init_from is not None:
            folder = resolve_path(self.init_from)
            network = any((folder / sub / "config.json").is_file() for sub in ("unet", "transformer"))
            if not (network and (folder / "scheduler" / "scheduler_config.json").is_file()):
                raise ConfigError(f"recipe.init_from: {self.init_from!r} is not an exported pipeline folder (unet/ "
                                  "or transformer/ and scheduler/); run the previous stage first, or set null")


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces: segments, levels, boundary points
# ---------------------------------------------------------------------------------------------------------------


def segment_boundaries(times: Tensor, clean_end: float) -> Tensor:
    """b_0 < b_1 < ... < b_k: the grid's clean end, then the k export times (given noisiest first)."""
    return torch.cat([torch.tensor([clean_end], dtype=times.dtype), times.flip(0)])


def grid_with_boundaries(grid: Tensor, boundaries: Tensor, rtol: float = 1e-5) -> tuple[Tensor, Tensor]:
    """(grid, indices of the boundaries in it): each boundary replaces the grid level within `rtol` of it (the
    scheduler's float and the grid's differ in the last bits), or is inserted where there is none."""
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
    """The grid index of the lower boundary of the segment holding level n >= 1. Segments are (b_j, b_{j+1}]: the
    largest boundary level strictly below n (an upper boundary, where the pipeline runs the student, belongs to the
    segment below it)."""
    levels = boundary_levels.to(n.device)
    return levels[torch.searchsorted(levels, n) - 1]


def solver_level(n: Tensor, skip: int, lower: Tensor) -> Tensor:
    """The teacher solver's landing level: `skip` levels down, stopped at the segment's lower boundary."""
    return torch.maximum(n - skip, lower)


def to_boundary(x_t: Tensor, x0: Tensor, t: Tensor, b: Tensor, clean_end: Tensor, process: Process) -> Tensor:
    """The point at the lower boundary b that an x0 estimate at (x_t, t) stands for: its DDIM step t -> b
    (Hyper-SD Alg. 1, x_hat_end = DDIM(x_t, f(x_t), t, t_end)); in the lowest segment (`clean_end`) x0 itself."""
    a_t, s_t = process.alpha_sigma(t)
    a_b, s_b = process.alpha_sigma(b)
    return torch.where(_bcast(clean_end, x_t), x0, ddim_step(x_t, x0, a_t, s_t, a_b, s_b))


def segment_target(x_m: Tensor, x0_target: Tensor, t_m: Tensor, b: Tensor, clean_end: Tensor,
                   process: Process) -> Tensor:
    """TSCD's target: the target network's x0 at the solver's point x_m carried to the boundary b, and on the
    boundary (t_m = b) the solver's point itself: the segment's boundary condition."""
    carried = to_boundary(x_m, x0_target, t_m, b, clean_end, process)
    return torch.where(_bcast(t_m == b, x_m), x_m, carried)


def load_stage(student: Denoiser, folder: Path, resolution: int | None = None) -> None:
    """Copy the network weights of a previous stage's exported pipeline `folder` into `student`. Rows the export
    dropped (a class-conditional UNet's null class) keep the student's values."""
    previous = load_denoiser(folder, resolution=resolution).model.state_dict()
    own = student.model.state_dict()
    for key, value in previous.items():
        mine = own.get(key)
        if mine is not None and value.ndim >= 1 and value.shape[1:] == mine.shape[1:] \
                and value.shape[0] < mine.shape[0]:
            previous[key] = torch.cat([value, mine[value.shape[0]:].to(value)])
    try:
        student.model.load_state_dict(previous)
    except RuntimeError as err:
        raise ConfigError(f"recipe.init_from: {str(folder)!r} holds another network than this teacher's student "
                          f"({type(student.model).__name__}): {str(err).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class TSCD(Recipe):
    """LCM (held: the student, its schedule, the grid and the teacher solver) with the loss cut into segments."""

    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int,
                 init_from: Path | None = None, resolution: int | None = None):
        self.cfg = cfg
        self.lcm = LCM(cfg, teacher, guidance_scale, num_steps)
        self.teacher, self.generator, self.schedule = self.lcm.teacher, self.lcm.generator, self.lcm.schedule
        self.target_decay = cfg.target_decay  # the trainer keeps the EMA target network (nets.target)
        self.export_timesteps = cfg.timesteps
        if init_from is not None:
            load_stage(self.generator, init_from, resolution)
        self.boundaries = segment_boundaries(self.schedule.times, float(self.lcm.grid[0]))
        self.grid, self.boundary_levels = grid_with_boundaries(self.lcm.grid, self.boundaries)

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if batch.images is None:
            raise ValueError("tscd needs data images in the batch")
        if nets.target is None:
            raise RuntimeError("tscd needs the trainer's EMA target network (nets.target is None)")
        x0, cond, process = batch.images, batch.cond, self.teacher.process
        grid = self.grid.to(x0.device)
        n = torch.randint(1, len(grid), (x0.shape[0],), device=x0.device)
        lower = lower_boundary(n, self.boundary_levels)
        m = solver_level(n, self.cfg.skip_steps, lower)
        t_n, t_m, t_b, clean_end = grid[n], grid[m], grid[lower], lower == 0
        x_n = add_noise(process, x0, torch.randn_like(x0), t_n)
        x_m = self.lcm.teacher_solver(x_n, t_n, t_m, cond)
        with torch.no_grad():
            target = segment_target(x_m, nets.target(x_m, t_m, cond), t_m, t_b, clean_end, process)
        pred = to_boundary(x_n, nets.trained(x_n, t_n, cond), t_n, t_b, clean_end, process)
        loss = pseudo_huber(pred, target, self.cfg.huber_c).mean()
        return loss, {"loss": loss.item(), "on_boundary": (m == lower).float().mean().item()}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> TSCD:
    r = cfg.recipe
    init = None if r.init_from is None else resolve_path(r.init_from)
    return TSCD(r, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, init, cfg.data.resolution)
