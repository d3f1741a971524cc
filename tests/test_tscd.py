"""TSCD (recipes/tscd.py): segments and their boundaries, the target against the exact ODE of a Gaussian toy, the
stage chain (scripts/tscd_chain.py), a few-update run that trains only the student, and the export reproducing
`recipe.generate` at the segment boundaries in a process that never imports distill."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import NO_DISTILL, REPO, subprocess_env, tiny_overrides

from distill.base.errors import ConfigError
from distill.models.schedules import StudentSchedule, rollout
from distill.parametrization import EDMProcess
from distill.recipes.lcm import pseudo_huber
from distill.recipes.tscd import (
    grid_with_boundaries,
    lower_boundary,
    segment_boundaries,
    segment_target,
    solver_level,
)
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.registry import build_recipe
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(teacher, run, *extra, config="digits/tscd.yaml"):
    return load_config(config, tiny_overrides(teacher, run, *extra))


def _chain_module():
    spec = importlib.util.spec_from_file_location("tscd_chain", REPO / "scripts" / "tscd_chain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# Segments
# ---------------------------------------------------------------------------------------------------------------


def test_segment_assignment_and_solver_levels():
    grid = torch.arange(10.0)
    boundaries = segment_boundaries(torch.tensor([9.0, 7.0, 3.0]), 0.0)
    assert boundaries.tolist() == [0.0, 3.0, 7.0, 9.0]
    merged, levels = grid_with_boundaries(grid, boundaries)
    assert torch.equal(merged, grid) and levels.tolist() == [0, 3, 7, 9]
    n = torch.arange(1, 10)
    # (b_j, b_{j+1}]: an export level belongs to the segment below it
    assert lower_boundary(n, levels).tolist() == [0, 0, 0, 3, 3, 3, 3, 7, 7]
    m = solver_level(n, 2, lower_boundary(n, levels))
    assert m.tolist() == [0, 0, 1, 3, 3, 4, 5, 7, 7]


def test_boundaries_off_the_grid_are_inserted_and_near_ones_snap():
    grid = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    boundaries = torch.tensor([0.0, 1.5, 3.0 * (1 + 1e-7)], dtype=torch.float64)
    merged, levels = grid_with_boundaries(grid, boundaries, rtol=1e-5)
    assert merged.tolist() == [0.0, 1.0, 1.5, 2.0, 3.0 * (1 + 1e-7)] and levels.tolist() == [0, 2, 4]
    assert torch.equal(merged[levels], boundaries)


@pytest.mark.parametrize("extra", [("student.num_steps=4",),
                                   ("student.num_steps=2", "recipe.timesteps=[25, 0]"),
                                   ("student.num_steps=2", "recipe.num_timesteps=30")])
def test_the_export_levels_are_the_segment_boundaries(tiny_teacher, extra):
    recipe, _ = build_recipe(_config(tiny_teacher, Path("/nonexistent"), *extra), torch.device("cpu"))
    k = recipe.schedule.num_steps
    assert len(recipe.boundaries) == k + 1 and abs(float(recipe.boundaries[0]) - EDMProcess().sigma_min) < 1e-8
    torch.testing.assert_close(recipe.boundaries[1:].flip(0), recipe.schedule.times.float())
    assert torch.equal(recipe.grid[recipe.boundary_levels], recipe.boundaries)
    assert (recipe.grid.diff() > 0).all() and len(recipe.grid) >= recipe.cfg.num_timesteps


def test_bad_configs_are_refused(tiny_teacher):
    with pytest.raises(ConfigError, match="recipe.num_timesteps"):
        _config(tiny_teacher, Path("/nonexistent"), "student.num_steps=8", "recipe.num_timesteps=8")
    with pytest.raises(ConfigError, match="skip_steps"):
        _config(tiny_teacher, Path("/nonexistent"), "recipe.skip_steps=40")
    with pytest.raises(ConfigError, match="timesteps"):
        _config(tiny_teacher, Path("/nonexistent"), "student.num_steps=2", "recipe.timesteps=[0, 25]")


def test_stage_configs_validate_and_count_down(tiny_teacher):
    for k in (8, 4, 2, 1):
        cfg = load_config(REPO / "recipes" / "digits" / "tscd_stages" / f"stage_{k}.yaml",
                          tiny_overrides(tiny_teacher, Path("/nonexistent")))
        assert cfg.recipe_name == "tscd" and cfg.student.num_steps == k


# ---------------------------------------------------------------------------------------------------------------
# The target on a Gaussian toy: x0 ~ N(mu, c^2), EDM x_t = x0 + t eps, PF-ODE known in closed form
# ---------------------------------------------------------------------------------------------------------------

MU, C, SIGMA_MIN = 0.3, 0.5, 0.002


def ode(x, t, s):
    """Phi_{t->s}: (x - mu) / sqrt(c^2 + t^2) is constant along the PF-ODE of a Gaussian."""
    return MU + ((C**2 + s**2) / (C**2 + t**2)).sqrt() * (x - MU)


def consistency(x, t):
    return ode(x, t, torch.full_like(t, SIGMA_MIN))


def tweedie(x, t):
    return MU + C**2 / (C**2 + t**2) * (x - MU)


def _toy_segments(k):
    grid = EDMProcess().from_unit(torch.linspace(0, 1, 40)).double()
    times = {2: [80.0, 2.2404], 4: [80.0, 16.7799, 2.2404, 0.1312]}[k]  # the export's default k-step levels
    times = torch.stack([grid[(grid - v).abs().argmin()] for v in times])
    return grid_with_boundaries(grid, segment_boundaries(times, SIGMA_MIN))


def _segment_residual(student, target_net, k, skip=4):
    """|student(x_n) - target| for every level n >= 1 of the grid, the solver exact; (residuals, m, lower)."""
    grid, levels = _toy_segments(k)
    n = torch.arange(1, len(grid))
    lower = lower_boundary(n, levels)
    m = solver_level(n, skip, lower)
    z = torch.linspace(0.5, 3, len(n), dtype=torch.float64) * (-1) ** n  # away from mu, where the maps meet
    x_n = MU + z * (C**2 + grid[n] ** 2).sqrt()
    x_m = ode(x_n, grid[n], grid[m])
    target = segment_target(x_m, target_net(x_m, grid[m], levels, grid), m == 0)
    return (student(x_n, grid[n], levels, grid) - target).abs(), m, lower


def _segmentwise(anchor):
    """The map consistent along the ODE inside each segment, equal to `anchor` at the segment's lower end; the
    lowest segment uses the CM boundary (the consistency function)."""

    def f(x, t, levels, grid):
        n = torch.searchsorted(grid, t.contiguous())
        b = grid[lower_boundary(n, levels)]
        at_b = ode(x, t, b)
        return torch.where(b == grid[0], consistency(x, t), anchor(at_b, b))

    return f


@pytest.mark.parametrize("k", [2, 4])
def test_exact_segment_map_has_zero_loss_and_perturbed_ones_do_not(f64, k):
    exact = lambda x, t, levels, grid: consistency(x, t)  # noqa: E731
    res, m, lower = _segment_residual(exact, exact, k)
    assert res.max() < 1e-12 and (m == lower).sum() >= k  # pairs landing on each boundary were checked
    assert pseudo_huber(res[:, None], torch.zeros_like(res)[:, None], 1e-3).max() < 1e-12

    perturbed = lambda x, t, levels, grid: consistency(x, t) + 0.01 * t / (1 + t)  # noqa: E731
    res, _, _ = _segment_residual(perturbed, perturbed, k)
    assert res.min() > 1e-5

    # Consistent inside each segment but anchored at the Tweedie x0 of the boundary point (the limit of the
    # paper's DDIM form): zero on interior pairs, nonzero exactly on pairs that land on an upper boundary b_j >= b_1.
    local = _segmentwise(tweedie)
    res, m, lower = _segment_residual(local, local, k)
    landing = (m == lower) & (lower > 0)
    assert landing.any() and res[~landing].max() < 1e-12 and res[landing].min() > 1e-3


@pytest.mark.parametrize("k", [2, 4])
def test_the_stochastic_export_sampler_is_exact_only_with_the_sampler_boundary(f64, k):
    """The export's rollout (fresh noise at every boundary) of the fixed point keeps the data std c; the
    segment-local map anchored at the boundary's Tweedie estimate under-disperses (the derivation's claim)."""
    grid, levels = _toy_segments(k)
    sched = StudentSchedule(times=grid[levels][1:].flip(0), sigma_min=SIGMA_MIN, clip_x0=False)
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(1)
    exact = rollout(lambda x, t, cond: consistency(x, t), sched, {}, noise)
    torch.manual_seed(1)
    local = rollout(lambda x, t, cond: _segmentwise(tweedie)(x, t, levels, grid), sched, {}, noise)
    assert abs(exact.std().item() - C) < 0.005 and abs(exact.mean().item() - MU) < 0.01
    assert local.std().item() < C - 0.008  # 0.488 (k = 2), 0.404 (k = 4); Monte Carlo error ~0.001


def test_diagnostics_measure_the_segment_residual(tiny_teacher, f64):
    """With the teacher's solver replaced by the toy's exact ODE: the consistency function has zero gap in every
    segment; the Tweedie-anchored segment map a zero gap in the lowest segment only."""
    recipe, _ = build_recipe(_config(tiny_teacher, Path("/nonexistent"), "student.num_steps=4"), torch.device("cpu"))
    recipe.lcm.teacher_solver = lambda x, t, s, cond: ode(x, t.double(), s.double())
    grid, levels = recipe.grid.double(), recipe.boundary_levels
    noise = torch.randn(512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = recipe.diagnostics(lambda x, t, cond: consistency(x, t.double()), {}, noise)
    assert sorted(exact) == [f"segment_gap_{j}" for j in range(4)] and max(exact.values()) < 1e-6
    local = _segmentwise(tweedie)
    gaps = recipe.diagnostics(lambda x, t, cond: local(x, t.double(), levels, grid), {}, noise)
    assert gaps["segment_gap_0"] < 1e-6 and min(gaps[f"segment_gap_{j}"] for j in (1, 2, 3)) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def test_generator_loss_trains_only_the_student(tiny_teacher, tmp_path):
    cfg = _config(tiny_teacher, tmp_path / "a", "student.num_steps=4", "teacher.guidance_scale=1.5",
                  "data.batch_size=16")
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    target = copy.deepcopy(recipe.generator).requires_grad_(False)
    batch = data.sample(16, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with update_nets(recipe, "generator", target=target) as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and 0 < logs["on_boundary"] <= 1
    assert all(p.grad is not None for p in recipe.generator.parameters())
    assert all(p.grad is None for p in recipe.teacher.parameters()) and all(p.grad is None for p in target.parameters())

    trainer = Trainer(_config(tiny_teacher, tmp_path / "b", "student.num_steps=2", "run.max_steps=3"))
    teacher0 = {k: v.clone() for k, v in trainer.recipe.teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in trainer.recipe.generator.state_dict().items()}
    trainer.train()
    assert all(torch.equal(v, trainer.recipe.teacher.state_dict()[k]) for k, v in teacher0.items())
    assert any(not torch.equal(v, trainer.recipe.generator.state_dict()[k]) for k, v in student0.items())
    assert any(not torch.equal(v, trainer.target_network.state_dict()[k]) for k, v in student0.items())
    with trainer.ema_weights() as gen:
        gaps = trainer.recipe.diagnostics(gen, {"class_labels": torch.tensor([1, 2, 3])}, torch.randn(3, 1, 8, 8))
    assert sorted(gaps) == ["segment_gap_0", "segment_gap_1"] and all(0 < v < float("inf") for v in gaps.values())


def test_stage_chain_starts_each_stage_from_the_previous_ema_student(tiny_teacher, tmp_path, monkeypatch, capsys):
    chain = _chain_module()
    seen = []
    original = chain.initialise_student

    def recording(trainer, state):
        original(trainer, state)
        gen = {k: v.clone() for k, v in trainer.recipe.generator.state_dict().items()}
        target = {k: v.clone() for k, v in trainer.target_network.state_dict().items()}
        params = [p.detach().clone() for p in trainer.recipe.generator.parameters()]
        seen.append((trainer.cfg.student.num_steps, state, gen, target, [s.clone() for s in trainer.ema.shadow_params],
                     params))

    monkeypatch.setattr(chain, "initialise_student", recording)
    overrides = tiny_overrides(tiny_teacher, Path("/ignored"), "trainer.ema_decay=0.5")
    stages = []  # the on_stage hook (what --score hangs on) sees each stage's trained trainer, in order
    folders = chain.run_chain([4, 2], 2, tmp_path, overrides,
                              on_stage=lambda name, t: stages.append((name, t.step, t.cfg.student.num_steps)))
    assert stages == [("stage_4", 2, 4), ("stage_2", 2, 2)]
    assert folders == [tmp_path / "stage_4" / "pipeline", tmp_path / "stage_2" / "pipeline"]
    assert all((f / "distill.json").is_file() for f in folders)
    assert json.loads((folders[1] / "distill.json").read_text())["num_inference_steps"] == 2
    assert len(seen) == 1  # the first stage starts from the teacher, the second from the first
    steps, state, gen, target, shadow, params = seen[0]
    assert steps == 2
    for key, value in state.items():
        assert torch.equal(gen[key], value) and torch.equal(target[key], value)
    assert all(torch.equal(s, p) for s, p in zip(shadow, params))
    # the state is stage 4's exported EMA student (the export drops the null-class row of the class embedding)
    from diffusers import UNet2DModel

    exported = UNet2DModel.from_pretrained(folders[0] / "unet").state_dict()
    for key, value in exported.items():
        ours = state["model." + key] if "model." + key in state else None
        assert ours is not None, key
        torch.testing.assert_close(ours[: value.shape[0]] if ours.ndim else ours, value)
    teacher = build_recipe(_config(tiny_teacher, tmp_path / "t"), torch.device("cpu"))[0].teacher.state_dict()
    assert any(not torch.equal(state[k], teacher[k]) for k in state)
    assert "stage 2: 2 updates from the previous stage" in capsys.readouterr().out


CLEAN_SAMPLE = NO_DISTILL + r"""
import torch
from diffusers import ConsistencyModelPipeline, DiffusionPipeline

