"""Flow maps by self-distillation against closed forms: on a Gaussian toy whose flow map is known, the exact map
satisfies the Lagrangian, Eulerian and semigroup relations and a perturbed one does not (by the closed-form
amount); the residual loss's gradient matches finite differences; training with each objective moves a
parametrised map to the exact one; the end time folds exactly into the exported network; runs train only the
student, and the export reproduces `generate` in a process that never imports distill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import sample_exports_cleanly, tiny_overrides
from torch import nn

from distill.base.errors import ConfigError
from distill.parametrization import EDMProcess, flow_range
from distill.recipes.flow_map import (
    TARGET_SIGN,
    Config,
    FlowMap,
    TwoTimeStudent,
    diagonal_view,
    esd_residual,
    flow_map_view,
    fold_end_time,
    jump_grid,
    lsd_residual,
    map_from_x0,
    map_loss,
    psd_target,
    sample_flow_map,
    sample_times,
    teacher_view,
    velocity_from_x0,
)
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.recipe import Nets

pytestmark = pytest.mark.usefixtures("one_thread")

SD, SIGMA_MIN = 0.5, 0.002
PROCESS = EDMProcess(sigma_min=SIGMA_MIN, sigma_data=SD)
T0, S_MAX = flow_range(PROCESS)
MU = torch.tensor([0.3, -0.6, 0.1], dtype=torch.float64)
C = torch.tensor([0.4, 0.25, 0.6], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Gaussian toy: x0 ~ N(MU, C^2) per coordinate, x_s = (1 - s) x0 + s z; x_s ~ N(m_s, V_s)
# ---------------------------------------------------------------------------------------------------------------


def col(v: torch.Tensor) -> torch.Tensor:
    return v[:, None]


def mean_var(s):
    return col(1 - s) * MU, col(1 - s) ** 2 * C**2 + col(s) ** 2


def exact_map(x, s, t):
    """X*_{s,t}(x) = m_t + sqrt(V_t / V_s) (x - m_s): the PF-ODE of a Gaussian is affine."""
    (m_s, v_s), (m_t, v_t) = mean_var(s), mean_var(t)
    return m_t + torch.sqrt(v_t / v_s) * (x - m_s)


def slope(s):
    """k_s = V_s' / (2 V_s): b_s(x) = m_s' + k_s (x - m_s)."""
    _, v = mean_var(s)
    return (-(col(1 - s)) * C**2 + col(s)) / v


def exact_velocity(x, s):
    m, _ = mean_var(s)
    return -MU + slope(s) * (x - m)


def average_velocity(x, s, t):
    """(x - X*_{s,t}(x)) / (s - t) without dividing (V_t - V_s = (s - t) (c^2 (2 - s - t) - s - t)); b_s at t = s."""
    (m_s, v_s), (_, v_t) = mean_var(s), mean_var(t)
    q = (C**2 * col(2 - s - t) - col(s + t)) / (v_s.sqrt() * (v_t.sqrt() + v_s.sqrt()))
    return -MU - q * (x - m_s)


class GaussianTeacher(nn.Module):
    """The exact EDM denoiser E[x0 | y] = mu + c^2 / (c^2 + sigma^2) (y - mu), behind the Denoiser call."""

    process = PROCESS

    def forward(self, y, sigma, cond, want="x0", guidance_scale=1.0):
        return MU + C**2 / (C**2 + col(sigma) ** 2) * (y - MU)


class ToyTwoTime(nn.Module):
    """A two-time network D(y, sigma, end) whose map (eq. (1)) is X* + (1 - t0) (s - t) c(s, t) x with
    c = theta_0 + theta_1 s + theta_2 t (theta = 0: the exact map; its diagonal velocity is then b)."""

    process = PROCESS

    def __init__(self, theta=(0.0, 0.0, 0.0)):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone())

    def forward(self, y, sigma, cond, end=None):
        s = sigma / (1 + sigma)
        t = torch.full_like(s, T0) if end is None else end
        x = col(1 - s) * y
        avg = average_velocity(x, s, t)
        c = self.theta[0] + self.theta[1] * s + self.theta[2] * t
        return (x - col(s - T0) * avg) / (1 - T0) + col(s - T0) * col(c) * x


def perturbation(theta, x, s, t):
    """X_theta - X*, and its derivatives in t and s."""
    c = theta[0] + theta[1] * s + theta[2] * t
    a = (1 - T0) * (s - t) * c
    da_dt = (1 - T0) * (-c + (s - t) * theta[2])
    da_ds = (1 - T0) * (c + (s - t) * theta[1])
    return col(a) * x, col(da_dt) * x, col(da_ds) * x


def toy_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + C * torch.randn(n, 3, generator=g)
    z = torch.randn(n, 3, generator=g)
    s = T0 + (S_MAX - T0) * torch.rand(n, generator=g)
    t = T0 + (s - T0) * torch.rand(n, generator=g)
    return x0, z, s, t, col(1 - s) * x0 + col(s) * z


# ---------------------------------------------------------------------------------------------------------------
# The parametrisation and the closed forms
# ---------------------------------------------------------------------------------------------------------------


def test_map_from_x0_is_the_line_through_x_and_the_clean_end(f64):
    x0, z, s, t, x = toy_batch(16, 0)
    D = torch.randn(16, 3)
    torch.testing.assert_close(map_from_x0(x, D, s, s, T0), x)  # X_{s,s} = id
    torch.testing.assert_close(map_from_x0(x, D, s, torch.full_like(s, T0), T0), (1 - T0) * D)  # the clean end
    # the tangent at t = s is the diagonal velocity, and X = x + (t - s) v_{s,t} (the paper's form)
    eps = 1e-6
    dX = (map_from_x0(x, D, s, s + eps, T0) - map_from_x0(x, D, s, s - eps, T0)) / (2 * eps)
    torch.testing.assert_close(dX, velocity_from_x0(x, D, s, T0))
    torch.testing.assert_close(map_from_x0(x, D, s, t, T0), x + col(t - s) * velocity_from_x0(x, D, s, T0))


def test_toy_network_and_teacher_are_the_closed_forms(f64):
    x0, z, s, t, x = toy_batch(32, 1)
    exact = ToyTwoTime()
    torch.testing.assert_close(flow_map_view(exact, PROCESS, {}, T0)(x, s, t), exact_map(x, s, t))
    torch.testing.assert_close(diagonal_view(exact, PROCESS, {}, T0)(x, s), exact_velocity(x, s))
    torch.testing.assert_close(teacher_view(GaussianTeacher(), {})(x, s), exact_velocity(x, s))
    # the Gaussian's map moves a point along its own velocity: d/dt X*_{s,t} = b_t(X*_{s,t})
    eps = 1e-6
    dX = (exact_map(x, s, t + eps) - exact_map(x, s, t - eps)) / (2 * eps)
    torch.testing.assert_close(dX, exact_velocity(exact_map(x, s, t), t))


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_lagrangian_and_eulerian_residuals(f64, method):
    """R vanishes for the exact map and equals the closed form for a perturbed one: LSD R = dP/dt - k_t P, ESD
    R = dP/ds + P'(x) b_s, P = X_theta - X* (b affine with slope k)."""
    x0, z, s, t, x = toy_batch(64, 2)
    tol = dict(rtol=1e-7, atol=1e-9) if method == "exact" else dict(rtol=1e-5, atol=1e-7)
    b = teacher_view(GaussianTeacher(), {})
    X_exact = flow_map_view(ToyTwoTime(), PROCESS, {}, T0)
    for residual in (lsd_residual, esd_residual):
        X, R = residual(X_exact, b, x, s, t, method, 1e-5)
        torch.testing.assert_close(X, exact_map(x, s, t))
        torch.testing.assert_close(R, torch.zeros_like(R), **{**tol, "rtol": 0})
    theta = torch.tensor([0.5, -0.3, 0.8])
    X_theta = flow_map_view(ToyTwoTime(theta), PROCESS, {}, T0)
    P, dP_dt, dP_ds = perturbation(theta, x, s, t)
    _, R_lsd = lsd_residual(X_theta, b, x, s, t, method, 1e-5)
    expected = dP_dt - slope(t) * P
    assert expected.abs().mean() > 1e-2
    torch.testing.assert_close(R_lsd, expected, **tol)
    _, R_esd = esd_residual(X_theta, b, x, s, t, method, 1e-5)
    c = theta[0] + theta[1] * s + theta[2] * t
    torch.testing.assert_close(R_esd, dP_ds + col((1 - T0) * (s - t) * c) * exact_velocity(x, s), **tol)


