"""k-rectified flow ("reflow") on teacher ODE pairs (Liu et al. 2022, arXiv 2209.03003; InstaFlow, arXiv 2309.06380).

Given pairs (z, x1) with x1 the teacher's ODE solution from the noise z (distill.data.pairs), train a flow on the straight
interpolation between them (Liu et al. eq. 1 with the coupling (z, x1) in place of independent draws):

    x_s = (1 - s) x1 + s z,   s ~ U[s_min, s_max],   loss = || v(x_s, s) - (z - x1) ||^2.

Its ODE dx/ds = v(x, s), integrated from s = s_max (noise) to 0, has straighter paths than the teacher's: paths of
a rectified flow never cross, and on the coupling's own pairs they are trained toward the chords. Repeating it on
pairs from the new flow is k-reflow; `straightness` measures the result.

Time direction: diffusers' flow-matching convention, s = 0 data, s = 1 noise, velocity z - x1 (SD3, Flux and
FlowMatchEulerDiscreteScheduler; the Denoiser's "flow" kind). The RectifiedFlow / InstaFlow code runs the other
way (t = 1 - s, t = 0 noise, velocity x1 - z); a flow trained there maps here by s = 1 - t and v -> -v.

The flow network is the teacher's own network, initialised from it and keeping its preconditioning: flow time s
maps to the teacher's native time t of the same signal-to-noise ratio, alpha(t) / sigma(t) = (1 - s) / s, and
the flow state to the teacher's by x_t = x_s alpha(t) / (1 - s) (EDM: sigma = s / (1 - s), x_sigma =
x_s / (1 - s); a rectified-flow teacher: the identity). The teacher's PF-ODE in these coordinates IS the flow ODE
(both are dx/ds = (x_s - x0_hat) / s), so training starts from the teacher exactly, and a reflowed flow is again
a network of the teacher's kind that `distill pairs` can use as the teacher of the next round.

On a flow-matching latent family (SD3, Flux, Wan; data.name: prompts or images, the store's conditions are
prompt embeddings) the network is the teacher's transformer in its native convention, and the reflowed flow is
exported as the family's stock pipeline with the deterministic `FlowMatchEulerDiscreteScheduler` at the teacher's
shift: `num_inference_steps=k` runs Euler's method on the pipeline's own sigmas, which is the grid `generate`
integrates on, so the export samples what the flow samples. VP latent teachers (SD1.5, SDXL, PixArt) are refused:
their flow view (x_s = x_t / (alpha + sigma), s = sigma / (alpha + sigma)) has no stock ODE scheduler to leave as.

On the pixel digits teacher the reflowed flow is exported as a teacher-format folder (`unet/` + `scheduler/`,
like the shipped digits teacher), not as a stock pipeline: no stock diffusers pipeline integrates a deterministic
ODE for a class-conditional UNet2DModel (DDIMPipeline takes no class labels; ConsistencyModelPipeline re-noises between
steps, which is not this ODE). Its one-step student (recipes/instaflow.py) is the stock-pipeline export.

SlimFlow's annealing reflow (Zhu et al. 2024, arXiv 2407.12718, sec. 3.2) is `anneal_steps > 0` with a smaller
network (`block_out_channels`) trained from scratch: the noise paired with x1 starts independent of it and is
annealed toward the teacher's, z_beta = sqrt(1 - beta^2) z + beta eps, with beta falling linearly from 1 to 0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Callable

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.base.errors import ConfigError
from distill.config import Config as RunConfig
from distill.config import Section, require
from distill.data.pairs import PairDataset, PairsConfig, is_text_store, open_pairs
from distill.models.denoiser import Denoiser, smaller_network
from distill.parametrization import flow_interpolate, flow_range, flow_velocity
from distill.training.recipe import Nets, Recipe

VelocityFn = Callable[[Tensor, Tensor], Tensor]


class Config(Section):
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="the teacher ODE pair store it trains on")
    min_s: float = Field(0.0, ge=0.0, lt=1.0, description="lowest flow time s of the loss (clipped to the "
                                                          "network's range)")
    max_s: float = Field(1.0, gt=0.0, le=1.0, description="highest flow time s of the loss (clipped likewise)")
    anneal_steps: int = Field(0, ge=0, description="SlimFlow's annealing reflow: steps over which the paired "
                                                   "noise goes from independent to the teacher's; 0 = plain reflow")
    block_out_channels: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(
        None, min_length=1, max_length=8,
        description="null = the teacher's network, initialised from it; else a new network of the teacher's "
                    "design with these widths (one per block), trained from scratch (SlimFlow)")
    layers_per_block: int | None = Field(None, ge=1, description="with block_out_channels: layers per block; "
                                                                 "null = the teacher's")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.min_s < self.max_s, "min_s", f"must be < recipe.max_s ({self.max_s}), got {self.min_s}")
        require(self.layers_per_block is None or self.block_out_channels is not None, "layers_per_block",
                "only applies with recipe.block_out_channels (a new, smaller network)")
        return self

    def check_run(self, cfg: RunConfig) -> None:
        pipeline = vp_latent_teacher(cfg)
        if pipeline is not None:
            raise ConfigError(f"teacher.path: reflow on a latent family needs a flow-matching teacher (SD3, Flux, "
                              f"Wan), whose flow it trains in the native convention and exports as the stock "
                              f"pipeline with its Euler ODE scheduler; {pipeline} is a VP family, whose flow view "
                              f"no stock scheduler integrates (not implemented)")
        if is_text_store(cfg) and self.block_out_channels is not None:
            raise ConfigError("recipe.block_out_channels: SlimFlow's smaller network is a UNet2DModel of other "
                              "widths; a smaller latent family's transformer is not implemented")


def vp_latent_teacher(cfg: RunConfig) -> str | None:
    """The pipeline of a VP latent teacher (SD1.5, SDXL, PixArt) on text data, else None: the teachers whose flow
    view the reflow recipes do not support yet. Teachers with other faults are left to their own checks."""
    if not is_text_store(cfg):
        return None
    from distill.base.errors import ExportRefused
    from distill.base.paths import resolve_path
    from distill.families.target import teacher_target

    try:
        target = teacher_target(resolve_path(cfg.teacher.path), cfg.teacher.prediction)[0]
    except (StopIteration, ExportRefused):
        return None
    return target.pipeline if target is not None and target.kind != "flow" else None


# ---------------------------------------------------------------------------------------------------------------
# Reflow's losses and pair annealing (pure functions; the flow coordinates: distill.parametrization's flow view)
# ---------------------------------------------------------------------------------------------------------------


def reflow_loss(v_pred: Tensor, z: Tensor, x1: Tensor) -> Tensor:
    """Per-sample ||v - (z - x1)||^2 / D (Liu et al. 2022 eq. 1 in our time direction)."""
    return (v_pred - (z - x1)).pow(2).flatten(1).mean(1)


def annealed_noise(z: Tensor, eps: Tensor, beta: float) -> Tensor:
    """SlimFlow sec. 3.2: sqrt(1 - beta^2) z + beta eps, standard normal for every beta; beta = 1 ignores the
    teacher's noise (random pairs), beta = 0 is plain reflow."""
    return (1 - beta**2) ** 0.5 * z + beta * eps


