"""DisBack: distribution backtracking distillation (Zhang et al. 2024, "Distribution Backtracking Builds A Faster
Convergence Trajectory for Diffusion Distillation", arXiv 2408.15991).

The paper (abstract, README of the authors' code github.com/SYZhang0805/DisBack, read there). Score distillation
(DMD, VSD) moves a one-step student G along grad = s_fake - s_real on its own re-noised samples. Early in training
G is far from the teacher, and the teacher's score on G's samples is a poor guide ("score mismatch"). DisBack
runs two stages:

1. Degradation recording. A copy of the teacher s_theta is fine-tuned by denoising score matching on the samples
   of the *initial* student G_0 (the student itself is not updated; the authors' `degradation.py` computes no
   generator gradient), and checkpoints are kept along the way: the degradation path
   s_theta = s'_0, s'_1, ..., s'_N, s'_N ~ the score of G_0's distribution (their README's pseudocode: one node
   every `interval_1st` updates, and the last).
2. Distribution backtracking. The path reversed is taken as a convergence trajectory from G_0 to the teacher. The
   fake score s_phi starts as s'_N; the "real" score of the DMD/VSD gradient (their Eq. 8) is a node of the path,
   starting at s'_{N-1} and switched to the next node toward the teacher every `interval_2nd` iterations (their
   train_sd.py reloads the real network from the next saved checkpoint every `--interval` iterations: a fixed
   schedule), ending at the teacher; s_phi is fitted to G's samples throughout (their Eq. 5), as in DMD2.

Here: DMD2 (`distill.recipes.dmd2`) holds what DisBack shares with it and is used, not copied: the student, its
k-step schedule and backward simulation, the fake score (`FakeScore`) and its denoising loss (the critic update),
the time sampler and the normalised DMD gradient. DisBack adds the path and the schedule.

One run, two phases (the trainer's step s counts iterations of `trainer.critic_steps` critic updates and one
generator update):

* s < D = `degradation_steps`: the critic update is DMD2's denoising loss on the initial student's detached samples
  (the paper's Eq. 7 as DSM in the network's own output space), and the generator update is a no-op: its loss
  reaches no generator weight, so every gradient is None and AdamW skips every parameter (no step, no moment, no
  weight decay; a zero-gradient step would instead advance Adam's bias correction and inflate the first real step).
  The fake score IS the path network: at the start of iteration b_j = ceil(j D / N), j = 1 .. N - 1, its weights
  are copied into node j of the path; after D iterations it is s'_N (N = `path_nodes`).
* s >= D: DMD2's generator update with the real score replaced by node k(s) of the path,

      k(s) = max(N - 1 - floor((s - D) / I), 0),     I = `backtrack_steps`,

  node 0 being the frozen teacher (with its guidance), so the student is pulled toward s'_{N-1} for I updates, then
  s'_{N-2}, ..., and toward the teacher from iteration D + (N - 1) I on; the fake score keeps training as in DMD2.

Derived here (not in the sources read): (a) the fake score and the path network are one network: the authors
clone s'_N into s_phi and never use s'_N as a target, so training the one network through both stages gives the
same s_phi and the same nodes, without a third copy; (b) nodes other than the teacher are called exactly as the
teacher is, guidance included (the authors' code loads a node's weights into the real network, which it then
guides); (c) DMD's per-sample normalisation |x - x0_real| is taken against the current node's x0, so with the path
reduced to the teacher (D = 0, or k = 0) the gradient is DMD2's exactly (tested).

State across resume. The trainer checkpoints the generator, the critic (every parameter and buffer of the critic
module), the optimizers and EMAs, nothing of a recipe's own. So the path lives in the critic: `FakeScoreWithPath`
holds DMD2's fake score and the N - 1 recorded nodes as one frozen parameter (N - 1, P) (requires_grad False: no
optimizer state, no gradient, not broadcast by DDP at every forward as a buffer would be, but in every checkpoint).
The schedule k(s) and the recording steps b_j are pure functions of the step, so a resumed run records and
switches exactly where the uninterrupted one does (tested). The node network the recipe evaluates (`path_net`, a
frozen float32 copy of the teacher) is a cache of one node's weights, reloaded from the critic when the node or the
stored path changes; it is not state.

Left out: DMD2's GAN head and DMD's regression loss (not part of DisBack's description; use dmd2), LoRA adapters
and FSDP2 (the path is a flat copy of unsharded weights; refused), a switching criterion other than the fixed
schedule (the public code switches on a fixed interval), fp16 (the gradient scaler refuses a step with no
gradients; bf16 and fp32 run). Cost: N - 1 flat copies of the fake score plus one node network in memory.
"""

from __future__ import annotations

