"""Prediction conversions, PF-ODE velocities and time conventions against closed forms and diffusers.

The key test is `test_exact_denoiser_gives_pf_ode_velocity`: for Gaussian data x0 ~ N(mu, c^2) the exact denoiser
is known in closed form, so every prediction kind it implies, and the ODE velocity built from it, can be checked
against the probability-flow ODE computed independently from the score (Song et al. 2021, eq. 13).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from distill.parametrization import (
    PREDICTION_KINDS,
    EDMProcess,
    FlowProcess,
    TrigFlowProcess,
    VPProcess,
    add_noise,
    cm_scalings,
    convert,
    edm_scalings,
    edm_sigma,
    flow_dynamic_shift,
    flow_from_trigflow,
    flow_shift,
    flow_shift_mu,
    from_x0,
    karras_sigmas,
    log_snr,
    ode_velocity,
    to_x0,
    trigflow_from_flow,
    vp_timesteps,
)

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-9}
SIGMA_DATA = 0.5  # TrigFlow / EDM / CM sigma_d used throughout
SIGMA_MIN = 0.002  # CM boundary
MU_DYN = 1.15  # a dynamic-shift mu (Flux's max_shift)


# ---------------------------------------------------------------------------------------------------------------
# Continuous-time processes: t -> (alpha, sigma, dalpha/dt, dsigma/dt), all analytic, float64
# ---------------------------------------------------------------------------------------------------------------


def _vp_cos(t):
    h = math.pi / 2
    return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


def _flow(t):
    return 1 - t, t.clone(), -torch.ones_like(t), torch.ones_like(t)


def _flow_shift3(t):
    k = 3.0
    s = flow_shift(t, k)
    ds = k / (1 + (k - 1) * t) ** 2
    return 1 - s, s, -ds, ds


def _flow_dynamic(t):
    e = math.exp(MU_DYN)
    s = flow_dynamic_shift(t, MU_DYN)
    ds = e / (e * t + 1 - t) ** 2
    return 1 - s, s, -ds, ds


def _trigflow(t):
    return torch.cos(t), SIGMA_DATA * torch.sin(t), -torch.sin(t), SIGMA_DATA * torch.cos(t)


def _edm(t):
    return torch.ones_like(t), t.clone(), torch.zeros_like(t), torch.ones_like(t)


PROCESSES = {
    # name: (schedule, sampler of t in a range that keeps alpha and sigma away from 0)
    "vp_cos": (_vp_cos, lambda g, n: 0.03 + 0.94 * torch.rand(n, 1, generator=g, dtype=F64)),
    "flow": (_flow, lambda g, n: 0.03 + 0.94 * torch.rand(n, 1, generator=g, dtype=F64)),
    "flow_shift3": (_flow_shift3, lambda g, n: 0.03 + 0.9 * torch.rand(n, 1, generator=g, dtype=F64)),
    "flow_dynamic": (_flow_dynamic, lambda g, n: 0.03 + 0.9 * torch.rand(n, 1, generator=g, dtype=F64)),
    "trigflow": (_trigflow, lambda g, n: 0.05 + (math.pi / 2 - 0.1) * torch.rand(n, 1, generator=g, dtype=F64)),
    "edm": (_edm, lambda g, n: torch.exp(math.log(0.01) + math.log(8000.0) * torch.rand(n, 1, generator=g, dtype=F64))),
}


def _kw(name: str) -> dict:
    """Constants the conversions take for this process (TrigFlow and EDM carry sigma_d = 0.5)."""
    return {"sigma_data": SIGMA_DATA if name in ("trigflow", "edm") else 1.0, "sigma_min": SIGMA_MIN}


def _setup(name: str, n: int = 32, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    schedule, draw_t = PROCESSES[name]
    t = draw_t(g, n)
    alpha, sigma, dalpha, dsigma = schedule(t)
    x0 = torch.randn(n, d, generator=g, dtype=F64)
    eps = torch.randn(n, d, generator=g, dtype=F64)
    return g, t, alpha, sigma, dalpha, dsigma, x0, eps


def _cm_reference(sigma_min: float, sigma_data: float) -> CMStochasticIterativeScheduler:
    return CMStochasticIterativeScheduler(sigma_min=sigma_min, sigma_data=sigma_data)


def _true_predictions(name, x0, eps, alpha, sigma):
    """Each prediction kind's target written from its own definition, independently of the module under test."""
    kw = _kw(name)
    x_t = alpha * x0 + sigma * eps
    ref = _cm_reference(kw["sigma_min"], kw["sigma_data"])
    sig_edm, x_edm = sigma / alpha, x_t / alpha  # EDM view of a scaled process: x / alpha = x0 + (sigma / alpha) eps
    c_skip, c_out = ref.get_scalings(sig_edm)
    b_skip, b_out = ref.get_scalings_for_boundary_condition(sig_edm)
    truth = {
        "x0": x0,
        "epsilon": eps,
        "v": alpha * eps - sigma * x0,  # Salimans & Ho 2022
        "flow": eps - x0,  # rectified-flow velocity
        "edm": (x0 - c_skip * x_edm) / c_out,  # Karras et al. 2022: D = c_skip x + c_out F
        "cm": (x0 - b_skip * x_edm) / b_out,  # Song et al. 2023 App. C
    }
    if name == "trigflow":
        # sCM: x_t = cos t x0 + sin t z with z = sd eps; F is the velocity over sd: sd F = dx_t/dt.
        t = torch.atan2(sigma / kw["sigma_data"], alpha)
        truth["trigflow"] = (torch.cos(t) * kw["sigma_data"] * eps - torch.sin(t) * x0) / kw["sigma_data"]
    if name == "vp_cos":
        # With sd = 1 a VP state is a TrigFlow state (t = atan(sigma / alpha)), and F equals the v-prediction.
        truth["trigflow"] = truth["v"]
    return x_t, truth


