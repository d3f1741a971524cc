"""Self-E: the self-evaluating any-step model, trained from data with no teacher (Yu, Qi, Li, Zhang, Zhang, Lin,
Shechtman, Wang & Nitzan 2025, "Self-Evaluation Unlocks Any-Step Text-to-Image Generation", arXiv 2512.22374).

What the paper's public pages say (abstract, project page, README of github.com/XinYu-Andy/SelfE, summaries; the
method section's equations were not readable to us, see docs/self_e.md): one network, trained from scratch, with two
time inputs (the current time t and the landing time s); a *learning from data* term (real x0 noised to x_t, an x0
prediction trained with a conditional flow-matching objective) and a *self-evaluation* term: the model jumps from
x_t to a landing point, the landed sample is re-noised and judged by the same network's own score estimate (its
conditional and unconditional predictions, "classifier score + auxiliary terms", its eq. 13), which serves as a
"dynamic self-teacher" for global distribution matching. Everything below in equations is our derivation.

Coordinates and network (as recipes/flow_map.py, whose two-time network we reuse): flow time s in [t0, s_max],
x_s = (1 - s) x0 + s z, EDM state y = x_s / (1 - s) at sigma = s / (1 - s). D(x, t, u) is the CM-parametrised student
with the end time u added to its time embedding (`TwoTimeStudent`):

* the diagonal u = t is the model's denoiser, E[x0 | x_t] when trained (its score: s_t(x) = ((1 - t) D - x) / t^2);
* the clean edge u = t0 is the generator: from x_t it lands on a clean sample x^ = D(x_t, t, t0) in one jump; the
  exported network is this edge (d(t0) folded into a bias), sampled by the stock ConsistencyModelPipeline at any k.

Learning from data (the paper's term; weighting ours): on the diagonal, the plain flow-matching loss

    L_data = || v(I_t) - (z - x0) ||^2 / D,  v = (I_t - (1 - t0) D(I_t, t, t)) / (t - t0),  I_t = (1 - t) x0 + t z.  (1)

Self-evaluation (derived). x_t = I_t of other data (t uniform, or the student's k pipeline times), x^ =
D(x_t, t, t0) with gradient, re-noised to a level tau: x^_tau = (1 - tau) x^ + tau e. The reverse KL of the landed
marginal q_tau against the model's own p_tau has, for a reparametrised x^ (the standard DMD identity, with
s_q - s_p = (1 - tau) (D_q - D_p) / tau^2 in our coordinates),

    d KL(q_tau || p_tau) / d theta = (1 - tau)^2 / tau^2  E[ (D_fake(x^_tau) - D_real(x^_tau))^T dx^/dtheta ],       (2)

with D_real = the model's own guided diagonal, sg(D_u + w (D_c - D_u)) at (x^_tau, tau, tau) (current weights, or
the EMA target: `evaluator`), and D_fake = an estimate of the landed distribution's denoiser (`fake_score`):

* `critic`: a fake-score network fitted to the landed samples by denoising (DMD2's, here of the student's design
  and initialisation): (2) is then a distribution-matching gradient against the model's own score; it vanishes
  exactly when the landed samples are distributed as the model's own score implies (D_fake = D_real at w = 1);
* `conditional`: the model's own unguided conditional estimate D_c, which *is* the landed distribution's denoiser
  when the samples already follow the model (the assumption): D_fake - D_real = -(w - 1)(D_c - D_u), the classifier
  score (x0 units) of the model itself, cond vs uncond of one network, the mechanism the paper's pages describe;
  zero at w = 1 and on unconditional data.

We take DMD's per-sample normalisation of (2) (dmd2.dmd_gradient: divide by mean |x^ - D_real|) and its surrogate
0.5 ||x^ - sg(x^ - g)||^2 (dmd2.dmd_loss). The generator loss is  L_data + self_eval_weight * L_self  (weight 0: the
plain flow-matching loss); the critic loss is denoising on detached landed samples.

No teacher call anywhere: the trainer still loads teacher.path (its network class and config give the student's
architecture and its scheduler the export's), and `init: teacher` would start from its weights; the default
`init: scratch` is the paper's from-scratch training (flow_map's `init: scratch`: a fresh network of its design).
Left out (unread or not applicable): the paper's energy-preserving guidance, its exact eq. 13 auxiliary terms, its
time and loss weightings, landings at intermediate times u in (t0, t) (the stock export uses the clean edge only).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition, concat_conditions, index_condition
from distill.config import Config as RunConfig
from distill.config import Section, require, require_images
from distill.models.denoiser import Denoiser
from distill.models.schedules import rollout, student_from_teacher, student_schedule
from distill.parametrization import flow_interpolate, flow_range, flow_to_native
from distill.recipes.dmd2 import denoising_loss, dmd_gradient, dmd_loss
from distill.recipes.flow_map import (
    TwoTimeStudent,
    check_descending_timesteps,
    check_two_time_run,
    fold_end_time,
    residual_loss,
    two_time_x0,
    velocity_from_x0,
)
from distill.training.recipe import Nets, Recipe


class Config(Section):
    init: Literal["scratch", "teacher"] = Field(
        "scratch", description="the student's (and critic's) starting weights: a fresh network of the teacher's "
                               "design (the paper trains from scratch), or the teacher's weights")
    self_eval_weight: float = Field(1.0, ge=0.0, description="weight of the self-evaluation loss beside the "
                                                             "flow-matching loss; 0 = plain flow matching")
    fake_score: Literal["critic", "conditional"] = Field(
        "critic", description="the landed samples' denoiser in the self-evaluation gradient: a fake-score critic "
                              "fitted to them (distribution matching), or the model's own conditional estimate "
                              "(the classifier score -(w - 1)(D_c - D_u); needs guidance_scale > 1)")
    evaluator: Literal["current", "ema"] = Field(
        "current", description="weights of the model whose diagonal scores the landed samples: the current ones, "
                               "or an EMA target network (decay evaluator_decay)")
    evaluator_decay: float = Field(0.99, ge=0.0, lt=1.0, description="evaluator: ema: the target's EMA decay")
    guidance_scale: float = Field(1.0, ge=1.0, le=20.0, description="w of the real score D_u + w (D_c - D_u) the "
                                                                    "landed samples are judged by (the teacher's "
                                                                    "guidance_scale is unused)")
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="share of the data loss's labels replaced by the "
                                                                  "null class (learns D_u for guidance)")
    data_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="share of the batch in the flow-matching loss; "
                                                                  "the rest starts the self-evaluation jumps")
    start_times: Literal["uniform", "schedule"] = Field(
        "uniform", description="flow times the self-evaluation jumps start from: uniform in [t0, s_max] (any "
                               "step count), or the student's k pipeline times")
    min_tau: float = Field(0.02, gt=0.0, lt=1.0, description="lowest flow time the landed sample is re-noised to")
    max_tau: float = Field(0.98, gt=0.0, lt=1.0, description="highest flow time of the re-noising; > min_tau")
    end_embedding_gain: float = Field(1.0, gt=0.0, le=1000.0, description="output scale of the end-time "
                                                                          "embedding (recipes/flow_map.py)")
    timesteps: list[int] | None = Field(
        None, description="custom intermediate times of a multi-step student: the pipeline's `timesteps=` "
                          "(descending indices into its Karras grid, last 0); null = `num_inference_steps` spacing")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.min_tau < self.max_tau, "min_tau", f"must be < recipe.max_tau ({self.max_tau}), got "
                                                        f"{self.min_tau}")
        require(self.fake_score != "conditional" or self.guidance_scale > 1, "fake_score",
                f"conditional needs recipe.guidance_scale > 1 (got {self.guidance_scale}): its gradient, the "
                "classifier score -(w - 1)(D_c - D_u), is zero at w = 1")
        require(self.guidance_scale == 1 or self.label_dropout > 0, "label_dropout",
                f"must be > 0 with recipe.guidance_scale: {self.guidance_scale}: the unconditional estimate D_u "
                "is learnt from data with dropped labels (no teacher provides it)")
        check_descending_timesteps(self.timesteps)
        return self

    def check_run(self, cfg: RunConfig) -> None:
        require_images(cfg, "data.name", "Self-E learns from data: flow matching on I_t = (1 - t) x0 + t z")
        check_two_time_run(cfg, self.timesteps, "self_e")


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces (tested against closed forms on Gaussians)
# ---------------------------------------------------------------------------------------------------------------


def guided(x0_cond: Tensor, x0_uncond: Tensor | None, w: float) -> Tensor:
    """The guided estimate D_u + w (D_c - D_u) (w = 1 or no D_u: D_c)."""
    return x0_cond if x0_uncond is None or w == 1.0 else x0_uncond + w * (x0_cond - x0_uncond)


def renoise(x0: Tensor, eps: Tensor, tau: Tensor) -> Tensor:
    """A clean sample re-noised to flow time tau: (1 - tau) x0 + tau eps."""
    return flow_interpolate(x0, eps, tau)


def fresh_like(denoiser: Denoiser) -> Denoiser:
    """A trainable denoiser of `denoiser`'s class and config with fresh weights (nothing of its weights kept)."""
    twin = denoiser.copy(trainable=True)
    config = {k: v for k, v in twin.model.config.items() if not k.startswith("_")}
    device = next(twin.model.parameters()).device
    twin.model = type(twin.model).from_config(config).to(device).float().train()
    return twin


