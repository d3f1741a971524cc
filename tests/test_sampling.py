"""DPM-Solver++(2M) against the exact probability-flow ODE of Gaussian data.

For x0 ~ N(mu, c^2) the exact denoiser is affine and the PF-ODE keeps z = (x_t - alpha mu) / sqrt(alpha^2 c^2 +
sigma^2) constant, so the ODE maps a start x_T to x_0 = mu + c z_T exactly. The samplers start from sigma_T noise
(the alpha_T x0 part is neglected), so the reference is taken from that actual start.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from tiny import tiny_unet

from distill.models.denoiser import Denoiser
from distill.models.sampling import dpm_solver_2m, sample, unit_grid
from distill.parametrization import EDMProcess, FlowProcess, TrigFlowProcess, VPProcess

F64 = torch.float64
D = 16


def _gaussian(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(D, generator=g, dtype=F64)
    c = 0.5 + 0.5 * torch.rand(D, generator=g, dtype=F64)
    noise = torch.randn(64, D, generator=g, dtype=F64)
    return mu, c, noise


def _exact_x0(x, alpha, sigma, mu, c):
    return mu + alpha * c**2 * (x - alpha * mu) / (alpha**2 * c**2 + sigma**2)


def _ode_solution(noise, alpha_start, sigma_start, mu, c):
    """x_0 reached by the exact PF-ODE from x_T = sigma_T noise."""
    x_start = sigma_start * noise
    return mu + c * (x_start - alpha_start * mu) / (alpha_start**2 * c**2 + sigma_start**2).sqrt()


class GaussianDenoiser:
    """The exact denoiser of x0 ~ N(mu + label, c^2) behind the interface `sample` uses."""

    def __init__(self, process, mu, c):
        self.process, self.mu, self.c = process, mu, c
        self.guidance_scales: list[float] = []

    def __call__(self, x_t, t, cond, want="x0", guidance_scale=1.0):
        assert want == "x0"
        self.guidance_scales.append(guidance_scale)
        alpha, sigma = self.process.alpha_sigma(t)
        alpha, sigma = alpha.to(F64)[:, None], sigma.to(F64)[:, None]
        mu = self.mu + cond["class_labels"].to(F64)[:, None] if "class_labels" in cond else self.mu
        return _exact_x0(x_t, alpha, sigma, mu, self.c)


def _start(process):
    alpha, sigma = process.alpha_sigma(process.from_unit(torch.ones(1, dtype=F64)))
    return alpha.to(F64), sigma.to(F64)


def _max_err(a, b) -> float:
    return float((a - b).abs().max())


def test_dpm_solver_2m_is_second_order_on_a_uniform_log_snr_grid():
    # Away from the sigma = 0 end the textbook order shows cleanly: error ratio -> 4 per halving of h.
    mu, c, noise = _gaussian(1)

    def x0_fn(x, lam):
        return _exact_x0(x, torch.sigmoid(lam).sqrt()[:, None], torch.sigmoid(-lam).sqrt()[:, None], mu, c)

    errs = []
    for n in (16, 32, 64, 128):
        lam = torch.linspace(-6.0, 6.0, n + 1, dtype=F64)
        alphas, sigmas = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        out = dpm_solver_2m(x0_fn, noise, alphas, sigmas, lam)
        a0, s0, a1, s1 = alphas[0], sigmas[0], alphas[-1], sigmas[-1]
        z = (s0 * noise - a0 * mu) / (a0**2 * c**2 + s0**2).sqrt()
        errs.append(_max_err(out, a1 * mu + (a1**2 * c**2 + s1**2).sqrt() * z))
    assert errs[1] / errs[2] > 3.5 and errs[2] / errs[3] > 3.7, errs
    assert errs[-1] < 1e-3, errs


PROCESSES = {
    "flow": FlowProcess(),
    "flow_shift3": FlowProcess(shift=3.0),
    "flow_dynamic": FlowProcess(mu=1.15),
    "trigflow": TrigFlowProcess(sigma_data=0.5),
    "edm": EDMProcess(),
    "vp_ddpm": VPProcess.from_scheduler_config(DDPMScheduler().config),
}


@pytest.mark.parametrize("name", list(PROCESSES))
def test_sample_reaches_exact_ode_solution(name):
    process = PROCESSES[name]
    mu, c, noise = _gaussian(2)
    alpha_start, sigma_start = _start(process)
    ref = _ode_solution(noise, alpha_start, sigma_start, mu, c)
    errs = {}
    for n in (50, 100, 400):
        errs[n] = _max_err(sample(GaussianDenoiser(process, mu, c), {}, noise, num_steps=n), ref)
    assert errs[50] < 3e-2, errs
    # Second order in the step size (a first-order solver would shrink the error at most ~4x over two doublings);
    # the sigma -> 0 end of a unit-time grid costs a little, hence 7 rather than 16.
    assert errs[100] / errs[400] > 7.0, errs


def test_dpm_solver_2m_on_continuous_vp():
    # alpha = cos(pi u / 2), sigma = sin(pi u / 2), integrated to u = 0 (sigma = 0 returns the last x0 estimate).
    mu, c, noise = _gaussian(3)

    def x0_fn(x, u):
        return _exact_x0(x, torch.cos(math.pi * u / 2)[:, None], torch.sin(math.pi * u / 2)[:, None], mu, c)

    errs = {}
    for n in (50, 100, 400):
        u = unit_grid(n)
        alphas, sigmas = torch.cos(math.pi * u / 2), torch.sin(math.pi * u / 2)
        sigmas[-1], alphas[-1] = 0.0, 1.0
        ref = _ode_solution(noise, alphas[0], sigmas[0], mu, c)
        errs[n] = _max_err(dpm_solver_2m(x0_fn, noise, alphas, sigmas, u), ref)
    assert errs[50] < 2e-2 and errs[100] / errs[400] > 7.0, errs


def test_sample_batches_conditions_and_passes_guidance():
    mu, c, noise = _gaussian(4)
    labels = torch.arange(noise.shape[0]) % 5
    process = FlowProcess()
    fake = GaussianDenoiser(process, mu, c)
    whole = sample(fake, {"class_labels": labels}, noise, num_steps=100, guidance_scale=3.0)
    assert set(fake.guidance_scales) == {3.0}
    split = sample(GaussianDenoiser(process, mu, c), {"class_labels": labels}, noise, num_steps=100, batch_size=7)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    # Each sample follows its own class's ODE.
    ref = _ode_solution(noise, *_start(process), mu + labels.to(F64)[:, None], c)
    assert _max_err(whole, ref) < 1e-2


# ---------------------------------------------------------------------------------------------------------------
# A real (tiny) network
# ---------------------------------------------------------------------------------------------------------------


def _tiny_unet() -> UNet2DModel:
    return tiny_unet(attention=False).eval()


def test_sample_with_tiny_unet_denoiser():
    process = EDMProcess()
    den = Denoiser(_tiny_unet(), process, "edm")
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 1, 8, 8, generator=g)
    cond = {"class_labels": torch.tensor([0, 3, 7, 9])}

    out = sample(den, cond, noise, num_steps=3, guidance_scale=2.0, batch_size=3)
    assert out.shape == noise.shape and out.dtype == noise.dtype and bool(torch.isfinite(out).all())

    # One step: the guided x0 estimate at sigma_max from sigma_max * noise.
    s_max = torch.full((4,), process.sigma_max)
    one = sample(den, cond, noise, num_steps=1, guidance_scale=2.0)
    torch.testing.assert_close(one, den(process.sigma_max * noise, s_max, cond, want="x0", guidance_scale=2.0))
    assert not torch.allclose(one, den(process.sigma_max * noise, s_max, cond, want="x0"), atol=1e-4)

    # Two steps: a first-order (DDIM / Euler) step to the middle of the Karras ramp, then its x0 estimate.
    s_mid = float(process.from_unit(torch.tensor([0.5])))
    x = process.sigma_max * noise
    d0 = den(x, s_max, cond, want="x0", guidance_scale=2.0)
    x1 = (s_mid / process.sigma_max) * x + (1 - s_mid / process.sigma_max) * d0
    two = sample(den, cond, noise, num_steps=2, guidance_scale=2.0)
    expected = den(x1, torch.full((4,), s_mid), cond, want="x0", guidance_scale=2.0)
    torch.testing.assert_close(two, expected, rtol=1e-4, atol=1e-5)
