"""Reflow, InstaFlow and SlimFlow: the straightening itself on a 2-D toy with a crossing coupling, the flow view of
an EDM teacher (exact), annealing and flow guidance against their formulas, and the recipes end to end on the tiny
teacher (pairs -> reflow -> pairs from the flow -> one-step student -> stock pipeline loaded without distill)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import NO_DISTILL, REPO, subprocess_env, tiny_overrides

from distill.base.errors import ConfigError
from distill.data.pairs import generate_from_config
from distill.models.denoiser import load_denoiser
from distill.models.schedules import rollout
from distill.parametrization import EDMProcess, flow_interpolate, flow_range, flow_to_native, flow_velocity
from distill.recipes.instaflow import two_step_euler
from distill.recipes.reflow import anneal_beta, annealed_noise, euler_path, parameter_count, reflow_loss, straightness
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

YAML = {name: REPO / "recipes" / "digits" / f"{name}.yaml" for name in ("reflow", "instaflow", "slimflow_reflow",
                                                                     "slimflow_distill", "dmd")}
SMALL_PAIRS = ("recipe.pairs.num_pairs=12", "recipe.pairs.shard_size=6", "recipe.pairs.num_steps=2",
               "recipe.pairs.progress_bar=false")


# ---------------------------------------------------------------------------------------------------------------
# The 2-D toy: a crossing coupling, straightened by reflow
# ---------------------------------------------------------------------------------------------------------------


class ToyFlow(torch.nn.Module):
    """A velocity network v(x, s) for 2-D points."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                       torch.nn.SiLU(), torch.nn.Linear(64, 2))

    def forward(self, x, s):
        return self.net(torch.cat([x, s[:, None]], 1))


def crossing_pairs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise clusters at (-2, +-1) coupled to data clusters at (2, -+1): every chord crosses the other cluster's."""
    side = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    z = torch.stack([torch.full((n,), -2.0), side], 1) + 0.15 * torch.randn(n, 2, generator=g)
    x1 = torch.stack([torch.full((n,), 2.0), -side], 1) + 0.15 * torch.randn(n, 2, generator=g)
    return z, x1


