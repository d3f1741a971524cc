"""DMD (v1) = DMD2 + the regression loss on stored teacher ODE pairs: the term is the formula on the student's
first step from the stored noise, it is added with its weight, and its gradient reaches the generator."""

from __future__ import annotations

import pytest
import torch
from tiny import REPO, tiny_overrides

from distill.base.errors import ConfigError
from distill.data.pairs import generate_from_config
from distill.recipes.dmd2 import regression_pairs
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

DMD_YAML = REPO / "recipes" / "digits/dmd.yaml"


def cfg(teacher, tmp_path, *extra):
    return load_config(DMD_YAML, tiny_overrides(
        teacher, tmp_path / "run", f"recipe.pairs.path={tmp_path / 'pairs'}", "recipe.pairs.num_pairs=8",
        "recipe.pairs.shard_size=4", "recipe.pairs.num_steps=2", "recipe.pairs.progress_bar=false", *extra))


def test_dmd_regression_term_is_its_formula(tiny_teacher, tmp_path):
    generate_from_config(cfg(tiny_teacher, tmp_path))
    trainer = Trainer(cfg(tiny_teacher, tmp_path, "recipe.regression_weight=0.5"))
    recipe = trainer.recipe
    batch = trainer.dataset.sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
    torch.manual_seed(7)
    pairs = regression_pairs(recipe.pairs, 4, torch.device("cpu"))  # the same draw the loss made
    sched = recipe.schedule
    with torch.no_grad():
        g_of_z = recipe.generator(sched.start(pairs.noise), sched.t(0, 4, torch.device("cpu")), pairs.cond)
    want = (g_of_z - pairs.images).pow(2).flatten(1).mean(1).mean()  # L2: mean over pixels, then batch
    assert logs["regression_loss"] == pytest.approx(want.item(), rel=1e-5)
    assert loss.item() == pytest.approx(logs["dmd_loss"] + 0.5 * logs["regression_loss"], rel=1e-5)
    # Its gradient reaches the generator.
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.generator.parameters())


def test_pseudo_huber_regression_is_used_when_configured(tiny_teacher, tmp_path):
    generate_from_config(cfg(tiny_teacher, tmp_path))
    trainer = Trainer(cfg(tiny_teacher, tmp_path, "recipe.regression.loss=pseudo_huber",
                          "recipe.regression.pseudo_huber_c=0.1"))
    recipe = trainer.recipe
    batch = trainer.dataset.sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    with update_nets(recipe, "generator") as nets:
        _, logs = recipe.generator_loss(nets, batch, 0)
    torch.manual_seed(3)
    pairs = regression_pairs(recipe.pairs, 4, torch.device("cpu"))
    with torch.no_grad():
        out = recipe.generator(recipe.schedule.start(pairs.noise), recipe.schedule.t(0, 4, torch.device("cpu")),
                               pairs.cond)
    d2 = (out - pairs.images).pow(2).flatten(1).sum(1)
    assert logs["regression_loss"] == pytest.approx(((d2 + 0.01).sqrt() - 0.1).mean().item(), rel=1e-4)


def test_regression_needs_a_store(tiny_teacher, tmp_path):
    with pytest.raises(ConfigError, match="recipe.pairs"):
        cfg(tiny_teacher, tmp_path, "recipe.pairs=null")
    with pytest.raises(FileNotFoundError, match="distill pairs"):
        Trainer(cfg(tiny_teacher, tmp_path))
    assert load_config(REPO / "recipes" / "digits/dmd2.yaml").recipe.regression_weight == 0  # DMD2 unchanged
