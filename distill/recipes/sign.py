"""SIGN: score-based idempotent distillation (Zaman, Liu & Chiu 2025, "Score-based Idempotent Distillation of
Diffusion Models", arXiv 2509.21470), built on the Idempotent Generative Network (IGN; Shocher et al. 2023,
arXiv 2311.01462).

Sources. IGN's losses were read (its abstract and project page, and a public reimplementation). Of SIGN, only the
abstract (and third-party summaries of it) could be read here, not its method section: SIGN distils an idempotent
generator f (f(f(z)) = f(z)) from a diffusion teacher's scores, without IGN's adversarial term, generates in one
step and refines by re-application, and can project corrupted inputs back onto the data. Its exact losses,
weights and input construction are therefore NOT taken from the paper: every equation below that is not IGN's is
derived here, and says so.

IGN (read). f maps a source (noise z) onto the target manifold {x: f(x) = x} with three losses, D a distance
(L1 in IGN's reimplementations), theta' a frozen copy of the current weights theta:
    L_rec   = D(f_theta(x), x)                      data are fixed points;
    L_idem  = D(f_theta'(f_theta(z)), f_theta(z))   gradient through the inner application only;
    L_tight = -D(f_theta(f_theta'(z)), f_theta'(z)) gradient through the outer application only,
weighted and with L_tight clamped (IGN's values are not used here). L_tight makes f a discriminator of its own
outputs (IGN is GAN-like); it is the adversarial part SIGN removes.

The generator and "re-application" (derived). The student is the export target's network: on the digits family a
consistency model x0 = f(x, sigma) = c_skip x + c_out F with the boundary scalings of diffusers'
CMStochasticIterativeScheduler. One step is f at sigma_max. Re-applying f directly to its clean output would be f at
sigma_min, where c_skip = 1 and c_out = 0: f(y, sigma_min) = y exactly for every network, so L_rec and the idempotence
of that re-application hold by construction and carry no signal (tests/test_sign.py checks this). The re-application
used here is the exported sampler's own step: re-noise y to a level sigma (the scheduler's rule,
y + sqrt(sigma^2 - sigma_min^2) n with fresh n; alpha y + sigma n for the noising schedules) and apply f at sigma,

    R_sigma(y) = f(renoise_sigma(y, n), sigma),

so the k-step student IS f re-applied k - 1 times at the pipeline's levels, and `generate` is the pipeline's
sampler (the export reproduces it). Note the ideal student is idempotent in law, not pointwise: if y ~ p_data and
f(., sigma) carries p_sigma onto p_data, R_sigma(y) ~ p_data again, but R_sigma(y) != y (at the 2-step level
sigma = 2.24 a digit is regenerated, not kept). Pointwise idempotence is asked only at a small refinement level
sigma_r (`idempotence_sigma`), where re-noising barely moves a sample off the data.

The losses of one generator update (y: the student's x0 at a uniformly chosen step of its k-step rollout, earlier
steps without gradient, DMD2's backward simulation: every re-application must land on the data distribution).

1. Score-based idempotence (derived; replaces L_rec and L_tight). A projector P onto a distribution at level sigma
   is a denoiser of re-noised samples, P(y) = E[x0 | y_sigma], y_sigma = y + sigma n: Tweedie's formula
   P(y) = y_sigma + sigma^2 grad log p_sigma(y_sigma) ties it to the score. The teacher's projector P_real = the
   teacher's x0 (with its guidance) replaces IGN's data reconstruction: no data image is read. The generated
   distribution's own projector P_fake is the MSE-optimal minimiser of the idempotence residual
   E ||P(y_sigma) - y||^2 over generated y, i.e. a denoiser fitted to the student's samples (DMD2's fake score,
   trained by `critic_loss`, imported). The generator minimises the teacher's residual minus its own, with the
   projectors held fixed (stop-gradient) at the noisy point:

       L_score = w/2 (||y - sg P_real||^2 - ||y - sg P_fake||^2) / D,
       grad_y L_score = w (P_fake - P_real) / D = w sigma^2 (grad log q_sigma - grad log p_sigma)(y_sigma) / D,

   whose expectation (w = 1) is sigma^2 / D times the gradient of KL(q_sigma || p_sigma), q the student's
   distribution: zero exactly when q = p (tests: the closed-form score difference on a Gaussian, and the
   parameter gradient against the closed-form KL gradient). This is where SIGN's "no adversarial loss" lands: the
   outer projector of generated samples *cooperates* (it models the student's distribution) instead of
   discriminating as IGN's tightness does. The level sigma is uniform in unit time on [min_t, max_t], and w is DMD's
   per-sample normalisation 1 / mean|y - P_real| (a choice for stability, not SIGN's): the gradient is then DMD2's
   exactly, so with idempotence_weight 0 this recipe is DMD2 without its GAN (tested).

2. Idempotence (IGN's L_idem, with the re-application above):

       L_idem = ||f_theta'(renoise_sigma_r(y, n), sigma_r) - y||^2 / D,

   theta' the trainer's target network with decay 0 (a copy of theta after every update: IGN's frozen copy), so
   the gradient reaches y through both slots (the outer's input and the target) but no weight of the outer. Squared
   L2 instead of IGN's L1 (one distance for the loss and the reported residual). Near an idempotent f with Jacobian
   J the gradient is 2 (J^T - I)(f(y) - y) / D, normal to the manifold of fixed points: it sharpens samples onto
   the manifold without moving mass along it (that is the score term's job).

   loss = score_weight L_score + idempotence_weight L_idem.

Left out: IGN's adversarial L_tight (replaced by the fake projector, above); IGN's L_rec on data images (exact by
construction at sigma_min; the teacher's projector stands in for data); SIGN's editing / projection of corrupted
inputs (inference uses, not training); any SIGN-specific weight or level (unknown here: ours are tuned on the toy and
the digits teacher, docs/sign.md).

Reported (`diagnostics`): idempotence_residual = mean ||R_sigma_r(y) - y||^2 / D over k-step samples y of the EMA
student, the re-application clipped to [-1, 1] as a pipeline step is.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.base.errors import ConfigError
from distill.config import Config as RunConfig
from distill.config import Section, require
from distill.models.denoiser import Denoiser
from distill.models.schedules import KStepSchedule, rollout
from distill.parametrization import add_noise, edm_sigma_range, native_time_from_edm_sigma
from distill.recipes.dmd2 import DMD2
from distill.recipes.dmd2 import Config as DMD2Config
from distill.training.recipe import Nets, Recipe


class Config(Section):
    min_t: float = Field(0.02, ge=0.0, le=1.0, description="lowest re-noising level of the score-based term and "
                                                           "of the fake projector's training, in unit time (0 "
                                                           "clean, 1 noisiest); below recipe.max_t")
    max_t: float = Field(0.98, ge=0.0, le=1.0, description="highest re-noising level, unit time; above "
                                                           "recipe.min_t")
    score_weight: float = Field(1.0, gt=0.0, description="weight of the score-based idempotence term (teacher's "
                                                         "projector against the fake one); > 0, it is the only "
                                                         "term that matches distributions")
    idempotence_weight: float = Field(1.0, ge=0.0, description="weight of IGN's idempotence loss "
                                                               "||f'(R(y)) - y||^2 / D; 0 = none (then no copy of "
                                                               "the student is kept)")
    idempotence_sigma: float = Field(0.1, gt=0.0, description="EDM noise level sigma_r (sigma / alpha) of the "
                                                              "re-application R in the idempotence loss and the "
                                                              "reported residual; above the process's sigma_min")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.min_t < self.max_t, "min_t", f"must be < recipe.max_t ({self.max_t}), got {self.min_t}")
        return self


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces (tested against closed forms on Gaussian toys)
# ---------------------------------------------------------------------------------------------------------------


def idempotence_loss(reapplied: Tensor, y: Tensor) -> Tensor:
    """Per-sample IGN idempotence residual ||f(f(z)) - f(z)||^2 / D with `reapplied` = f(f(z)), `y` = f(z).
    Gradient flows through both arguments as the caller built them (IGN: through the inner application)."""
    return (reapplied - y).pow(2).flatten(1).mean(1)


def score_idempotence_loss(y: Tensor, p_real: Tensor, p_fake: Tensor, normalize: bool = True) -> Tensor:
    """Per-sample w/2 (||y - sg P_real||^2 - ||y - sg P_fake||^2) / D: the teacher projector's idempotence residual
    minus the generated distribution's own. Its gradient in y is w (P_fake - P_real) / D; w = 1 / mean|y - P_real|
    (DMD's normalisation) or 1."""
    p_real, p_fake = p_real.detach(), p_fake.detach()
    dims = tuple(range(1, y.ndim))
    w = 1.0 / (y.detach() - p_real).abs().mean(dim=dims).clamp_min(1e-8) if normalize else 1.0
    # ||y - a||^2 - ||y - b||^2 = (b - a) . (2 y - a - b): factored, no cancellation of two large squares
    return w * 0.5 * ((p_fake - p_real) * (2 * y - p_real - p_fake)).mean(dim=dims)


def reapplication_input(schedule: KStepSchedule, y: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """The input of f re-applied to its output `y` at native time `t` (a one-element tensor): `y` re-noised by the
    export sampler's own rule (ConsistencyModelPipeline: y + sqrt(sigma^2 - sigma_min^2) noise)."""
    return replace(schedule, times=t.reshape(1)).renoise(y, 0, noise)


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class SIGN(Recipe):
    """DMD2's student, fake score, backward simulation and critic update (held, not copied), the score-based
    idempotence term and IGN's idempotence loss."""

    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int,
                 image_shape: tuple[int, ...]):
        self.cfg = cfg
        self.dmd = DMD2(DMD2Config(min_t=cfg.min_t, max_t=cfg.max_t), teacher, guidance_scale, num_steps, image_shape)
        self.teacher, self.guidance_scale = self.dmd.teacher, guidance_scale
        self.generator, self.critic, self.schedule = self.dmd.generator, self.dmd.critic, self.dmd.schedule
        self.target_decay = 0.0 if cfg.idempotence_weight > 0 else None  # IGN's frozen copy theta' = theta
        process = self.generator.process
        lo, hi = max(getattr(process, "sigma_min", 0.0), edm_sigma_range(process)[0]), edm_sigma_range(process)[1]
        if not lo < cfg.idempotence_sigma <= hi:
            raise ConfigError(f"recipe.idempotence_sigma: {cfg.idempotence_sigma} is outside the noise levels "
                              f"({lo:.4g}, {hi:.4g}] the student's {type(process).__name__} re-noises to")
        self.reapply_t = float(native_time_from_edm_sigma(process, torch.tensor([cfg.idempotence_sigma]))[0])

    def reapply(self, outer: nn.Module, y: Tensor, cond: Condition, noise: Tensor) -> Tensor:
        """R_sigma_r(y) = outer(renoise(y), sigma_r): f applied again to its own output, as a pipeline step."""
        t = torch.full((y.shape[0],), self.reapply_t, device=y.device)  # made where y is (the recipe contract)
        return outer(reapplication_input(self.schedule, y, t[:1], noise), t, cond)

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg, cond = self.cfg, batch.cond
        first = next(iter(cond.values()))
        n, device = first.shape[0], first.device
        y = self.dmd.student_output(nets, cond, n, device, grad=True)  # f's output, through nets.trained
        # 1. score-based idempotence: both projectors at the same re-noised y, held fixed
        t = self.dmd.sample_t(n, device)
        y_t = add_noise(self.teacher.process, y.detach(), torch.randn_like(y), t)
        with torch.no_grad():
            p_real = self.teacher(y_t, t, cond, guidance_scale=self.guidance_scale)
            p_fake = nets.critic.denoiser(y_t, t, cond)
        loss_score = score_idempotence_loss(y, p_real, p_fake).mean()
        loss = cfg.score_weight * loss_score
        logs = {"score_loss": loss_score.item(), "projector_gap": (p_fake - p_real).abs().mean().item()}
        # 2. IGN's idempotence: the frozen copy re-applied to y; gradient reaches y through its input
        if cfg.idempotence_weight > 0:
            if nets.target is None:
                raise RuntimeError("sign needs the trainer's target network (IGN's frozen copy); nets.target is None")
            loss_idem = idempotence_loss(self.reapply(nets.target, y, cond, torch.randn_like(y)), y).mean()
            loss = loss + cfg.idempotence_weight * loss_idem
            logs["idempotence_loss"] = loss_idem.item()
        logs["loss"] = loss.item()
        return loss, logs

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """The fake projector: DMD2's denoising loss on the student's detached, re-noised samples (the minimiser
        of the generated samples' idempotence residual)."""
        return self.dmd.critic_loss(nets, batch, step)

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)

    @torch.no_grad()
    def diagnostics(self, generator: nn.Module, cond: Condition, noise: Tensor) -> dict[str, float]:
        """idempotence_residual: mean ||R_sigma_r(y) - y||^2 / D over the student's k-step samples y (re-noised with
        noise drawn from a fixed seed, independent of y's own even for a batch of one), the re-application clipped
        as a pipeline step is."""
        y = self.generate(generator, cond, noise)
        draw = torch.Generator(device=noise.device).manual_seed(0)
        renoise = torch.randn(noise.shape, generator=draw, device=noise.device, dtype=noise.dtype)
        again = self.reapply(generator, y, cond, renoise)
        if self.schedule.clip_x0:
            again = again.clamp(-1, 1)
        return {"idempotence_residual": idempotence_loss(again, y).mean().item()}


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> SIGN:
    return SIGN(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, tuple(dataset.image_shape))
