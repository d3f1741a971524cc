"""MDT-dist against closed forms on a Gaussian toy (data N(m, c^2) per dimension, whose teacher velocity and
marginal-data transport are known exactly): VM's finite-difference derivative is the total derivative along the
teacher's flow, VM's target reproduces the transport velocity, VM's gradient vanishes at the transport and points
to it otherwise, VD's gradient vanishes for matching marginals and otherwise has its closed form; then as a run:
gradient routing, config errors, and the export reproducing the rollout."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from test_data_split import poisoned_half_a  # noqa: F401 (a fixture)
from tiny import REPO, sample_exports_cleanly, tiny_overrides, tiny_unet

from distill.base.errors import ConfigError
from distill.models.denoiser import load_denoiser
from distill.models.schedules import rollout
from distill.parametrization import EDMProcess, FlowProcess, flow_velocity
from distill.recipes.dmd2 import dmd_loss
from distill.recipes.mdt_dist import (
    Config,
    sample_flow_time,
    total_derivative,
    vd_gradient,
    vm_loss,
    vm_target,
)
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.registry import build_recipe
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

M = torch.tensor([0.3, -0.6, 0.1], dtype=torch.float64)
C = torch.tensor([0.4, 0.25, 0.6], dtype=torch.float64)


def _col(s: torch.Tensor) -> torch.Tensor:
    return s[:, None]


def posterior_mean(x, s, m, c):
    """E[x0 | x_s = x] for x0 ~ N(m, c^2), x_s = (1 - s) x0 + s z."""
    s = _col(s)
    return m + (1 - s) * c**2 / ((1 - s) ** 2 * c**2 + s**2) * (x - (1 - s) * m)


def velocity(x, s, m=M, c=C):
    """The flow velocity (x - E[x0 | x]) / s of the Gaussian's marginals."""
    return (x - posterior_mean(x, s, m, c)) / _col(s)


def transport(x, s, m=M, c=C):
    """The teacher ODE's endpoint from x at s (the monotone map between the Gaussians N((1-s) m, .) and N(m, c^2))."""
    s = _col(s)
    return m + c * (x - (1 - s) * m) / torch.sqrt((1 - s) ** 2 * c**2 + s**2)


def transport_velocity(x, s, m=M, c=C):
    return (x - transport(x, s, m, c)) / _col(s)


def marginal_samples(n, seed, m=M, c=C, lo=0.05, hi=0.95):
    g = torch.Generator().manual_seed(seed)
    x0 = m + c * torch.randn(n, 3, generator=g, dtype=torch.float64)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    s = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return (1 - _col(s)) * x0 + _col(s) * z, s


# ---------------------------------------------------------------------------------------------------------------
# VM
# ---------------------------------------------------------------------------------------------------------------


def test_finite_difference_is_the_total_derivative_along_the_teacher_flow(f64):
    """(u(x, s) - u(x - Delta v, s - Delta)) / Delta -> d_x u . v + d_s u (a JVP), error O(Delta)."""
    x, s = marginal_samples(64, 0)
    v = velocity(x, s)
    _, exact = torch.func.jvp(transport_velocity, (x, s), (v, torch.ones_like(s)))
    errors = []
    for delta in (1e-2, 1e-3):
        fd = total_derivative(transport_velocity(x, s), transport_velocity(x - delta * v, s - delta), delta, None)
        errors.append((fd - exact).abs().max().item())
    assert exact.abs().mean() > 0.05
    assert errors[1] < 0.15 * errors[0] and errors[1] < 2e-2, errors


def test_normalised_derivative_has_norm_below_one(f64):
    d = torch.randn(5, 3) * torch.tensor([[0.01], [0.1], [1.0], [10.0], [100.0]])
    out = total_derivative(d, torch.zeros_like(d), 1.0, 0.1)
    norms = out.norm(dim=1)
    torch.testing.assert_close(norms, d.norm(dim=1) / (d.norm(dim=1) + 0.1))