def test_semigroup(f64):
    """X_{s,t} = X_{u,t} o X_{s,u} for the exact map (PSD's target is then the map itself), not for a perturbed one."""
    x0, z, s, t, x = toy_batch(64, 3)
    u = t + (s - t) * torch.rand(64, generator=torch.Generator().manual_seed(4))
    exact = flow_map_view(ToyTwoTime(), PROCESS, {}, T0)
    torch.testing.assert_close(psd_target(exact, x, s, u, t), exact(x, s, t))
    torch.testing.assert_close(psd_target(exact_map, x, s, u, t), exact_map(x, s, t))
    wrong = flow_map_view(ToyTwoTime([0.5, -0.3, 0.8]), PROCESS, {}, T0)
    assert (psd_target(wrong, x, s, u, t) - wrong(x, s, t)).abs().mean() > 1e-2


@pytest.mark.parametrize("sampler", ["uniform", "lognormal", "schedule"])
def test_time_sampler(sampler):
    cfg = Config(time_sampler=sampler, clean_end_fraction=0.25)
    schedule = torch.tensor([0.9, 0.5, 0.1])
    torch.manual_seed(0)
    s, t = sample_times(4000, cfg, T0, S_MAX, torch.device("cpu"), schedule)
    assert bool(((T0 <= t) & (t <= s) & (s <= S_MAX)).all())
    assert (t == T0).double().mean().item() == pytest.approx(0.25, abs=0.03)
    if sampler == "schedule":  # only the pipeline's first times, each about as often
        assert [int((s == v).sum()) for v in schedule] == pytest.approx([1333] * 3, abs=150)
    else:
        assert len(set(s.tolist())) > 3900