spec = json.load(open(sys.argv[1]))
pipe = DiffusionPipeline.from_pretrained(spec["folder"])
pipe.set_progress_bar_config(disable=True)
assert type(pipe) is ConsistencyModelPipeline, type(pipe)
pipe.scheduler.set_timesteps(num_inference_steps=spec["steps"])
sigmas = pipe.scheduler.sigmas[: spec["steps"]].tolist()
images = pipe(batch_size=len(spec["labels"]), class_labels=spec["labels"], num_inference_steps=spec["steps"],
              generator=torch.Generator().manual_seed(spec["seed"]), output_type="pt").images
torch.save({"images": images, "sigmas": sigmas}, spec["results"])
assert not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""


def test_export_reproduces_generate_at_the_segment_boundaries(tiny_teacher, tmp_path):
    labels, seed, k = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4], 1234, 4
    trainer = Trainer(_config(tiny_teacher, tmp_path / "run", "run.max_steps=2", "export.at_end=true",
                              "trainer.ema_decay=0.5", f"student.num_steps={k}"))
    folder = trainer.train()
    with torch.no_grad(), trainer.ema_weights() as gen:
        torch.manual_seed(seed)
        noise = torch.randn(len(labels), 1, 8, 8)
        reference = (trainer.recipe.generate(gen, {"class_labels": torch.tensor(labels)}, noise) / 2 + 0.5).clamp(0, 1)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"folder": str(folder), "labels": labels, "seed": seed, "steps": k,
                                "results": str(tmp_path / "out.pt")}))
    proc = subprocess.run([sys.executable, "-c", CLEAN_SAMPLE, str(spec)], capture_output=True, text=True,
                          timeout=300, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(torch.tensor(got["sigmas"], dtype=torch.float32), trainer.recipe.boundaries[1:].flip(0))
    assert reference.std() > 0.01
    torch.testing.assert_close(got["images"], reference, atol=2e-5, rtol=1e-4)