def train_toy(z: torch.Tensor, x1: torch.Tensor, steps: int = 800, seed: int = 0) -> ToyFlow:
    torch.manual_seed(seed)
    flow = ToyFlow()
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, z.shape[0], (256,))
        s = torch.rand(256)
        loss = reflow_loss(flow(flow_interpolate(x1[idx], z[idx], s), s), z[idx], x1[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return flow


def test_reflow_straightens_a_crossing_coupling():
    g = torch.Generator().manual_seed(0)
    z, x1 = crossing_pairs(2048, g)
    grid = torch.linspace(1.0, 0.0, 41)
    rf1 = train_toy(z, x1)  # the 1-rectified flow of the crossing coupling: its paths cannot cross, so they bend
    z_test, _ = crossing_pairs(512, g)
    path1 = euler_path(lambda x, s: rf1(x, s), z_test, grid)
    # Reflow: pairs from rf1's own ODE, and a new flow on their chords.
    z_new, _ = crossing_pairs(2048, g)
    x1_new = euler_path(lambda x, s: rf1(x, s), z_new, grid)[-1]
    rf2 = train_toy(z_new, x1_new, seed=1)
    path2 = euler_path(lambda x, s: rf2(x, s), z_test, grid)
    s1, s2 = straightness(path1, grid).mean().item(), straightness(path2, grid).mean().item()
    assert s1 > 0.05, s1  # the 1-rectified flow's paths are visibly curved
    assert s2 < 0.25 * s1, (s1, s2)
    print(f"toy straightness: 1-rectified {s1:.4f}, reflowed {s2:.4f}")
    # Straighter means one Euler step lands where the fine ODE does.
    one1 = euler_path(lambda x, s: rf1(x, s), z_test, grid[[0, -1]])[-1]
    one2 = euler_path(lambda x, s: rf2(x, s), z_test, grid[[0, -1]])[-1]
    err1 = (one1 - path1[-1]).pow(2).sum(1).mean().item()
    err2 = (one2 - path2[-1]).pow(2).sum(1).mean().item()
    assert err2 < 0.25 * err1, (err1, err2)


def test_straightness_is_zero_on_chords_and_positive_off_them():
    grid = torch.linspace(1.0, 0.0, 11)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    chord = torch.stack([b + float(s) * (a - b) for s in grid])
    assert straightness(chord, grid).abs().max() < 1e-12
    bent = chord.clone()
    bent[5] += 1.0  # one point of 11 displaced by 1 in each of 3 dimensions
    torch.testing.assert_close(straightness(bent, grid), torch.full((4,), 1.0 / 11))


# ---------------------------------------------------------------------------------------------------------------
# The flow view of an EDM network is exact
# ---------------------------------------------------------------------------------------------------------------


def test_flow_euler_step_is_the_teachers_ddim_step(tiny_teacher):
    """dx/ds = (x - x0_hat)/s in flow coordinates is the teacher's PF-ODE: one Euler step in s equals one DDIM step
    in sigma (x_b = x0 + sigma_b / sigma_a (x_a - x0)) after the change of variables x_s = x_sigma / (1 + sigma)."""
    teacher = load_denoiser(tiny_teacher, prediction="edm")
    g = torch.Generator().manual_seed(0)
    cond = {"class_labels": torch.tensor([0, 3, 7])}
    sig_a, sig_b = 2.5, 0.7
    x_a = torch.randn(3, 1, 8, 8, generator=g) * sig_a
    with torch.no_grad():
        x0 = teacher(x_a, torch.full((3,), sig_a), cond)
        ddim = x0 + sig_b / sig_a * (x_a - x0)
        s_a, s_b = sig_a / (1 + sig_a), sig_b / (1 + sig_b)
        y_a = x_a / (1 + sig_a)
        v = flow_velocity(teacher, teacher.process, y_a, torch.full((3,), s_a), cond)
        y_b = y_a + (s_b - s_a) * v
    torch.testing.assert_close(y_b * (1 + sig_b), ddim, atol=1e-5, rtol=1e-5)
    x_t, t = flow_to_native(teacher.process, y_a, torch.full((3,), s_a))
    torch.testing.assert_close(t, torch.full((3,), sig_a))
    torch.testing.assert_close(x_t, x_a)
    lo, hi = flow_range(EDMProcess())
    assert hi == pytest.approx(80 / 81) and lo == pytest.approx(0.002 / 1.002)


# ---------------------------------------------------------------------------------------------------------------
# SlimFlow: annealing and flow guidance
# ---------------------------------------------------------------------------------------------------------------


def test_annealed_noise_moves_from_random_to_teacher_pairs():
    assert [anneal_beta(k, 100) for k in (0, 50, 100, 200)] == [1.0, 0.5, 0.0, 0.0]
    assert anneal_beta(0, 0) == 0.0  # plain reflow
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(200000, generator=g), torch.randn(200000, generator=g)
    for beta in (0.0, 0.3, 0.8, 1.0):
        mixed = annealed_noise(z, eps, beta)
        assert mixed.var().item() == pytest.approx(1.0, abs=0.01)  # still standard normal
        corr = (mixed * z).mean().item()
        assert corr == pytest.approx((1 - beta**2) ** 0.5, abs=0.01)  # coupling to the teacher's noise
    assert torch.equal(annealed_noise(z, eps, 0.0), z) and torch.equal(annealed_noise(z, eps, 1.0), eps)


def test_two_step_euler_of_a_straight_flow_is_its_endpoint():
    """A network whose x0 estimate is a constant c has straight paths to c: two Euler steps land on c exactly for
    any intermediate time; with an x0 estimate that depends on x the intermediate time matters."""
    process = EDMProcess()
    c = torch.randn(5, 1, 4, 4)
    z = torch.randn(5, 1, 4, 4)
    out = two_step_euler(lambda x, t, cond: c, process, z, {}, torch.rand(5) * 0.9)
    torch.testing.assert_close(out, c, atol=1e-5, rtol=1e-5)
    half = lambda x, t, cond: 0.5 * x / (1 + t.reshape(-1, 1, 1, 1))  # x0 = half the flow state
    a = two_step_euler(half, process, z, {}, torch.full((5,), 0.2))
    b = two_step_euler(half, process, z, {}, torch.full((5,), 0.6))
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The recipes end to end on the tiny teacher
# ---------------------------------------------------------------------------------------------------------------


def run_cfg(name: str, teacher: Path, run: Path, *extra: str):
    return load_config(YAML[name], tiny_overrides(teacher, run, *SMALL_PAIRS, *extra))


CLEAN_LOAD = NO_DISTILL + r"""
import torch
from diffusers import ConsistencyModelPipeline, DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
assert type(pipe) is ConsistencyModelPipeline
pipe.set_progress_bar_config(disable=True)
labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
out = pipe(batch_size=10, class_labels=labels, generator=torch.Generator().manual_seed(1234), output_type="pt").images
torch.save({"images": out, "params": sum(p.numel() for p in pipe.unet.parameters())}, sys.argv[2])
print("clean load ok")
"""


def clean_load(folder: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(folder), str(out)], capture_output=True, text=True,
                          timeout=300, env=subprocess_env(), check=False)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    return torch.load(out)


def student_reference(trainer: Trainer) -> torch.Tensor:
    """The EMA student's one step from the noise the pipeline draws with a generator seeded 1234, as "pt" output."""
    with torch.no_grad(), trainer.ema_weights() as gen:
        noise = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(1234))
        x0 = rollout(gen, trainer.recipe.schedule, {"class_labels": torch.arange(10)}, noise)
    return (x0 / 2 + 0.5).clamp(0, 1)