# ---------------------------------------------------------------------------------------------------------------
# The recipe's loss on the toy (a FlowMap with the closed-form teacher and student)
# ---------------------------------------------------------------------------------------------------------------


def toy_recipe(**overrides) -> FlowMap:
    recipe = FlowMap.__new__(FlowMap)  # the recipe's losses without its teacher-loading constructor
    recipe.cfg, recipe.teacher, recipe.guidance_scale = Config(**overrides), GaussianTeacher(), 1.0
    recipe.process, recipe.t0, recipe.s_max, recipe.schedule_flow_times = PROCESS, T0, S_MAX, None
    return recipe


def toy_loss(recipe, student, seed, n=256):
    from distill.base.batch import Batch

    x0 = MU + C * torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    return recipe.generator_loss(Nets(generator=student, critic=None, trained=student), Batch(x0, {}), 0)


@pytest.mark.parametrize("objective", ["lsd", "esd"])
def test_residual_loss_gradient_matches_finite_differences(f64, objective):
    """gradient: residual is the paper's |R|^2 with the gradient through the derivative: autograd equals central
    differences of the loss in theta (same draws, the stop-gradient velocity held at its values), and the exact
    map's loss is zero."""
    recipe = toy_recipe(objective=objective, gradient="residual", diagonal_fraction=0.25, fd_step=1e-4)
    held: list[torch.Tensor] = []
    velocity = recipe.velocity

    def recorded(nets, cond):  # the first call records b, later calls replay it: sg(b) is a constant in theta
        b = velocity(nets, cond)
        return lambda y, t: held[0] if held else held.append(b(y, t)) or held[0]

    recipe.velocity = recorded
    theta = torch.tensor([0.5, -0.3, 0.8])
    student = ToyTwoTime(theta)
    loss, logs = toy_loss(recipe, student, 7)
    loss.backward()
    eps = 1e-6
    fd = torch.zeros(3)
    for i in range(3):
        e = torch.zeros(3)
        e[i] = eps
        plus, minus = toy_loss(recipe, ToyTwoTime(theta + e), 7)[0], toy_loss(recipe, ToyTwoTime(theta - e), 7)[0]
        fd[i] = (plus - minus) / (2 * eps)
    assert student.theta.grad.abs().max() > 1e-2
    torch.testing.assert_close(student.theta.grad, fd, rtol=1e-6, atol=1e-9)
    assert logs["off_diagonal_loss"] > 1e-3 and logs["diagonal_loss"] > 1e-3
    recipe.velocity = velocity
    assert toy_loss(recipe, ToyTwoTime(), 7)[0].item() < 1e-12  # the exact map: every term vanishes


@pytest.mark.parametrize("objective", ["lsd", "esd"])
def test_target_loss_pulls_the_map_along_the_normalised_residual(f64, objective):
    """gradient: target: the loss's gradient in X_theta is -2 SIGN g / D with g = R / (||R|| + c), R the residual
    of the stop-gradient student; a zero residual (the exact map) gives zero loss."""
    x0, z, s, t, x = toy_batch(32, 5)
    b = teacher_view(GaussianTeacher(), {})
    residual = lsd_residual if objective == "lsd" else esd_residual
    X_minus, R = residual(flow_map_view(ToyTwoTime([0.5, -0.3, 0.8]), PROCESS, {}, T0), b, x, s, t)
    g = R / (R.flatten(1).norm(dim=1, keepdim=True) + 0.1)
    X_theta = X_minus.clone().requires_grad_(True)
    map_loss(X_theta, X_minus + TARGET_SIGN[objective] * g).sum().backward()
    torch.testing.assert_close(X_theta.grad, -2 * TARGET_SIGN[objective] * g / 3)
    assert toy_loss(toy_recipe(objective=objective, gradient="target"), ToyTwoTime(), 8)[0].item() < 1e-12


