"""Noise processes, prediction types and time conventions, as pure functions.

Every teacher family corrupts data the same way, x_t = alpha(t) x0 + sigma(t) eps with eps ~ N(0, I);
families differ only in how they name time and what their network outputs. This module holds:

* prediction conversions: any prediction kind <-> the x0 estimate, given (x_t, alpha, sigma);
* processes: VP (discrete DDPM timesteps), rectified flow (with static or dynamic shift), TrigFlow and EDM, each
  mapping its native time to (alpha, sigma), to the value the network is fed, and from a "unit time"
  u in [0, 1] (0 clean, 1 pure noise) that recipes use to sample noise levels family-agnostically;
* time conversions between conventions (log-SNR, EDM sigma, flow shift, TrigFlow <-> flow), and few-step
  timestep spacings.

Prediction kinds (the vocabulary recipes and denoisers share):

==============  ====================================================================================
``"x0"``        the clean-data estimate (diffusers' ``"sample"``)
``"epsilon"``   the noise estimate
``"v"``         v = alpha eps - sigma x0 (Salimans & Ho 2022; diffusers' ``"v_prediction"`` for VP)
``"flow"``      u = eps - x0, the rectified-flow velocity dx/ds for x_s = (1 - s) x0 + s eps
``"trigflow"``  F with sigma_d F = (cos t x_t - x0) / sin t (sCM, arXiv 2410.11081 eq. 6); alpha = cos t,
                sigma = sigma_d sin t
``"edm"``       raw EDM network output F with x0 = c_skip x + c_out F (Karras et al. 2022, Table 1);
                alpha = 1
``"cm"``        raw consistency-model output with the boundary scalings of diffusers'
                CMStochasticIterativeScheduler (Song et al. 2023, App. C): c_skip, c_out vanish/equal 1 at
                sigma_min; alpha = 1
==============  ====================================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch
from torch import Tensor

PredictionKind = Literal["x0", "epsilon", "v", "flow", "trigflow", "edm", "cm"]
PREDICTION_KINDS: tuple[str, ...] = ("x0", "epsilon", "v", "flow", "trigflow", "edm", "cm")

# diffusers' scheduler `prediction_type` names -> ours.
DIFFUSERS_PREDICTION_TYPES = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}


def _check_kind(kind: str) -> None:
    if kind not in PREDICTION_KINDS:
        raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTION_KINDS}")


# ---------------------------------------------------------------------------------------------------------------
# Preconditioning (EDM and consistency-model boundary scalings)
# ---------------------------------------------------------------------------------------------------------------


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1): returns (c_skip, c_out, c_in)."""
    denom = sigma**2 + sigma_data**2
    return sigma_data**2 / denom, sigma * sigma_data / denom.sqrt(), 1.0 / denom.sqrt()


def cm_scalings(sigma: Tensor, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor, Tensor]:
    """Consistency-model boundary scalings (Song et al. 2023, App. C), as CMStochasticIterativeScheduler uses them.

    Returns (c_skip, c_out, c_in); c_skip = 1 and c_out = 0 at sigma = sigma_min, so f(x, sigma_min) = x.
    """
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, 1.0 / (sigma**2 + sigma_data**2).sqrt()


# ---------------------------------------------------------------------------------------------------------------
# Prediction conversions: pure functions of (prediction, x_t, alpha, sigma)
# ---------------------------------------------------------------------------------------------------------------