def anneal_beta(step: int, anneal_steps: int) -> float:
    """Linear annealing from 1 (random pairs) to 0 (teacher pairs) over `anneal_steps`; 0 steps = always 0."""
    return 0.0 if anneal_steps == 0 else max(0.0, 1.0 - step / anneal_steps)


@torch.no_grad()
def euler_path(velocity: VelocityFn, z: Tensor, s_grid: Tensor) -> Tensor:
    """Euler's method for dx/ds = v from x = s_grid[0] z (the data part neglected at the noisiest time, as every
    diffusion sampler does) down the decreasing grid; returns the path (len(s_grid), *z.shape)."""
    x = z * float(s_grid[0])
    path = [x]
    for i in range(len(s_grid) - 1):
        s = s_grid[i].to(z.device).expand(z.shape[0])
        x = x + float(s_grid[i + 1] - s_grid[i]) * velocity(x, s)
        path.append(x)
    return torch.stack(path)


def straightness(path: Tensor, s_grid: Tensor) -> Tensor:
    """Per-sample mean squared deviation of an ODE path from its chord, over the path's points and dimensions:
    mean_k || x_k - (x_end + (s_k - s_end) / (s_0 - s_end) (x_0 - x_end)) ||^2 / D. 0 for a straight path run at
    constant speed; the flow's straightness (Liu et al. 2022, sec. 2.2) is the same idea in velocities."""
    s = s_grid.to(path.dtype).to(path.device)
    frac = ((s - s[-1]) / (s[0] - s[-1])).reshape((-1,) + (1,) * (path.ndim - 1))
    chord = path[-1:] + frac * (path[:1] - path[-1:])
    return (path - chord).pow(2).flatten(2).mean(2).mean(0)


