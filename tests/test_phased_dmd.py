"""Phased DMD: phase boundaries and the subinterval score-matching target against closed forms, the experts'
routing, progressive training, and the expert-per-step export loaded and sampled in a process without `distill`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import NO_DISTILL, subprocess_env, tiny_overrides

from distill.models.schedules import student_schedule
from distill.parametrization import EDMProcess, VPProcess
from distill.recipes.phased_dmd import (
    PhasedExperts,
    phase_at,
    phase_boundaries,
    subinterval_x0_target,
    transition,
    unit_time,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def phased_config(teacher: Path, run_dir: Path, *extra: str):
    """recipes/digits/phased_dmd.yaml with the tiny teacher and a run of seconds (tests/tiny.py)."""
    from distill.training.preflight import load_config

    return load_config("digits/phased_dmd.yaml", tiny_overrides(teacher, run_dir, *extra))


# -- phases ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
def test_phase_boundaries_are_the_samplers_karras_sigmas(tiny_teacher, k):
    """Phase i starts at the Karras sigma of ramp i * (N // k) / (N - 1) (CMStochasticIterativeScheduler, N = 40
    training timesteps, Karras et al. 2022 eq. 5) and ends at sqrt(sigma_{i+1}^2 - sigma_min^2); the last ends clean."""
    from distill.models.denoiser import load_denoiser
    from distill.models.schedules import student_from_teacher

    student = student_from_teacher(load_denoiser(tiny_teacher, prediction="edm"))
    lo, hi, rho, n = 0.002 ** (1 / 7), 80.0 ** (1 / 7), 7.0, 40
    starts = [(hi + i * (n // k) / (n - 1) * (lo - hi)) ** rho for i in range(k)]
    ends = [(s**2 - 0.002**2) ** 0.5 for s in starts[1:]]
    got = phase_boundaries(student_schedule(student, k))
    assert [g[0] for g in got] == pytest.approx(starts, rel=1e-5)
    assert [g[1] for g in got[:-1]] == pytest.approx(ends, rel=1e-5) and got[-1][1] is None  # the last ends clean
    assert all(a > b for a, b in got[:-1])  # each phase spans a non-empty SNR interval, noisiest first


def test_progressive_phase_order():
    assert [phase_at(s, 10, 2) for s in range(10)] == [0] * 5 + [1] * 5
    assert [phase_at(s, 7, 3) for s in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert phase_at(0, 1, 4) == 0


@pytest.mark.parametrize("process", [EDMProcess(), VPProcess(tuple(torch.linspace(0.9999, 0.0001, 1000).tolist()))])
def test_unit_time_inverts_from_unit(process):
    for u in (0.05, 0.3, 0.9):
        t = process.from_unit(torch.tensor([u]))
        assert unit_time(process, float(t)) == pytest.approx(u, abs=2e-3 if isinstance(process, VPProcess) else 1e-6)


# -- the subinterval target -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha_s,sigma_s,alpha_t,sigma_t", [
    (1.0, 0.3, 1.0, 0.9),        # EDM (alpha = 1)
    (0.95, 0.312, 0.6, 0.8),     # VP (alpha^2 + sigma^2 = 1)
    (0.7, 0.3, 0.4, 0.6),        # rectified flow (alpha = 1 - s, sigma = s)
])
def test_subinterval_target_has_the_exact_posterior_mean(f64, alpha_s, sigma_s, alpha_t, sigma_t):
    """x0 ~ N(mu, c^2): E[target(x_t, x_s) | x_t] must be the exact E[x0 | x_t] = mu + alpha_t c^2 /
    (alpha_t^2 c^2 + sigma_t^2) (x_t - alpha_t mu). The target is affine in x_s, so its conditional mean is the
    target at E[x_s | x_t], a Gaussian posterior in closed form."""
    mu, c = torch.tensor([0.4, -1.0, 0.0]), torch.tensor([0.5, 1.2, 0.8])
    a_s, s_s, a_t, s_t = (torch.tensor(v) for v in (alpha_s, sigma_s, alpha_t, sigma_t))
    a = a_t / a_s
    var_ts = s_t**2 - a**2 * s_s**2
    x_t = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    prior_mean, prior_var = a_s * mu, a_s**2 * c**2 + s_s**2  # x_s's marginal
    post_mean = prior_mean + prior_var * a / (a**2 * prior_var + var_ts) * (x_t - a * prior_mean)
    expected = mu + a_t * c**2 / (a_t**2 * c**2 + s_t**2) * (x_t - a_t * mu)
    torch.testing.assert_close(subinterval_x0_target(x_t, post_mean, a_t, s_t, a_s, s_s), expected)
    # Regressing the target on x_t over joint samples recovers the same denoiser (slope and intercept per dim).
    g = torch.Generator().manual_seed(1)
    x0 = mu + c * torch.randn(200_000, 3, generator=g)
    x_s = a_s * x0 + s_s * torch.randn(x0.shape, generator=g)
    x_t = a * x_s + var_ts.sqrt() * torch.randn(x0.shape, generator=g)
    y = subinterval_x0_target(x_t, x_s, a_t, s_t, a_s, s_s)
    slope = ((x_t - x_t.mean(0)) * (y - y.mean(0))).mean(0) / x_t.var(0)
    torch.testing.assert_close(slope, a_t * c**2 / (a_t**2 * c**2 + s_t**2), atol=0.03, rtol=0.03)


def test_subinterval_target_from_clean_data_is_the_data(f64):
    x_t, x_s = torch.randn(8, 2), torch.randn(8, 2)
    torch.testing.assert_close(subinterval_x0_target(x_t, x_s, torch.tensor(0.6), torch.tensor(0.8),
                                                     torch.tensor(1.0), torch.tensor(0.0)), x_s)


def test_transition_gives_the_marginal_noise_level(f64):
    """x_s = x0 + sigma_s eps, then the transition to t: x_t - x0 has variance sigma_t^2 (EDM)."""
    p = EDMProcess()
    x0 = torch.zeros(100_000, 1)
    x_s = x0 + 0.5 * torch.randn_like(x0)
    t = torch.full((len(x0),), 1.3)
    x_t = transition(p, x_s, torch.tensor(1.0), torch.tensor(0.5), t, torch.randn_like(x0))
    assert float(x_t.var()) == pytest.approx(1.3**2, rel=0.02)


# -- the experts and the recipe ---------------------------------------------------------------------------------


def test_experts_route_by_noise_level(tiny_teacher):
    from distill.models.denoiser import load_denoiser
    from distill.models.schedules import student_from_teacher

    experts = [student_from_teacher(load_denoiser(tiny_teacher, prediction="edm")) for _ in range(2)]
    with torch.no_grad():
        for p in experts[1].parameters():
            p.add_(0.05)
    times = student_schedule(experts[0], 2).times
    moe = PhasedExperts(experts, times)
    x, cond = torch.randn(3, 1, 8, 8), {"class_labels": torch.tensor([0, 1, 2])}
    with torch.no_grad():
        for k in range(2):
            t = times[k].expand(3)
            torch.testing.assert_close(moe(x, t, cond), experts[k](x, t, cond))
        with pytest.raises(ValueError, match="none of the phases"):
            moe(x, torch.full((3,), 0.5), cond)


def test_recipe_trains_only_the_current_phase(tiny_teacher, tmp_path):
    from distill.training.nets import update_nets
    from distill.training.registry import build_recipe

    cfg = phased_config(tiny_teacher, tmp_path, "student.num_steps=2", "run.max_steps=4")
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    batch = data.sample(4, torch.Generator().manual_seed(0))
    experts = recipe.generator.experts
    for step, phase in ((0, 0), (3, 1)):
        with update_nets(recipe, "generator") as nets:
            loss, logs = recipe.generator_loss(nets, batch, step)
        loss.backward()
        assert logs["phase"] == phase and torch.isfinite(loss)
        assert all(p.grad is not None for p in experts[phase].parameters())
        assert all(p.grad is None for p in experts[1 - phase].parameters())
        assert all(p.grad is None for p in recipe.critic.parameters())
        recipe.generator.zero_grad(set_to_none=True)
        with update_nets(recipe, "critic") as nets:
            loss, logs = recipe.critic_loss(nets, batch, step)
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in recipe.critic.parameters())
        assert all(p.grad is None for p in recipe.generator.parameters())
        recipe.critic.zero_grad(set_to_none=True)
    # noise levels of the last phase lie above its output level (clean: min_t) and of phase 0 above sigma_1
    t0 = recipe._sample_t(0, 1000, torch.device("cpu"))
    assert float(t0.min()) > recipe.phases[0][1]


def test_digits_config_and_toy_config_validate():
    from distill.training.preflight import load_config

    for name in ("digits/phased_dmd.yaml", "toy/phased_dmd.yaml"):
        cfg = load_config(name)
        assert cfg.recipe_name == "phased_dmd" and cfg.student.num_steps == 2


# -- export ------------------------------------------------------------------------------------------------------

CLEAN_LOAD = NO_DISTILL + r"""
import torch
from diffusers import ConsistencyModelPipeline, DiffusionPipeline

