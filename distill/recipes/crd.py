"""CRD: centred reward distillation (Zhu, Wang, Lathuiliere & Kalogeiton 2026, "Diffusion Reinforcement Learning via
Centered Reward Distillation", arXiv 2603.14128): reward fine-tuning of the student (or a teacher) by matching a
centred external reward with the model's centred implicit reward, plus a KL anchor to a guided reference.

Sources. Read here: the paper's abstract and summaries of it, and a public implementation by the paper's first
author (the `crd` trainer of X-GenGroup/Flow-Factory, its docs). The paper's method section was not readable, so
the equation numbers are not cited; what the abstract states and the implementation does is marked (read), what
neither gives is marked (derived) and is tested in closed form in tests/test_crd.py.

1. The target (read: "derived from KL-regularized reward maximization"). max_p E_p[r(x, c)] - beta KL(p || p_0)
   has the optimum p*(x | c) = p_0(x | c) exp(r(x, c) / beta) / Z(c), so
       r(x, c) = beta log p*(x | c) / p_0(x | c) + beta log Z(c).
   Z(c) is intractable, but it is one constant per condition: centring both sides over K samples of the same
   condition cancels it ("within-prompt centering", read). With l_theta(x) an estimate of log p_theta / p_0 and
   v^c = v - mean over the group of v,

       L_crd = (1 / beta) mean_i (beta l_theta^c(x_i) - r^c(x_i))^2,

   zero for p_theta = p* on any samples (tested: exactly zero with exact log-ratios, and an Adam fit of a Gaussian
   lands on the tilted optimum). The 1 / beta scale is the implementation's (it multiplies by clip / beta): the
   first update's gradient is -2 r^c grad l whatever beta. Centring both v's makes the gradient in l_i equal to
   2 (beta l_i^c - r_i^c), the same as with the group mean of l detached (the implementation's form; tested).

2. The implicit reward (read: the implementation estimates it from prediction errors on the forward process,
   "-(||v_theta - v_target||^2 - ||v_old - v_target||^2)", with the same noise and time for both networks).
   Here in x0 space, for one level t and noise eps per sample, x_t = alpha x + sigma eps:
       l_theta(x) = w(t) (||D_old(x_t, t) - x||^2 - ||D_theta(x_t, t) - x||^2).
   p_0 is the *old* network, the trainer's EMA target network (decay `old_decay`), as in the implementation, not
   the frozen reference: each update tilts the recent model by exp(r / beta), and the KL anchor (3.) holds the
   drift. The old network also draws the samples (the implementation keeps a second, separately decayed sampling
   copy; one copy here).
   Weights w (derived): `elbo` is the continuous-time ELBO (VDM: -log p(x) = 1/2 int -SNR'(t) E||x - D||^2 dt +
   terms that cancel between two networks), importance-weighted for t uniform in unit time on [min_t, max_t]:
       w(u) = 1/2 |d SNR / du| (max_t - min_t),  sum over dimensions.
   For EDM (SNR = sigma^-2) the integrand is sigma^-3 d sigma; for an exact Gaussian denoiser its integral is
   log N(x; m, s^2) up to a constant (tested against the closed form). `edm` (default) is EDM's loss weighting
   lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 with the mean over dimensions: a surrogate of lower
   variance (the implementation, too, uses an unweighted velocity loss), whose beta is then a scale, not nats.

3. The KL regulariser (read: "KL anchoring to a CFG-guided pretrained model"; the implementation adds
   kl_beta ||v_theta - v_ref||^2, v_ref the reference with guidance). Here, derived with the same weight:
       KL_i = w(t) ||D_theta(x_t, t) - D_ref(x_t, t)||^2,
   with `elbo` weights the one-sample Girsanov estimate of the KL between the two networks' reverse SDEs, which is
   KL(p_theta || p_ref) for exact denoisers (tested on Gaussians). D_ref is the teacher at its guidance scale
   (`kl_reference: teacher`) or the frozen starting student (`init`).

       loss = L_crd + kl_weight mean_i KL_i.

Which network. The objective needs networks that are denoisers (posterior means): their ELBO is their sampler's
likelihood. By default the student is the teacher's consistency-model init (`student_from_teacher`, the teacher's
weights under the export's boundary scalings: a denoiser) sampled by the export's k-step ConsistencyModelPipeline;
a fine-tuned teacher, exported in the student's format. `init_from` starts from an exported pipeline folder
instead (a distilled student): then the estimate in 2. is a surrogate (a distilled network at large sigma maps
noise to a sample, not to a posterior mean) and the teacher as reference pulls it toward the teacher's blurred
posterior mean; `kl_reference: init` anchors it to itself instead (docs/crd.md).

Rewards (digits): the shipped classifier's log-probability (`classifier_logprob`) or probability
(`classifier_prob`) of the asked class, or the ink fraction mean (x + 1) / 2 (`ink`, a stroke-thickness reward
that a classifier does not check). Images of another size are resized bilinearly to the classifier's 16 x 16.

Left out: the reward-adaptive KL strength, the old and sampling copies' decay schedules (one constant decay),
the two-direction softmax centring and the BCE variant, the implementation's per-sample adaptive normalisation of
the prediction errors, several training times per sample.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.base.errors import ConfigError
from distill.base.paths import ASSETS
from distill.config import Config as RunConfig
from distill.config import Section, require
from distill.models.classifier import ConvClassifier, load_classifier
from distill.models.denoiser import Denoiser
from distill.models.schedules import rollout, student_from_teacher, student_schedule
from distill.parametrization import add_noise, edm_sigma
from distill.training.recipe import Nets, Recipe


class Config(Section):
    reward: Literal["classifier_logprob", "classifier_prob", "ink"] = Field(
        "classifier_logprob", description="the external reward r(x, c): the shipped digits classifier's log-"
                                          "probability or probability of class c, or the ink fraction (strokes)")
    beta: float = Field(1.0, gt=0.0, description="KL temperature of the target p_old exp(r / beta) (CRD's beta); "
                                                 "> 0")
    kl_weight: float = Field(0.1, ge=0.0, description="weight of the KL anchor to the reference (the "
                                                      "implementation's kl_beta = 0.1); 0 = none")
    kl_reference: Literal["teacher", "init"] = Field("teacher", description="the KL anchor: the teacher at "
                                                     "teacher.guidance_scale, or the frozen starting student")
    weighting: Literal["edm", "elbo"] = Field("edm", description="weight w(t) of the prediction errors: EDM's "
                                              "lambda(sigma), dimension mean (default), or the ELBO's, dimension "
                                              "sum (log-ratios in nats; high variance)")
    group_size: int = Field(8, ge=2, description="K samples per condition, centred together; divides "
                                                 "data.batch_size")
    old_decay: float = Field(0.9, ge=0.0, lt=1.0, description="EMA decay of the old network (implicit reward's "
                                                              "p_old and the sampler), the trainer's target network")
    min_t: float = Field(0.02, ge=0.0, le=1.0, description="lowest training noise level, unit time (0 clean, 1 "
                                                           "noisiest); below recipe.max_t")
    max_t: float = Field(0.98, ge=0.0, le=1.0, description="highest training noise level, unit time")
    init_from: str | None = Field(None, min_length=1, description="an exported pipeline folder whose network starts "
                                                                  "the student; null = the teacher's student init")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.min_t < self.max_t, "min_t", f"must be < recipe.max_t ({self.max_t}), got {self.min_t}")
        return self

    def check_run(self, cfg: RunConfig) -> None:
        if cfg.data.batch_size % self.group_size:
            raise ConfigError(f"recipe.group_size: {self.group_size} does not divide data.batch_size "
                              f"({cfg.data.batch_size}); each condition's K samples are centred together")


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces (tested against closed forms on Gaussians)
# ---------------------------------------------------------------------------------------------------------------


def centre(v: Tensor, group_size: int) -> Tensor:
    """v minus its mean over each group of `group_size` consecutive entries (one condition's samples)."""
    g = v.reshape(-1, group_size)
    return (g - g.mean(1, keepdim=True)).reshape(v.shape)


def crd_loss(log_ratio: Tensor, reward: Tensor, beta: float, group_size: int) -> Tensor:
    """Per-sample (beta l^c - r^c)^2 / beta: the centred reward-matching residual, zero for every sample when
    beta log p_theta / p_old equals r up to one constant per group."""
    return (beta * centre(log_ratio, group_size) - centre(reward, group_size)).pow(2) / beta


def elbo_weight(process, u: Tensor, span: float) -> Tensor:
    """1/2 |d SNR / du| * span at unit times u: the ELBO's weight of E||x - D||^2 (sum over dimensions) for u drawn
    uniformly on an interval of length `span`."""
    with torch.enable_grad():
        u = u.detach().float().requires_grad_(True)
        alpha, sigma = process.alpha_sigma(process.from_unit(u))
        (d_snr,) = torch.autograd.grad((alpha / sigma).pow(2).sum(), u)
    return 0.5 * d_snr.abs() * span


def edm_weight(process, t: Tensor, dims: int) -> Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 at the EDM level of native times t, over
    `dims` dimensions (a mean)."""
    alpha, sigma = process.alpha_sigma(t)
    s, sd = edm_sigma(alpha, sigma), getattr(process, "sigma_data", 0.5)
    return (s**2 + sd**2) / (s * sd) ** 2 / dims


def implicit_reward(x: Tensor, d_theta: Tensor, d_old: Tensor, weight: Tensor) -> Tensor:
    """Per-sample w (||D_old - x||^2 - ||D_theta - x||^2), the one-sample estimate of log p_theta(x) / p_old(x)."""
    dims = tuple(range(1, x.ndim))
    return weight * ((d_old - x).pow(2).sum(dims) - (d_theta - x).pow(2).sum(dims))


def kl_estimate(d_theta: Tensor, d_ref: Tensor, weight: Tensor) -> Tensor:
    """Per-sample w ||D_theta - D_ref||^2: the one-sample Girsanov estimate of KL(p_theta || p_ref)."""
    return weight * (d_theta - d_ref).pow(2).sum(tuple(range(1, d_theta.ndim)))


def classifier_reward(logits: Tensor, labels: Tensor, log: bool) -> Tensor:
    """log p(c | x) (or p(c | x)) of the asked classes from classifier logits."""
    logp = logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    return logp if log else logp.exp()


def ink_reward(x: Tensor) -> Tensor:
    """Mean ink fraction (x + 1) / 2 of images in [-1, 1] (ink is +1): thicker strokes, more reward."""
    return ((x.clamp(-1, 1) + 1) / 2).flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class CRD(Recipe):
    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int,
                 image_shape: tuple[int, ...], classifier: nn.Module | None = None, start: Denoiser | None = None):
        self.cfg, self.guidance_scale, self.image_shape = cfg, guidance_scale, tuple(image_shape)
        self.teacher = teacher.eval().requires_grad_(False)
        self.generator = student_from_teacher(teacher) if start is None else start
        self.reference = self.teacher if cfg.kl_reference == "teacher" else self.generator.copy(trainable=False)
        self.ref_guidance = guidance_scale if cfg.kl_reference == "teacher" else 1.0
        self.classifier = classifier.eval().requires_grad_(False) if classifier is not None else None
        self.schedule = student_schedule(self.generator, num_steps)
        self.target_decay = cfg.old_decay  # the old network: p_old of the implicit reward, and the sampler

    def reward(self, x: Tensor, cond: Condition) -> Tensor:
        """r(x, c) per sample (no gradient is needed: CRD's reward is a black box)."""
        if self.cfg.reward == "ink":
            return ink_reward(x)
        res = self.classifier.resolution
        if x.shape[-1] != res:
            x = F.interpolate(x.float(), size=(res, res), mode="bilinear", align_corners=False)
        logits = self.classifier(x.float().clamp(-1, 1))
        return classifier_reward(logits, cond["class_labels"], log=self.cfg.reward == "classifier_logprob")

    def grouped_condition(self, cond: Condition) -> Condition:
        """The batch's first B / K labels, each repeated K times (consecutive groups share a condition)."""
        if "class_labels" not in cond:
            raise ValueError("crd centres rewards per class: it needs class_labels in the batch condition")
        labels = cond["class_labels"]
        k = self.cfg.group_size
        return {"class_labels": labels[: labels.shape[0] // k].repeat_interleave(k)}

    def weight(self, u: Tensor, t: Tensor, dims: int) -> Tensor:
        process = self.teacher.process
        if self.cfg.weighting == "elbo":
            return elbo_weight(process, u, self.cfg.max_t - self.cfg.min_t)
        return edm_weight(process, t, dims)

    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if nets.target is None:
            raise RuntimeError("crd needs the trainer's target network (the old network); nets.target is None")
        cfg, cond = self.cfg, self.grouped_condition(batch.cond)
        labels = cond["class_labels"]
        n, device = labels.shape[0], labels.device
        with torch.no_grad():  # samples of the old network (the decoupled sampler) and their rewards
            x = rollout(nets.target, self.schedule, cond, torch.randn((n, *self.image_shape), device=device))
            r = self.reward(x, cond).float()
        u = torch.rand(n, device=device) * (cfg.max_t - cfg.min_t) + cfg.min_t
        t = self.teacher.process.from_unit(u)
        x_t = add_noise(self.teacher.process, x, torch.randn_like(x), t)
        with torch.no_grad():
            d_old = nets.target(x_t, t, cond)
            d_ref = self.reference(x_t, t, cond, guidance_scale=self.ref_guidance) if cfg.kl_weight > 0 else None
        d_theta = nets.trained(x_t, t, cond)
        w = self.weight(u, t, x[0].numel())
        ell = implicit_reward(x, d_theta, d_old, w)
        loss_crd = crd_loss(ell, r, cfg.beta, cfg.group_size).mean()
        loss = loss_crd
        logs = {"crd_loss": loss_crd.item(), "reward": r.mean().item(), "implicit_reward_abs": ell.abs().mean().item()}
        if d_ref is not None:
            kl = kl_estimate(d_theta, d_ref, w).mean()
            loss = loss + cfg.kl_weight * kl
            logs["kl"] = kl.item()
        logs["loss"] = loss.item()
        return loss, logs

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return rollout(generator, self.schedule, cond, noise)

    @torch.no_grad()
    def diagnostics(self, generator: nn.Module, cond: Condition, noise: Tensor) -> dict[str, float]:
        """reward: the mean external reward of the student's k-step samples."""
        return {"reward": self.reward(self.generate(generator, cond, noise), cond).mean().item()}


def load_start(folder: str, teacher: Denoiser) -> Denoiser:
    """The network of an exported pipeline folder, as a trainable student of the teacher's architecture: the
    export drops the null-class embedding row (it only serves guidance), so the teacher's is put back (an
    unguided student never reads it; a re-export drops it again)."""
    from distill.base.paths import resolve_path
    from distill.models.denoiser import load_denoiser

    loaded = load_denoiser(resolve_path(folder), prediction="cm")
    start = student_from_teacher(teacher)
    if loaded.process != teacher.process:
        raise ConfigError(f"recipe.init_from: {folder} samples under {loaded.process}, the teacher under "
                          f"{teacher.process}")
    state, own = loaded.model.state_dict(), start.model.state_dict()
    key = "class_embedding.weight"
    if key in state and key in own and state[key].shape[0] == own[key].shape[0] - 1:
        state[key] = torch.cat([state[key], own[key][-1:].to(state[key])])
    try:
        start.model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"recipe.init_from: {folder} does not hold a network of the teacher's architecture "
                          f"({str(e).splitlines()[0]})") from None
    return start


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> CRD:
    classifier = None
    if cfg.recipe.reward != "ink":
        # the shipped digits classifier (the FD-digits judge's network, distill/assets/digits_classifier) as a frozen
        # reward model, made where the teacher is (the registry moves only trained networks)
        classifier = load_classifier(ASSETS / "digits_classifier", functools.partial(ConvClassifier, 1),
                                     "digits classifier", "scripts/train_digits_classifier.py")
        classifier = classifier.to(next(teacher.parameters()).device)
    start = load_start(cfg.recipe.init_from, teacher) if cfg.recipe.init_from else None
    return CRD(cfg.recipe, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, tuple(dataset.image_shape),
               classifier, start)