# ---------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROCESSES))
def test_round_trips_every_kind(name):
    g, _, alpha, sigma, _, _, x0, eps = _setup(name)
    x_t = alpha * x0 + sigma * eps
    kw = _kw(name)
    for kind in PREDICTION_KINDS:
        p = torch.randn(x0.shape, generator=g, dtype=F64)
        x0_of_p = to_x0(p, kind, x_t, alpha, sigma, **kw)
        torch.testing.assert_close(from_x0(x0_of_p, kind, x_t, alpha, sigma, **kw), p, **TIGHT)
        pred_of_x0 = from_x0(x0, kind, x_t, alpha, sigma, **kw)
        torch.testing.assert_close(to_x0(pred_of_x0, kind, x_t, alpha, sigma, **kw), x0, **TIGHT)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_conversions_match_definitions(name):
    _, _, alpha, sigma, _, _, x0, eps = _setup(name, seed=1)
    kw = _kw(name)
    x_t, truth = _true_predictions(name, x0, eps, alpha, sigma)
    for kind, target in truth.items():
        torch.testing.assert_close(from_x0(x0, kind, x_t, alpha, sigma, **kw), target, **TIGHT)
        torch.testing.assert_close(to_x0(target, kind, x_t, alpha, sigma, **kw), x0, **TIGHT)
    for a in truth:
        for b in truth:
            torch.testing.assert_close(convert(truth[a], a, b, x_t, alpha, sigma, **kw), truth[b], **TIGHT)


def test_unknown_kind_is_rejected():
    x = torch.zeros(2, 3, dtype=F64)
    one = torch.ones(2, 1, dtype=F64)
    for fn in (to_x0, from_x0):
        with pytest.raises(ValueError, match="sample"):
            fn(x, "sample", x, one, one)
    with pytest.raises(ValueError, match="eps"):
        convert(x, "eps", "eps", x, one, one)


