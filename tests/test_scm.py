"""sCM against closed forms: the TrigFlow view of every process, and on a Gaussian toy whose exact consistency
function is known, the tangent g, the target and the loss have their closed-form values, and training moves a
consistency-model-parametrized student toward the exact consistency function (distillation and sCT)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.parametrization import (
    EDMProcess,
    FlowProcess,
    TrigFlowProcess,
    VPProcess,
    cm_scalings,
    native_time_from_edm_sigma,
    trigflow_from_x0,
    trigflow_to_native,
)
from distill.recipes.scm import data_velocity, normalize_tangent, scm_loss, scm_tangent, teacher_velocity, trigflow_view

pytestmark = pytest.mark.usefixtures("one_thread")

SD, SIGMA_MIN = 0.5, 0.002
MU = torch.tensor([0.3, -0.6, 0.1], dtype=torch.float64)
C = torch.tensor([0.4, 0.25, 0.6], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# TrigFlow conversions
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process", [EDMProcess(), FlowProcess(shift=3.0), TrigFlowProcess(sigma_data=0.5),
                                     VPProcess.from_scheduler_config({"beta_schedule": "scaled_linear",
                                                                      "beta_start": 0.00085, "beta_end": 0.012})])
def test_native_time_has_the_asked_edm_noise_level(process):
    sigma = torch.tensor([0.05, 0.3, 2.0, 14.0])  # inside SD1.5's VP table
    alpha, s = process.alpha_sigma(native_time_from_edm_sigma(process, sigma))
    torch.testing.assert_close(s / alpha, sigma, rtol=2e-6, atol=0)


def test_trigflow_state_maps_to_the_same_noisy_sample(f64):
    """x_trig = cos t x0 + sin t sd eps is, in each process, alpha x0 + sigma eps at the mapped native time."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 1, 3, 3, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    t = torch.tensor([0.1, 0.7, 1.2, 1.5])
    x_trig = torch.cos(t)[:, None, None, None] * x0 + torch.sin(t)[:, None, None, None] * SD * eps
    for process in (EDMProcess(sigma_data=SD), FlowProcess(), TrigFlowProcess(sigma_data=SD)):
        x_native, t_native = trigflow_to_native(process, x_trig, t, SD)
        alpha, sigma = process.alpha_sigma(t_native)
        expected = alpha.double()[:, None, None, None] * x0 + sigma.double()[:, None, None, None] * eps
        torch.testing.assert_close(x_native, expected, rtol=1e-6, atol=1e-6)
    # EDM in closed form: sigma = sd tan t, x_edm = x_trig / cos t.
    x_edm, sigma = trigflow_to_native(EDMProcess(sigma_data=SD), x_trig, t, SD)
    torch.testing.assert_close(sigma, SD * torch.tan(t))
    torch.testing.assert_close(x_edm, x_trig / torch.cos(t)[:, None, None, None])
    # F from the x0 estimate, and back through the consistency function f = cos t x_t - sin t sd F (sCM eq. 6).
    F = trigflow_from_x0(x0, x_trig, t, SD)
    c, s = torch.cos(t)[:, None, None, None], torch.sin(t)[:, None, None, None]
    torch.testing.assert_close(c * x_trig - s * SD * F, x0)
    torch.testing.assert_close(F, c * eps - s * x0 / SD)  # sd F = (c^2 x0 + c s sd eps - x0) / s


# ---------------------------------------------------------------------------------------------------------------
# Gaussian toy: x0 ~ N(MU, C^2) per coordinate, EDM noise x = x0 + sigma eps
# ---------------------------------------------------------------------------------------------------------------