import logging

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.base.errors import ConfigError
from distill.config import Config as RunConfig
from distill.config import Section, require
from distill.models.denoiser import Denoiser
from distill.parametrization import add_noise
from distill.recipes.dmd2 import DMD2, FakeScore, dmd_gradient, dmd_loss
from distill.recipes.dmd2 import Config as DMD2Config
from distill.training.recipe import Nets, Recipe

logger = logging.getLogger("distill")


class Config(Section):
    min_t: float = Field(0.02, ge=0.0, le=1.0, description="lowest noise level of the DMD gradient and the "
                                                           "fake-score (path network) loss, in unit time (0 clean, "
                                                           "1 noisiest); below recipe.max_t")
    max_t: float = Field(0.98, ge=0.0, le=1.0, description="highest noise level, unit time; above recipe.min_t")
    dmd_weight: float = Field(1.0, gt=0.0, description="weight of the distribution matching loss against the "
                                                       "current path node; > 0")
    degradation_steps: int = Field(40, ge=0, description="iterations of the degradation-recording phase D: the "
                                                         "fake score is fitted to the initial student's samples and "
                                                         "the student is held fixed; counted in run.max_steps; "
                                                         "0 = no path (the teacher is the only node: DMD2)")
    path_nodes: int = Field(4, ge=1, description="nodes N recorded along the degradation besides the teacher; "
                                                 "node j is the fake score after ceil(j D / N) iterations, node N "
                                                 "the fake score the backtracking starts from; at most "
                                                 "recipe.degradation_steps; unused when that is 0")
    backtrack_steps: int = Field(40, ge=1, description="generator updates I spent on each intermediate node "
                                                       "(N - 1, ..., 1) before switching to the next one toward "
                                                       "the teacher (the fixed interval of the authors' code)")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.min_t < self.max_t, "min_t", f"must be < recipe.max_t ({self.max_t}), got {self.min_t}")
        require(self.degradation_steps == 0 or self.path_nodes <= self.degradation_steps, "path_nodes",
                f"must be <= recipe.degradation_steps ({self.degradation_steps}): each node is recorded at its own "
                f"iteration, got {self.path_nodes}")
        return self

    def check_run(self, cfg: RunConfig) -> None:
        if self.degradation_steps == 0:
            return
        if cfg.trainer.mixed_precision == "fp16":
            raise ConfigError("trainer.mixed_precision: fp16's gradient scaler refuses the generator's no-op updates "
                              "of disback's degradation phase (no gradients); use bf16, auto or no")
        if cfg.trainer.parallel == "fsdp2":
            raise ConfigError("trainer.parallel: disback records its degradation path as flat copies of unsharded "
                              "weights; fsdp2 is not supported, use ddp")


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces: where nodes are recorded, which node is the target
# ---------------------------------------------------------------------------------------------------------------


