"""TBCM against closed forms and as a run.

On a Gaussian toy whose PF-ODE and consistency function are known in closed form: the pair store's paths are the
teacher ODE's states (and the solver's own), the velocity rebuilt from a stored x0 estimate is the teacher's, the
route step is DDIM, online routes follow the ODE, and on every trajectory point (stored, jittered or online) the
tangent vanishes for the exact consistency function and has its closed form for a wrong one; training on
trajectory points moves a student to the consistency function. On the tiny teacher: a store without paths is the
store it always was, paths round-trip, only the student trains, no data image is read while training, and the
export reproduces the student's rollout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import torch
from safetensors import safe_open
from tiny import sample_exports_cleanly, tiny_overrides
from torch import nn

from distill.base.errors import ConfigError
from distill.data.pairs import (
    PairsConfig,
    PairStore,
    PathPairsConfig,
    generate_from_config,
    make_shard,
    path_steps,
    read_manifest,
)
from distill.models.sampling import dpm_solver_2m, unit_grid
from distill.parametrization import (
    EDMProcess,
    FlowProcess,
    TrigFlowProcess,
    cm_scalings,
    karras_sigmas,
    trigflow_to_native,
)
from distill.recipes.scm import scm_loss, scm_tangent, teacher_velocity, trigflow_view
from distill.recipes.tbcm import (
    ddim_step,
    jitter_route,
    native_to_trigflow,
    online_points,
    reference_route,
    stored_points,
    tbcm_loss,
    trace_route,
    velocity_from_x0,
)
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.registry import build_recipe
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SD, SIGMA_MIN, SIGMA_MAX = 0.5, 0.002, 80.0
MU = torch.tensor([0.3, -0.6, 0.1], dtype=torch.float64)
C = torch.tensor([0.4, 0.25, 0.6], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Gaussian toy: x0 ~ N(MU, C^2) per coordinate, EDM noise x = x0 + sigma eps
# ---------------------------------------------------------------------------------------------------------------


class GaussianTeacher(nn.Module):
    """The exact denoiser E[x0 | x] = mu + c^2 / (c^2 + sigma^2) (x - mu), behind the Denoiser call signature."""

    process = EDMProcess(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, sigma_data=SD)

    def forward(self, x, sigma, cond, want="x0", guidance_scale=1.0):
        return (MU + C**2 / (C**2 + sigma.double()[:, None] ** 2) * (x.double() - MU)).to(x.dtype)


def invariant(x_edm, sigma):
    """(x - mu) / sqrt(c^2 + sigma^2): constant along the Gaussian's PF-ODE."""
    return (x_edm - MU) / torch.sqrt(C**2 + sigma[..., None] ** 2)


def exact_consistency(x, sigma):
    """f*(x, sigma) = the ODE's state at sigma_min from (x, sigma)."""
    return MU + torch.sqrt(C**2 + SIGMA_MIN**2) * invariant(x, sigma)


class ToyCMStudent(nn.Module):
    """A CM-parametrized student x0 = f*(x, sigma) + theta c_out(sigma) x (theta = 0: the consistency function)."""

    process = EDMProcess(sigma_min=SIGMA_MIN, sigma_data=SD)

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64).clone())

    def forward(self, x, sigma, cond):
        _, c_out, _ = cm_scalings(sigma, SD, SIGMA_MIN)
        return exact_consistency(x, sigma) + self.theta * c_out[:, None] * x


def closed_form_df_dt(theta, x_t, t):
    """d/dt of f_theta along the exact PF-ODE in TrigFlow time (f* is constant along it)."""
    sigma = SD * torch.tan(t)
    x_edm = x_t / torch.cos(t)[:, None]
    s, root = sigma[:, None], torch.sqrt(sigma[:, None] ** 2 + SD**2)
    c_out = (s - SIGMA_MIN) * SD / root
    dc_out = SD / root - (s - SIGMA_MIN) * SD * s / root**3
    dx_dsigma = s * (x_edm - MU) / (C**2 + s**2)
    return theta * (dc_out * x_edm + c_out * dx_dsigma) * SD / torch.cos(t)[:, None] ** 2