def exact_consistency(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """f*(x, sigma): (x - mu) / sqrt(c^2 + sigma^2) is constant along the PF-ODE, and f*(x, sigma_min) = x."""
    s = sigma[:, None]
    return MU + torch.sqrt(C**2 + SIGMA_MIN**2) / torch.sqrt(C**2 + s**2) * (x - MU)


class GaussianTeacher(nn.Module):
    """The exact denoiser E[x0 | x] = mu + c^2 / (c^2 + sigma^2) (x - mu), behind the Denoiser call signature."""

    process = EDMProcess(sigma_min=SIGMA_MIN, sigma_data=SD)

    def forward(self, x, sigma, cond, want="x0", guidance_scale=1.0):
        return MU + C**2 / (C**2 + sigma[:, None] ** 2) * (x - MU)


class ToyCMStudent(nn.Module):
    """A consistency-model-parametrized student x0 = c_skip x + c_out F with F = F* + theta x (theta = 0 is
    exact): x0 = f*(x, sigma) + theta c_out(sigma) x."""

    process = EDMProcess(sigma_min=SIGMA_MIN, sigma_data=SD)

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone())

    def forward(self, x, sigma, cond):
        _, c_out, _ = cm_scalings(sigma, SD, SIGMA_MIN)
        return exact_consistency(x, sigma) + self.theta * c_out[:, None] * x


def toy_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + C * torch.randn(n, 3, generator=g)
    t = torch.atan(torch.exp(-0.5 + 1.2 * torch.randn(n, generator=g)) / SD).clamp(0.05, 1.55)
    z = SD * torch.randn(n, 3, generator=g)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z
    return x0, z, t, x_t


def closed_form_df_dt(theta, x_t, t):
    """d/dt of f_theta = f* + theta c_out(sigma) x_edm along the exact PF-ODE (f* is constant along it)."""
    sigma = SD * torch.tan(t)
    x_edm = x_t / torch.cos(t)[:, None]
    s, root = sigma[:, None], torch.sqrt(sigma[:, None] ** 2 + SD**2)
    c_out = (s - SIGMA_MIN) * SD / root
    dc_out = SD / root - (s - SIGMA_MIN) * SD * s / root**3
    dx_dsigma = s * (x_edm - MU) / (C**2 + s**2)  # the EDM PF-ODE of the Gaussian: dx/dsigma = (x - D) / sigma
    dsigma_dt = SD / torch.cos(t)[:, None] ** 2
    return theta * (dc_out * x_edm + c_out * dx_dsigma) * dsigma_dt


def test_teacher_velocity_is_the_trigflow_pf_ode(f64):
    _, _, t, x_t = toy_batch(64, 0)
    v = teacher_velocity(GaussianTeacher(), x_t, t, {}, SD)
    sigma = (SD * torch.tan(t))[:, None]
    x_edm = x_t / torch.cos(t)[:, None]
    dx_edm_dt = sigma * (x_edm - MU) / (C**2 + sigma**2) * SD / torch.cos(t)[:, None] ** 2
    expected = -torch.sin(t)[:, None] * x_edm + torch.cos(t)[:, None] * dx_edm_dt  # d(cos t x_edm)/dt
    torch.testing.assert_close(v, expected)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_tangent_target_and_loss_have_the_closed_form(f64, method):
    x0, z, t, x_t = toy_batch(64, 1)
    teacher = GaussianTeacher()
    dxt_dt = teacher_velocity(teacher, x_t, t, {}, SD)
    tol = dict(rtol=1e-7, atol=1e-9) if method == "exact" else dict(rtol=1e-4, atol=1e-6)
    eps = 1e-5
    # The exact consistency function: g = 0, so the target is F^- itself and the loss is zero.
    exact = ToyCMStudent(0.0)
    F_minus, g = scm_tangent(trigflow_view(exact, exact.process, {}, SD), x_t, t, dxt_dt, SD, 1.0, method, eps)
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-9 if method == "exact" else 1e-6, rtol=0)
    # A wrong student: g = cos(t) df_theta/dt in closed form; with warmup r the x_t + dF/dt part scales by r.
    theta = torch.tensor([0.5, -0.3, 0.8])
    student = ToyCMStudent(theta)
    F_student = trigflow_view(student, student.process, {}, SD)
    F_minus, g = scm_tangent(F_student, x_t, t, dxt_dt, SD, 1.0, method, eps)
    expected_g = torch.cos(t)[:, None] * closed_form_df_dt(theta, x_t, t)
    assert expected_g.abs().mean() > 1e-2
    torch.testing.assert_close(g, expected_g, **tol)
    _, g0 = scm_tangent(F_student, x_t, t, dxt_dt, SD, 0.0, method, eps)
    _, g_half = scm_tangent(F_student, x_t, t, dxt_dt, SD, 0.5, method, eps)
    torch.testing.assert_close(g0, -torch.cos(t)[:, None] ** 2 * (SD * F_minus - dxt_dt))
    torch.testing.assert_close(g_half, 0.5 * (g0 + g), **tol)
    # F^- is the student's TrigFlow output; the loss at F_theta = F^- is ||g||^2 / D, adaptively weighted
    # exp(-u) ||g||^2 / D + u.
    x0_hat = student(x_t / torch.cos(t)[:, None], SD * torch.tan(t), {})
    torch.testing.assert_close(F_minus, (torch.cos(t)[:, None] * x_t - x0_hat) / (SD * torch.sin(t)[:, None]))
    torch.testing.assert_close(scm_loss(F_minus, F_minus, g), expected_g.pow(2).mean(1), **tol)
    u = torch.linspace(-1, 1, 64)
    torch.testing.assert_close(scm_loss(F_minus, F_minus, g, u), torch.exp(-u) * expected_g.pow(2).mean(1) + u, **tol)


