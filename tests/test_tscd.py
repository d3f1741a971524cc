"""TSCD (Hyper-SD) against closed forms and as runs: the segments are the export's k-step schedule, on a Gaussian
toy the exact segment map of the PF-ODE has zero loss and a wrong x0 costs its residual carried to the boundary,
the boundary condition needs no network, the pipeline's re-noising of a k-segment student has the derived
variance, only the student trains, a stage starts from the previous stage's export (and the chain script runs),
and the export reproduces the student's own rollout in a process that cannot import distill."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import NO_DISTILL, REPO, subprocess_env, tiny_overrides

from distill.base.errors import ConfigError
from distill.models.schedules import StudentSchedule, rollout
from distill.parametrization import EDMProcess, VPProcess
from distill.recipes.lcm import pseudo_huber
from distill.recipes.tscd import (
    grid_with_boundaries,
    lower_boundary,
    segment_boundaries,
    segment_target,
    solver_level,
    to_boundary,
)
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.registry import build_recipe
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SD, SIGMA_MIN = 0.5, 0.002
MU = torch.tensor([0.3, -0.6, 0.1], dtype=torch.float64)
C = torch.tensor([0.4, 0.25, 0.6], dtype=torch.float64)
#: the digits export's k-step sigmas (CMStochasticIterativeScheduler, 40 Karras levels, default spacing)
DIGITS_TIMES = {1: [80.0], 2: [80.0, 2.2404397], 4: [80.0, 16.779890, 2.2404397, 0.13119736]}


def _config(teacher, run, *extra, yaml_path="digits/tscd.yaml"):
    return load_config(yaml_path, tiny_overrides(teacher, run, *extra))


# ---------------------------------------------------------------------------------------------------------------
# Segments
# ---------------------------------------------------------------------------------------------------------------


def test_every_level_maps_to_the_segment_ending_at_the_next_export_time(tiny_teacher):
    boundaries = {}
    for k in (1, 2, 4, 8):
        recipe, _ = build_recipe(_config(tiny_teacher, Path("/nonexistent"), f"student.num_steps={k}"),
                                 torch.device("cpu"))
        times, grid, levels = recipe.schedule.times, recipe.grid, recipe.boundary_levels
        assert len(grid) == 40 and torch.equal(grid[levels[1:]].flip(0), times)  # trained at the pipeline's floats
        assert levels[0] == 0 and float(grid[0]) == pytest.approx(SIGMA_MIN, rel=1e-5)
        nexts = torch.cat([times[1:], grid[:1]])  # where pipeline step i re-noises to: the next time, or sigma_min
        for i in range(k):
            for n in range(1, len(grid)):
                inside = bool(nexts[i] < grid[n] <= times[i])
                assert inside == (float(grid[lower_boundary(torch.tensor([n]), levels)]) == float(nexts[i])), (k, i, n)
        boundaries[k] = set(recipe.boundaries.tolist())
    assert boundaries[1] <= boundaries[2] <= boundaries[4] <= boundaries[8]  # the stages' segments nest
    n = torch.arange(1, 40)
    lower = lower_boundary(n, torch.tensor([0, 9, 19, 29, 39]))
    assert torch.equal(solver_level(n, 4, lower), torch.maximum(n - 4, lower))
    assert (solver_level(n, 4, lower) >= lower).all() and (solver_level(n, 4, lower) < n).all()


def test_boundaries_off_the_grid_are_inserted():
    grid = VPProcess(tuple(torch.linspace(0.999, 0.01, 1000).tolist())).from_unit(torch.linspace(0, 1, 50))
    merged, idx = grid_with_boundaries(grid, segment_boundaries(torch.tensor([999.0, 499.0]), 0.0))
    assert merged.dtype == grid.dtype and len(merged) == 51 and merged.tolist() == sorted(set(merged.tolist()))
    assert merged[idx].tolist() == [0, 499, 999]


# ---------------------------------------------------------------------------------------------------------------
# Gaussian toy: x0 ~ N(MU, C^2) per coordinate, EDM x = x0 + sigma eps, whose PF-ODE is known in closed form
# ---------------------------------------------------------------------------------------------------------------


def flow(x, s, b):
    """The exact PF-ODE map from level s to level b: (x - mu) / sqrt(c^2 + sigma^2) is constant along it."""
    return MU + torch.sqrt(C**2 + b[:, None] ** 2) / torch.sqrt(C**2 + s[:, None] ** 2) * (x - MU)


def segment_x0(x, t, b, clean_end):
    """The exact TSCD student: the x0 whose DDIM step t -> b lands on flow(x, t, b); the clean sample in the lowest
    segment (the consistency function f*(x, t) = flow(x, t, sigma_min))."""
    r = (b / t)[:, None]
    jump = (flow(x, t, b) - r * x) / (1 - r)
    return torch.where(clean_end[:, None], flow(x, t, torch.full_like(t, SIGMA_MIN)), jump)


def toy_levels(seed):
    process = EDMProcess(sigma_min=SIGMA_MIN, sigma_data=SD)
    grid = process.from_unit(torch.linspace(0, 1, 40, dtype=torch.float64))
    bounds = segment_boundaries(torch.tensor(DIGITS_TIMES[4], dtype=torch.float64), float(grid[0]))
    grid, levels = grid_with_boundaries(grid, bounds)
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, 40, (400,), generator=g)
    lower = lower_boundary(n, levels)
    m = solver_level(n, 4, lower)
    x0 = MU + C * torch.randn(400, 3, generator=g, dtype=torch.float64)
    x_n = x0 + grid[n][:, None] * torch.randn(400, 3, generator=g, dtype=torch.float64)
    return process, grid, n, m, lower, x_n


def test_exact_segment_map_has_zero_loss_and_a_wrong_x0_pays_its_carried_residual(f64):
    process, grid, n, m, lower, x_n = toy_levels(0)
    t_n, t_m, b, clean = grid[n], grid[m], grid[lower], lower == 0
    assert clean.any() and (~clean).any() and (m == lower).any() and (m > lower).any()
    x_m = flow(x_n, t_n, t_m)  # the exact solver
    pred = to_boundary(x_n, segment_x0(x_n, t_n, b, clean), t_n, b, clean, process)
    target = segment_target(x_m, segment_x0(x_m, t_m, b, clean), t_m, b, clean, process)
    end = torch.where(clean[:, None], flow(x_n, t_n, torch.full_like(t_n, SIGMA_MIN)), flow(x_n, t_n, b))
    # the boundary point of x_n's trajectory (to float32: EDMProcess.alpha_sigma computes in float32)
    torch.testing.assert_close(pred, end, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target, end, rtol=1e-5, atol=1e-6)
    assert pseudo_huber(pred, target, 1e-3).abs().max() < 1e-8
    # an x0 off by delta: the loss is the residual carried to the boundary, (1 - b/t) delta (x0 itself when clean)
    delta = 0.05 * torch.randn(x_n.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wrong = to_boundary(x_n, segment_x0(x_n, t_n, b, clean) + delta, t_n, b, clean, process)
    weight = torch.where(clean, torch.ones_like(t_n), 1 - b / t_n)[:, None]
    torch.testing.assert_close(pseudo_huber(wrong, target, 1e-3), pseudo_huber(weight * delta, 0 * delta, 1e-3),
                               rtol=1e-4, atol=1e-8)


def test_on_the_boundary_the_target_is_the_solvers_point(f64):
    """DDIM to its own level is the identity: where the solver lands on the lower boundary the target is x_b, whatever
    the target network says; in the lowest segment that is LCM's rule (target x_0 at the clean end, else the target
    network's x0, and the student's own x0 as prediction)."""
    process, grid, n, m, lower, x_n = toy_levels(2)
    t_m, b, clean = grid[m], grid[lower], lower == 0
    x_m = x_n + 0.1
    junk = torch.randn(x_m.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = segment_target(x_m, junk, t_m, b, clean, process)
    on = m == lower
    torch.testing.assert_close(target[on], x_m[on], rtol=0, atol=0)
    torch.testing.assert_close(target[~on & clean], junk[~on & clean], rtol=0, atol=0)
    a = (b / t_m)[:, None]
    torch.testing.assert_close(target[~on & ~clean], ((1 - a) * junk + a * x_m)[~on & ~clean])
    torch.testing.assert_close(to_boundary(x_n, junk, grid[n], b, clean, process)[clean], junk[clean], rtol=0, atol=0)


def recursion_std(times: list[float], c: float) -> float:
    """Std of the pipeline's sample from the exact k-segment student on x0 ~ N(0, c^2) (derived, docs/tscd.md):
    x ~ N(0, v), x0 = a x with a = (rho - b/t) / (1 - b/t), rho = sqrt(c^2 + b^2) / sqrt(c^2 + t^2), then
    v <- a^2 v + b^2 - sigma_min^2; the last step's x0 = rho_min x."""
    v = times[0] ** 2
    for t, b in zip(times, times[1:]):
        rho = math.sqrt((c * c + b * b) / (c * c + t * t))
        v = ((rho - b / t) / (1 - b / t)) ** 2 * v + b * b - SIGMA_MIN**2
    return math.sqrt(v * (c * c + SIGMA_MIN**2) / (c * c + times[-1] ** 2))