@pytest.fixture(scope="module")
def chain(tiny_teacher, tmp_path_factory):
    """Teacher pairs -> 2 reflow steps (flow exported in teacher format) -> pairs from the flow -> 2 InstaFlow
    steps (stock pipeline)."""
    root = tmp_path_factory.mktemp("chain")
    teacher_pairs = f"recipe.pairs.path={root / 'pairs_teacher'}"
    generate_from_config(run_cfg("reflow", tiny_teacher, root / "reflow", teacher_pairs))
    reflow = Trainer(run_cfg("reflow", tiny_teacher, root / "reflow", teacher_pairs, "export.at_end=true",
                             "trainer.ema_decay=0.5"))
    at_start = {k: v.clone() for k, v in reflow.recipe.generator.model.state_dict().items()}
    flow_dir = reflow.train()
    flow_pairs = f"recipe.pairs.path={root / 'pairs_flow'}"
    generate_from_config(run_cfg("instaflow", flow_dir, root / "insta", flow_pairs))
    insta = Trainer(run_cfg("instaflow", flow_dir, root / "insta", flow_pairs, "export.at_end=true",
                            "trainer.ema_decay=0.5"))
    pipe_dir = insta.train()
    return {"root": root, "reflow": reflow, "at_start": at_start, "flow_dir": flow_dir, "insta": insta,
            "pipe_dir": pipe_dir, "teacher": tiny_teacher}


