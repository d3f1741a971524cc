"""Deterministic multi-step samplers for teachers, written over (alpha, sigma) so they serve every process.

The default is DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) in data-prediction form: one network
call per step, second order; `solver="ddim"` is its first-order case (DDIM, which is Euler in the flow time of the
same process). Noise levels are spaced evenly in the process's unit time (the Karras ramp for EDM,
shifted time for flows, integer timesteps for VP).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from distill.base.batch import Condition
from distill.models.denoiser import Denoiser

X0Fn = Callable[[Tensor, Tensor], Tensor]

#: solver name -> order of the multistep update.
SOLVERS = {"dpm_solver_2m": 2, "ddim": 1}


def unit_grid(num_steps: int, u_max: float = 1.0, u_min: float = 0.0) -> Tensor:
    """num_steps + 1 unit times from u_max (noisiest) to u_min (cleanest), evenly spaced."""
    return torch.linspace(u_max, u_min, num_steps + 1, dtype=torch.float64)


@torch.no_grad()
def dpm_solver_2m(x0_fn: X0Fn, noise: Tensor, alphas: Tensor, sigmas: Tensor, ts: Tensor, order: int = 2) -> Tensor:
    """Integrate the PF-ODE from ts[0] to ts[-1] with DPM-Solver++(2M) (`order=1`: DDIM).

    Args:
        x0_fn: (x_t, t batch) -> x0 estimate.
        noise: standard normal noise; the start is sigma_0 * noise (the alpha_0 x0 part is neglected, as every
            sampler does at the noisiest level).
        alphas, sigmas, ts: per-step values, length num_steps + 1. A final sigma of 0 returns the last x0 estimate.
    """
    x = noise * float(sigmas[0])
    lam = torch.where(sigmas > 0, torch.log(alphas) - torch.log(sigmas.clamp_min(1e-30)), torch.full_like(sigmas, float("inf")))
    prev_x0, prev_h = None, None
    n = x.shape[0]
    for i in range(len(ts) - 1):
        x0 = x0_fn(x, ts[i].expand(n).to(x.device))
        if float(sigmas[i + 1]) == 0.0:
            return x0
        h = float(lam[i + 1] - lam[i])
        if h <= 0:
            raise ValueError(f"noise levels must strictly decrease; step {i} repeats one (too many steps for a "
                             "discrete process?)")
        if prev_x0 is None or order == 1:
            d = x0
        else:
            r = prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        x = (float(sigmas[i + 1]) / float(sigmas[i])) * x - float(alphas[i + 1]) * math.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    cond: Condition,
    noise: Tensor,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    batch_size: int = 256,
    solver: str = "dpm_solver_2m",
) -> Tensor:
    """Sample a (teacher) denoiser with DPM-Solver++(2M) (or `solver="ddim"`) over `num_steps` steps; returns x0
    in data space.

    The last step lands on the cleanest level of the process (unit time 0) and returns its x0 estimate.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {list(SOLVERS)}")
    process = denoiser.process
    u = unit_grid(num_steps)
    ts = process.from_unit(u)
    alphas, sigmas = process.alpha_sigma(ts)
    alphas, sigmas = alphas.double(), sigmas.double()
    # The end point: clean data (sigma = 0, alpha = 1 after normalising), reached through the last x0 estimate.
    sigmas = torch.cat([sigmas[:-1], torch.zeros(1, dtype=sigmas.dtype)])
    alphas = torch.cat([alphas[:-1], torch.ones(1, dtype=alphas.dtype)])
    outs = []
    for start in range(0, noise.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        c = {k: v[sl] for k, v in cond.items()}

        def x0_fn(x: Tensor, t: Tensor) -> Tensor:
            return denoiser(x, t, c, want="x0", guidance_scale=guidance_scale)

        outs.append(dpm_solver_2m(x0_fn, noise[sl], alphas, sigmas, ts, order=SOLVERS[solver]))
    return torch.cat(outs)