def slow(*args):
    return pytest.param(*args, marks=pytest.mark.slow)


TRAINING = [("distillation", "lsd", "residual"), slow("distillation", "lsd", "target"),
            slow("distillation", "esd", "residual"), ("distillation", "esd", "target"),
            ("distillation", "psd", "residual"), ("training", "lsd", "residual"), slow("training", "lsd", "target"),
            slow("training", "esd", "target"), slow("training", "psd", "residual")]


@pytest.mark.parametrize("mode,objective,gradient", TRAINING)
def test_training_moves_the_map_to_the_exact_one(f64, mode, objective, gradient):
    """Adam on theta with the recipe's loss (teacher or self-distillation) shrinks the perturbation toward 0
    (PSD, which bootstraps from its own compositions, takes longer)."""
    recipe = toy_recipe(mode=mode, objective=objective, gradient=gradient, diagonal_fraction=0.25)
    start, end = train_toy(recipe, 300 if objective == "psd" else 150)
    assert end < 0.1 * start, (start, end)


@pytest.mark.parametrize("objective", ["lsd", slow("esd")])
def test_target_sign_is_the_side_of_the_boundary(f64, monkeypatch, objective):
    """The target form with the other sign bootstraps away from the boundary X_{s,s} = x, and diverges."""
    monkeypatch.setitem(TARGET_SIGN, objective, -TARGET_SIGN[objective])
    start, end = train_toy(toy_recipe(objective=objective, gradient="target"), 150)
    assert end > 2 * start, (start, end)


def train_toy(recipe, iterations):
    """|theta|_1 before and after `iterations` Adam updates of the toy map with the recipe's loss."""
    student = ToyTwoTime([0.6, -0.5, 0.4])
    opt = torch.optim.Adam(student.parameters(), lr=0.02)
    start = student.theta.detach().abs().sum()
    for it in range(iterations):
        loss, _ = toy_loss(recipe, student, 100 + it)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start, student.theta.detach().abs().sum()


# ---------------------------------------------------------------------------------------------------------------
# The two-time network, its export and the runs (tiny class-conditional teacher, toy MLP)
# ---------------------------------------------------------------------------------------------------------------


def _config(teacher, run, *extra):
    return load_config("digits/flow_map.yaml", tiny_overrides(teacher, run, *extra))


def _randomised(student: TwoTimeStudent) -> TwoTimeStudent:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in student.end_embedding.parameters():
            p.normal_(0, 0.3)
    return student


@pytest.mark.parametrize("which", ["unet", "toy"])
def test_end_time_folds_exactly_into_the_exported_network(tiny_teacher, which):
    from distill.base.paths import resolve_path
    from distill.models.denoiser import load_denoiser
    from distill.models.schedules import student_from_teacher

    if which == "unet":
        folder, shape, labels = tiny_teacher, (5, 1, 8, 8), [0, 1, 2, 3, 10]
    else:
        folder, shape, labels = resolve_path("builtin:toy_teacher"), (5, 2), [0, 0, 0, 1, 1]
    teacher = load_denoiser(folder, prediction="edm")
    t0 = flow_range(teacher.process)[0]
    x, sigma = torch.randn(shape), torch.tensor([80.0, 5.0, 1.0, 0.3, 0.01])
    cond = {"class_labels": torch.tensor(labels)}
    fresh = TwoTimeStudent(student_from_teacher(teacher), t0)
    with torch.no_grad():  # zero-initialised: every end time is the one-time CM student
        torch.testing.assert_close(fresh(x, sigma, cond, end=torch.full((5,), 0.5)), fresh.student(x, sigma, cond))
    student = _randomised(fresh)
    with torch.no_grad():
        two_time = student(x, sigma, cond)  # end None: t0
        folded = fold_end_time(student)(x, sigma, cond)
        other = student(x, sigma, cond, end=torch.full((5,), 0.5))
    torch.testing.assert_close(folded, two_time, rtol=1e-6, atol=1e-6)
    assert (other - two_time).abs().mean() > 1e-3  # the end time matters
    assert type(fold_end_time(student).model) is type(teacher.model)
    assert all(not p.requires_grad for p in fold_end_time(student).model.parameters())