def test_the_pipelines_renoising_of_a_segment_student_has_the_derived_spread(f64):
    """The exact k-segment student sampled as ConsistencyModelPipeline samples (fresh noise at each re-noising):
    one segment gives the data's spread; more segments lose some (the docstring's 0.488 / 0.404 for c = 0.5)."""
    assert recursion_std(DIGITS_TIMES[1], 0.5) == pytest.approx(0.5, rel=1e-4)
    assert [round(recursion_std(DIGITS_TIMES[k], 0.5), 3) for k in (2, 4)] == [0.488, 0.404]
    for k, times in DIGITS_TIMES.items():
        bounds = torch.tensor([SIGMA_MIN, *reversed(times)], dtype=torch.float64)

        def student(x, t, cond):
            lower = bounds[torch.searchsorted(bounds, t.contiguous()) - 1]
            return segment_x0(x, t, lower, lower == SIGMA_MIN)

        schedule = StudentSchedule(times=torch.tensor(times, dtype=torch.float64), sigma_min=SIGMA_MIN,
                                   clip_x0=False)
        torch.manual_seed(k)
        x = rollout(student, schedule, {}, torch.randn(100_000, 3, dtype=torch.float64))
        expected = torch.tensor([recursion_std(times, float(c)) for c in C], dtype=torch.float64)
        torch.testing.assert_close(x.std(0), expected, rtol=0.015, atol=0)
        if k == 1:
            torch.testing.assert_close(x.std(0), C, rtol=0.015, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Runs on the tiny teacher
# ---------------------------------------------------------------------------------------------------------------


def test_generator_loss_trains_only_the_student(tiny_teacher, tmp_path):
    cfg = _config(tiny_teacher, Path("/nonexistent"), "student.num_steps=4", "teacher.guidance_scale=1.5")
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    batch = data.sample(8, torch.Generator().manual_seed(0))
    with update_nets(recipe, "generator", target=copy.deepcopy(recipe.generator).requires_grad_(False)) as nets:
        torch.manual_seed(4)
        loss, logs = recipe.generator_loss(nets, batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and 0 <= logs["on_boundary"] <= 1
    assert all(p.grad is not None for p in recipe.generator.parameters())
    assert all(p.grad is None for p in recipe.teacher.parameters())

    trainer = Trainer(_config(tiny_teacher, tmp_path / "run", "student.num_steps=2", "run.max_steps=3"))
    before = {name: {k: v.clone() for k, v in net.state_dict().items()}
              for name, net in (("teacher", trainer.recipe.teacher), ("student", trainer.recipe.generator))}
    trainer.train()
    assert all(torch.equal(v, trainer.recipe.teacher.state_dict()[k]) for k, v in before["teacher"].items())
    assert any(not torch.equal(v, trainer.recipe.generator.state_dict()[k]) for k, v in before["student"].items())


CLEAN_SAMPLE = NO_DISTILL + r"""
import torch
from diffusers import ConsistencyModelPipeline, DiffusionPipeline

spec = json.load(open(sys.argv[1]))
pipe = DiffusionPipeline.from_pretrained(spec["folder"])
pipe.set_progress_bar_config(disable=True)
assert type(pipe) is ConsistencyModelPipeline, type(pipe)
images = pipe(batch_size=len(spec["labels"]), class_labels=spec["labels"], num_inference_steps=spec["steps"],
              generator=torch.Generator().manual_seed(spec["seed"]), output_type="pt").images
torch.save(images, spec["results"])
assert not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""


def test_export_reproduces_generate_and_the_next_stage_starts_from_it(tiny_teacher, tmp_path):
    labels, seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4], 1234
    trainer = Trainer(_config(tiny_teacher, tmp_path / "stage_2", "student.num_steps=2", "run.max_steps=2",
                              "export.at_end=true", "trainer.ema_decay=0.5"))
    folder = trainer.train()
    assert json.loads((folder / "distill.json").read_text())["num_inference_steps"] == 2
    with torch.no_grad(), trainer.ema_weights() as gen:
        ema = {k: v.clone() for k, v in gen.state_dict().items()}
        torch.manual_seed(seed)
        x0 = trainer.recipe.generate(gen, {"class_labels": torch.tensor(labels)}, torch.randn(len(labels), 1, 8, 8))
    reference = (x0 / 2 + 0.5).clamp(0, 1)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"folder": str(folder), "labels": labels, "seed": seed, "steps": 2,
                                "results": str(tmp_path / "out.pt")}))
    proc = subprocess.run([sys.executable, "-c", CLEAN_SAMPLE, str(spec)], capture_output=True, text=True,
                          timeout=300, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    assert reference.std() > 0.01
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), reference, atol=2e-5, rtol=1e-4)

    # the next stage (1 segment): student, EMA target and exported EMA start from that export; the teacher does not
    nxt = Trainer(_config(tiny_teacher, tmp_path / "stage_1", "student.num_steps=1", f"recipe.init_from={folder}"))
    teacher = trainer.recipe.teacher.state_dict()
    for net in (nxt.recipe.generator, nxt.target_network):
        state = net.state_dict()
        for k, v in ema.items():
            if k.endswith("class_embedding.weight"):  # the export drops the null class row: the teacher's
                assert torch.equal(state[k][:-1], v[:-1]) and torch.equal(state[k][-1], teacher[k][-1])
            else:
                assert torch.equal(state[k], v), k
    assert all(torch.equal(v, teacher[k]) for k, v in nxt.recipe.teacher.state_dict().items())
    assert any(not torch.equal(v, teacher[k]) for k, v in nxt.recipe.generator.state_dict().items())


def test_chain_script_runs_the_stages_in_order(tiny_teacher, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tscd_chain", REPO / "scripts" / "tscd_chain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tiny = [o for o in tiny_overrides(tiny_teacher, tmp_path) if not o.startswith(("run.", "export."))]
    assert script.main(["--budget", "1", "--stages", "2", "1", "--out", str(tmp_path), "--set", *tiny]) == 0
    out = capsys.readouterr().out
    assert out.index("stage 2:") < out.index("stage 1:") and "from the teacher" in out
    first, last = (yaml.safe_load((tmp_path / f"stage_{k}" / "config.yaml").read_text()) for k in (2, 1))
    assert first["recipe"]["init_from"] is None and first["student"]["num_steps"] == 2
    assert last["recipe"]["init_from"] == str(tmp_path / "stage_2" / "pipeline") and last["student"]["num_steps"] == 1
    assert last["teacher"]["path"] == first["teacher"]["path"] == str(tiny_teacher)
    assert json.loads((tmp_path / "stage_1" / "pipeline" / "distill.json").read_text())["num_inference_steps"] == 1
    with pytest.raises(SystemExit, match="strictly decreasing"):
        script.main(["--budget", "1", "--stages", "1", "2", "--out", str(tmp_path / "x")])


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------


def test_stage_configs_chain_8_4_2_1(tiny_teacher, tmp_path):
    stages = REPO / "recipes" / "digits" / "tscd_stages"
    assert sorted(p.name for p in stages.glob("*.yaml")) == [f"stage_{k}.yaml" for k in (1, 2, 4, 8)]
    previous = None
    for k in (8, 4, 2, 1):
        raw = yaml.safe_load((stages / f"stage_{k}.yaml").read_text())
        assert raw["student"]["num_steps"] == k and raw["teacher"]["path"] == "builtin:digits_teacher"
        assert raw["recipe"]["init_from"] == (None if previous is None else f"{previous}/pipeline")
        previous = raw["run"]["output_dir"]
        cfg = _config(tiny_teacher, tmp_path, "recipe.init_from=null", yaml_path=stages / f"stage_{k}.yaml")
        assert cfg.recipe_name == "tscd" and cfg.student.num_steps == k


def test_bad_configs_are_refused_with_the_key(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"recipe.init_from: .* is not an exported pipeline folder"):
        _config(tiny_teacher, tmp_path, f"recipe.init_from={tmp_path}")
    with pytest.raises(ConfigError, match="recipe.skip_steps"):
        _config(tiny_teacher, tmp_path, "recipe.skip_steps=40")
    with pytest.raises(ConfigError, match="recipe.timesteps"):
        _config(tiny_teacher, tmp_path, "recipe.timesteps=[0, 20]")
    with pytest.raises(ConfigError, match="recipe.init_from: .* holds another network"):
        other = tmp_path / "other"
        (other / "scheduler").mkdir(parents=True)
        (other / "scheduler" / "scheduler_config.json").write_text((Path(str(tiny_teacher)) / "scheduler" /
                                                                    "scheduler_config.json").read_text())
        unet = json.loads((Path(str(tiny_teacher)) / "unet" / "config.json").read_text())
        unet["block_out_channels"] = [c * 2 for c in unet["block_out_channels"]]
        from diffusers import UNet2DModel

        UNet2DModel.from_config(unet).save_pretrained(other / "unet")
        build_recipe(_config(tiny_teacher, tmp_path, f"recipe.init_from={other}"), torch.device("cpu"))