def flow_grid(process, num_steps: int) -> Tensor:
    """num_steps + 1 flow times, evenly spaced from the network's s_max down to 0."""
    _, s_max = flow_range(process)
    return torch.linspace(s_max, 0.0, num_steps + 1, dtype=torch.float32)


def sample_flow(flow: Denoiser, cond: Condition, noise: Tensor, num_steps: int) -> Tensor:
    """The flow ODE's endpoint from `noise` with `num_steps` Euler steps (the last one lands on its x0 estimate)."""
    return euler_path(lambda x, s: flow_velocity(flow, flow.process, x, s, cond), noise,
                      flow_grid(flow.process, num_steps))[-1]


def pipeline_flow_grid(flow: Denoiser, num_steps: int) -> Tensor | None:
    """The k + 1 flow times (k = num_steps, the last 0) a latent flow family's pipeline visits with its Euler ODE
    scheduler (`Target.ode_scheduler`, set as the pipeline sets it); None for a network without a stock pipeline."""
    from distill.models.schedules import latent_target

    target = latent_target(flow)
    if target is None:
        return None
    src = flow.source
    scheduler = target.ode_scheduler(src["scheduler_config"], num_steps)
    seq = target.image_seq_len(Path(src["folder"]), src["network_config"], src["resolution"] or 0)
    target.set_timesteps(scheduler, num_steps, seq)
    return scheduler.sigmas.to(torch.float32)


def flow_straightness(flow: Denoiser, cond: Condition, noise: Tensor, num_steps: int = 20) -> float:
    """The mean chord deviation (see :func:`straightness`) of `flow`'s Euler paths from `noise`."""
    grid = flow_grid(flow.process, num_steps)
    path = euler_path(lambda x, s: flow_velocity(flow, flow.process, x, s, cond), noise, grid)
    return float(straightness(path, grid).mean())


# ---------------------------------------------------------------------------------------------------------------
# The network's size (SlimFlow's smaller student: `distill.models.denoiser.smaller_network`)
# ---------------------------------------------------------------------------------------------------------------


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def write_flow_pipeline(flow: Denoiser, out_dir: str | Path, num_steps: int, config=None) -> Path:
    """A latent flow family's reflowed flow as its stock pipeline (the teacher's VAE, text encoders and tokenizers)
    with the deterministic Euler ODE scheduler at the teacher's shift, written atomically."""
    from distill.export.pipeline import replace_dir, seeding_line
    from distill.models.schedules import latent_target

    target, src = latent_target(flow), flow.source
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    device, training = next(flow.model.parameters()).device, flow.model.training
    scheduler = target.ode_scheduler(src["scheduler_config"], num_steps)
    target.write(flow.model.to("cpu").eval(), Path(src["folder"]), tmp, num_steps, src["scheduler_config"], scheduler)
    flow.model.to(device).train(training)
    resolution = src["resolution"] or 0
    guidance = target.guidance_scale(src["network_config"])
    call = target.call(num_steps, resolution, guidance)
    grid = pipeline_flow_grid(flow, num_steps).tolist()
    seed = target.seeding(num_steps, stochastic=False)  # the ODE draws only the initial noise
    meta = {"kind": "rectified flow (reflow)", "pipeline": target.pipeline, "num_inference_steps": num_steps,
            "sigmas": grid, "resolution": resolution, "call": call, "guidance_scale": guidance, "seeding": seed,
            "parameters": parameter_count(flow.model), "recipe": getattr(config, "recipe_name", None)}
    (tmp / "distill.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "README.md").write_text(
        "---\nlibrary_name: diffusers\ntags: [distill]\n---\n\n# Reflowed flow\n\n"
        f"A stock `{target.pipeline}` with a deterministic `{type(scheduler).__name__}` (the teacher's shift): "
        "Euler's method on the reflowed flow, whose paths are straighter than the teacher's.\n\n"
        "```python\nfrom diffusers import DiffusionPipeline\n\n"
        f"pipe = DiffusionPipeline.from_pretrained(\"{out_dir.name}\")\n"
        f"{target.output} = {call}.{target.output}\n```\n\n"
        f"- steps: {num_steps}, on the sigmas {['%.4g' % t for t in grid]} (other counts run too, on the same "
        "shifted grid ending there)\n"
        "- guidance: off; the teacher's classifier-free guidance is in the pairs the flow was trained on\n"
        + seeding_line(seed) +
        "- also usable as `teacher.path` (for `distill pairs` of the next reflow round, or InstaFlow)\n")
    replace_dir(tmp, out_dir)
    return out_dir