def to_x0(
    pred: Tensor,
    kind: str,
    x_t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    *,
    sigma_data: float = 1.0,
    sigma_min: float = 0.0,
) -> Tensor:
    """The x0 estimate implied by a prediction of `kind` at x_t = alpha x0 + sigma eps.

    `alpha` and `sigma` broadcast against `x_t`. For "trigflow", sigma = sigma_data sin t and alpha = cos t;
    for "edm" and "cm", alpha = 1 and sigma is the EDM noise level.
    """
    _check_kind(kind)
    if kind == "x0":
        return pred
    if kind == "epsilon":
        return (x_t - sigma * pred) / alpha
    if kind == "v":
        # v = alpha eps - sigma x0 and x_t = alpha x0 + sigma eps  =>  alpha x_t - sigma v = (alpha^2 + sigma^2) x0
        return (alpha * x_t - sigma * pred) / (alpha**2 + sigma**2)
    if kind == "flow":
        # u = eps - x0, x_t = alpha x0 + sigma eps  =>  x_t - sigma u = (alpha + sigma) x0
        return (x_t - sigma * pred) / (alpha + sigma)
    if kind == "trigflow":
        # sCM eq. 6: f(x_t, t) = cos(t) x_t - sin(t) sigma_d F; TrigFlow states x_t with alpha = cos t.
        sin_t = sigma / sigma_data
        return alpha * x_t - sin_t * sigma_data * pred
    if kind == "edm":
        c_skip, c_out, _ = edm_scalings(sigma / alpha, sigma_data)
        return c_skip * (x_t / alpha) + c_out * pred
    c_skip, c_out, _ = cm_scalings(sigma / alpha, sigma_data, sigma_min)
    return c_skip * (x_t / alpha) + c_out * pred


def from_x0(
    x0: Tensor,
    kind: str,
    x_t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    *,
    sigma_data: float = 1.0,
    sigma_min: float = 0.0,
) -> Tensor:
    """The prediction of `kind` that corresponds to the x0 estimate `x0` at x_t (inverse of :func:`to_x0`)."""
    _check_kind(kind)
    if kind == "x0":
        return x0
    eps = (x_t - alpha * x0) / sigma
    if kind == "epsilon":
        return eps
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "flow":
        return eps - x0
    if kind == "trigflow":
        sin_t = sigma / sigma_data
        return (alpha * x_t - x0) / (sin_t * sigma_data)
    if kind == "edm":
        c_skip, c_out, _ = edm_scalings(sigma / alpha, sigma_data)
        return (x0 - c_skip * (x_t / alpha)) / c_out
    c_skip, c_out, _ = cm_scalings(sigma / alpha, sigma_data, sigma_min)
    return (x0 - c_skip * (x_t / alpha)) / c_out


def convert(
    pred: Tensor,
    from_kind: str,
    to_kind: str,
    x_t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    *,
    sigma_data: float = 1.0,
    sigma_min: float = 0.0,
) -> Tensor:
    """Convert a prediction between kinds at the same (x_t, alpha, sigma)."""
    if from_kind == to_kind:
        _check_kind(from_kind)
        return pred
    x0 = to_x0(pred, from_kind, x_t, alpha, sigma, sigma_data=sigma_data, sigma_min=sigma_min)
    return from_x0(x0, to_kind, x_t, alpha, sigma, sigma_data=sigma_data, sigma_min=sigma_min)


