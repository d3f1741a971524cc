"""sCM, rCM and LCM as runs: gradient routing, rCM's regulariser is DMD's gradient, LCM's skipping-step solver
is the teacher's own solver step, bitwise resume for each recipe, and each export reproduces the student's own
rollout when loaded in a process that never imports distill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import sample_exports_cleanly, tiny_overrides

from distill.models.schedules import rollout
from distill.training.checkpoints import list_checkpoints
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.registry import build_recipe
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {"scm": "digits/scm.yaml", "rcm": "digits/rcm.yaml", "lcm": "digits/lcm.yaml"}


def _config(name, teacher, run, *extra):
    return load_config(CONFIGS[name], tiny_overrides(teacher, run, *extra))


def _state(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    out = {"generator": {k: v.detach().clone() for k, v in trainer.recipe.generator.state_dict().items()},
           "ema": {str(i): p.detach().clone() for i, p in enumerate(trainer.ema.shadow_params)}}
    if trainer.recipe.critic is not None:
        out["critic"] = {k: v.detach().clone() for k, v in trainer.recipe.critic.state_dict().items()}
    if trainer.target_network is not None:
        out["target"] = {k: v.detach().clone() for k, v in trainer.target_network.state_dict().items()}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Losses and routing
# ---------------------------------------------------------------------------------------------------------------


def test_rcm_regulariser_is_the_dmd_gradient(tiny_teacher):
    """The rCM DMD term's gradient in the student's samples is DMD's normalised gradient / D, with the teacher's
    CFG as the real score and the fake score as the fake one."""
    from distill.parametrization import add_noise
    from distill.recipes.dmd2 import dmd_gradient

    cfg = _config("rcm", tiny_teacher, Path("/nonexistent"), "teacher.guidance_scale=2.0")
    recipe, _ = build_recipe(cfg, torch.device("cpu"))
    cond = {"class_labels": torch.tensor([0, 3, 7, 9])}
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    torch.manual_seed(5)
    with update_nets(recipe, "generator") as nets:
        loss, grad = recipe.dmd_term(nets, x, cond)
    loss.sum().backward()
    torch.manual_seed(5)
    t = recipe.sample_dmd_time(4, x.device)
    x_t = add_noise(recipe.teacher.process, x.detach(), torch.randn_like(x), t)
    with torch.no_grad():
        real = recipe.teacher(x_t, t, cond, guidance_scale=2.0)
        fake = recipe.critic.denoiser(x_t, t, cond)
    expected = dmd_gradient(x.detach(), real, fake)
    assert expected.abs().mean() > 1e-4
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(x.grad, expected / 64)


@pytest.mark.parametrize("name,steps", [("scm", 1), ("rcm", 2), ("lcm", 1)])
def test_generator_loss_trains_only_the_student(tiny_teacher, name, steps):
    import copy

    cfg = _config(name, tiny_teacher, Path("/nonexistent"), f"student.num_steps={steps}", "teacher.guidance_scale=1.5")
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    target = copy.deepcopy(recipe.generator).requires_grad_(False) if name == "lcm" else None
    batch = data.sample(4, torch.Generator().manual_seed(0))
    with update_nets(recipe, "generator", target=target) as nets:
        loss, logs = recipe.generator_loss(nets, batch, 50)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() != 0.0
    assert all(p.grad is not None for p in recipe.generator.parameters())  # the log-variance head included
    assert all(p.grad is None for p in recipe.teacher.parameters())
    if recipe.critic is not None:
        assert all(p.grad is None for p in recipe.critic.parameters())
        recipe.generator.zero_grad(set_to_none=True)
        with update_nets(recipe, "critic") as nets:
            recipe.critic_loss(nets, batch, 0)[0].backward()
        assert all(p.grad is not None for p in recipe.critic.parameters())
        assert all(p.grad is None for p in recipe.generator.parameters())


def test_lcm_skipping_step_solver_is_the_teachers_solver_step(tiny_teacher):
    """One skipping step equals the teacher's own sampler (DPM-Solver++(2M), whose first step is first order)
    run over the two levels, with the same CFG."""
    from distill.models.sampling import dpm_solver_2m

    cfg = _config("lcm", tiny_teacher, Path("/nonexistent"), "teacher.guidance_scale=1.5")
    recipe, _ = build_recipe(cfg, torch.device("cpu"))
    cond = {"class_labels": torch.tensor([1, 2, 3])}
    for n, m in ((39, 35), (20, 16), (5, 1)):
        s_n, s_m = recipe.grid[n], recipe.grid[m]
        noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(n))
        x_n = noise * s_n
        ours = recipe.teacher_solver(x_n, s_n.expand(3), s_m.expand(3), cond)
        ts = torch.stack([s_n, s_m]).double()
        theirs = dpm_solver_2m(lambda x, t: recipe.teacher(x, t.float(), cond, guidance_scale=1.5), noise,
                               torch.ones(2, dtype=torch.float64), ts, ts)
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)


def test_pseudo_huber_limits():
    from distill.recipes.lcm import pseudo_huber

    a = torch.zeros(2, 1, 2, 2)
    small, big = torch.full_like(a, 1e-5), torch.full_like(a, 10.0)
    torch.testing.assert_close(pseudo_huber(small, a, 0.001), torch.full((2,), 1e-10 / (2 * 0.001)), rtol=1e-2, atol=0)
    torch.testing.assert_close(pseudo_huber(big, a, 0.001), torch.full((2,), 10.0 - 0.001), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Resume: a run killed after step 3 (checkpoint at 2) and resumed equals the straight run, bitwise
# ---------------------------------------------------------------------------------------------------------------


class Killed(Exception):
    pass


@pytest.mark.parametrize("name", ["scm", "rcm", "lcm"])
def test_resume_is_bitwise_exact(tiny_teacher, tmp_path, name):
    run = ("run.max_steps=4", "trainer.checkpoint_every=2", "trainer.ema_decay=0.9", "student.num_steps=2",
           "recipe.tangent_warmup_steps=3" if name != "lcm" else "recipe.target_decay=0.5")
    straight = Trainer(_config(name, tiny_teacher, tmp_path / "a", *run))
    initial = _state(straight)
    straight.train()
    final = _state(straight)

    first = Trainer(_config(name, tiny_teacher, tmp_path / "b", *run))
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
    second = Trainer(_config(name, tiny_teacher, tmp_path / "b", *run, "trainer.resume=latest"))
    second.train()
    resumed = _state(second)
    assert resumed.keys() == final.keys()
    for net in final:
        assert any(not torch.equal(final[net][k], initial[net][k]) for k in final[net]), f"{net} did not train"
        differ = [k for k in final[net] if not torch.equal(final[net][k], resumed[net][k])]
        assert not differ, f"{name} {net}: {differ[:3]}"


# ---------------------------------------------------------------------------------------------------------------
# Export: a clean process (distill unimportable) samples each pipeline; it equals the student's rollout
# ---------------------------------------------------------------------------------------------------------------

EXPORTS = {"scm": ("student.num_steps=1",), "rcm": ("student.num_steps=2",),
           "lcm": ("student.num_steps=2", "recipe.timesteps=[25, 0]")}


def test_exports_reproduce_the_student_rollout(tiny_teacher, tmp_path):
    labels, seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4], 1234
    runs, reference = {}, {}
    for name, extra in EXPORTS.items():
        trainer = Trainer(_config(name, tiny_teacher, tmp_path / name, "run.max_steps=2", "export.at_end=true",
                                  "trainer.ema_decay=0.5", *extra))
        folder = trainer.train()
        meta = json.loads((folder / "distill.json").read_text())
        runs[name] = {"folder": str(folder), "steps": meta["num_inference_steps"], "timesteps": meta.get("timesteps")}
        with torch.no_grad(), trainer.ema_weights() as gen:
            torch.manual_seed(seed)
            noise = torch.randn(len(labels), 1, 8, 8)
            x0 = rollout(trainer.recipe.export_model(gen),
                         trainer.recipe.schedule, {"class_labels": torch.tensor(labels)}, noise)
        reference[name] = (x0 / 2 + 0.5).clamp(0, 1)
    assert runs["lcm"]["timesteps"] == [25, 0] and "timesteps=[25, 0]" in (Path(runs["lcm"]["folder"]) / "README.md").read_text()
    got = sample_exports_cleanly(runs, labels, seed, tmp_path)
    for name in EXPORTS:
        assert reference[name].std() > 0.01
        torch.testing.assert_close(got[name], reference[name], atol=2e-5, rtol=1e-4, msg=name)
