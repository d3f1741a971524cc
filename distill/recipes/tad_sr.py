"""TAD-SR: one-step diffusion super-resolution by time-aware distillation (He et al. 2024, arXiv 2408.07476).

The paper distills a multi-step SR diffusion teacher into a one-step student with (its abstract) "a novel score
distillation strategy to align the data distribution between the outputs of the student and teacher models after
minor noise perturbation", which lets the student "concentrate more on the high-frequency details", plus a latent
adversarial loss with a time-aware discriminator that uses the diffusion prior. docs/tad_sr.md says which parts are
read, which derived and which left out; this file implements, on 16x16 digits super-resolved from 4x4:

* `regression_loss`: the student's one-step output against the teacher's k-step output from the same noise and
  low-res image (the distillation term every one-step SR distillation starts from);
* `time_aware_score_loss`: the score distillation at minor noise: noise the student's and the teacher's outputs
  with the *same* eps to a small sigma ~ U[sigma_lo, sigma_hi] and push the student's output along the difference of
  the teacher's denoised estimates there, weighted per noise level (derived: see its docstring);
* `time_aware_gan_losses`: the time-aware discriminator: a small head on the frozen teacher's bottleneck features at
  the same noise level (real = ground-truth HR, fake = student), non-saturating GAN loss.

The repository's `Condition` is a dict of tensors that `Denoiser` passes to its family's `call`; the shared
`UNet2DFamily.call` hands only `class_labels` to the network. So the image condition lives in this file: the
`LowResConcatFamily` below concatenates `cond["low_res"]` (the 4x4 image upsampled to 16x16) to the noisy input as
a second channel, and a `Denoiser` built with it carries the SR condition through every prediction. What would make it
first class is one shared change: `distill.families.family_for` picking a family from the network *config*
(e.g. an `in_channels == out_channels + 1` UNet2DModel with a `low_res` condition key, or a `teacher.family` config
entry), plus an SR dataset in `distill.data`; then `load_denoiser` and `distill train` would carry it unchanged.

Because of that, this recipe is a self-contained training module driven by scripts/train_tad_sr.py, not a
`distill train` recipe.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.base.errors import ConfigError, ExportRefused
from distill.families.unet2d import UNet2DFamily
from distill.models.denoiser import Denoiser
from distill.parametrization import EDMProcess

SIGMA_DATA = 0.5
#: the SR process: EDM with the consistency-model time convention (c_noise = 250 log sigma), as the digits teacher
SR_PROCESS = EDMProcess(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
LOW_RES_KEY = "low_res"


# ---------------------------------------------------------------------------------------------------------------
# The SR condition: 4x4 average pooling, nearest upsampling, concatenation as a second input channel
# ---------------------------------------------------------------------------------------------------------------


def downsample(hr: Tensor, factor: int = 4) -> Tensor:
    """The degradation: `factor` x `factor` average pooling of (N, C, H, W) images (H, W divisible by `factor`)."""
    if hr.ndim != 4 or hr.shape[-1] % factor or hr.shape[-2] % factor:
        raise ValueError(f"downsample needs (N, C, H, W) images with H, W divisible by {factor}, got {tuple(hr.shape)}")
    return F.avg_pool2d(hr, factor)


def upsample(lr: Tensor, factor: int = 4) -> Tensor:
    """Nearest upsampling (each low-res pixel repeated `factor` x `factor` times): the channel the network sees."""
    return lr.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def low_res_condition(hr: Tensor, factor: int = 4) -> Condition:
    """The SR condition of ground-truth images `hr`: {"low_res": upsample(downsample(hr))}, same shape as `hr`."""
    return {LOW_RES_KEY: upsample(downsample(hr, factor), factor)}


class LowResConcatFamily(UNet2DFamily):
    """A `UNet2DModel` with `in_channels = 2 * out_channels`: the (scaled) noisy image and the upsampled low-res
    image concatenated along channels. Only `call` (and so the features it hooks), the null condition and the
    export differ from the shared UNet2DFamily; the low-res channel is not scaled by c_in (it is a condition, not
    the noisy state)."""

    def export_target(self, network_config: dict, scheduler_config: dict, prediction: str | None,
                      pipeline: str | None) -> None:
        raise ExportRefused("a UNet2DModel with a concatenated low-res channel has no stock diffusers pipeline: "
                            "see distill.recipes.tad_sr.export_student and docs/tad_sr.md")

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        low_res = cond.get(LOW_RES_KEY)
        if low_res is None or low_res.shape != x.shape:
            got = None if low_res is None else tuple(low_res.shape)
            raise ValueError(f"an SR denoiser needs cond['{LOW_RES_KEY}'] of the input's shape {tuple(x.shape)}, "
                             f"got {got}")
        return model(torch.cat([x, low_res.to(x.dtype)], dim=1), timestep, return_dict=False)[0]

    def null_condition(self, model: nn.Module, cond: Condition) -> Condition:
        raise ValueError("the SR denoiser has no null condition (no classifier-free guidance)")


def build_sr_unet(channels: tuple[int, ...] = (32, 64), attention: bool = False, resolution: int = 16):
    """A small pixel UNet2DModel: 2 input channels (noisy image, upsampled low-res), 1 output channel."""
    from diffusers import UNet2DModel

    n = len(channels)
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if attention else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attention else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
    return UNet2DModel(sample_size=resolution, in_channels=2, out_channels=1, block_out_channels=tuple(channels),
                       down_block_types=tuple(down), up_block_types=tuple(up), layers_per_block=1,
                       attention_head_dim=channels[-1], norm_num_groups=8, add_attention=attention)


def sr_denoiser(model: nn.Module) -> Denoiser:
    """An EDM-preconditioned SR denoiser over `model` (x0 = c_skip x + c_out F, F = model([c_in x, low_res]))."""
    if model.config.in_channels != 2 * model.config.out_channels:
        raise ConfigError(f"an SR UNet2DModel needs in_channels = 2 * out_channels, got in_channels="
                          f"{model.config.in_channels}, out_channels={model.config.out_channels}")
    return Denoiser(model, SR_PROCESS, "edm", family=LowResConcatFamily())


def load_sr_denoiser(folder: str | Path, trainable: bool = False) -> Denoiser:
    """The SR teacher (or an exported student) from a folder with `unet/` and `scheduler/`."""
    from diffusers import UNet2DModel

    root = Path(folder)
    if not (root / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{str(root / 'unet' / 'config.json')!r} is missing: not an SR teacher folder")
    model = UNet2DModel.from_pretrained(root / "unet", use_safetensors=True)
    model.requires_grad_(trainable)
    model.train(trainable)
    return sr_denoiser(model)


# ---------------------------------------------------------------------------------------------------------------
# Sampling: the teacher's k deterministic steps, the student's one step
# ---------------------------------------------------------------------------------------------------------------


def karras_grid(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """num_steps noise levels from sigma_max down to sigma_min (Karras et al. 2022, eq. 5), then 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / max(num_steps - 1, 1)
    s = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def sample_sr(denoiser: Denoiser, cond: Condition, noise: Tensor, num_steps: int) -> Tensor:
    """Deterministic DDIM / Euler sampling in x0 form on the Karras grid, one network call per step:
    x <- x0 + (sigma_next / sigma) (x - x0), starting at x = sigma_max * noise. num_steps = 1 is one call at
    sigma_max, exactly the student's one step."""
    sigmas = karras_grid(num_steps, SR_PROCESS.sigma_min, SR_PROCESS.sigma_max).to(noise.device)
    x = noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = denoiser(x, s.expand(x.shape[0]), cond)
        x = x0 + (s_next / s) * (x - x0)
    return x