def node_steps(degradation_steps: int, path_nodes: int) -> list[int]:
    """b_j = ceil(j D / N), j = 1 .. N: node j is the fake score at the start of iteration b_j (after b_j updates
    of the degradation phase); b_N = D is the fake score the backtracking starts from."""
    return [-(-j * degradation_steps // path_nodes) for j in range(1, path_nodes + 1)]


def backtrack_target(step: int, degradation_steps: int, path_nodes: int, backtrack_steps: int) -> int | None:
    """The path node whose score is the generator update's real score at `step`: None in the degradation phase
    (no generator update), then max(N - 1 - floor((step - D) / I), 0); node 0 is the teacher."""
    if step < degradation_steps:
        return None
    if degradation_steps == 0:
        return 0
    return max(path_nodes - 1 - (step - degradation_steps) // backtrack_steps, 0)


def flat_weights(module: nn.Module) -> Tensor:
    """The parameters of `module` in order, flattened into one detached vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@torch.no_grad()
def load_flat_weights(module: nn.Module, flat: Tensor) -> None:
    """Copy a vector made by :func:`flat_weights` (of a network of the same architecture) into `module`."""
    offset = 0
    for p in module.parameters():
        p.copy_(flat[offset: offset + p.numel()].view_as(p))
        offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"a flat copy of {flat.numel()} weights does not fit a network of {offset}")


# ---------------------------------------------------------------------------------------------------------------
# The critic: DMD2's fake score, and the path recorded from it
# ---------------------------------------------------------------------------------------------------------------


class FakeScoreWithPath(nn.Module):
    """DMD2's fake score (trained) and the intermediate nodes s'_1 .. s'_{N-1} of the degradation path recorded
    from it: one frozen parameter `path` of shape (N - 1, P), checkpointed with the critic, never optimised."""

    def __init__(self, fake: FakeScore, intermediate_nodes: int):
        super().__init__()
        self.fake = fake
        ref = next(fake.denoiser.model.parameters())
        size = sum(p.numel() for p in fake.denoiser.model.parameters())
        self.path = nn.Parameter(torch.zeros(intermediate_nodes, size, dtype=ref.dtype, device=ref.device),
                                 requires_grad=False)

    @property
    def denoiser(self) -> Denoiser:
        return self.fake.denoiser

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition) -> tuple[Tensor, Tensor | None]:
        return self.fake(x_t, t, cond)

    @torch.no_grad()
    def record(self, node: int) -> None:
        """Store the fake score's current weights as path node `node` (1 .. N - 1)."""
        self.path[node - 1].copy_(flat_weights(self.fake.denoiser.model))


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class DisBack(Recipe):
    """DMD2 (held: student, schedule, fake score, critic update) with the real score walking the recorded
    degradation path back to the teacher."""

    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int,
                 image_shape: tuple[int, ...]):
        self.cfg = cfg
        self.dmd = DMD2(DMD2Config(min_t=cfg.min_t, max_t=cfg.max_t, dmd_weight=cfg.dmd_weight), teacher,
                        guidance_scale, num_steps, image_shape)
        self.teacher, self.guidance_scale = self.dmd.teacher, guidance_scale
        self.generator, self.schedule = self.dmd.generator, self.dmd.schedule
        self.nodes = cfg.path_nodes if cfg.degradation_steps > 0 else 0
        intermediate = max(self.nodes - 1, 0)
        self.critic = FakeScoreWithPath(self.dmd.critic, intermediate)
        self.record_at = {b: j for j, b in enumerate(node_steps(cfg.degradation_steps, self.nodes), 1)
                          if j < self.nodes} if self.nodes else {}
        # the node network: a frozen float32 copy of the teacher holding one node's weights (a cache, not state)
        self.path_net = teacher.copy(trainable=True).requires_grad_(False).eval() if intermediate else None
        self._loaded: tuple[int, int, int] | None = None
        self._recorded_step: int | None = None

    def target_node(self, step: int) -> int | None:
        c = self.cfg
        return backtrack_target(step, c.degradation_steps, self.nodes, c.backtrack_steps)

    def node(self, k: int) -> Denoiser:
        """The denoiser of path node k: the teacher for k = 0, else `path_net` holding the recorded weights."""
        if k == 0:
            return self.teacher
        path = self.critic.path
        key = (k, path.data_ptr(), path._version)
        if self._loaded != key:
            if not bool(path[k - 1].any()):
                raise RuntimeError(f"disback: path node {k} was never recorded (the critic's path holds zeros "
                                   "there); it is recorded in the degradation phase of this run or its checkpoint")
            load_flat_weights(self.path_net.model, path[k - 1])
            self._loaded = key
        return self.path_net

    # -- the two updates -------------------------------------------------------------------------------------
    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cond = batch.cond
        first = next(iter(cond.values()))
        n, device = first.shape[0], first.device
        k = self.target_node(step)
        if k is None:  # degradation: the student is held fixed; a loss that reaches no generator weight
            return torch.zeros((), device=device, requires_grad=True).clone(), {"loss": 0.0, "degradation": 1.0}
        x = self.dmd.student_output(nets, cond, n, device, grad=True)  # backward simulation, as DMD2
        t = self.dmd.sample_t(n, device)
        x_t = add_noise(self.teacher.process, x, torch.randn_like(x), t)
        with torch.no_grad():
            x0_real = self.node(k)(x_t.detach(), t, cond, guidance_scale=self.guidance_scale)  # node k's score
            x0_fake = nets.critic.denoiser(x_t.detach(), t, cond)
            grad = dmd_gradient(x.detach(), x0_real, x0_fake)
        loss_dmd = dmd_loss(x, grad).mean()  # gradient (s_fake - s_node) in x0 form (the paper's Eq. 8)
        loss = self.cfg.dmd_weight * loss_dmd
        return loss, {"loss": loss.item(), "dmd_loss": loss_dmd.item(), "dmd_grad_abs": grad.abs().mean().item(),
                      "target_node": float(k), "degradation": 0.0}

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """DMD2's fake-score loss on the student's detached samples (the paper's Eq. 7 in the degradation phase,
        Eq. 5 after it); a node is recorded first, once, at the first critic update of its iteration."""
        node = self.record_at.get(step)
        if node is not None and self._recorded_step != step:
            self.critic.record(node)
            self._recorded_step = step
        return self.dmd.critic_loss(nets, batch, step)

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return self.dmd.generate(generator, cond, noise)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> DisBack:
    rc = cfg.recipe
    if rc.degradation_steps >= cfg.run.max_steps:
        logger.warning("recipe.degradation_steps=%d >= run.max_steps=%d: the run ends in the degradation phase and "
                       "the student is never updated", rc.degradation_steps, cfg.run.max_steps)
    return DisBack(rc, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, tuple(dataset.image_shape))