def test_one_jump_is_the_one_step_pipeline_sample(tiny_teacher):
    from distill.training.registry import build_recipe

    recipe, _ = build_recipe(_config(tiny_teacher, Path("/nonexistent")), torch.device("cpu"))
    gen = _randomised(recipe.generator)
    cond, noise = {"class_labels": torch.tensor([1, 2, 3])}, torch.randn(3, 1, 8, 8)
    one_step = recipe.generate(gen, cond, noise)
    torch.testing.assert_close(sample_flow_map(gen, cond, noise, jump_grid(recipe.process, 1)), one_step,
                               rtol=1e-5, atol=1e-5)
    assert (sample_flow_map(gen, cond, noise, jump_grid(recipe.process, 3)) - one_step).abs().mean() > 1e-4
    assert recipe.diagnostics(gen, cond, noise)["semigroup_gap"] > 0


LOSSES = [("distillation", "lsd", "residual"), ("distillation", "esd", "target"), ("distillation", "psd", "residual"),
          ("training", "lsd", "target"), ("training", "esd", "residual")]


@pytest.mark.parametrize("mode,objective,gradient", LOSSES)
def test_generator_loss_trains_only_the_student(tiny_teacher, mode, objective, gradient):
    from distill.training.registry import build_recipe

    cfg = _config(tiny_teacher, Path("/nonexistent"), f"recipe.mode={mode}", f"recipe.objective={objective}",
                  f"recipe.gradient={gradient}", "teacher.guidance_scale=1.5", "recipe.clean_end_fraction=0.0")
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    batch = data.sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and logs["off_diagonal_loss"] > 0
    assert all(p.grad is not None for p in recipe.generator.parameters())
    assert recipe.generator.end_embedding.mlp[2].weight.grad.abs().sum() > 0  # the end time is trained
    assert all(p.grad is None for p in recipe.teacher.parameters())


def test_run_trains_only_the_student_and_the_export_reproduces_generate(tiny_teacher, tmp_path):
    from distill.training.trainer import Trainer

    labels, seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4], 1234
    runs, reference = {}, {}
    for steps in (1, 2):
        trainer = Trainer(_config(tiny_teacher, tmp_path / f"k{steps}", "run.max_steps=2", "export.at_end=true",
                                  "trainer.ema_decay=0.5", f"student.num_steps={steps}",
                                  "recipe.end_embedding_gain=100.0"))
        before = {k: v.clone() for k, v in trainer.recipe.generator.state_dict().items()}
        teacher = {k: v.clone() for k, v in trainer.recipe.teacher.state_dict().items()}
        folder = trainer.train()
        after = trainer.recipe.generator.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("end_embedding"))
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("student"))
        assert all(torch.equal(v, trainer.recipe.teacher.state_dict()[k]) for k, v in teacher.items())
        meta = json.loads((folder / "distill.json").read_text())
        runs[steps] = {"folder": str(folder), "steps": meta["num_inference_steps"]}
        with torch.no_grad(), trainer.ema_weights() as gen:
            torch.manual_seed(seed)
            noise = torch.randn(len(labels), 1, 8, 8)
            x0 = trainer.recipe.generate(gen, {"class_labels": torch.tensor(labels)}, noise)
            assert gen.end_embedding.mlp[2].weight.abs().sum() > 0  # d(t0) is not zero: the fold is exercised
        reference[steps] = (x0 / 2 + 0.5).clamp(0, 1)
    got = sample_exports_cleanly(runs, labels, seed, tmp_path)
    for steps in runs:
        assert reference[steps].std() > 0.01
        torch.testing.assert_close(got[str(steps)], reference[steps], atol=2e-5, rtol=1e-4, msg=f"{steps} steps")


# ---------------------------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,key", [
    (("recipe.mode=training", "recipe.diagonal_fraction=0.0"), "recipe.diagonal_fraction"),
    (("recipe.mode=training", "recipe.clean_end_fraction=0.5"), "recipe.clean_end_fraction"),
    (("recipe.timesteps=[0, 20]",), "recipe.timesteps"),
    (("recipe.objective=rsd",), "recipe.objective"),
    (("recipe.objective=esd", "recipe.time_sampler=schedule"), "recipe.time_sampler"),
])
def test_bad_config_names_the_key(tiny_teacher, extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _config(tiny_teacher, Path("/nonexistent"), *extra)