def test_reflow_starts_from_the_teacher_and_exports_a_teacher_folder(chain):
    from safetensors.torch import load_file

    teacher = load_file(chain["teacher"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert chain["at_start"].keys() == teacher.keys()
    assert all(torch.equal(chain["at_start"][k], teacher[k]) for k in teacher)
    flow_dir = chain["flow_dir"]
    saved = load_file(flow_dir / "unet" / "diffusion_pytorch_model.safetensors")
    with chain["reflow"].ema_weights() as gen:
        ema = {k: v.detach().cpu().clone() for k, v in gen.model.state_dict().items()}
    differ = [(k, (saved[k] - ema[k]).abs().max().item()) for k in saved if not torch.equal(saved[k], ema[k])]
    assert not differ, differ[:5]  # the EMA flow, every class row kept
    assert any(not torch.equal(saved[k], teacher[k]) for k in saved)  # it trained
    flow = load_denoiser(flow_dir, prediction="edm")
    assert isinstance(flow.process, EDMProcess)
    assert "Not a stock pipeline" in (flow_dir / "README.md").read_text()
    logs = chain["reflow"].train_step()
    assert logs["generator/reflow_loss"] > 0


def test_instaflow_export_is_the_students_one_step(chain, tmp_path):
    got = clean_load(chain["pipe_dir"], tmp_path / "out.pt")
    want = student_reference(chain["insta"])
    assert want.std() > 0.01
    torch.testing.assert_close(got["images"], want, atol=2e-5, rtol=1e-4)


def test_instaflow_loss_is_the_regression_of_the_single_step(chain):
    recipe = chain["insta"].recipe
    batch = recipe.dataset.sample(4, torch.Generator().manual_seed(0))
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
    with torch.no_grad():
        out = recipe.generator(recipe.schedule.start(batch.noise), recipe.schedule.t(0, 4, torch.device("cpu")), batch.cond)
    want = (out - batch.images).pow(2).flatten(1).mean(1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # Stored pairs of the flow: the student starts as the flow's one Euler step, not its 2-step ODE result.
    assert loss.item() > 0


def test_instaflow_refuses_multi_step_students(chain):
    with pytest.raises(ConfigError, match="student.num_steps"):
        Trainer(run_cfg("instaflow", chain["flow_dir"], chain["root"] / "x", f"recipe.pairs.path={chain['root'] / 'pairs_flow'}",
                        "student.num_steps=2"))


def test_missing_store_names_the_command(tiny_teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="distill pairs"):
        Trainer(run_cfg("reflow", tiny_teacher, tmp_path / "r", f"recipe.pairs.path={tmp_path / 'none'}"))


def test_slimflow_student_is_smaller_and_exports(chain, tmp_path):
    """Annealing reflow into a smaller network from scratch, then flow-guided distillation; stock export."""
    root, teacher = chain["root"], chain["teacher"]
    teacher_pairs = f"recipe.pairs.path={root / 'pairs_teacher'}"  # the same store reflow used
    small = Trainer(run_cfg("slimflow_reflow", teacher, tmp_path / "slim", teacher_pairs, "export.at_end=true",
                            "recipe.block_out_channels=[4, 8]", "recipe.anneal_steps=4"))
    small_dir = small.train()
    n_small = parameter_count(small.recipe.generator.model)
    n_teacher = parameter_count(load_denoiser(teacher).model)
    assert n_small < n_teacher / 2
    assert json.loads((small_dir / "distill.json").read_text())["parameters"] == n_small
    pairs = f"recipe.pairs.path={tmp_path / 'pairs_small'}"
    generate_from_config(run_cfg("slimflow_distill", small_dir, tmp_path / "slim_d", pairs))
    student = Trainer(run_cfg("slimflow_distill", small_dir, tmp_path / "slim_d", pairs, "export.at_end=true"))
    batch = student.recipe.dataset.sample(4, torch.Generator().manual_seed(0))
    with update_nets(student.recipe, "generator") as nets:
        loss, logs = student.recipe.generator_loss(nets, batch, 0)
    assert logs["flow_guidance_loss"] > 0
    w = student.cfg.recipe.flow_guidance_weight
    assert loss.item() == pytest.approx(logs["regression_loss"] + w * logs["flow_guidance_loss"], rel=1e-5)
    pipe_dir = student.train()
    got = clean_load(pipe_dir, tmp_path / "out.pt")
    assert got["params"] < n_teacher / 2
    torch.testing.assert_close(got["images"], student_reference(student), atol=2e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="recipe.block_out_channels"):
        Trainer(run_cfg("slimflow_reflow", teacher, tmp_path / "bad", teacher_pairs, "recipe.block_out_channels=[4]"))


def test_reflow_samples_with_the_students_step_count(chain):
    """generate() (grids, comparison tables) is the flow sampled with student.num_steps Euler steps."""
    from distill.recipes.reflow import sample_flow

    recipe = chain["reflow"].recipe
    assert recipe.num_steps == 1  # the shipped config's student.num_steps
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.arange(4)}
    with torch.no_grad(), chain["reflow"].ema_weights() as gen:
        got = recipe.generate(gen, cond, noise)
        one = sample_flow(gen, cond, noise, 1).clamp(-1, 1)
        twenty = sample_flow(gen, cond, noise, 20).clamp(-1, 1)
    torch.testing.assert_close(got, one)
    assert (got - twenty).abs().max() > 1e-3  # the step count matters, so the check above can fail
