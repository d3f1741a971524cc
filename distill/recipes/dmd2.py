"""DMD2: improved distribution matching distillation (Yin et al. 2024, arXiv 2405.14867).

A one- or few-step generator G is trained so that its output distribution matches the teacher's. Re-noising a
generated x at a random level t, the gradient of the reverse KL is the difference of two scores; in x0 form
(DMD eq. 7 / DMD2 sec. 4) it is  grad = (x0_fake(x_t) - x0_real(x_t)) / mean|x - x0_real(x_t)|,
normalised per sample. x0_real is the frozen teacher with classifier-free guidance (CFG on the teacher only);
x0_fake is a trainable copy of the teacher (the "fake score") fitted to the generator's current samples by
ordinary denoising on detached samples. DMD2 drops DMD's regression loss and adds:

* two time-scale updates: `trainer.critic_steps` fake-score updates per generator update (sec. 4.2);
* an optional GAN head on the fake score's bottleneck features, trained with non-saturating losses against
  real images (sec. 4.3);
* multi-step students trained with backward simulation: the input of step i is made by the student's own
  i-step rollout without gradient, exactly as its exported pipeline samples (sec. 4.4).

DMD (v1) is this recipe with `regression_weight > 0` (DMD, arXiv 2311.18828, eq. 9: loss = KL gradient term +
lambda_reg L_reg, lambda_reg = 0.25 there): the student's step from sigma_max on stored noise z (for a one-step
student, G(z)) is regressed on the teacher's ODE sample x from z (the pair store `pairs`, made with
`distill pairs CONFIG`), with L2, pseudo-Huber, or a perceptual network (LPIPS in the paper) as `regression`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition, concat_conditions
from distill.config import Config as RunConfig
from distill.config import Section, require, require_images
from distill.data.pairs import PairDataset, PairsConfig, RegressionConfig, open_pairs
from distill.models.adapters import AdapterDenoiser, add_lora_adapters
from distill.models.denoiser import Denoiser
from distill.models.schedules import rollout, step_input, student_from_teacher, student_prediction, student_schedule
from distill.parametrization import add_noise
from distill.training.recipe import Nets, Recipe


class Config(Section):
    min_t: float = Field(0.02, ge=0.0, le=1.0, description="lowest noise level of the DMD gradient and the "
                                                           "fake-score loss, in unit time (0 clean, 1 noisiest; "
                                                           "DMD2: 0.02 T); below recipe.max_t")
    max_t: float = Field(0.98, ge=0.0, le=1.0, description="highest noise level, unit time (DMD2: 0.98 T); above "
                                                           "recipe.min_t")
    dmd_weight: float = Field(1.0, gt=0.0, description="weight of the distribution matching loss (DMD2 eq. 2); "
                                                       "> 0, a negative weight would climb the KL")
    gan: bool = Field(False, description="a GAN head on the fake score's bottleneck features, against real images")
    gan_generator_weight: float = Field(5e-3, ge=0.0, description="weight of the generator's non-saturating GAN "
                                                                  "loss (DMD2's SDXL runs: 5e-3); 0 = none; used "
                                                                  "with recipe.gan only")
    gan_critic_weight: float = Field(1e-2, ge=0.0, description="weight of the critic's GAN loss (DMD2's SDXL runs: "
                                                               "1e-2); 0 = none; used with recipe.gan only")
    regression_weight: float = Field(0.0, ge=0.0, description="DMD (v1)'s regression loss on stored teacher ODE "
                                                              "pairs (DMD eq. 9, lambda_reg = 0.25 there); "
                                                              "0 = none (DMD2)")
    regression: RegressionConfig = Field(default_factory=RegressionConfig, description="the regression's "
                                         "distance on the stored pairs")
    pairs: PairsConfig | None = Field(None, description="the pair store of the regression loss; null = none")
    adapters: bool = Field(False, description="one base in memory: student and fake score are LoRA adapters on "
                                              "the frozen teacher (distill/models/adapters.py); the export merges them")
    lora_rank: int = Field(32, ge=1, description="LoRA rank of each adapter (with adapters: true)")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.min_t < self.max_t, "min_t", f"must be < recipe.max_t ({self.max_t}), got {self.min_t}")
        require(self.regression_weight == 0 or self.pairs is not None, "pairs",
                f"recipe.regression_weight={self.regression_weight} needs a pair store (recipe.pairs)")
        return self

    def check_run(self, cfg: RunConfig) -> None:
        if self.gan:
            require_images(cfg, "recipe.gan", "the GAN head tells real images from the student's, DMD2 sec. 4.3")


# ---------------------------------------------------------------------------------------------------------------
# Losses (pure functions; tested against closed forms on Gaussian toys)
# ---------------------------------------------------------------------------------------------------------------


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """Per-sample normalised DMD gradient (DMD2 sec. 3, following DMD eq. 8):
    (x0_fake - x0_real) / mean_dims |x - x0_real|. Pass detached estimates."""
    dims = tuple(range(1, x.ndim))
    norm = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    return (x0_fake - x0_real) / norm


def dmd_loss(x: Tensor, grad: Tensor) -> Tensor:
    """Per-sample 0.5 ||x - sg(x - grad)||^2 / D, whose gradient in x is grad / D."""
    dims = tuple(range(1, x.ndim))
    return 0.5 * (x - (x - grad).detach()).pow(2).mean(dim=dims)


def regression_pairs(pairs: PairDataset, n: int, device: torch.device) -> Batch:
    """A batch of stored (noise, teacher sample, condition) pairs, drawn with torch's global RNG (which the
    trainer reseeds from (seed, step, rank) every iteration)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    return pairs.sample(n, g).to(device)


