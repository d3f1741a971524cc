"""DisBack against the math: the degradation path fitted to a Gaussian student walks from the teacher to the
student's exact (Tweedie) denoiser, nodes are recorded and targets switched where the schedule says, the generator
gradient is DMD2's with the teacher as target and DMD2's with the recorded node as teacher otherwise, the degradation
phase leaves the student untouched, each update trains only its own network, bad configs are refused by name, a
resumed run equals the uninterrupted one, and the export reproduces `recipe.generate` in a process that never
imports distill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import sample_exports_cleanly, tiny_overrides

from distill.base.errors import ConfigError
from distill.recipes.disback import backtrack_target, flat_weights, load_flat_weights, node_steps
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.recipe import Nets
from distill.training.registry import build_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

NOWHERE = Path("/nonexistent")
PATH2 = ("recipe.degradation_steps=2", "recipe.path_nodes=2", "recipe.backtrack_steps=1")  # node 1 at step 1


def _config(teacher, run, *extra):
    return load_config("digits/disback.yaml", tiny_overrides(teacher, run, *extra))


# ---------------------------------------------------------------------------------------------------------------
# The schedule (pure functions)
# ---------------------------------------------------------------------------------------------------------------


def test_nodes_are_recorded_at_evenly_spaced_iterations():
    assert node_steps(40, 4) == [10, 20, 30, 40]
    assert node_steps(10, 3) == [4, 7, 10]  # ceil(j D / N)
    assert node_steps(5, 5) == [1, 2, 3, 4, 5]
    assert node_steps(7, 1) == [7]


def test_the_target_walks_the_path_back_to_the_teacher_and_stays():
    D, N, I = 6, 4, 3
    got = [backtrack_target(s, D, N, I) for s in range(20)]
    assert got == [None] * 6 + [3, 3, 3, 2, 2, 2, 1, 1, 1] + [0] * 5
    assert [backtrack_target(s, 0, 4, 3) for s in range(3)] == [0, 0, 0]  # no path: DMD2 from the start
    assert [backtrack_target(s, 2, 1, 5) for s in range(4)] == [None, None, 0, 0]  # one node: the teacher after D


# ---------------------------------------------------------------------------------------------------------------
# Degradation on the toy with known truth: a Gaussian student N(m, s^2), whose denoiser is Tweedie's
# E[x0 | x_t] = m + s^2 / (s^2 + sigma^2) (x_t - m)
# ---------------------------------------------------------------------------------------------------------------

M, S = torch.tensor([1.0, -0.5]), torch.tensor([0.3, 0.6])


class GaussianStudent(torch.nn.Module):
    """A one-step 'student' whose samples are exactly N(M, S^2): its input is sigma_max * z (the schedule's start)."""

    def __init__(self, sigma_max: float):
        super().__init__()
        self.sigma_max = sigma_max

    def forward(self, x, t, cond):
        return M + S * x / self.sigma_max


def _tweedie_error(denoiser, sigmas, n=2048, seed=5):
    g = torch.Generator().manual_seed(seed)
    errs = []
    with torch.no_grad():
        for sigma in sigmas:
            x0 = M + S * torch.randn(n, 2, generator=g)
            x_t = x0 + sigma * torch.randn(n, 2, generator=g)
            exact = M + S**2 / (S**2 + sigma**2) * (x_t - M)
            pred = denoiser(x_t, torch.full((n,), sigma), {"class_labels": torch.zeros(n, dtype=torch.long)})
            errs.append((pred - exact).pow(2).mean().sqrt().item())
    return sum(errs) / len(errs)


def test_degradation_path_walks_from_the_teacher_to_the_students_exact_denoiser():
    """The critic update, run on a fixed Gaussian student (the degradation phase), fits the fake score to the
    student's Tweedie denoiser; the recorded nodes lie in order between the teacher and it."""
    cfg = load_config("toy/disback.yaml", ["recipe.degradation_steps=300", "recipe.path_nodes=3"])
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    assert recipe.record_at == {100: 1, 200: 2}
    student = GaussianStudent(float(recipe.teacher.process.sigma_max))
    nets = Nets(generator=student, critic=recipe.critic, trained=recipe.critic)
    opt = torch.optim.Adam([p for p in recipe.critic.parameters() if p.requires_grad], lr=2e-3)
    torch.manual_seed(0)
    for step in range(300):
        batch = data.sample(512, torch.Generator().manual_seed(step))
        assert recipe.target_node(step) is None  # degradation: no generator target
        loss, _ = recipe.critic_loss(nets, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sigmas = [0.05, 0.2, 0.5, 1.0, 2.0]
    errors = [_tweedie_error(recipe.node(k), sigmas) for k in (0, 1, 2)]
    errors.append(_tweedie_error(recipe.critic.denoiser, sigmas))  # node N: the fake score backtracking starts from
    assert errors[0] > 0.3, errors  # the teacher (an 8-mode ring) is far from the student's denoiser
    assert errors == sorted(errors, reverse=True), errors  # the path degrades monotonically toward the student
    assert errors[-1] < 0.1 * errors[0] and errors[-1] < 0.05, errors


# ---------------------------------------------------------------------------------------------------------------
# The generator gradient against DMD2's
# ---------------------------------------------------------------------------------------------------------------


def _generator_grads(recipe, batch, step, seed=7):
    torch.manual_seed(seed)
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, step)
    loss.backward()
    grads = [p.grad.clone() for p in recipe.generator.parameters()]
    recipe.generator.zero_grad(set_to_none=True)
    return grads, logs


def test_with_the_teacher_as_target_the_gradient_is_dmd2s_exactly(tiny_teacher):
    common = ("student.num_steps=2", "teacher.guidance_scale=1.5")
    dmd2, data = build_recipe(load_config("digits/dmd2.yaml", tiny_overrides(tiny_teacher, NOWHERE, *common)),
                              torch.device("cpu"))
    batch = data.sample(4, torch.Generator().manual_seed(1))
    ref, _ = _generator_grads(dmd2, batch, 0)
    no_path, _ = build_recipe(_config(tiny_teacher, NOWHERE, *common, "recipe.degradation_steps=0"),
                              torch.device("cpu"))
    assert no_path.path_net is None and no_path.critic.path.shape[0] == 0
    for step in (0, 5):  # no path: the teacher is the target from the start
        got, logs = _generator_grads(no_path, batch, step)
        assert logs["target_node"] == 0
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with_path, _ = build_recipe(_config(tiny_teacher, NOWHERE, *common, *PATH2), torch.device("cpu"))
    got, logs = _generator_grads(with_path, batch, 3)  # past the path: the teacher
    assert logs["target_node"] == 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_on_a_recorded_node_the_gradient_is_dmd2s_with_that_node_as_teacher(tiny_teacher):
    common = ("student.num_steps=1", "teacher.guidance_scale=1.5")
    recipe, data = build_recipe(_config(tiny_teacher, NOWHERE, *common, *PATH2), torch.device("cpu"))
    batch = data.sample(4, torch.Generator().manual_seed(2))
    fake = recipe.critic.fake.denoiser.model
    with torch.no_grad():  # a fake score that has moved off the teacher
        for p in fake.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with update_nets(recipe, "critic") as nets:
        recipe.critic_loss(nets, batch, 1)  # iteration 1 = b_1: node 1 is recorded before the update
    assert torch.equal(recipe.critic.path[0], flat_weights(fake))
    got, logs = _generator_grads(recipe, batch, 2)
    assert logs["target_node"] == 1
    dmd2, _ = build_recipe(load_config("digits/dmd2.yaml", tiny_overrides(tiny_teacher, NOWHERE, *common)),
                           torch.device("cpu"))
    teacher_grads, _ = _generator_grads(dmd2, batch, 0)
    load_flat_weights(dmd2.teacher.model, recipe.critic.path[0])  # node 1 as DMD2's teacher
    dmd2.critic.load_state_dict(recipe.critic.fake.state_dict())
    ref, _ = _generator_grads(dmd2, batch, 0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    assert max((a - b).abs().max().item() for a, b in zip(got, teacher_grads)) > 1e-6


def test_a_node_never_recorded_is_refused(tiny_teacher):
    recipe, data = build_recipe(_config(tiny_teacher, NOWHERE, *PATH2), torch.device("cpu"))
    with update_nets(recipe, "generator") as nets, pytest.raises(RuntimeError, match="path node 1 was never"):
        recipe.generator_loss(nets, data.sample(2, torch.Generator().manual_seed(0)), 2)


# ---------------------------------------------------------------------------------------------------------------
# Which networks each update trains
# ---------------------------------------------------------------------------------------------------------------


def test_each_update_trains_only_its_own_network(tiny_teacher):
    recipe, data = build_recipe(_config(tiny_teacher, NOWHERE, *PATH2), torch.device("cpu"))
    batch = data.sample(4, torch.Generator().manual_seed(0))
    frozen = [recipe.teacher, recipe.path_net]

    def no_grads(*nets):
        return all(p.grad is None for net in nets for p in net.parameters())

    # degradation: the generator update reaches no weight at all (AdamW then skips every parameter)
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
    loss.backward()
    assert loss.item() == 0 and logs["degradation"] == 1.0
    assert no_grads(recipe.generator, recipe.critic, *frozen)
    opt = torch.optim.AdamW(recipe.generator.parameters(), lr=1e-3, weight_decay=0.1)
    before = [p.detach().clone() for p in recipe.generator.parameters()]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(recipe.generator.parameters(), before)) and not opt.state
    # the critic update: the fake score only, never the recorded path
    for step in (0, 1):
        with update_nets(recipe, "critic") as nets:
            recipe.critic_loss(nets, batch, step)[0].backward()
    assert all(p.grad is not None for p in recipe.critic.fake.parameters())
    assert recipe.critic.path.grad is None and not recipe.critic.path.requires_grad
    assert no_grads(recipe.generator, *frozen)
    recipe.critic.zero_grad(set_to_none=True)
    # backtracking on node 1: the generator only
    with update_nets(recipe, "generator") as nets:
        recipe.generator_loss(nets, batch, 2)[0].backward()
    assert all(p.grad is not None for p in recipe.generator.parameters())
    assert no_grads(recipe.critic, *frozen)


@pytest.mark.parametrize("overrides, message", [
    (["recipe.degradation_steps=3", "recipe.path_nodes=4"], "recipe.path_nodes: must be <= recipe.degradation_steps "
                                                            "(3): each node is recorded at its own iteration, got 4"),
    (["recipe.min_t=0.5", "recipe.max_t=0.4"], "recipe.min_t: must be < recipe.max_t (0.4), got 0.5"),
    (["recipe.dmd_weight=0"], "recipe.dmd_weight:"),
    (["recipe.backtrack_steps=0"], "recipe.backtrack_steps:"),
    (["recipe.degradation_steps=-1"], "recipe.degradation_steps:"),
    (["recipe.path_nodes=0"], "recipe.path_nodes:"),
    (["recipe.gan=true"], "unknown config key recipe.gan"),  # DMD2's GAN head: left out
    (["trainer.mixed_precision=fp16"], "trainer.mixed_precision: fp16's gradient scaler refuses"),
])
def test_bad_config_is_refused_by_name(tiny_teacher, overrides, message):
    with pytest.raises(ConfigError) as e:
        build_recipe(_config(tiny_teacher, NOWHERE, *overrides), torch.device("cpu"))
    assert str(e.value).startswith(message), str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# A few updates through the trainer: resume, the teacher untouched, the export
# ---------------------------------------------------------------------------------------------------------------

def test_resumed_run_equals_the_uninterrupted_one_and_the_export_reproduces_generate(tiny_teacher, tmp_path):
    from distill.models.denoiser import load_denoiser
    from distill.training.trainer import Trainer

    common = (*PATH2, "trainer.ema_decay=0.5")  # 4 iterations: degradation 0-1 (node 1 at 1), node 1 at 2, teacher 3
    teacher_before = {k: v.clone() for k, v in load_denoiser(tiny_teacher).state_dict().items()}
    whole = Trainer(_config(tiny_teacher, tmp_path / "whole", *common, "run.max_steps=4", "export.at_end=true"))
    recipe = whole.recipe
    before = {k: v.clone() for k, v in recipe.generator.state_dict().items()}
    folder = whole.train()
    assert any(not torch.equal(v, before[k]) for k, v in recipe.generator.state_dict().items())
    for k, v in recipe.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"the teacher changed: {k}"
    assert recipe.critic.path[0].abs().sum() > 0
    # the same run cut at 2 (a checkpoint) and resumed in a fresh trainer
    run = tmp_path / "cut"
    Trainer(_config(tiny_teacher, run, *common, "run.max_steps=2", "trainer.checkpoint_every=2")).train()
    resumed = Trainer(_config(tiny_teacher, run, *common, "run.max_steps=4", "trainer.resume=latest"))
    resumed.train()
    for name, a, b in (("generator", whole.recipe.generator, resumed.recipe.generator),
                       ("critic", whole.recipe.critic, resumed.recipe.critic)):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(w, v, rtol=0, atol=0, msg=f"{name}.{k}")
    # the export: plain diffusers, in a process without distill, reproduces generate
    labels, seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4], 1234
    with torch.no_grad(), whole.ema_weights() as gen:
        torch.manual_seed(seed)
        noise = torch.randn(len(labels), 1, 8, 8)
        reference = (recipe.generate(gen, {"class_labels": torch.tensor(labels)}, noise) / 2 + 0.5).clamp(0, 1)
    got = sample_exports_cleanly({"student": {"folder": str(folder), "steps": 1}}, labels, seed, tmp_path)
    assert reference.std() > 0.01
    torch.testing.assert_close(got["student"], reference, atol=2e-5, rtol=1e-4)