def test_vm_target_is_the_transport_velocity(f64):
    """At the marginal-data transport, u = v - s du/ds (dT/ds = 0 along the flow): the target reproduces u*; the
    teacher's own velocity (a one-step Euler jump, not the transport) is not a fixed point."""
    x, s = marginal_samples(256, 1)
    v, delta = velocity(x, s), 1e-4
    u_star = transport_velocity(x, s)
    target = vm_target(v, total_derivative(u_star, transport_velocity(x - delta * v, s - delta), delta, None), s)
    torch.testing.assert_close(target, u_star, atol=2e-3, rtol=0)
    wrong = vm_target(v, total_derivative(v, velocity(x - delta * v, s - delta), delta, None), s)
    assert (wrong - v).abs().mean() > 0.05


class GaussianTransportStudent(torch.nn.Module):
    """u_theta = (x - T_theta(x, s)) / s with T_theta the transport of N(m_theta, c_theta^2)."""

    def __init__(self, m, c):
        super().__init__()
        self.m = torch.nn.Parameter(torch.as_tensor(m, dtype=torch.float64).clone())
        self.c = torch.nn.Parameter(torch.as_tensor(c, dtype=torch.float64).clone())

    def forward(self, x, s):
        return transport_velocity(x, s, self.m, self.c)


def _vm_grad(student, n=4096, seed=2, delta=1e-3):
    student.zero_grad()
    x, s = marginal_samples(n, seed)  # data interpolants (vm_states: data)
    v = velocity(x, s)
    u = student(x, s)
    with torch.no_grad():
        target = vm_target(v, total_derivative(u, student(x - delta * v, s - delta), delta, None), s)
    vm_loss(u, target).mean().backward()
    return student.m.grad.clone(), student.c.grad.clone()


def test_vm_gradient_vanishes_at_the_transport_and_points_to_it(f64):
    gm, gc = _vm_grad(GaussianTransportStudent(M, C))
    assert gm.abs().max() < 2e-3 and gc.abs().max() < 2e-3, (gm, gc)
    gm, gc = _vm_grad(GaussianTransportStudent(M + 0.3, C))
    assert (gm > 1e-3).all(), gm  # descent lowers m_theta toward m
    gm, gc = _vm_grad(GaussianTransportStudent(M, 1.5 * C))
    assert (gc > 1e-3).all(), gc  # descent shrinks c_theta toward c