def gaussian_store(num_steps: int, path_points: int, n: int = 64) -> dict[str, torch.Tensor]:
    pc = PathPairsConfig(num_pairs=n, shard_size=n, num_steps=num_steps, path_points=path_points, labels="uniform",
                         batch_size=n // 2)
    return make_shard(GaussianTeacher(), pc, 0, (3,), 1.0, None, 1, torch.device("cpu"))


def test_store_paths_are_the_teacher_ode_states(f64):
    """With the exact denoiser, the stored states lie on the PF-ODE through their noise (its invariant is kept),
    the stored x0 estimates are the teacher's there, and the stored times are the sampler's levels."""
    shard = gaussian_store(100, 12)
    steps = path_steps(100, 12)
    assert steps[0] == 0 and steps[-1] == 99 and len(set(steps)) == 12
    grid = karras_sigmas(unit_grid(100), SIGMA_MIN, SIGMA_MAX).float()
    torch.testing.assert_close(shard["path_times"], grid[steps].expand(64, 12))
    x_T = shard["noise"] * SIGMA_MAX
    torch.testing.assert_close(shard["path"][:, 0], x_T.float())  # step 0: the scaled noise itself
    start = invariant(x_T, torch.full((64,), SIGMA_MAX))
    drift = invariant(shard["path"].double(), shard["path_times"].double()) - start[:, None]
    assert drift.abs().max() < 0.01, drift.abs().max()
    end = (shard["sample"].double() - MU) / C - start
    assert end.abs().max() < 0.01
    flat = shard["path"].flatten(0, 1).double()
    want = GaussianTeacher()(flat, shard["path_times"].flatten().double(), {})
    torch.testing.assert_close(shard["path_x0"].flatten(0, 1).double(), want, rtol=1e-6, atol=1e-6)


def test_velocity_from_a_stored_estimate_is_the_teacher_velocity(f64):
    shard = gaussian_store(12, 12)
    x, t = native_to_trigflow(GaussianTeacher.process, shard["path"].flatten(0, 1).double(),
                              shard["path_times"].flatten().double(), SD)
    v = velocity_from_x0(shard["path_x0"].flatten(0, 1).double(), x, t, SD)
    torch.testing.assert_close(v, teacher_velocity(GaussianTeacher(), x, t, {}, SD), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("process", [EDMProcess(sigma_data=SD), FlowProcess(shift=3.0), TrigFlowProcess(sigma_data=SD)])
def test_native_to_trigflow_inverts_trigflow_to_native(process):
    x = torch.randn(5, 1, 3, 3)
    t = torch.tensor([0.05, 0.4, 0.9, 1.3, 1.55])
    x_native, t_native = trigflow_to_native(process, x, t, SD)
    x_back, t_back = native_to_trigflow(process, x_native, t_native, SD)
    torch.testing.assert_close(t_back, t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_back, x, rtol=1e-4, atol=1e-5)


def test_route_step_is_ddim(f64):
    """cos(t - s) x - sin(t - s) dx/dt = sin s / sin t x + sin(t - s) / sin t x0, and in EDM coordinates the
    teacher sampler's first-order (DDIM) step."""
    teacher = GaussianTeacher()
    x_edm = MU + 3.0 * torch.randn(8, 3)
    sigma, sigma_next = torch.full((8,), 3.0), torch.full((8,), 0.7)
    x, t = native_to_trigflow(teacher.process, x_edm, sigma, SD)
    s = torch.atan(sigma_next / SD)
    x0 = teacher(x_edm, sigma, {})
    stepped = ddim_step(x, velocity_from_x0(x0, x, t, SD), t, s)
    torch.testing.assert_close(stepped, (torch.sin(s) / torch.sin(t))[:, None] * x
                               + (torch.sin(t - s) / torch.sin(t))[:, None] * x0)
    ones, levels = torch.ones(2, dtype=torch.float64), torch.tensor([3.0, 0.7], dtype=torch.float64)
    ddim = dpm_solver_2m(lambda y, tt: teacher(y, tt, {}), x_edm / 3.0, ones, levels, levels, order=1)
    torch.testing.assert_close(stepped / torch.cos(s)[:, None], ddim)


def test_route_levels_and_jitter():
    ref = reference_route(EDMProcess(), 16, SD)
    want = torch.atan(karras_sigmas(unit_grid(16)[:16], SIGMA_MIN, SIGMA_MAX) / SD).float()
    torch.testing.assert_close(ref, want)
    assert torch.all(ref[1:] < ref[:-1]) and abs(float(ref[0]) - float(np.arctan(160.0))) < 1e-6
    torch.manual_seed(0)
    times = jitter_route(ref, 4000)
    assert torch.equal(times[:, 0], ref[0].expand(4000))
    assert torch.all(times[:, 1:] >= ref[1:]) and torch.all(times[:, 1:] <= ref[:-1])
    share = (times[:, 1:] - ref[1:]) / (ref[:-1] - ref[1:])  # uniform within each interval
    assert (share.mean(0) - 0.5).abs().max() < 0.03 and (share.var(0) - 1 / 12).abs().max() < 0.01


def test_online_route_follows_the_teacher_ode(f64):
    """States of a fine route stay on the PF-ODE through the start; each is one route step from the one before,
    with the teacher's velocity there."""
    teacher = GaussianTeacher()
    ref = reference_route(teacher.process, 400, SD).double()
    eps = torch.randn(16, 3)
    start = SD * torch.sin(ref[0]) * eps
    velocity = lambda x, t: teacher_velocity(teacher, x, t, {}, SD)  # noqa: E731
    states, vels = trace_route(velocity, start, ref.expand(16, 400))
    sigma = SD * torch.tan(ref)
    drift = invariant(states / torch.cos(ref)[:, None], sigma) - invariant(eps * SIGMA_MAX, sigma[:1])[:, None]
    assert drift.abs().max() < 0.02, drift.abs().max()
    torch.testing.assert_close(vels[:, 7], velocity(states[:, 7], ref[7].expand(16)))
    torch.testing.assert_close(states[:, 8], ddim_step(states[:, 7], vels[:, 7], ref[7].expand(16), ref[8].expand(16)))


def _points(kind: str, seed: int):
    """(x_t, t, dx_t/dt) of 64 trajectory points of the Gaussian teacher: stored (fixed or jittered) or online."""
    torch.manual_seed(seed)
    teacher = GaussianTeacher()
    velocity = lambda x, t: teacher_velocity(teacher, x, t, {}, SD)  # noqa: E731
    if kind == "online":
        ref = reference_route(teacher.process, 16, SD).double()
        x_t, t, v, _ = online_points(velocity, ref, 64, (3,), SD, "jittered")
        return x_t, t, v
    shard = gaussian_store(12, 12)
    k = torch.randint(1, 11, (64,)) if kind == "fixed" else torch.randint(0, 11, (64,))
    rows = torch.arange(64)
    f = {key: shard[key].double() for key in ("path", "path_times", "path_x0")}
    return stored_points(f["path"][rows, k], f["path_times"][rows, k], f["path_x0"][rows, k],
                         f["path_times"][rows, k + 1], teacher.process, SD, kind, velocity)


@pytest.mark.parametrize("kind", ["fixed", "jittered", "online"])
def test_tangent_vanishes_on_trajectory_points_for_the_consistency_function(f64, kind):
    x_t, t, v = _points(kind, 1)
    torch.testing.assert_close(v, teacher_velocity(GaussianTeacher(), x_t, t, {}, SD), rtol=1e-5, atol=1e-5)
    exact = ToyCMStudent(0.0)
    _, g = scm_tangent(trigflow_view(exact, exact.process, {}, SD), x_t, t, v, SD)
    assert g.abs().max() < 1e-5, g.abs().max()
    theta = torch.tensor([0.5, -0.3, 0.8])
    wrong = ToyCMStudent(theta)
    _, g = scm_tangent(trigflow_view(wrong, wrong.process, {}, SD), x_t, t, v, SD)
    expected = torch.cos(t)[:, None] * closed_form_df_dt(theta, x_t, t)
    assert expected.abs().mean() > 1e-2
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-5)
    levels = torch.atan(karras_sigmas(unit_grid(12)[:12], SIGMA_MIN, SIGMA_MAX).float().double() / SD)
    on_level = torch.isclose(t.double()[:, None], levels[None], rtol=0, atol=1e-6).any(1)
    assert on_level.all() if kind == "fixed" else not on_level.any()  # jittered draws lie between the levels


def test_loss_is_the_weighted_scm_loss(f64):
    F = torch.randn(6, 4, requires_grad=True)
    g, t, u = torch.randn(6, 4), torch.linspace(0.1, 1.5, 6), torch.linspace(-1, 1, 6)
    w = 1 / (SD * torch.tan(t))
    mse = g.pow(2).mean(1)
    torch.testing.assert_close(tbcm_loss(F, F.detach(), g, t, SD, u), w * torch.exp(-u) * mse + u)
    torch.testing.assert_close(tbcm_loss(F, F.detach(), g, t, SD), w * mse)
    torch.testing.assert_close(tbcm_loss(F, F.detach(), g, t, SD, u, "none"), scm_loss(F, F.detach(), g, u))
    tbcm_loss(F, F.detach(), g, t, SD, u).sum().backward()
    torch.testing.assert_close(F.grad, -2 * (w * torch.exp(-u))[:, None] * g / 4)


def test_training_on_trajectory_points_moves_the_student_to_the_consistency_function(f64):
    from distill.parametrization import trigflow_from_x0
    from distill.recipes.scm import LogVarianceHead, normalize_tangent

    student, head = ToyCMStudent([0.6, -0.5, 0.4]), LogVarianceHead().double()
    opt = torch.optim.Adam([{"params": student.parameters(), "lr": 0.02}, {"params": head.parameters(), "lr": 0.05}])
    start = student.theta.detach().abs().sum()
    for it in range(120):
        x_t, t, v = _points("jittered", 100 + it)
        _, g = scm_tangent(trigflow_view(student, student.process, {}, SD), x_t, t, v, SD)
        g = normalize_tangent(g, "normalize", 0.1)
        F_theta = trigflow_from_x0(student(x_t / torch.cos(t)[:, None], SD * torch.tan(t), {}), x_t, t, SD)
        loss = tbcm_loss(F_theta, F_theta.detach(), g, t, SD, head(torch.log(SD * torch.tan(t)))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert student.theta.detach().abs().sum() < 0.1 * start, student.theta


# ---------------------------------------------------------------------------------------------------------------
# The pair store on the tiny teacher: paths round-trip, a store without paths is unchanged
# ---------------------------------------------------------------------------------------------------------------

SMALL = ("recipe.pairs.num_pairs=10", "recipe.pairs.shard_size=4", "recipe.pairs.num_steps=4",
         "recipe.pairs.path_points=4", "recipe.pairs.batch_size=3", "recipe.pairs.progress_bar=false",
         "recipe.pairs.seed=5")
OLD_SPEC_KEYS = {"num_pairs", "shard_size", "num_shards", "num_steps", "solver", "labels", "seed", "image_shape",
                 "guidance_scale", "num_classes", "condition_keys", "teacher", "teacher_sha256", "teacher_prediction",
                 "data"}


def tbcm_config(teacher: Path, root: Path, *extra: str):
    return load_config("digits/tbcm.yaml", tiny_overrides(teacher, root / "run", f"recipe.pairs.path={root / 'store'}",
                                                          *SMALL, *extra))


@pytest.fixture(scope="module")
def tbcm_store(tiny_teacher, tmp_path_factory):
    """A path store of the tiny teacher (guidance 1.5) and a store of the same spec without paths."""
    root = tmp_path_factory.mktemp("tbcm")
    generate_from_config(tbcm_config(tiny_teacher, root, "teacher.guidance_scale=1.5"))
    plain = [o for o in SMALL if "path_points" not in o]  # the same store through a recipe that keeps no paths
    generate_from_config(load_config("digits/instaflow.yaml", tiny_overrides(
        tiny_teacher, root / "run", f"recipe.pairs.path={root / 'plain'}", "recipe.pairs.labels=uniform",
        "teacher.guidance_scale=1.5", *plain)))
    return root


def test_store_keeps_the_solver_path_and_the_same_pairs(tbcm_store, tiny_teacher):
    from distill.models.denoiser import load_denoiser

    store, plain = PairStore(tbcm_store / "store", verify=True), PairStore(tbcm_store / "plain", verify=True)
    assert store.spec["path_points"] == 4 and "path_points" not in plain.spec
    assert {k: v for k, v in store.spec.items() if k not in ("path_points",)} == plain.spec
    teacher = load_denoiser(tiny_teacher, prediction="edm")
    levels = teacher.process.from_unit(unit_grid(4)).double()
    alphas, sigmas = torch.ones(5, dtype=torch.float64), levels.clone()
    for with_path, without in zip(store, plain):
        for key in without:  # noise, sample, conditions: the very pairs a store without paths holds
            assert torch.equal(with_path[key], without[key]), key
        n = without["noise"].shape[0]
        cond = {"class_labels": without["cond.class_labels"]}
        x0_fn = lambda x, t: teacher(x, t.float(), cond, guidance_scale=1.5)  # noqa: E731
        for i in range(4):  # the solver run up to step i lands on the stored state of step i
            state = without["noise"] * float(levels[0]) if i == 0 else \
                dpm_solver_2m(x0_fn, without["noise"], alphas[: i + 1], sigmas[: i + 1], levels[: i + 1]).float()
            torch.testing.assert_close(with_path["path"][:, i], state, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(with_path["path_times"][:, i], levels[i].float().expand(n))
            torch.testing.assert_close(with_path["path_x0"][:, i], x0_fn(state, levels[i].expand(n)),
                                       rtol=1e-5, atol=1e-5)
    assert path_steps(4, 3) == [0, 2, 3] and path_steps(20, 1) == [0]


def test_a_path_store_resumes_to_the_same_bytes(tbcm_store, tiny_teacher, tmp_path):
    """A shard lost to a kill is made again from (seed, shard) alone: the finished store is byte-identical."""
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(tbcm_store / "store", copy)
    (copy / "shard-000001.safetensors").unlink()
    generate_from_config(tbcm_config(tiny_teacher, tmp_path, "teacher.guidance_scale=1.5"))
    for name in ("shard-000000.safetensors", "shard-000001.safetensors", "shard-000002.safetensors", "manifest.json"):
        assert (copy / name).read_bytes() == (tbcm_store / "store" / name).read_bytes(), name


def test_a_store_without_paths_is_the_store_it_was(tbcm_store):
    manifest = read_manifest(tbcm_store / "plain")
    assert set(manifest["spec"]) == OLD_SPEC_KEYS
    for rec in manifest["shards"].values():
        with safe_open(str(tbcm_store / "plain" / rec["file"]), framework="pt") as f:
            assert set(f.keys()) == {"noise", "sample", "cond.class_labels"}
    assert "path_points" not in PairsConfig.model_fields  # the option is PathPairsConfig's: PairsConfig as it was
    with pytest.raises(ConfigError, match=r"^recipe\.pairs\.path_points: must be <= pairs\.num_steps \(4\)"):
        load_config("digits/tbcm.yaml", ["recipe.pairs.num_steps=4", "recipe.pairs.path_points=5"])


def test_trajectory_data_are_stored_points(tbcm_store, tiny_teacher):
    from distill.recipes.tbcm import TrajectoryDataset

    store = PairStore(tbcm_store / "store")
    by_state = {}
    for shard in store:
        for r in range(shard["noise"].shape[0]):
            for k in range(4):
                by_state[shard["path"][r, k].sum().item()] = (shard, r, k)
    cfg = tbcm_config(tiny_teacher, tbcm_store, "teacher.guidance_scale=1.5")
    for route, ks in (("jittered", {0, 1, 2}), ("fixed", {1, 2, 3})):
        data = TrajectoryDataset(cfg.recipe.pairs, type("D", (), {"image_shape": (1, 8, 8)})(), route, 1.5)
        seen = set()
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            batch = data.sample(6, g)
            assert batch.images is None
            for j in range(6):
                shard, r, k = by_state[batch.states[j].sum().item()]
                seen.add(k)
                assert torch.equal(batch.teacher_x0[j], shard["path_x0"][r, k])
                assert batch.times[j] == shard["path_times"][r, k]
                assert batch.next_times[j] == shard["path_times"][r, min(k + 1, 3)]
                assert batch.cond["class_labels"][j] == shard["cond.class_labels"][r]
        assert seen == ks, (route, seen)


# ---------------------------------------------------------------------------------------------------------------
# Runs on the tiny teacher
# ---------------------------------------------------------------------------------------------------------------


ONLINE = ("recipe.trajectories=online", "recipe.pairs=null", "recipe.route_steps=4")


@pytest.mark.parametrize("extra", [(), ("recipe.route=fixed",), ONLINE], ids=["jittered", "fixed", "online"])
def test_generator_loss_trains_only_the_student(tbcm_store, tiny_teacher, extra):
    cfg = tbcm_config(tiny_teacher, tbcm_store, "teacher.guidance_scale=1.5", *extra)
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    assert data is recipe.dataset
    batch = data.sample(4, torch.Generator().manual_seed(0))
    assert batch.images is None
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, 50)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() != 0.0 and logs["tangent_norm"] > 0
    assert all(p.grad is not None for p in recipe.generator.parameters())  # the log-variance head included
    assert all(p.grad is None for p in recipe.teacher.parameters())


@pytest.fixture
def poisoned_digits(monkeypatch):
    """scikit-learn's digits with every image NaN (labels intact): whatever reads an image sees NaN."""
    real = sklearn.datasets.load_digits()
    images = np.full_like(real.images, np.nan, dtype=np.float64)
    bunch = sklearn.utils.Bunch(**{**real, "images": images, "data": images.reshape(len(images), -1)})
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda *a, **k: bunch)


@pytest.mark.parametrize("extra", [(), ONLINE], ids=["store", "online"])
def test_training_never_reads_a_data_image(poisoned_digits, tiny_teacher, tmp_path, monkeypatch, extra):
    """Images are NaN from the start (so the store and any image read during training would be NaN), and once the
    trainer is built the digits loader and the data set's sampler raise: three updates still train the student."""
    from distill.data import digits

    cfg = tbcm_config(tiny_teacher, tmp_path, "run.max_steps=3", *extra)
    if cfg.recipe.pairs is not None:
        generate_from_config(cfg)
        assert all(torch.isfinite(s["path"]).all() for s in PairStore(cfg.recipe.pairs.path))
    trainer = Trainer(cfg)
    assert type(trainer.dataset).__name__ in ("TrajectoryDataset", "ConditionDataset")

    def refuse(*args, **kwargs):
        raise AssertionError("a data image was read during training")

    monkeypatch.setattr(digits, "load_digits", refuse)
    monkeypatch.setattr(digits.DigitsDataset, "sample", refuse)
    monkeypatch.setattr(sklearn.datasets, "load_digits", refuse)
    before = {k: v.clone() for k, v in trainer.recipe.generator.state_dict().items()}
    teacher = {k: v.clone() for k, v in trainer.recipe.teacher.state_dict().items()}
    trainer.train()
    after = trainer.recipe.generator.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("student."))
    assert all(torch.equal(teacher[k], v) for k, v in trainer.recipe.teacher.state_dict().items())