def test_preconditioning_matches_diffusers():
    sigma = torch.exp(torch.linspace(math.log(SIGMA_MIN), math.log(80.0), 17, dtype=F64))
    ref = _cm_reference(SIGMA_MIN, SIGMA_DATA)
    c_skip, c_out, c_in = edm_scalings(sigma, SIGMA_DATA)
    r_skip, r_out = ref.get_scalings(sigma)
    torch.testing.assert_close(c_skip, r_skip, **TIGHT)
    torch.testing.assert_close(c_out, r_out, **TIGHT)
    torch.testing.assert_close(c_in, 1 / (sigma**2 + SIGMA_DATA**2).sqrt(), **TIGHT)
    b_skip, b_out, b_in = cm_scalings(sigma, SIGMA_DATA, SIGMA_MIN)
    r_skip, r_out = ref.get_scalings_for_boundary_condition(sigma)
    torch.testing.assert_close(b_skip, r_skip, **TIGHT)
    torch.testing.assert_close(b_out, r_out, **TIGHT)
    torch.testing.assert_close(b_in, c_in, **TIGHT)
    # Boundary condition: f(x, sigma_min) = x.
    assert float(b_skip[0]) == pytest.approx(1.0) and float(b_out[0]) == pytest.approx(0.0, abs=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# Closed form: the exact denoiser of Gaussian data and the probability-flow ODE
# ---------------------------------------------------------------------------------------------------------------


def _gaussian(g, d, per_dim: bool):
    mu = 0.7 * torch.randn(d, generator=g, dtype=F64)
    c = (0.3 + torch.rand(d, generator=g, dtype=F64)) if per_dim else torch.tensor(0.8, dtype=F64)
    return mu, c


def _exact_denoiser(x_t, alpha, sigma, mu, c):
    """E[x0 | x_t] for x0 ~ N(mu, c^2), x_t = alpha x0 + sigma eps."""
    return mu + alpha * c**2 * (x_t - alpha * mu) / (alpha**2 * c**2 + sigma**2)


def _score_velocity(x_t, alpha, sigma, dalpha, dsigma, mu, c):
    """PF-ODE dx/dt = f x - g^2 / 2 grad log p_t(x), with f = alpha'/alpha and g^2 = 2 sigma sigma' - 2 f sigma^2."""
    f = dalpha / alpha
    g2 = 2 * sigma * dsigma - 2 * f * sigma**2
    score = -(x_t - alpha * mu) / (alpha**2 * c**2 + sigma**2)  # p_t = N(alpha mu, alpha^2 c^2 + sigma^2)
    return f * x_t - 0.5 * g2 * score


@pytest.mark.parametrize("per_dim", [False, True], ids=["scalar_c", "per_dim_c"])
@pytest.mark.parametrize("name", list(PROCESSES))
def test_exact_denoiser_gives_pf_ode_velocity(name, per_dim):
    g, t, alpha, sigma, dalpha, dsigma, _, _ = _setup(name, seed=2)
    kw = _kw(name)
    mu, c = _gaussian(g, 6, per_dim)
    x_t = alpha * mu + (alpha**2 * c**2 + sigma**2).sqrt() * torch.randn(alpha.shape[0], 6, generator=g, dtype=F64)
    d_hat = _exact_denoiser(x_t, alpha, sigma, mu, c)
    v_true = _score_velocity(x_t, alpha, sigma, dalpha, dsigma, mu, c)

    torch.testing.assert_close(ode_velocity(d_hat, x_t, alpha, sigma, dalpha, dsigma), v_true, **TIGHT)

    # The exact noise estimate, from E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 c^2 + sigma^2).
    eps_true = sigma * (x_t - alpha * mu) / (alpha**2 * c**2 + sigma**2)
    independent = {
        "x0": d_hat,
        "epsilon": eps_true,
        "v": alpha * eps_true - sigma * d_hat,
        "flow": eps_true - d_hat,
    }
    for kind in PREDICTION_KINDS:
        pred = from_x0(d_hat, kind, x_t, alpha, sigma, **kw)
        if kind in independent:
            torch.testing.assert_close(pred, independent[kind], **TIGHT)
        x0_back = to_x0(pred, kind, x_t, alpha, sigma, **kw)
        torch.testing.assert_close(ode_velocity(x0_back, x_t, alpha, sigma, dalpha, dsigma), v_true, **TIGHT)
        for other in PREDICTION_KINDS:
            x0_other = to_x0(convert(pred, kind, other, x_t, alpha, sigma, **kw), other, x_t, alpha, sigma, **kw)
            torch.testing.assert_close(ode_velocity(x0_other, x_t, alpha, sigma, dalpha, dsigma), v_true, **TIGHT)
        torch.testing.assert_close(convert(pred, kind, "epsilon", x_t, alpha, sigma, **kw), eps_true, **TIGHT)

    if name == "trigflow":
        # sCM: the PF-ODE is dx_t/dt = sd F.
        f_pred = from_x0(d_hat, "trigflow", x_t, alpha, sigma, **kw)
        torch.testing.assert_close(SIGMA_DATA * f_pred, v_true, **TIGHT)
    if name.startswith("flow"):
        # The "flow" prediction is the velocity in flow time s; in unit time it picks up ds/dt = dsigma/dt.
        u_pred = from_x0(d_hat, "flow", x_t, alpha, sigma, **kw)
        torch.testing.assert_close(dsigma * u_pred, v_true, **TIGHT)
        if name == "flow":
            torch.testing.assert_close(u_pred, v_true, **TIGHT)


def test_flow_shift_derivatives_used_above_are_right():
    # Guards the analytic ds/du of the shifted flows the closed-form test relies on (central differences).
    u = torch.linspace(0.05, 0.95, 19, dtype=F64)
    h = 1e-6
    for schedule in (_flow_shift3, _flow_dynamic, _vp_cos, _trigflow):
        a_p, s_p, _, _ = schedule(u + h)
        a_m, s_m, _, _ = schedule(u - h)
        _, _, da, ds = schedule(u)
        torch.testing.assert_close(da, (a_p - a_m) / (2 * h), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(ds, (s_p - s_m) / (2 * h), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# Time conventions
# ---------------------------------------------------------------------------------------------------------------


def test_trigflow_flow_time_maps():
    s = torch.linspace(0.0, 1.0, 101, dtype=F64)
    torch.testing.assert_close(flow_from_trigflow(trigflow_from_flow(s)), s, **TIGHT)
    t = torch.linspace(0.0, math.pi / 2, 101, dtype=F64)
    torch.testing.assert_close(trigflow_from_flow(flow_from_trigflow(t)), t, **TIGHT)
    assert float(trigflow_from_flow(torch.tensor(1.0, dtype=F64))) == pytest.approx(math.pi / 2)

    # State map (sd = 1): x_trig / (cos t + sin t) is the flow state at s = flow_from_trigflow(t).
    g = torch.Generator().manual_seed(3)
    t = (math.pi / 2) * torch.rand(64, 1, generator=g, dtype=F64)
    x0 = torch.randn(64, 5, generator=g, dtype=F64)
    eps = torch.randn(64, 5, generator=g, dtype=F64)
    x_trig = torch.cos(t) * x0 + torch.sin(t) * eps
    s = flow_from_trigflow(t)
    torch.testing.assert_close(x_trig / (torch.cos(t) + torch.sin(t)), (1 - s) * x0 + s * eps, **TIGHT)


def test_log_snr_and_edm_sigma():
    g = torch.Generator().manual_seed(4)
    alpha = 0.05 + torch.rand(50, generator=g, dtype=F64)
    sigma = 0.05 + 3 * torch.rand(50, generator=g, dtype=F64)
    lam = log_snr(alpha, sigma)
    torch.testing.assert_close(lam, torch.log(alpha**2 / sigma**2), **TIGHT)
    torch.testing.assert_close(edm_sigma(alpha, sigma), torch.exp(-lam / 2), **TIGHT)
    torch.testing.assert_close(edm_sigma(alpha, sigma), sigma / alpha, **TIGHT)


def test_flow_shift_matches_flow_match_euler_scheduler():
    for k in (1, 4, 28):
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        # set_timesteps spaces its unshifted grid from sigma_max to the (already shifted) sigma_min of __init__.
        grid = torch.from_numpy(np.linspace(sched.sigma_max, sched.sigma_min, k)).to(F64)
        sched.set_timesteps(k)
        torch.testing.assert_close(sched.sigmas[:-1].to(F64), flow_shift(grid, 3.0), rtol=1e-6, atol=1e-6)
    # With explicit sigmas the scheduler shifts exactly our grid.
    u = torch.linspace(1.0, 0.02, 9, dtype=F64)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=u.tolist())
    torch.testing.assert_close(sched.sigmas[:-1].to(F64), flow_shift(u, 3.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sched.timesteps.to(F64), 1000 * flow_shift(u, 3.0), rtol=1e-6, atol=1e-4)
    # Shift 1 is the identity; the map keeps the endpoints.
    torch.testing.assert_close(flow_shift(u, 1.0), u, **TIGHT)
    ends = flow_shift(torch.tensor([0.0, 1.0], dtype=F64), 3.0)
    torch.testing.assert_close(ends, torch.tensor([0.0, 1.0], dtype=F64), **TIGHT)


def test_dynamic_shift_matches_flow_match_euler_scheduler():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    u = torch.linspace(1.0, 0.02, 9, dtype=F64)
    for seq_len in (256, 1024, 4096, 6000):
        mu = flow_shift_mu(seq_len)
        assert mu == pytest.approx(calculate_shift(seq_len), abs=1e-12)
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
        sched.set_timesteps(sigmas=u.tolist(), mu=mu)
        torch.testing.assert_close(sched.sigmas[:-1].to(F64), flow_dynamic_shift(u, mu), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sched.time_shift(mu, 1.0, u), flow_dynamic_shift(u, mu), **TIGHT)
    # Flux's defaults: mu = 0.5 at 256 tokens and 1.15 at 4096, linear in between.
    assert flow_shift_mu(256) == pytest.approx(0.5) and flow_shift_mu(4096) == pytest.approx(1.15)
    assert flow_shift_mu(2176) == pytest.approx(0.825)
    # A dynamic shift with mu = log k is the static shift k.
    torch.testing.assert_close(flow_dynamic_shift(u, math.log(3.0)), flow_shift(u, 3.0), **TIGHT)


def test_karras_sigmas():
    u = torch.linspace(0.0, 1.0, 40, dtype=F64)
    sig = karras_sigmas(u, 0.002, 80.0, 7.0)
    assert float(sig[0]) == pytest.approx(0.002, rel=1e-12) and float(sig[-1]) == pytest.approx(80.0, rel=1e-12)
    assert bool((sig[1:] > sig[:-1]).all())
    # diffusers' ramp runs the other way (0 -> sigma_max).
    sched = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    ramp = np.linspace(0, 1, 17)
    ref = torch.from_numpy(sched._convert_to_karras(ramp)).to(F64)
    torch.testing.assert_close(karras_sigmas(torch.from_numpy(1 - ramp), 0.002, 80.0, 7.0), ref, **TIGHT)
    torch.testing.assert_close(sched.sigmas.to(F64), sig.flip(0), rtol=1e-9, atol=1e-12)
    # rho = 1 is a straight line.
    torch.testing.assert_close(karras_sigmas(u, 1.0, 3.0, 1.0), 1.0 + 2.0 * u, **TIGHT)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 50])
@pytest.mark.parametrize("spacing,offset", [("trailing", 0), ("leading", 0), ("leading", 1), ("linspace", 0)])
def test_vp_timesteps_match_ddim(spacing, offset, k):
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(k)
    assert vp_timesteps(1000, k, spacing, steps_offset=offset) == sched.timesteps.tolist()


def test_vp_timesteps_known_values_and_errors():
    assert vp_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    assert vp_timesteps(1000, 4, "leading", steps_offset=1) == [751, 501, 251, 1]
    with pytest.raises(ValueError, match="num_steps"):
        vp_timesteps(1000, 0)
    with pytest.raises(ValueError, match="spacing"):
        vp_timesteps(1000, 4, "karras")


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------


def test_vp_process_matches_ddpm_scheduler():
    sched = DDPMScheduler()
    proc = VPProcess.from_scheduler_config(sched.config)
    assert proc.num_train_timesteps == 1000
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    alpha, sigma = proc.alpha_sigma(t)
    ac = sched.alphas_cumprod[t].to(F64)
    torch.testing.assert_close(alpha.to(F64), ac.sqrt(), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(sigma.to(F64), (1 - ac).sqrt(), rtol=2e-6, atol=1e-7)

    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 3, 4, 4, generator=g)
    eps = torch.randn(6, 3, 4, 4, generator=g)
    torch.testing.assert_close(add_noise(proc, x0, eps, t), sched.add_noise(x0, eps, t), rtol=1e-5, atol=1e-6)

    # Fractional t interpolates log-SNR linearly between neighbouring timesteps.
    lo, hi = proc.alpha_sigma(torch.tensor([100, 101]))
    a_mid, s_mid = proc.alpha_sigma(torch.tensor([100.25]))
    lam = log_snr(lo.to(F64), hi.to(F64))
    lam_mid = log_snr(a_mid.to(F64), s_mid.to(F64))
    torch.testing.assert_close(lam_mid, 0.75 * lam[:1] + 0.25 * lam[1:], rtol=1e-4, atol=1e-5)
    assert float(proc.model_time(torch.tensor([7]))) == 7
    assert proc.from_unit(torch.tensor([0.0, 1.0])).tolist() == [0, 999]


def test_flow_process():
    proc = FlowProcess(shift=3.0)
    s = torch.tensor([0.0, 0.25, 1.0])
    alpha, sigma = proc.alpha_sigma(s)
    torch.testing.assert_close(alpha, 1 - s)
    torch.testing.assert_close(sigma, s)
    torch.testing.assert_close(proc.model_time(s), 1000 * s)
    u = torch.linspace(0, 1, 11)
    torch.testing.assert_close(proc.from_unit(u), flow_shift(u, 3.0))
    torch.testing.assert_close(FlowProcess(mu=0.8).from_unit(u), flow_dynamic_shift(u, 0.8))

    # add_noise equals FlowMatchEulerDiscreteScheduler.scale_noise at the same sigma.
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(1, 2, 4, 4, generator=g)
    eps = torch.randn(1, 2, 4, 4, generator=g)
    for i in (0, 3, 9):
        ref = sched.scale_noise(x0, sched.timesteps[i : i + 1], eps)
        torch.testing.assert_close(add_noise(proc, x0, eps, sched.sigmas[i : i + 1]), ref)


def test_trigflow_process():
    proc = TrigFlowProcess(sigma_data=SIGMA_DATA)
    t = torch.tensor([0.1, 0.7, 1.5])
    alpha, sigma = proc.alpha_sigma(t)
    torch.testing.assert_close(alpha, torch.cos(t))
    torch.testing.assert_close(sigma, SIGMA_DATA * torch.sin(t))
    torch.testing.assert_close(proc.input_scale(t), torch.full((3,), 1 / SIGMA_DATA))
    ends = proc.from_unit(torch.tensor([0.0, 1.0]))
    assert float(ends[0]) == pytest.approx(0.0) and float(ends[1]) == pytest.approx(math.atan(80.0 / 0.5), rel=1e-6)


def test_edm_process_matches_cm_scheduler():
    proc = EDMProcess(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
    sched = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
    sched.set_timesteps(10)
    sigmas = sched.sigmas[:-1].float()
    ref_time = torch.from_numpy(sched.sigma_to_t(sigmas.double().numpy())).float()
    torch.testing.assert_close(proc.model_time(sigmas), ref_time)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, 4, 4, generator=g)
    for i in range(10):
        sched_i = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
        sched_i.set_timesteps(10)
        sched_i.set_begin_index(i)
        ref = sched_i.scale_model_input(x, sched_i.timesteps[i])
        torch.testing.assert_close(x * proc.input_scale(sigmas[i : i + 1]), ref)
    # Unit time runs the Karras ramp from sigma_min (u = 0) to sigma_max (u = 1).
    torch.testing.assert_close(proc.from_unit(torch.tensor([0.0, 1.0])), torch.tensor([0.002, 80.0]))
    alpha, sigma = proc.alpha_sigma(sigmas)
    torch.testing.assert_close(alpha, torch.ones_like(sigmas))
    torch.testing.assert_close(sigma, sigmas)