def test_vm_descent_recovers_the_transport(f64):
    student = GaussianTransportStudent(torch.zeros(3), torch.ones(3))
    opt = torch.optim.Adam(student.parameters(), lr=0.03)
    for it in range(200):
        _vm_grad(student, n=512, seed=100 + it)
        opt.step()
    torch.testing.assert_close(student.m.detach(), M, atol=0.05, rtol=0)
    torch.testing.assert_close(student.c.detach(), C, atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# VD
# ---------------------------------------------------------------------------------------------------------------


def test_vd_gradient_closed_form(f64):
    """Fake marginals of N(m', c^2): v_fake - v_real = (m - m') s / ((1 - s)^2 c^2 + s^2) for every x, so VD moves
    the student's samples toward the teacher's mean; equal marginals give exactly 0. dmd_loss carries it as grad / D."""
    x, s = marginal_samples(128, 3)
    assert vd_gradient(velocity(x, s), velocity(x, s)).abs().max() == 0
    m_fake = M + torch.tensor([0.5, -0.2, 0.0], dtype=torch.float64)
    grad = vd_gradient(velocity(x, s), velocity(x, s, m_fake, C))
    sc = _col(s)
    expected = -(M - m_fake) * sc / ((1 - sc) ** 2 * C**2 + sc**2)
    torch.testing.assert_close(grad, expected)
    # the same direction in x0 terms is DMD's (x0_fake - x0_real), divided by s
    x0_gap = posterior_mean(x, s, m_fake, C) - posterior_mean(x, s, M, C)
    torch.testing.assert_close(grad, x0_gap / sc)
    sample = torch.randn(128, 3, requires_grad=True)
    dmd_loss(sample, grad).sum().backward()
    torch.testing.assert_close(sample.grad, grad / 3)


def test_flow_time_sampler_stays_in_range():
    s = sample_flow_time(20000, 0.002, 0.98, 0.01, 1.0, 1.0)
    assert s.min() >= 0.012 and s.max() <= 0.98
    assert 0.6 < s.median() < 0.75  # sigmoid(1) = 0.73 mapped into [0.012, 0.98]


# ---------------------------------------------------------------------------------------------------------------
# Runs on the tiny teacher
# ---------------------------------------------------------------------------------------------------------------


def _config(teacher, run, *extra, path="digits/mdt_dist.yaml"):
    return load_config(path, tiny_overrides(teacher, run, *extra))


@pytest.fixture(scope="module")
def tiny_flow_teacher(tmp_path_factory):
    """An untrained 8x8 rectified-flow UNet2DModel (other weights than tiny_teacher's) with a stock
    FlowMatchEulerDiscreteScheduler: a pixel flow teacher without an export target, as builtin:digits_flow_teacher."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = tmp_path_factory.mktemp("tiny_flow_teacher")
    unet = tiny_unet()
    with torch.no_grad():
        torch.manual_seed(1)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(root / "unet", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(root / "scheduler")
    return root


@pytest.mark.parametrize("extra", [(), ("recipe.vd_fake=student", "recipe.vm_states=student"),
                                   ("recipe.vd_weight=0",)])
def test_generator_loss_trains_only_the_student(tiny_teacher, extra):
    cfg = _config(tiny_teacher, Path("/nonexistent"), "student.num_steps=2", "teacher.guidance_scale=1.5", *extra)
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    assert (recipe.critic is None) == (cfg.recipe.vd_fake == "student" or cfg.recipe.vd_weight == 0)
    batch = data.sample(4, torch.Generator().manual_seed(0))
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, 5)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() != 0.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.generator.parameters())
    assert all(p.grad is None for p in recipe.teacher.parameters())
    if recipe.critic is not None:
        assert all(p.grad is None for p in recipe.critic.parameters())
        recipe.generator.zero_grad(set_to_none=True)
        with update_nets(recipe, "critic") as nets:
            recipe.critic_loss(nets, batch, 0)[0].backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.critic.parameters())
        assert all(p.grad is None for p in recipe.generator.parameters())
    assert recipe.diagnostics(recipe.generator, batch.cond, torch.randn(4, 1, 8, 8))["vm_residual"] >= 0


@pytest.mark.parametrize("second", [False, True])
def test_vd_term_is_the_velocity_difference(tiny_teacher, tiny_flow_teacher, second):
    """With VM off, the generator loss's gradient in the student sample is (v_teacher - v_critic) / (D N) at the
    re-noised sample (critic mode); with recipe.velocity_teacher both velocities are the flow network's, read in
    its own coordinates, while the student stays teacher.path's consistency model."""
    extra = (f"recipe.velocity_teacher={tiny_flow_teacher}",) if second else ()
    cfg = _config(tiny_teacher, Path("/nonexistent"), "recipe.vm_weight=0", "teacher.guidance_scale=2.0", *extra)
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    assert isinstance(recipe.generator.process, EDMProcess) and recipe.generator.prediction == "cm"
    want = FlowProcess if second else EDMProcess
    assert isinstance(recipe.teacher.process, want) and isinstance(recipe.critic.denoiser.process, want)
    batch = data.sample(4, torch.Generator().manual_seed(0))
    seen = {}
    orig = recipe.generator.forward

    def spy(x, t, cond, **kw):
        out = orig(x, t, cond, **kw)
        if torch.is_grad_enabled() and out.requires_grad:
            out.retain_grad()
            seen["x"] = out
        return out

    recipe.generator.forward = spy
    torch.manual_seed(7)
    with update_nets(recipe, "generator") as nets:
        loss, _ = recipe.generator_loss(nets, batch, 0)
    loss.backward()
    x = seen["x"].detach().clamp(-1, 1)
    torch.manual_seed(7)
    torch.randint(0, 1, ()), torch.randn(4, 1, 8, 8)  # the step index and the noise of student_input
    s = recipe.sample_s(4, x.device)
    x_s = (1 - s[:, None, None, None]) * x + s[:, None, None, None] * torch.randn_like(x)
    with torch.no_grad():
        v_real = flow_velocity(lambda a, b, c: recipe.teacher(a, b, c, guidance_scale=2.0), recipe.teacher.process,
                               x_s, s, batch.cond)
        v_fake = flow_velocity(recipe.critic.denoiser, recipe.teacher.process, x_s, s, batch.cond)
    expected = (v_real - v_fake) / (64 * 4) * (x.abs() < 1).float()  # mean over D and batch; clamp at +-1
    assert expected.abs().mean() > 1e-5
    torch.testing.assert_close(seen["x"].grad, expected, atol=1e-6, rtol=1e-4)


def test_vm_target_uses_the_velocity_teacher_in_its_own_coordinates(tiny_teacher, tiny_flow_teacher):
    """VM alone with a flow velocity teacher and an EDM student: the student is fed x_s / (1 - s) at sigma =
    s / (1 - s), the flow network x_s at s, and the loss's gradient in the student's x0 output is
    -2 (u - (v - s D)) / (s D N) with v the flow network's velocity (guided) and D the student's difference."""
    cfg = _config(tiny_teacher, Path("/nonexistent"), "recipe.vd_weight=0", "teacher.guidance_scale=1.5",
                  "recipe.norm_c=null", f"recipe.velocity_teacher={tiny_flow_teacher}")
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    assert recipe.critic is None and isinstance(recipe.teacher.process, FlowProcess)
    assert recipe.s_hi == pytest.approx(80 / 81) and recipe.s_lo == pytest.approx(0.002 / 1.002)
    batch = data.sample(4, torch.Generator().manual_seed(0))
    seen = {}
    orig = recipe.generator.forward

    def spy(x, t, cond, **kw):
        out = orig(x, t, cond, **kw)
        if torch.is_grad_enabled() and out.requires_grad:
            out.retain_grad()
            seen["x0"], seen["t"] = out, t
        return out

    recipe.generator.forward = spy
    torch.manual_seed(3)
    with update_nets(recipe, "generator") as nets:
        loss, _ = recipe.generator_loss(nets, batch, 0)
    loss.backward()
    torch.manual_seed(3)
    s = recipe.sample_s(4, torch.device("cpu"))
    col = s[:, None, None, None]
    x_s = (1 - col) * batch.images + col * torch.randn_like(batch.images)
    torch.testing.assert_close(seen["t"], s / (1 - s))  # EDM sigma of the same signal-to-noise ratio
    with torch.no_grad():
        x0 = seen["x0"].detach()
        u = (x_s - x0) / col
        v = _guided_flow(recipe.teacher.model, x_s, s, batch.cond["class_labels"], 1.5)  # a flow's output is v
        delta = cfg.recipe.interval
        u_prev = flow_velocity(recipe.generator, recipe.generator.process, x_s - delta * v, s - delta, batch.cond)
        target = v - col * (u - u_prev) / delta
    expected = -2 * (u - target) / (col * 64 * 4)
    assert expected.abs().mean() > 1e-5
    torch.testing.assert_close(seen["x0"].grad, expected, atol=1e-6, rtol=1e-4)


def _guided_flow(unet, x_s, s, labels, w):
    """The rectified-flow network's guided output eps - x0 at (x_s, 1000 s), the null class 10 as uncond."""
    cond = unet(x_s, 1000 * s, class_labels=labels).sample
    uncond = unet(x_s, 1000 * s, class_labels=torch.full_like(labels, 10)).sample
    return uncond + w * (cond - uncond)


@pytest.mark.parametrize("second", [False, True])
def test_training_changes_only_the_student_and_critic(tiny_teacher, tiny_flow_teacher, tmp_path, second):
    extra = (f"recipe.velocity_teacher={tiny_flow_teacher}",) if second else ()
    trainer = Trainer(_config(tiny_teacher, tmp_path / "run", "run.max_steps=2", *extra))
    frozen = {k: v.clone() for k, v in trainer.recipe.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in trainer.recipe.generator.state_dict().items()}
    trainer.train()
    assert all(torch.equal(v, trainer.recipe.teacher.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, trainer.recipe.generator.state_dict()[k]) for k, v in student.items())


def test_config_errors(tiny_teacher, tiny_flow_teacher, tmp_path):
    with pytest.raises(ValueError, match="both 0"):
        Config(vm_weight=0.0, vd_weight=0.0)
    with pytest.raises(ValueError):
        Config(vd_fake="teacher")
    with pytest.raises(ValueError):
        Config(interval=0.0)
    with pytest.raises(ConfigError, match="recipe.vm_states"):
        load_config("text_flow/mdt_dist.yaml", ["recipe.vm_states=data"])
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="recipe.velocity_teacher: .* not a UNet2DModel teacher folder"):
        _config(tiny_teacher, run, f"recipe.velocity_teacher={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="recipe.velocity_teacher: .*a second teacher is a flow-matching"):
        _config(tiny_teacher, run, f"recipe.velocity_teacher={tiny_teacher}")  # an EDM folder is teacher.path
    with pytest.raises(ConfigError, match="recipe.velocity_teacher: not supported with trainer.parallel: fsdp2"):
        _config(tiny_teacher, run, f"recipe.velocity_teacher={tiny_flow_teacher}", "trainer.parallel=fsdp2")
    with pytest.raises(ConfigError, match="recipe.velocity_teacher: a second teacher needs a UNet2DModel"):
        load_config("text_flow/mdt_dist.yaml", [f"recipe.velocity_teacher={tiny_flow_teacher}"])


def test_variant_configs_load():
    """The subfolder configs are not table participants (tests/test_config.py reads one level); they load here."""
    variants = sorted((REPO / "recipes" / "digits" / "mdt_dist_variants").glob("*.yaml"))
    assert {p.stem for p in variants} >= {"vm", "vd", "official_vd", "flow_teacher"}
    for path in variants:
        cfg = load_config(path)
        assert cfg.recipe_name == "mdt_dist"
    cfg = load_config(REPO / "recipes" / "digits" / "mdt_dist_variants" / "flow_teacher.yaml")
    assert cfg.recipe.velocity_teacher == "builtin:digits_flow_teacher" and cfg.teacher.path == "builtin:digits_teacher"


def test_flow_teacher_script_trains_on_the_train_half_and_saves_a_flow_teacher(poisoned_half_a, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    """scripts/train_digits_flow_teacher.py with half A poisoned (NaN): a finite loss, so no half-A image was drawn
    (2 x 32 draws: with half A in the pool, all finite with chance 2^-64); the folder loads through load_denoiser
    as a rectified-flow teacher with the null class."""
    spec = importlib.util.spec_from_file_location("train_digits_flow_teacher",
                                                  REPO / "scripts" / "train_digits_flow_teacher.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "flow"
    monkeypatch.setattr(sys, "argv", ["train_digits_flow_teacher.py", "--out", str(out), "--steps", "2",
                                      "--batch-size", "32", "--resolution", "8"])
    script.main()
    assert math.isfinite(json.loads((out / "training_args.json").read_text())["final_loss_ema"])
    teacher = load_denoiser(out)
    assert isinstance(teacher.process, FlowProcess) and teacher.process.shift == 1.0
    assert teacher.prediction == "flow" and teacher.model.config.num_class_embeds == 11
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "FlowMatchEulerDiscreteScheduler"


@pytest.mark.slow
def test_export_reproduces_the_student_rollout(tiny_teacher, tmp_path):
    labels, seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4], 1234
    runs, reference = {}, {}
    for name, steps in (("one", 1), ("two", 2)):
        trainer = Trainer(_config(tiny_teacher, tmp_path / name, "run.max_steps=2", "export.at_end=true",
                                  "trainer.ema_decay=0.5", f"student.num_steps={steps}"))
        folder = trainer.train()
        runs[name] = {"folder": str(folder), "steps": steps, "timesteps": None}
        with torch.no_grad(), trainer.ema_weights() as gen:
            torch.manual_seed(seed)
            noise = torch.randn(len(labels), 1, 8, 8)
            x0 = rollout(gen, trainer.recipe.schedule, {"class_labels": torch.tensor(labels)}, noise)
            torch.manual_seed(seed)
            cond = {"class_labels": torch.tensor(labels)}
            torch.testing.assert_close(trainer.recipe.generate(gen, cond, torch.randn(len(labels), 1, 8, 8)), x0)
        reference[name] = (x0 / 2 + 0.5).clamp(0, 1)
    got = sample_exports_cleanly(runs, labels, seed, tmp_path)
    for name in runs:
        assert reference[name].std() > 0.01
        torch.testing.assert_close(got[name], reference[name], atol=2e-5, rtol=1e-4, msg=name)
