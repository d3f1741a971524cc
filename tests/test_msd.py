"""MSD against its definition: the TSM loss is EDM's weighted regression on the teacher (zero for a student equal to
the teacher), a student trains and is scored on its own classes only, one student holding every class on the
teacher's network without TSM is DMD2 gradient for gradient, each update trains only its own network, bad configs
are refused by name, a resumed run equals the uninterrupted one, the export reproduces `recipe.generate` in a
process that never imports distill, and the routing card's code runs there too."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import NO_DISTILL, REPO, sample_exports_cleanly, subprocess_env, tiny_overrides

from distill.base.batch import Batch
from distill.base.errors import ConfigError
from distill.models.denoiser import load_denoiser
from distill.recipes.msd import ClassSubset, split_classes, tsm_loss
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.registry import build_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

NOWHERE = Path("/nonexistent")
SMALL = ("recipe.block_out_channels=[4, 8]",)  # the tiny teacher's widths are (8, 16), norm groups 4


def _config(teacher, run, *extra):
    return load_config("digits/msd.yaml", tiny_overrides(teacher, run, *SMALL, *extra))


def _script():
    spec = importlib.util.spec_from_file_location("msd_script", REPO / "scripts" / "msd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------------
# TSM: the loss against its definition
# ---------------------------------------------------------------------------------------------------------------


def test_tsm_loss_is_edms_weighted_regression_and_zero_for_the_teacher(tiny_teacher):
    teacher = load_denoiser(tiny_teacher, prediction="edm")
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 1, 8, 8, generator=g) * 2
    t = torch.tensor([0.05, 1.0, 20.0])
    a, b = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    sigma, sd = t, teacher.process.sigma_data
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()  # EDM Table 1: lambda(sigma) = 1 / c_out^2
    expected = ((a - b) ** 2).flatten(1).mean(1) / c_out**2
    torch.testing.assert_close(tsm_loss(teacher, a, b, x_t, t), expected, rtol=1e-5, atol=0)
    cond = {"class_labels": torch.tensor([0, 4, 9])}
    with torch.no_grad():
        same = teacher.copy(trainable=True)(x_t, t, cond)
        assert tsm_loss(teacher, same, teacher(x_t, t, cond), x_t, t).abs().max().item() == 0.0


def test_in_the_tsm_phase_a_student_equal_to_the_teacher_has_zero_loss(tiny_teacher):
    recipe, data = build_recipe(load_config("digits/msd.yaml", tiny_overrides(
        tiny_teacher, NOWHERE, "recipe.block_out_channels=null", "recipe.tsm_steps=2")), torch.device("cpu"))
    recipe.generator.prediction = recipe.teacher.prediction  # the teacher's copy with the teacher's preconditioning
    batch = data.sample(4, torch.Generator().manual_seed(0))
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, 1)
    assert loss.item() == 0.0 and logs["tsm"] == 1.0
    with update_nets(recipe, "generator") as nets:
        assert recipe.generator_loss(nets, batch, 2)[1]["tsm"] == 0.0  # the phase ends at tsm_steps


# ---------------------------------------------------------------------------------------------------------------
# The class split and restriction
# ---------------------------------------------------------------------------------------------------------------


def test_classes_are_split_contiguously_and_evenly():
    assert split_classes(10, 1) == [list(range(10))]
    assert split_classes(10, 2) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert split_classes(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert split_classes(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for bad in (0, 11):
        with pytest.raises(ValueError):
            split_classes(10, bad)


def test_a_student_never_sees_another_students_labels(tiny_teacher, tmp_path):
    from distill.training.trainer import Trainer

    trainer = Trainer(_config(tiny_teacher, tmp_path / "run", "recipe.classes=[2, 7]", "recipe.tsm_steps=1",
                              "run.max_steps=3", "teacher.guidance_scale=1.0"))
    recipe, data = trainer.recipe, trainer.dataset
    assert isinstance(data, ClassSubset)
    seen = []

    def record(module, args, kwargs):
        labels = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
        seen.append(labels.clone())

    for net in (recipe.teacher.model, recipe.generator.model, recipe.critic.denoiser.model):
        net.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()  # 1 TSM iteration, 2 DMD2 iterations, 2 critic updates each
    assert len(seen) > 10 and set(torch.cat(seen).tolist()) == {2, 7}
    for s in range(20):
        assert set(data.sample(16, torch.Generator().manual_seed(s)).cond["class_labels"].tolist()) <= {2, 7}
    assert data.grid_condition(5)["class_labels"].tolist() == [2, 7, 2, 7, 2]
    intruder = Batch(torch.zeros(2, 1, 8, 8), {"class_labels": torch.tensor([2, 3])})
    for update, loss in (("generator", recipe.generator_loss), ("critic", recipe.critic_loss)):
        with update_nets(recipe, update) as nets, pytest.raises(ValueError, match=r"labels \[3\] outside"):
            loss(nets, intruder, 5)


def test_routed_samples_come_from_the_student_that_owns_each_label():
    script = _script()

    def student(value):
        @contextlib.contextmanager
        def ema_weights():
            yield None
        def generate(gen, cond, noise):
            return torch.full_like(noise, value) + 0 * cond["class_labels"][:, None, None, None]

        return SimpleNamespace(ema_weights=ema_weights, accelerator=SimpleNamespace(device=torch.device("cpu")),
                               recipe=SimpleNamespace(generate=generate))

    labels = torch.arange(23) % 10
    images = script.routed_images([student(0.25), student(-0.5)], [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], labels,
                                  torch.zeros(23, 1, 4, 4))
    owner = torch.where(labels < 5, 0.25, -0.5)
    assert torch.equal(images[:, 0, 0, 0], owner)


# ---------------------------------------------------------------------------------------------------------------
# Gradients: DMD2's for one student on the teacher's network; the right networks only
# ---------------------------------------------------------------------------------------------------------------


def _generator_grads(recipe, batch, step, seed=7):
    torch.manual_seed(seed)
    with update_nets(recipe, "generator") as nets:
        loss, _ = recipe.generator_loss(nets, batch, step)
    loss.backward()
    grads = [p.grad.clone() for p in recipe.generator.parameters()]
    recipe.generator.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("classes", ["null", json.dumps(list(range(10)))])
def test_one_student_with_every_class_on_the_teachers_network_is_dmd2(tiny_teacher, classes):
    common = ("student.num_steps=2", "teacher.guidance_scale=1.5")
    dmd2, data = build_recipe(load_config("digits/dmd2.yaml", tiny_overrides(tiny_teacher, NOWHERE, *common)),
                              torch.device("cpu"))
    msd, msd_data = build_recipe(load_config("digits/msd.yaml", tiny_overrides(
        tiny_teacher, NOWHERE, *common, "recipe.block_out_channels=null", "recipe.tsm_steps=0",
        f"recipe.classes={classes}")), torch.device("cpu"))
    batch = data.sample(4, torch.Generator().manual_seed(1))
    mine = msd_data.sample(4, torch.Generator().manual_seed(1))  # every class: the same rows are drawn
    assert torch.equal(mine.images, batch.images) and torch.equal(mine.cond["class_labels"], batch.cond["class_labels"])
    for step in (0, 3):
        for a, b in zip(_generator_grads(msd, batch, step), _generator_grads(dmd2, batch, 0)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_each_update_trains_only_its_own_network(tiny_teacher):
    recipe, data = build_recipe(_config(tiny_teacher, NOWHERE, "recipe.classes=[0, 5]", "recipe.tsm_steps=1"),
                                torch.device("cpu"))
    small = sum(p.numel() for p in recipe.generator.parameters())
    assert small < sum(p.numel() for p in recipe.teacher.parameters()) / 2
    assert recipe.generator.prediction == "cm" and recipe.critic.denoiser.prediction == recipe.teacher.prediction
    batch = data.sample(4, torch.Generator().manual_seed(0))

    def none(*nets):
        return all(p.grad is None for net in nets for p in net.parameters())

    for step in (0, 1):  # TSM, then DMD2
        with update_nets(recipe, "generator") as nets:
            recipe.generator_loss(nets, batch, step)[0].backward()
        assert all(p.grad is not None for p in recipe.generator.parameters()), step
        assert none(recipe.critic, recipe.teacher), step
        recipe.generator.zero_grad(set_to_none=True)
        with update_nets(recipe, "critic") as nets:
            recipe.critic_loss(nets, batch, step)[0].backward()
        assert all(p.grad is not None for p in recipe.critic.parameters()), step
        assert none(recipe.generator, recipe.teacher), step
        recipe.critic.zero_grad(set_to_none=True)


@pytest.mark.parametrize("overrides, message", [
    (["recipe.classes=[]"], "recipe.classes:"),
    (["recipe.classes=[-1]"], "recipe.classes[0]:"),
    (["recipe.classes=[3, 10]"], "recipe.classes: every class must be one of 0..9 (data.name: digits has 10), "
                                 "got [3, 10]"),
    (["recipe.classes=[1, 1]"], "recipe.classes: each class at most once, got [1, 1]"),
    (["recipe.block_out_channels=[4]"], "recipe.block_out_channels: the teacher has 2 blocks"),
    (["recipe.block_out_channels=[4, 6]"], "recipe.block_out_channels: every width must be a multiple"),
    (["recipe.block_out_channels=null", "recipe.layers_per_block=2"], "recipe.layers_per_block: only applies"),
    (["recipe.min_t=0.5", "recipe.max_t=0.4"], "recipe.min_t: must be < recipe.max_t (0.4), got 0.5"),
    (["recipe.tsm_steps=-1"], "recipe.tsm_steps:"),
    (["recipe.gan=true"], "unknown config key recipe.gan"),  # DMD2's GAN head: left out
])
def test_bad_config_is_refused_by_name(tiny_teacher, overrides, message):
    with pytest.raises(ConfigError) as e:
        build_recipe(_config(tiny_teacher, NOWHERE, *overrides), torch.device("cpu"))
    assert str(e.value).startswith(message), str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# A few updates through the trainer: resume, the export, the routing card
# ---------------------------------------------------------------------------------------------------------------

def test_resume_export_and_routing_card(tiny_teacher, tmp_path):
    from distill.training.trainer import Trainer

    common = ("recipe.classes=[0, 1, 2, 3, 4]", "recipe.tsm_steps=2", "trainer.ema_decay=0.5")  # TSM 0-1, DMD2 2-3
    whole = Trainer(_config(tiny_teacher, tmp_path / "whole", *common, "run.max_steps=4", "export.at_end=true"))
    before = {k: v.clone() for k, v in whole.recipe.generator.state_dict().items()}
    folder = whole.train()
    assert json.loads((folder / "distill.json").read_text())["msd_classes"] == [0, 1, 2, 3, 4]
    assert "trained on classes [0, 1, 2, 3, 4] only" in (folder / "README.md").read_text()
    assert any(not torch.equal(v, before[k]) for k, v in whole.recipe.generator.state_dict().items())
    run = tmp_path / "cut"  # cut at the phase switch and resumed in a fresh trainer
    Trainer(_config(tiny_teacher, run, *common, "run.max_steps=2", "trainer.checkpoint_every=2")).train()
    resumed = Trainer(_config(tiny_teacher, run, *common, "run.max_steps=4", "trainer.resume=latest"))
    resumed.train()
    for name in ("generator", "critic"):
        a, b = getattr(whole.recipe, name), getattr(resumed.recipe, name)
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(w, v, rtol=0, atol=0, msg=f"{name}.{k}")
    # the export: plain diffusers, in a process without distill, reproduces generate
    labels, seed = [0, 1, 2, 3, 4, 0, 2], 1234
    with torch.no_grad(), whole.ema_weights() as gen:
        torch.manual_seed(seed)
        noise = torch.randn(len(labels), 1, 8, 8)
        reference = (whole.recipe.generate(gen, {"class_labels": torch.tensor(labels)}, noise) / 2 + 0.5).clamp(0, 1)
    assert json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"] == [4, 8]  # the small one
    got = sample_exports_cleanly({"student": {"folder": str(folder), "steps": 1}}, labels, seed, tmp_path)
    assert reference.std() > 0.01
    torch.testing.assert_close(got["student"], reference, atol=2e-5, rtol=1e-4)
    # the routing card of scripts/msd.py: its code samples a class from its folder, without distill
    routed = tmp_path / "routed"
    for i in (0, 1):
        shutil.copytree(folder, routed / f"student_{i}")
    text = _script().card(split_classes(10, 2), 1)
    (routed / "README.md").write_text(text)
    assert "| 7 | `student_1/` |" in text
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", NO_DISTILL + code + "\nprint('card ok', sorted(pipes))\n"],
                          capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=routed)
    assert proc.returncode == 0 and "card ok ['student_1']" in proc.stdout, proc.stderr[-3000:]
    assert (routed / "seven.png").is_file()