class Killed(Exception):
    pass


def test_resume_is_bitwise_exact(tbcm_store, tiny_teacher, tmp_path):
    """Killed after step 3 (checkpoint at 2) and resumed, a run ends where the straight run does: path points and
    jittered times are drawn from the trainer's seeded streams."""
    from distill.training.checkpoints import list_checkpoints

    def config(run, *extra):
        return tbcm_config(tiny_teacher, tbcm_store, "teacher.guidance_scale=1.5", f"run.output_dir={run}",
                           "run.max_steps=4", "trainer.checkpoint_every=2", "trainer.ema_decay=0.9",
                           "recipe.tangent_warmup_steps=3", *extra)

    straight = Trainer(config(tmp_path / "a"))
    straight.train()
    final = {k: v.clone() for k, v in straight.recipe.generator.state_dict().items()}
    first = Trainer(config(tmp_path / "b"))
    step = first.train_step

    def killing():
        if first.step == 3:
            raise Killed
        return step()

    first.train_step = killing
    with pytest.raises(Killed):
        first.train()
    first.accelerator.end_training()
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000002"]
    second = Trainer(config(tmp_path / "b", "trainer.resume=latest"))
    second.train()
    resumed = second.recipe.generator.state_dict()
    assert not [k for k in final if not torch.equal(final[k], resumed[k])]