def write_flow_folder(flow: Denoiser, out_dir: str | Path, source_dir: Path | None, config=None) -> Path:
    """The flow as a teacher-format folder (`unet/` with every class row, `scheduler/` copied from the teacher it
    came from), written atomically; usable as `teacher.path` (e.g. by `distill pairs` for the next reflow)."""
    from distill.export.pipeline import replace_dir

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    device = next(flow.model.parameters()).device
    flow.model.to("cpu").save_pretrained(tmp / flow.family.subfolder, safe_serialization=True)
    flow.model.to(device)
    if source_dir is None or not (source_dir / "scheduler").is_dir():
        raise FileNotFoundError(f"the teacher folder {str(source_dir)!r} has no scheduler/ to copy")
    shutil.copytree(source_dir / "scheduler", tmp / "scheduler")
    meta = {"kind": "rectified flow (reflow) in the teacher's preconditioning", "prediction": flow.prediction,
            "parameters": parameter_count(flow.model), "recipe": getattr(config, "recipe_name", None),
            "pairs": getattr(getattr(config, "recipe", None), "pairs", None) and config.recipe.pairs.path}
    (tmp / "distill.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "README.md").write_text(
        "# Reflowed flow (teacher format)\n\n"
        f"A {type(flow.model).__name__} with the preconditioning of the teacher it was reflowed from "
        f"(`teacher.prediction: {flow.prediction}`). Not a stock pipeline: no stock diffusers pipeline runs a "
        "deterministic ODE for a class-conditional UNet2DModel. Use it as `teacher.path` in a distill config "
        "(`distill pairs` for the next reflow round, or recipes/instaflow.py for its one-step student).\n")
    replace_dir(tmp, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class Reflow(Recipe):
    def __init__(self, cfg: Config, teacher: Denoiser, teacher_dir: Path, dataset: PairDataset, num_steps: int):
        self.cfg = cfg
        self.num_steps = num_steps  # student.num_steps: the Euler steps the flow is sampled with (grids, tables)
        self.teacher_dir = teacher_dir
        self.dataset = dataset  # the trainer draws (noise, teacher sample, condition) batches from the store
        if cfg.block_out_channels is None:
            self.generator = teacher.copy(trainable=True)  # the flow starts as the teacher's ODE, exactly
        else:
            self.generator = smaller_network(teacher, cfg.block_out_channels, cfg.layers_per_block)
        lo, hi = flow_range(teacher.process)
        self.s_min, self.s_max = max(cfg.min_s, lo), min(cfg.max_s, hi)
        if self.s_min >= self.s_max:
            raise ConfigError(f"recipe.min_s/max_s: [{cfg.min_s}, {cfg.max_s}] misses the network's flow times "
                              f"[{lo:.4g}, {hi:.4g}]")

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if batch.noise is None:
            raise ValueError("reflow trains on a pair store: the batch has no noise (is recipe.dataset set?)")
        x1, cond = batch.images, batch.cond
        n = x1.shape[0]
        beta = anneal_beta(step, self.cfg.anneal_steps)
        z = annealed_noise(batch.noise, torch.randn_like(batch.noise), beta) if beta > 0 else batch.noise
        s = torch.rand(n, device=x1.device) * (self.s_max - self.s_min) + self.s_min
        v = flow_velocity(nets.trained, nets.generator.process, flow_interpolate(x1, z, s), s, cond)
        loss = reflow_loss(v, z, x1).mean()
        return loss, {"loss": loss.item(), "reflow_loss": loss.item(), "anneal_beta": beta}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        """The flow's Euler ODE sample with student.num_steps steps: on its pipeline's sigmas (latent families,
        what the export samples; latents are not clipped), else evenly spaced and clipped to [-1, 1]."""
        grid = pipeline_flow_grid(generator, self.num_steps)
        if grid is None:
            return sample_flow(generator, cond, noise, self.num_steps).clamp(-1, 1)
        return euler_path(lambda x, s: flow_velocity(generator, generator.process, x, s, cond), noise, grid)[-1]

    def export(self, generator: Denoiser, out_dir: str | Path, num_steps: int, config) -> Path:
        if pipeline_flow_grid(generator, 1) is not None:
            return write_flow_pipeline(generator, out_dir, num_steps, config)
        return write_flow_folder(generator, out_dir, self.teacher_dir, config)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> Reflow:
    from distill.base.paths import resolve_path

    pairs = open_pairs(cfg.recipe.pairs, dataset)
    return Reflow(cfg.recipe, teacher, resolve_path(cfg.teacher.path), pairs, cfg.student.num_steps)