def denoising_loss(native_pred: Tensor, native_target: Tensor) -> Tensor:
    """Per-sample MSE in the network's own output space (for EDM this is EDM's lambda(sigma)-weighted loss)."""
    return (native_pred - native_target).pow(2).flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# The critic: fake score plus optional GAN head, one forward pass
# ---------------------------------------------------------------------------------------------------------------


class GANHead(nn.Module):
    """A small classifier on bottleneck features (N, C, h, w) -> one logit per sample. Vector features (N, C), e.g.
    an MLP's last hidden layer, are taken as 1 x 1 maps (the 3 x 3 convolutions then act as linear layers)."""

    def __init__(self, channels: int):
        super().__init__()
        groups = 8 if channels % 8 == 0 else 1
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1),
        )

    def forward(self, feats: Tensor) -> Tensor:
        if feats.ndim == 2:
            feats = feats[:, :, None, None]
        return self.net(feats.float()).squeeze(1)


class FakeScore(nn.Module):
    """The trainable critic: a copy of the teacher, and (with GAN) a head on its features."""

    def __init__(self, denoiser: Denoiser, gan: bool):
        super().__init__()
        self.denoiser = denoiser
        self.head = GANHead(denoiser.family.feature_channels(denoiser.model)) if gan else None

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition) -> tuple[Tensor, Tensor | None]:
        """(x0 estimate, GAN logits or None) from a single pass (DDP needs one forward per backward)."""
        if self.head is None:
            return self.denoiser(x_t, t, cond), None
        x0, feats = self.denoiser.with_features(x_t, t, cond)
        return x0, self.head(feats)


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class DMD2(Recipe):
    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int, image_shape: tuple[int, ...]):
        self.cfg = cfg
        self.guidance_scale = guidance_scale
        self.image_shape = image_shape
        if cfg.adapters:  # one frozen base; the teacher is the base with the adapters off
            add_lora_adapters(teacher, ["student", "fake_score"], rank=cfg.lora_rank)
            self.teacher = AdapterDenoiser(teacher, None)
            self.generator = AdapterDenoiser(teacher, "student", prediction=student_prediction(teacher))
            self.critic = FakeScore(AdapterDenoiser(teacher, "fake_score"), gan=cfg.gan)
        else:
            self.teacher = teacher.eval().requires_grad_(False)
            self.generator = student_from_teacher(teacher)  # student, initialised from the teacher
            self.critic = FakeScore(teacher.copy(trainable=True), gan=cfg.gan)  # fake score, also from the teacher
        self.schedule = student_schedule(self.generator, num_steps)
        self.pairs: PairDataset | None = None  # set by build when cfg.regression_weight > 0
        self.regression_distance = cfg.regression.distance() if cfg.regression_weight > 0 else None

    # -- the pieces the recipes built on DMD2 share (decoupled_dmd, fdistill, swiftbrush) ------------------------
    def sample_t(self, n: int, device: torch.device) -> Tensor:
        """Native noise levels, uniform in unit time on [min_t, max_t]."""
        u = torch.rand(n, device=device) * (self.cfg.max_t - self.cfg.min_t) + self.cfg.min_t
        return self.teacher.process.from_unit(u)

    def student_output(self, nets: Nets, cond: Condition, n: int, device: torch.device, grad: bool,
                       regress: Batch | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x0 from a uniformly chosen student step; earlier steps are the student's own rollout, without
        gradient (backward simulation, DMD2 sec. 4.4). With grad (the generator update), the last step is the
        loss's pass through `nets.trained`. With `regress` (stored pairs), the student's first step on their
        noise joins the same pass and (x0, regression output) is returned."""
        sched = self.schedule
        noise = torch.randn((n, *self.image_shape), device=device)
        i = int(torch.randint(0, sched.num_steps, ()).item())
        x = step_input(nets.generator, sched, cond, noise, i)
        if regress is not None:
            m = regress.noise.shape[0]
            out = nets.trained(torch.cat([x, sched.start(regress.noise)]),
                               torch.cat([sched.t(i, n, device), sched.t(0, m, device)]),
                               concat_conditions(cond, regress.cond))
            return out[:n], out[n:]
        if grad:
            return nets.trained(x, sched.t(i, n, device), cond)
        with torch.no_grad():
            return nets.generator(x, sched.t(i, n, device), cond)

    def noised_student_sample(self, nets: Nets, cond: Condition, grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(x, t, x_t): a student sample (`student_output`), a noise level and x re-noised at it."""
        first = next(iter(cond.values()))
        x = self.student_output(nets, cond, first.shape[0], first.device, grad=grad)
        t = self.sample_t(first.shape[0], first.device)
        return x, t, add_noise(self.teacher.process, x, torch.randn_like(x), t)

    # -- the two updates -------------------------------------------------------------------------------------
    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cond = batch.cond
        n = next(iter(cond.values())).shape[0]
        device = next(iter(cond.values())).device
        regress = regression_pairs(self.pairs, n, device) if self.cfg.regression_weight > 0 else None
        x = self.student_output(nets, cond, n, device, grad=True, regress=regress)
        if regress is not None:
            x, x_regress = x
        t = self.sample_t(n, device)
        x_t = add_noise(self.teacher.process, x, torch.randn_like(x), t)
        with torch.no_grad():
            x0_real = self.teacher(x_t.detach(), t, cond, guidance_scale=self.guidance_scale)
            x0_fake = nets.critic.denoiser(x_t.detach(), t, cond)
            grad = dmd_gradient(x.detach(), x0_real, x0_fake)
        loss_dmd = dmd_loss(x, grad).mean()
        loss = self.cfg.dmd_weight * loss_dmd
        logs = {"dmd_loss": loss_dmd.item(), "dmd_grad_abs": grad.abs().mean().item()}
        if regress is not None:
            loss_reg = self.regression_distance(x_regress, regress.images).mean()  # DMD eq. 9's L_reg
            loss = loss + self.cfg.regression_weight * loss_reg
            logs["regression_loss"] = loss_reg.item()
        if self.cfg.gan:
            _, logits = nets.critic(x_t, t, cond)  # gradient reaches x through the frozen critic
            loss_gan = F.softplus(-logits).mean()  # non-saturating generator loss
            loss = loss + self.cfg.gan_generator_weight * loss_gan
            logs["gan_loss"] = loss_gan.item()
        logs["loss"] = loss.item()
        return loss, logs

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        cond = batch.cond
        x, t, x_t = self.noised_student_sample(nets, cond, grad=False)  # detached generator samples
        n, device = x.shape[0], x.device
        if self.cfg.gan:
            if batch.images is None:
                raise ValueError("dmd2 with gan: true needs real images in the data batch")
            t_real = self.sample_t(n, device)
            x_t_real = add_noise(self.teacher.process, batch.images, torch.randn_like(batch.images), t_real)
            both_cond = {k: torch.cat([v, v]) for k, v in cond.items()}
            x0_hat, logits = nets.trained(torch.cat([x_t, x_t_real]), torch.cat([t, t_real]), both_cond)
            x0_hat, (logits_fake, logits_real) = x0_hat[:n], logits.chunk(2)
        else:
            x0_hat, _ = nets.trained(x_t, t, cond)
        fake_score = nets.critic.denoiser
        loss_denoise = denoising_loss(fake_score.to_native(x0_hat, x_t, t), fake_score.to_native(x, x_t, t)).mean()
        loss = loss_denoise
        logs = {"denoise_loss": loss_denoise.item()}
        if self.cfg.gan:
            loss_gan = F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()
            loss = loss + self.cfg.gan_critic_weight * loss_gan
            logs["gan_loss"] = loss_gan.item()
        logs["loss"] = loss.item()
        return loss, logs

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> DMD2:
    recipe = DMD2(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, dataset.image_shape)
    if cfg.recipe.regression_weight > 0:
        recipe.pairs = open_pairs(cfg.recipe.pairs, dataset)
    return recipe