def test_bad_configs_are_refused(tbcm_store, tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"^recipe\.trajectories: online .* recipe\.pairs: null"):
        load_config("digits/tbcm.yaml", ["recipe.trajectories=online"])
    with pytest.raises(ConfigError, match=r"^recipe\.pairs: trajectories: store trains on the ODE paths"):
        load_config("digits/tbcm.yaml", ["recipe.pairs=null"])
    with pytest.raises(ConfigError, match=r"^recipe\.pairs\.path_points: must be >= 2 .* got 1"):
        load_config("digits/tbcm.yaml", ["recipe.pairs.path_points=1"])
    with pytest.raises(ConfigError, match=r"^recipe\.timesteps: must end with 0"):
        load_config("digits/tbcm.yaml", ["recipe.timesteps=[20, 5]"])
    plain = tbcm_config(tiny_teacher, tbcm_store, "teacher.guidance_scale=1.5",
                        f"recipe.pairs.path={tbcm_store / 'plain'}")
    with pytest.raises(ConfigError, match="keeps no ODE paths"):
        build_recipe(plain, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"guidance 1\.5, teacher\.guidance_scale is 1\.0"):
        build_recipe(tbcm_config(tiny_teacher, tbcm_store), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="distill pairs"):
        build_recipe(tbcm_config(tiny_teacher, tmp_path), torch.device("cpu"))