def one_step(student: Denoiser, cond: Condition, noise: Tensor) -> Tensor:
    """The student's output: its x0 estimate at sigma_max from x = sigma_max * noise."""
    s = torch.full((noise.shape[0],), SR_PROCESS.sigma_max, device=noise.device)
    return student(noise * SR_PROCESS.sigma_max, s, cond)


# ---------------------------------------------------------------------------------------------------------------
# TAD-SR's losses
# ---------------------------------------------------------------------------------------------------------------


def regression_loss(student_x0: Tensor, teacher_x0: Tensor) -> Tensor:
    """||G(z, y) - T_k(z, y)||^2 per sample (pixel mean): the student's one step against the teacher's k steps from
    the same noise z and low-res image y."""
    return (student_x0 - teacher_x0).pow(2).flatten(1).mean(1)


def time_aware_weight(sigma: Tensor, sigma_data: float = SIGMA_DATA) -> Tensor:
    """w(sigma) = (sigma^2 + sigma_data^2) / sigma (derived): on data N(mu, sigma_data^2 I) it makes the score
    term's gradient exactly x_s - x_T at every sigma (see `time_aware_score_loss`), so no noise level dominates."""
    return (sigma**2 + sigma_data**2) / sigma


def time_aware_score_gradient(teacher: Denoiser, x_student: Tensor, x_teacher: Tensor, cond: Condition,
                              sigma: Tensor, eps: Tensor) -> Tensor:
    """g = eps_T(x_s + sigma eps, sigma) - eps_T(x_T + sigma eps, sigma), eps_T(x, sigma) = (x - D_T(x, sigma)) / sigma.

    The score distillation at minor noise, as derived from TAD-SR's abstract: both outputs are perturbed with the
    *same* eps, so the SDS noise term cancels and what remains is the difference of the teacher's noise estimates,
    i.e. of what the teacher's denoiser removes at that level -- the high-frequency residual x - D_T(x) at small
    sigma. Equivalently g = [(x_s - x_T) - (D_T(x_s^sigma) - D_T(x_T^sigma))] / sigma. No gradient."""
    with torch.no_grad():
        s = _per_sample(sigma, x_student)
        d_s = teacher(x_student + s * eps, sigma, cond)
        d_t = teacher(x_teacher + s * eps, sigma, cond)
        return ((x_student - x_teacher) - (d_s - d_t)) / s


