"""Finding and building recipes. A recipe is one distillation method per file (`distill.recipes.<name>`, the
top-level `recipes/` folder), each with a `Config` (a `distill.config.Section`) and
`build(cfg, teacher, dataset) -> Recipe` (see `distill.training.recipe.Recipe`). YAML configs sit in
`recipes/<target>/<recipe>.yaml`. `distill.recipes` is a namespace package (no `__init__.py`, so the folder never
shadows an installed `recipes`).

The registry loads the teacher onto the device before `build` and moves the recipe's trained networks there
after it, so a recipe never handles devices. A recipe that trains on something other than the `data:` section's
dataset (a pair store) sets `recipe.dataset`; the trainer then draws its batches from that."""

from __future__ import annotations

import contextlib
import importlib
import types
from pathlib import Path
from typing import Callable, ContextManager

import torch

from distill.base.errors import ConfigError
from distill.base.paths import RECIPES_DIR, resolve_path
from distill.config import Config
from distill.training.recipe import Recipe


def recipe_module(name: str) -> types.ModuleType:
    """The module `distill.recipes.<name>`; a clear error lists the recipes that exist."""
    found = sorted(p.stem for p in RECIPES_DIR.glob("*.py") if not p.stem.startswith("_"))
    if name not in found:  # also keeps the config folders (recipes/digits/, ...) from passing as namespace modules
        raise ConfigError(f"recipe.name: no recipe {name!r}; available: {found}")
    module = importlib.import_module(f"distill.recipes.{name}")
    if not (hasattr(module, "Config") and callable(getattr(module, "build", None))):
        # a method that trains outside the trainer (e.g. tad_sr, an image-conditioned task with its own script)
        raise ConfigError(f"recipe.name: {name!r} is not a trainer recipe (distill/recipes/{name}.py has no Config "
                          "and build); it trains through its own script, named in its docstring")
    return module


def build_recipe(cfg: Config, device: torch.device,
                 main_process_first: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[Recipe, object]:
    """Load the teacher and data named by `cfg` and build its recipe, its trained networks on `device`; returns
    (recipe, the dataset to train on). The data set is made inside `main_process_first()` (the trainer passes
    accelerate's): what it caches (prompt embeddings, image latents) is computed once, by the main process, and the
    other processes read the cache it wrote."""
    recipe, dataset, _ = build_run(cfg, device, main_process_first)
    return recipe, dataset


def build_run(cfg: Config, device: torch.device,
              main_process_first: Callable[[], ContextManager] = contextlib.nullcontext, meta: bool = False):
    """:func:`build_recipe`, also returning the teacher as loaded (the trainer shards it under FSDP2):
    (recipe, dataset, teacher). `meta`: the teacher's network is built on the meta device from its config (no
    weights read), so the recipe's copies of it are meta too; the caller fills them
    (distill.training.parallel.MainWeights). The data set is made on `device` either way."""
    from distill.data import make_dataset
    from distill.models.denoiser import load_denoiser

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.teacher.dtype]
    teacher = load_denoiser(resolve_path(cfg.teacher.path), prediction=cfg.teacher.prediction,
                            resolution=cfg.data.resolution, dtype=dtype, meta=meta)
    if not meta:
        teacher.to(device)
    with main_process_first():
        dataset = make_dataset(cfg.data.name, cfg.data.resolution, cfg.data, teacher, device)
    null = getattr(dataset, "null_condition", None)
    if null:  # text families: guidance's unconditional half is the pipeline's empty prompt
        teacher.family.set_null_embeddings(null)
    recipe = recipe_module(cfg.recipe_name).build(cfg, teacher, dataset)
    if recipe.critic is not None and type(recipe).critic_loss is Recipe.critic_loss:
        raise TypeError(f"recipe {cfg.recipe_name}: {type(recipe).__name__} has a critic but no critic_loss")
    for net in (recipe.generator, recipe.critic):
        if net is not None and not meta:  # meta: moved when made real (to_empty)
            net.to(device)
    return recipe, dataset if recipe.dataset is None else recipe.dataset, teacher


def recipe_configs(kind: str, names: list[str] | None = None) -> dict[str, Path]:
    """name -> config of every shipped `recipes/<kind>/<name>.yaml` (kind "digits", "toy"): how the comparison
    scripts find their participants, so a recipe joins by adding a config. `names` selects; an unknown one is an
    error that lists what exists."""
    found = {p.stem: p for p in sorted((RECIPES_DIR / kind).glob("*.yaml"))}
    if names is None:
        return found
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"--recipes: no recipes/{kind}/<name>.yaml for {unknown}; available: {sorted(found)}")
    return {n: found[n] for n in names}