def test_exports_reproduce_the_student_rollout(tbcm_store, tiny_teacher, tmp_path):
    labels, seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4], 1234
    runs, reference = {}, {}
    for steps in (1, 2):
        cfg = tbcm_config(tiny_teacher, tbcm_store, "teacher.guidance_scale=1.5", "run.max_steps=2",
                          f"run.output_dir={tmp_path / str(steps)}", "export.at_end=true", "trainer.ema_decay=0.5",
                          f"student.num_steps={steps}")
        trainer = Trainer(cfg)
        folder = trainer.train()
        runs[str(steps)] = {"folder": str(folder), "steps": json.loads((folder / "distill.json").read_text())
                            ["num_inference_steps"]}
        with torch.no_grad(), trainer.ema_weights() as gen:
            torch.manual_seed(seed)  # the pipeline's generator: the start noise, then each renoising draw
            x0 = trainer.recipe.generate(gen, {"class_labels": torch.tensor(labels)}, torch.randn(len(labels), 1, 8, 8))
        reference[str(steps)] = (x0 / 2 + 0.5).clamp(0, 1)
    got = sample_exports_cleanly(runs, labels, seed, tmp_path)
    for name in runs:
        assert runs[name]["steps"] == int(name) and reference[name].std() > 0.01
        torch.testing.assert_close(got[name], reference[name], atol=2e-5, rtol=1e-4, msg=name)