folder, code, seed, out = sys.argv[1:5]
for name in json.load(open(f"{folder}/distill.json"))["experts"]:
    pipe = DiffusionPipeline.from_pretrained(f"{folder}/{name}")
    assert type(pipe) is ConsistencyModelPipeline, type(pipe)
namespace = {}
exec(open(code).read(), namespace)  # the loop exactly as the model card prints it
labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 7]
images = namespace["sample_phased"](folder, class_labels=labels, generator=torch.Generator().manual_seed(int(seed)))
torch.save(images, out)
assert not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""


def test_export_runs_each_expert_at_its_step_without_distill(tiny_teacher, tmp_path):
    from distill.models.schedules import rollout
    from distill.training.trainer import Trainer

    trainer = Trainer(phased_config(tiny_teacher, tmp_path / "run", "student.num_steps=2", "run.max_steps=2",
                                    "trainer.ema_decay=0.5", "export.at_end=true"))
    folder = trainer.train()
    card = (folder / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.split("\nimages = ")[0]  # the loop's definition; the test calls it with its own labels
    (tmp_path / "loop.py").write_text(code)
    meta = json.loads((folder / "distill.json").read_text())
    assert meta["experts"] == ["phase_0", "phase_1"] and meta["num_inference_steps"] == 2
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".py")]
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(folder), str(tmp_path / "loop.py"), "1234",
                           str(tmp_path / "images.pt")], capture_output=True, text=True, timeout=300,
                          env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    got = torch.load(tmp_path / "images.pt")
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 7])
    with torch.no_grad(), trainer.ema_weights() as gen:
        torch.manual_seed(1234)
        noise = torch.randn(len(labels), 1, 8, 8)
        want = (rollout(gen, trainer.recipe.schedule, {"class_labels": labels}, noise) / 2 + 0.5).clamp(0, 1)
        # the experts differ after training (phase 0 trained at step 0, phase 1 at step 1), so routing matters
        one_expert = PhasedExperts([gen.experts[0]] * 2, gen.times)
        torch.manual_seed(1234)
        noise = torch.randn(len(labels), 1, 8, 8)
        wrong = (rollout(one_expert, trainer.recipe.schedule, {"class_labels": labels}, noise) / 2 + 0.5).clamp(0, 1)
    assert want.std() > 0.01
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert (got - wrong).abs().max() > 1e-4