def test_loss_gradient_pushes_f_against_its_drift(f64):
    """d loss / d F_theta = -2 g / D at F_theta = F^-: a gradient step moves F_theta along +g."""
    F = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(5, 3)
    scm_loss(F, F.detach(), g).sum().backward()
    torch.testing.assert_close(F.grad, -2 * g / 3)


def test_tangent_normalisation_and_clipping(f64):
    g = torch.randn(4, 1, 5, 5) * torch.tensor([0.01, 1.0, 10.0, 100.0])[:, None, None, None]
    n = normalize_tangent(g, "normalize", c=0.1)
    norms = g.flatten(1).norm(dim=1)
    torch.testing.assert_close(n.flatten(1).norm(dim=1), norms / (norms + 0.1))
    assert normalize_tangent(g, "clip", clip=1.0).abs().max() == 1.0
    assert torch.equal(normalize_tangent(g, "none"), g)


@pytest.mark.parametrize("mode", ["distillation", "training"])
def test_training_moves_the_student_toward_the_consistency_function(f64, mode):
    """SGD on theta with the sCM loss (normalised tangent, learned log-variance) shrinks theta toward 0."""
    from distill.recipes.scm import LogVarianceHead

    student = ToyCMStudent([0.6, -0.5, 0.4])
    head = LogVarianceHead().double()
    opt = torch.optim.Adam([{"params": student.parameters(), "lr": 0.02}, {"params": head.parameters(), "lr": 0.05}])
    teacher = GaussianTeacher()
    start = student.theta.detach().abs().sum()
    for it in range(150):
        x0, z, t, x_t = toy_batch(256, 100 + it)
        dxt_dt = teacher_velocity(teacher, x_t, t, {}, SD) if mode == "distillation" else data_velocity(x0, z, t)
        F_minus, g = scm_tangent(trigflow_view(student, student.process, {}, SD), x_t, t, dxt_dt, SD)
        g = normalize_tangent(g, "normalize", 0.1)
        x0_theta = student(x_t / torch.cos(t)[:, None], SD * torch.tan(t), {})
        F_theta = trigflow_from_x0(x0_theta, x_t, t, SD)
        loss = scm_loss(F_theta, F_minus, g, head(torch.log(SD * torch.tan(t)))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = student.theta.detach().abs().sum()
    assert end < 0.1 * start, (start, end, student.theta)