def time_aware_score_loss(x_student: Tensor, gradient: Tensor, weight: Tensor) -> Tensor:
    """0.5 w(sigma) ||x_s - sg(x_s - g)||^2 per sample (pixel mean): its gradient in x_s is w g / D (D pixels),
    the SDS-style update that skips the teacher's Jacobian (Poole et al. 2022; DMD, Yin et al. 2024, eq. 7)."""
    target = (x_student - gradient).detach()
    return 0.5 * _per_sample(weight, x_student).flatten(1)[:, 0] * (x_student - target).pow(2).flatten(1).mean(1)


def sample_minor_sigma(n: int, sigma_range: tuple[float, float], generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> Tensor:
    """Minor noise levels, log-uniform in [sigma_lo, sigma_hi] (derived: the paper says only "minor noise")."""
    lo, hi = sigma_range
    if not 0.0 < lo <= hi:
        raise ValueError(f"sigma_range must satisfy 0 < lo <= hi, got {sigma_range}")
    u = torch.rand(n, generator=generator).to(device)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


class TimeAwareHead(nn.Module):
    """The discriminator head on the frozen teacher's bottleneck features at noise level sigma: the features carry
    sigma through the teacher's time embedding, so the discriminator is time-aware (TAD-SR's "time-aware
    discriminator that leverages diffusion priors"; its architecture in the paper was not read: this is ours)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.Conv2d(channels, 1, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).flatten(1).mean(1)


def time_aware_logits(teacher: Denoiser, head: TimeAwareHead, x: Tensor, cond: Condition, sigma: Tensor,
                      eps: Tensor) -> Tensor:
    """Logits of images `x` noised to sigma: head(teacher features of x + sigma eps at sigma)."""
    _, feats = teacher.with_features(x + _per_sample(sigma, x) * eps, sigma, cond)
    return head(feats)


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(-D(fake)), per sample."""
    return F.softplus(-fake_logits)


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """softplus(-D(real)) + softplus(D(fake)), per sample."""
    return F.softplus(-real_logits) + F.softplus(fake_logits)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Training (a self-contained module: see the module docstring for why it is not a `distill train` recipe)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TADSRConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-5
    disc_lr: float = 2e-4
    teacher_steps: int = 8           #: k: the teacher's sampler steps that make the regression targets
    pairs_per_image: int = 1         #: teacher targets precomputed per train image (fixed noise each)
    regression_weight: float = 1.0
    score_weight: float = 1.0        #: lambda of the time-aware score distillation term
    gan_weight: float = 0.0          #: lambda of the time-aware GAN term (0: no discriminator updates)
    sigma_range: tuple[float, float] = (0.05, 0.5)  #: minor noise levels of the score term and the discriminator
    seed: int = 0

    def check(self) -> None:
        for name in ("steps", "batch_size", "teacher_steps", "pairs_per_image"):
            if getattr(self, name) < 1:
                raise ConfigError(f"tad_sr.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("regression_weight", "score_weight", "gan_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"tad_sr.{name} must be >= 0, got {getattr(self, name)}")
        if self.regression_weight == self.score_weight == self.gan_weight == 0:
            raise ConfigError("tad_sr: every loss weight is 0; nothing would train")
        lo, hi = self.sigma_range
        if not 0.0 < lo <= hi:
            raise ConfigError(f"tad_sr.sigma_range must satisfy 0 < lo <= hi, got {self.sigma_range}")


def teacher_targets(teacher: Denoiser, images: Tensor, cfg: TADSRConfig, generator: torch.Generator,
                    chunk: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """(hr, noise, teacher output): `pairs_per_image` fixed noises per train image and the teacher's k-step SR."""
    hr = images.repeat(cfg.pairs_per_image, 1, 1, 1)
    noise = torch.randn(hr.shape, generator=generator)
    outs = []
    with torch.no_grad():
        for i in range(0, len(hr), chunk):
            outs.append(sample_sr(teacher, low_res_condition(hr[i:i + chunk]), noise[i:i + chunk], cfg.teacher_steps))
    return hr, noise, torch.cat(outs)


def train_tad_sr(teacher: Denoiser, images: Tensor, cfg: TADSRConfig, log_every: int = 50) -> tuple[Denoiser, list]:
    """Distil `teacher` into a one-step student initialised from it, on the train images `images` (half B).

    Per update: one discriminator step (when gan_weight > 0), then one student step on
    regression_weight * regression + score_weight * time-aware score + gan_weight * GAN. Returns the student and
    the logged rows."""
    cfg.check()
    gen = torch.Generator().manual_seed(cfg.seed)
    teacher.model.requires_grad_(False).eval()
    student = teacher.copy(trainable=True)
    opt = torch.optim.Adam(student.model.parameters(), lr=cfg.lr)
    head = TimeAwareHead(teacher.family.feature_channels(teacher.model)) if cfg.gan_weight > 0 else None
    disc_opt = torch.optim.Adam(head.parameters(), lr=cfg.disc_lr, betas=(0.0, 0.99)) if head is not None else None
    hr_all, noise_all, target_all = teacher_targets(teacher, images, cfg, gen)
    rows = []
    for step in range(cfg.steps):
        idx = torch.randint(0, len(hr_all), (cfg.batch_size,), generator=gen)
        hr, noise, target = hr_all[idx], noise_all[idx], target_all[idx]
        cond = low_res_condition(hr)
        sigma = sample_minor_sigma(cfg.batch_size, cfg.sigma_range, gen)
        eps = torch.randn(hr.shape, generator=gen)
        logs: dict[str, float] = {"step": step}
        if head is not None:  # the time-aware discriminator's step: real = ground truth, fake = the student
            with torch.no_grad():
                fake = one_step(student, cond, noise)
            d_loss = gan_discriminator_loss(time_aware_logits(teacher, head, hr, cond, sigma, eps),
                                            time_aware_logits(teacher, head, fake, cond, sigma, eps)).mean()
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            logs["disc_loss"] = d_loss.item()
        x_s = one_step(student, cond, noise)
        loss = cfg.regression_weight * regression_loss(x_s, target)
        logs["regression"] = regression_loss(x_s.detach(), target).mean().item()
        if cfg.score_weight > 0:
            g = time_aware_score_gradient(teacher, x_s.detach(), target, cond, sigma, eps)
            loss = loss + cfg.score_weight * time_aware_score_loss(x_s, g, time_aware_weight(sigma))
            logs["score_grad_rms"] = g.pow(2).mean().sqrt().item()
        if head is not None:
            head.requires_grad_(False)
            loss = loss + cfg.gan_weight * gan_generator_loss(time_aware_logits(teacher, head, x_s, cond, sigma, eps))
            head.requires_grad_(True)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.model.parameters(), 1.0)
        opt.step()
        logs["loss"] = loss.item()
        rows.append(logs)
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print("  ".join(f"{k} {v:.4g}" for k, v in logs.items()), flush=True)
    student.model.requires_grad_(False).eval()
    return student, rows


# ---------------------------------------------------------------------------------------------------------------
# Export: a UNet2DModel folder + scheduler config, and a model card whose plain-diffusers code is the one step
# ---------------------------------------------------------------------------------------------------------------

#: The model card's code: loads the folder with plain diffusers and reproduces `one_step` (no distill import).
CARD_CODE = '''import torch
from diffusers import UNet2DModel


def super_resolve(unet: UNet2DModel, low_res: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """low_res: (N, 1, 4, 4) in [-1, 1] (4x4 average pooling of a 16x16 digit); noise: (N, 1, 16, 16) standard
    normal. Returns the (N, 1, 16, 16) super-resolved images in [-1, 1] (clamp before saving)."""
    sigma_max, sigma_data = {sigma_max!r}, {sigma_data!r}
    sigma = torch.full((noise.shape[0],), sigma_max)
    x = noise * sigma_max
    up = low_res.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)  # nearest 4x upsampling
    denom = (sigma**2 + sigma_data**2).view(-1, 1, 1, 1)
    c_in, c_skip = 1.0 / denom.sqrt(), sigma_data**2 / denom
    c_out = sigma.view(-1, 1, 1, 1) * sigma_data / denom.sqrt()
    t = 250.0 * torch.log(sigma + 1e-44)  # the time input: 250 log(sigma)
    raw = unet(torch.cat([x * c_in, up.to(x.dtype)], dim=1), t, return_dict=False)[0]
    return c_skip * x + c_out * raw


unet = UNet2DModel.from_pretrained("{folder}/unet").eval()
'''


def export_student(student: Denoiser, out_dir: str | Path, info: dict | None = None) -> Path:
    """Write the one-step student as `unet/` (UNet2DModel, safetensors) + `scheduler/` (CMStochasticIterative-
    Scheduler config holding sigma_min/max/data) + README.md, whose code reproduces `one_step` with diffusers only.

    No stock diffusers pipeline fits (docs/tad_sr.md): the nearest, LDMSuperResolutionPipeline, concatenates the
    low-res image the same way but always decodes through a VQModel (quantisation and a conv decoder, which cannot
    be the identity) and runs the concatenated input through `scheduler.scale_model_input`."""
    from diffusers import CMStochasticIterativeScheduler

    out = Path(out_dir)
    student.model.save_pretrained(out / "unet", safe_serialization=True)
    CMStochasticIterativeScheduler(sigma_min=SR_PROCESS.sigma_min, sigma_max=SR_PROCESS.sigma_max,
                                   sigma_data=SIGMA_DATA).save_pretrained(out / "scheduler")
    code = CARD_CODE.format(sigma_max=float(SR_PROCESS.sigma_max), sigma_data=float(SIGMA_DATA), folder=str(out))
    (out / "README.md").write_text(
        "# TAD-SR one-step digits super-resolution student\n\n"
        "A diffusers `UNet2DModel` (in_channels=2: the noisy image and the 4x4 low-res image upsampled 4x by nearest\n"
        "repetition; out_channels=1) distilled by `distill.recipes.tad_sr` (TAD-SR, arXiv 2408.07476) into one step\n"
        "from the EDM SR teacher `distill/assets/digits_sr_teacher`. No stock diffusers pipeline can run it (see\n"
        "docs/tad_sr.md); this code, with plain torch and diffusers, reproduces the one-step output (to 1e-6,\n"
        "tested):\n\n"
        f"```python\n{code}```\n\n"
        + (f"Training: `{json.dumps(info)}`\n" if info else ""))
    return out