def eps_from_x0(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """The noise estimate implied by an x0 estimate."""
    return (x_t - alpha * x0) / sigma


def ode_velocity(x0: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, dalpha: Tensor, dsigma: Tensor) -> Tensor:
    """Probability-flow ODE velocity dx_t/dt = alpha'(t) x0_hat + sigma'(t) eps_hat.

    With the exact denoiser x0_hat = E[x0 | x_t] this is the exact PF-ODE drift for x_t = alpha x0 + sigma eps.
    """
    return dalpha * x0 + dsigma * eps_from_x0(x0, x_t, alpha, sigma)


# ---------------------------------------------------------------------------------------------------------------
# Time conventions
# ---------------------------------------------------------------------------------------------------------------


def log_snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """lambda = log(alpha^2 / sigma^2): the family-independent noise level."""
    return 2.0 * (torch.log(alpha) - torch.log(sigma))


def edm_sigma(alpha: Tensor, sigma: Tensor) -> Tensor:
    """The EDM noise level of (alpha, sigma): x_t / alpha = x0 + (sigma / alpha) eps."""
    return sigma / alpha


def flow_shift(s: Tensor, shift: float) -> Tensor:
    """Static shift of rectified-flow time (SD3): s -> k s / (1 + (k - 1) s)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_dynamic_shift(s: Tensor, mu: float) -> Tensor:
    """Resolution-dependent ("dynamic") shift as diffusers' `time_shift_type="exponential"`: exp(mu) s / (...)."""
    e = math.exp(mu)
    return e * s / (e * s + (1.0 - s))


def flow_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for :func:`flow_dynamic_shift`, linear in the token count (Flux's `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def trigflow_from_flow(s: Tensor) -> Tensor:
    """TrigFlow time t for rectified-flow time s (sd = 1): s = sin t / (cos t + sin t)  <=>  t = atan(s / (1 - s))."""
    return torch.atan2(s, 1.0 - s)


def flow_from_trigflow(t: Tensor) -> Tensor:
    """Rectified-flow time s for TrigFlow time t (sd = 1); the state maps as x_flow = x_trig / (cos t + sin t)."""
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def karras_sigmas(u: Tensor, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5 ramp: u = 0 -> sigma_min, u = 1 -> sigma_max."""
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (lo + u * (hi - lo)) ** rho


def vp_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> list[int]:
    """The integer timesteps a `num_steps` sampler visits, as diffusers' DDIM/DDPM `timestep_spacing` does.

    "trailing" always starts at T - 1 (the choice few-step students need); "leading" starts at
    (num_steps - 1) * (T // num_steps) + steps_offset; "linspace" rounds an even grid over [0, T - 1].
    """
    t = num_train_timesteps
    if num_steps < 1 or num_steps > t:
        raise ValueError(f"num_steps must be in [1, {t}], got {num_steps}")
    if spacing == "trailing":
        ratio = t / num_steps
        steps = [int(round(t - i * ratio)) - 1 for i in range(num_steps)]
    elif spacing == "leading":
        ratio = t // num_steps
        steps = [(num_steps - 1 - i) * ratio + steps_offset for i in range(num_steps)]
    elif spacing == "linspace":
        steps = [int(round(x)) for x in torch.linspace(0, t - 1, num_steps).flip(0).tolist()]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected 'trailing', 'leading' or 'linspace'")
    return steps


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------


class Process(Protocol):
    """A Gaussian forward process in its native time.

    Recipes address noise levels through `from_unit(u)` (u in [0, 1], 0 clean, 1 noisiest) so they never
    depend on a family's own time convention; denoisers call `model_time` and `input_scale` to feed networks.
    """

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]: ...

    def model_time(self, t: Tensor) -> Tensor: ...

    def input_scale(self, t: Tensor) -> Tensor: ...

    def from_unit(self, u: Tensor) -> Tensor: ...


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def add_noise(process: Process, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = alpha(t) x0 + sigma(t) eps, with per-sample t of shape (N,)."""
    alpha, sigma = process.alpha_sigma(t)
    return _bcast(alpha, x0).to(x0.dtype) * x0 + _bcast(sigma, x0).to(x0.dtype) * eps


@dataclass(frozen=True)
class VPProcess:
    """Variance preserving, discrete timesteps t in {0, ..., T-1} (DDPM / SD1.5 / SDXL).

    Fractional t interpolates log-SNR linearly between neighbouring timesteps.
    """

    alphas_cumprod: tuple[float, ...]

    @classmethod
    def from_scheduler_config(cls, config) -> "VPProcess":
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(dict(config))
        return cls(tuple(float(a) for a in sched.alphas_cumprod))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ac = torch.tensor(self.alphas_cumprod, dtype=torch.float64, device=t.device)
        lam = torch.log(ac) - torch.log1p(-ac)
        tf = t.to(torch.float64).clamp(0, len(ac) - 1)
        lo = tf.floor().long()
        hi = (lo + 1).clamp(max=len(ac) - 1)
        w = tf - lo
        lam_t = lam[lo] * (1 - w) + lam[hi] * w
        alpha2 = torch.sigmoid(lam_t)
        return alpha2.sqrt().float(), (1 - alpha2).sqrt().float()

    def model_time(self, t: Tensor) -> Tensor:
        return t

    def input_scale(self, t: Tensor) -> Tensor:
        return torch.ones_like(t, dtype=torch.float32)

    def from_unit(self, u: Tensor) -> Tensor:
        return (u * (self.num_train_timesteps - 1)).round().long()


@dataclass(frozen=True)
class FlowProcess:
    """Rectified flow in diffusers' convention: x_s = (1 - s) x0 + s eps, s in [0, 1], network fed 1000 s.

    `shift` applies to unit time (u -> shifted s); `mu` (if set) applies the dynamic, resolution-dependent shift.
    """

    shift: float = 1.0
    mu: float | None = None
    timestep_scale: float = 1000.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.float()
        return 1.0 - t, t

    def model_time(self, t: Tensor) -> Tensor:
        return t.float() * self.timestep_scale

    def input_scale(self, t: Tensor) -> Tensor:
        return torch.ones_like(t, dtype=torch.float32)

    def from_unit(self, u: Tensor) -> Tensor:
        u = u.float()
        if self.mu is not None:
            return flow_dynamic_shift(u, self.mu)
        return flow_shift(u, self.shift)


@dataclass(frozen=True)
class TrigFlowProcess:
    """TrigFlow (sCM): x_t = cos(t) x0 + sin(t) z, z ~ N(0, sd^2 I), t in [0, pi/2]; network sees x_t / sd.

    `time_scale` is c_noise(t) = time_scale * t (sCM uses 1000 t for diffusers-style embeddings).
    """

    sigma_data: float = 0.5
    time_scale: float = 1000.0
    t_max: float = math.atan(80.0 / 0.5)
    t_min: float = 0.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.float()
        return torch.cos(t), torch.sin(t) * self.sigma_data

    def model_time(self, t: Tensor) -> Tensor:
        return t.float() * self.time_scale

    def input_scale(self, t: Tensor) -> Tensor:
        return torch.full_like(t, 1.0 / self.sigma_data, dtype=torch.float32)

    def from_unit(self, u: Tensor) -> Tensor:
        return self.t_min + u.float() * (self.t_max - self.t_min)


@dataclass(frozen=True)
class EDMProcess:
    """EDM (Karras et al. 2022): x = x0 + sigma eps, native time = sigma.

    The network is fed c_in x and c_noise = `noise_scale` * log(sigma); noise_scale = 250 is the consistency-model
    convention of diffusers' CMStochasticIterativeScheduler (1000 * 0.25 * log sigma), which lets a student
    exported under that scheduler start from this teacher's weights unchanged.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    noise_scale: float = 250.0

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.float()
        return torch.ones_like(t), t

    def model_time(self, t: Tensor) -> Tensor:
        return self.noise_scale * torch.log(t.float() + 1e-44)

    def input_scale(self, t: Tensor) -> Tensor:
        return 1.0 / (t.float() ** 2 + self.sigma_data**2).sqrt()

    def from_unit(self, u: Tensor) -> Tensor:
        return karras_sigmas(u.float(), self.sigma_min, self.sigma_max, self.rho)


# ---------------------------------------------------------------------------------------------------------------
# Any process seen as TrigFlow (sCM, arXiv 2410.11081 sec. 2): one noise level, three names
# ---------------------------------------------------------------------------------------------------------------


def native_time_from_edm_sigma(process: Process, sigma: Tensor) -> Tensor:
    """The native time of `process` whose EDM noise level sigma(t) / alpha(t) equals `sigma`.

    Differentiable in `sigma` (forward AD included) for EDM, rectified flow and TrigFlow; for VP the fractional
    timestep is found by a search over the log-SNR table and then interpolated linearly in log-SNR (as
    `VPProcess.alpha_sigma` does), so it is differentiable within a table interval.
    """
    if isinstance(process, EDMProcess):
        return sigma
    if isinstance(process, FlowProcess):
        return sigma / (1.0 + sigma)  # x_s / (1 - s) = x0 + s / (1 - s) eps
    if isinstance(process, TrigFlowProcess):
        return torch.atan(sigma / process.sigma_data)
    if isinstance(process, VPProcess):
        ac = torch.tensor(process.alphas_cumprod, dtype=torch.float64, device=sigma.device)
        lam = (torch.log(ac) - torch.log1p(-ac)).flip(0)  # increasing in reversed time
        target = -2.0 * torch.log(sigma.to(torch.float64))
        hi_rev = torch.searchsorted(lam, target.detach()).clamp(1, len(ac) - 1)
        lo_rev = hi_rev - 1
        w = (target - lam[lo_rev]) / (lam[hi_rev] - lam[lo_rev])
        t_rev = lo_rev.to(torch.float64) + w  # position in the reversed table
        return (len(ac) - 1 - t_rev).clamp(0, len(ac) - 1).to(sigma.dtype)
    raise NotImplementedError(f"no EDM-sigma -> native time map for {type(process).__name__}")


def edm_sigma_range(process: Process) -> tuple[float, float]:
    """The EDM noise levels sigma / alpha that `process`'s native times reach: a VP process's table ends at
    timesteps 0 and T - 1 (SD: 0.029 and 14.6); EDM, rectified flow and TrigFlow reach every level."""
    if isinstance(process, VPProcess):
        ends = torch.tensor([0.0, process.num_train_timesteps - 1.0])
        alpha, sigma = process.alpha_sigma(ends)
        lo, hi = (sigma / alpha).tolist()
        return lo, hi
    return 0.0, math.inf


def trigflow_to_native(process: Process, x_trig: Tensor, t: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """(x_native, native time) of the TrigFlow state x_trig = cos t x0 + sin t z, z ~ N(0, sigma_data^2 I).

    x_trig / cos t = x0 + sigma_data tan t eps is the EDM state at sigma = sigma_data tan t; the native state is
    alpha(native t) times it.
    """
    cos_t = torch.cos(t)
    native_t = native_time_from_edm_sigma(process, sigma_data * torch.tan(t))
    alpha, _ = process.alpha_sigma(native_t)
    scale = _bcast(alpha.to(x_trig.dtype) / cos_t.to(x_trig.dtype), x_trig)
    return x_trig * scale, native_t


def trigflow_from_x0(x0: Tensor, x_trig: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow network output F of an x0 estimate: sigma_d F = (cos t x_t - x0) / sin t (sCM eq. 6)."""
    cos_t, sin_t = _bcast(torch.cos(t), x_trig), _bcast(torch.sin(t), x_trig)
    return (cos_t * x_trig - x0) / (sigma_data * sin_t)


# ---------------------------------------------------------------------------------------------------------------
# The flow view of a process: x_s = (1 - s) x0 + s z, s in [0, 1], mapped to the network's native state and time
# (reflow, InstaFlow, flow maps, MDT-dist and Self-E all train in it)
# ---------------------------------------------------------------------------------------------------------------


def flow_range(process) -> tuple[float, float]:
    """The flow times (s_min, s_max) a network of `process` covers (EDM: sigma / (1 + sigma) at its ends)."""
    if isinstance(process, EDMProcess):
        return process.sigma_min / (1 + process.sigma_min), process.sigma_max / (1 + process.sigma_max)
    if isinstance(process, FlowProcess):
        return 0.0, 1.0
    raise NotImplementedError(f"no flow view of a {type(process).__name__} network yet (EDM and "
                              "rectified-flow teachers are supported)")


def flow_to_native(process, x_s: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, t): the network's native state and time with the same signal-to-noise ratio as flow state x_s."""
    shape = (-1,) + (1,) * (x_s.ndim - 1)
    if isinstance(process, EDMProcess):
        sigma = s / (1 - s)
        return x_s / (1 - s).reshape(shape).to(x_s.dtype), sigma
    if isinstance(process, FlowProcess):
        return x_s, s
    flow_range(process)  # raises the clear error
    raise AssertionError


def flow_velocity(net: Callable[[Tensor, Tensor, dict[str, Tensor]], Tensor], process, x_s: Tensor, s: Tensor,
                  cond: dict[str, Tensor]) -> Tensor:
    """v(x_s, s) = (x_s - x0_hat) / s: the velocity of x_s = (1 - s) x0 + s z implied by the network's x0."""
    x_t, t = flow_to_native(process, x_s, s)
    x0 = net(x_t, t, cond)
    return (x_s - x0) / s.reshape((-1,) + (1,) * (x_s.ndim - 1)).to(x_s.dtype)


def flow_interpolate(x1: Tensor, z: Tensor, s: Tensor) -> Tensor:
    """x_s = (1 - s) x1 + s z."""
    s = s.reshape((-1,) + (1,) * (x1.ndim - 1)).to(x1.dtype)
    return (1 - s) * x1 + s * z