def drop_labels(cond: Condition, null: Condition, p: float) -> Condition:
    """`cond` with each sample's condition replaced by the null one with probability p (CFG training)."""
    n = next(iter(cond.values())).shape[0]
    drop = torch.rand(n, device=next(iter(cond.values())).device) < p
    return {k: torch.where(drop.reshape((-1,) + (1,) * (v.ndim - 1)), null[k], v) for k, v in cond.items()}


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class SelfE(Recipe):
    def __init__(self, cfg: Config, teacher: Denoiser, num_steps: int):
        self.cfg = cfg
        self.t0, self.s_max = flow_range(teacher.process)
        self.process = teacher.process
        student = student_from_teacher(teacher)  # the teacher's design and export parametrisation ("cm")
        critic = teacher.copy(trainable=True) if cfg.fake_score == "critic" else None
        if cfg.init == "scratch":
            student = fresh_like(student)
            critic = None if critic is None else fresh_like(critic)
        self.generator = TwoTimeStudent(student, self.t0, cfg.end_embedding_gain)
        self.critic = critic
        self.target_decay = cfg.evaluator_decay if cfg.evaluator == "ema" else None
        self.export_timesteps = cfg.timesteps
        self.schedule = student_schedule(student, num_steps, cfg.timesteps)
        sigmas = self.schedule.times.double()
        self.schedule_flow_times = (sigmas / (1 + sigmas)).float()
        # the teacher itself is not kept: no loss can read it

    def export_model(self, generator: nn.Module) -> Denoiser:
        return fold_end_time(generator)

    # -- times ----------------------------------------------------------------------------------------------------
    def data_times(self, n: int, device: torch.device) -> Tensor:
        return self.t0 + (self.s_max - self.t0) * torch.rand(n, device=device)

    def start_times(self, n: int, device: torch.device) -> Tensor:
        if self.cfg.start_times == "schedule":
            return self.schedule_flow_times.to(device)[torch.randint(len(self.schedule_flow_times), (n,),
                                                                     device=device)]
        return self.data_times(n, device)

    def tau(self, n: int, device: torch.device) -> Tensor:
        return self.cfg.min_tau + (self.cfg.max_tau - self.cfg.min_tau) * torch.rand(n, device=device)

    # -- the self-evaluation's two estimates at a re-noised landed sample (no gradient) ----------------------------
    def evaluator(self, nets: Nets) -> nn.Module:
        return nets.target if self.cfg.evaluator == "ema" else nets.generator

    def null(self, cond: Condition) -> Condition:
        student = self.generator.student
        return student.family.null_condition(student.model, cond)

    @torch.no_grad()
    def real_x0(self, nets: Nets, x_tau: Tensor, tau: Tensor, cond: Condition) -> Tensor:
        """The model's own guided denoiser on its diagonal, D_u + w (D_c - D_u) at (x_tau, tau, tau)."""
        net, w = self.evaluator(nets), self.cfg.guidance_scale
        if w == 1.0:
            return two_time_x0(net, self.process, x_tau, tau, tau, cond)
        both = two_time_x0(net, self.process, torch.cat([x_tau, x_tau]), torch.cat([tau, tau]),
                           torch.cat([tau, tau]), concat_conditions(cond, self.null(cond)))
        x0_c, x0_u = both.chunk(2)
        return guided(x0_c, x0_u, w)

    @torch.no_grad()
    def fake_x0(self, nets: Nets, x_tau: Tensor, tau: Tensor, cond: Condition) -> Tensor:
        """The landed distribution's denoiser: the critic's, or the model's own unguided conditional estimate."""
        if self.cfg.fake_score == "conditional":
            return two_time_x0(self.evaluator(nets), self.process, x_tau, tau, tau, cond)
        y, sigma = flow_to_native(self.process, x_tau, tau)
        return nets.critic(y, sigma, cond)

    # -- the two updates -----------------------------------------------------------------------------------------
    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg, t0 = self.cfg, self.t0
        if batch.images is None:
            raise ValueError("self_e needs data images in the batch (it learns from data)")
        x0, cond = batch.images, batch.cond
        n, device = x0.shape[0], x0.device
        k = n if cfg.self_eval_weight == 0 else min(max(round(n * cfg.data_fraction), 1), n - 1)
        # the draws, in this order (tests replay them): data times, data noise, label dropout, start times, ...
        t = self.data_times(k, device)
        z = torch.randn_like(x0[:k])
        cond_d = index_condition(cond, slice(0, k))
        if cfg.label_dropout > 0:
            cond_d = drop_labels(cond_d, self.null(cond_d), cfg.label_dropout)
        x_d = flow_interpolate(x0[:k], z, t)
        if k < n:
            cond_s = index_condition(cond, slice(k, n))
            t_s = self.start_times(n - k, device)
            x_s = flow_interpolate(x0[k:], torch.randn_like(x0[k:]), t_s)
            xs, ts = torch.cat([x_d, x_s]), torch.cat([t, t_s])
            ends = torch.cat([t, torch.full_like(t_s, t0)])
            cond_p = concat_conditions(cond_d, cond_s)
        else:
            xs, ts, ends, cond_p = x_d, t, t, cond_d
        # one pass with gradient: the diagonal (data) and the clean-edge jumps (self-evaluation)
        D = two_time_x0(nets.trained, self.process, xs, ts, ends, cond_p)
        loss_data = residual_loss(velocity_from_x0(x_d, D[:k], t, t0) - (z - x0[:k]))  # eq. (1)
        loss = loss_data.mean()
        logs = {"data_loss": loss_data.mean().item()}
        if k < n:
            x_hat = D[k:]  # landed clean samples (EDM scale = data scale), with gradient
            tau = self.tau(n - k, device)
            x_tau = renoise(x_hat.detach(), torch.randn_like(x_hat), tau)
            grad = dmd_gradient(x_hat.detach(), self.real_x0(nets, x_tau, tau, cond_s),
                                self.fake_x0(nets, x_tau, tau, cond_s))  # eq. (2), DMD-normalised
            loss_self = dmd_loss(x_hat, grad)
            loss = loss + cfg.self_eval_weight * loss_self.mean()
            logs.update(self_eval_loss=loss_self.mean().item(), self_eval_grad_abs=grad.abs().mean().item())
        logs["loss"] = loss.item()
        return loss, logs

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Denoising on detached landed samples: the critic becomes the landed distribution's denoiser."""
        if batch.images is None:
            raise ValueError("self_e needs data images in the batch (its jumps start from noised data)")
        x0, cond = batch.images, batch.cond
        n, device = x0.shape[0], x0.device
        t_s = self.start_times(n, device)
        with torch.no_grad():
            x_s = flow_interpolate(x0, torch.randn_like(x0), t_s)
            x_hat = two_time_x0(nets.generator, self.process, x_s, t_s, torch.full_like(t_s, self.t0), cond)
        tau = self.tau(n, device)
        y, sigma = flow_to_native(self.process, renoise(x_hat, torch.randn_like(x_hat), tau), tau)
        pred = nets.trained(y, sigma, cond)
        critic = nets.critic
        loss = denoising_loss(critic.to_native(pred, y, sigma), critic.to_native(x_hat, y, sigma)).mean()
        return loss, {"loss": loss.item(), "denoise_loss": loss.item()}

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> SelfE:
    return SelfE(cfg.recipe, teacher, cfg.student.num_steps)
