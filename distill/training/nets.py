"""The networks the trainer hands a loss (:class:`distill.training.recipe.Nets`), made once per update.

The trainer keeps two views of each trained network: the recipe's own module, and the module accelerate prepared
for the processes (the same object on one process; a DDP wrapper around it on several, later perhaps FSDP). Only
the trainer holds the prepared one; a loss receives it as `nets.trained` for its one pass with gradient, and the
recipe's own modules for everything else, with the network the update does not train frozen.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

from torch import nn

from distill.training.recipe import Nets, Recipe


@contextlib.contextmanager
def frozen(module: nn.Module | None) -> Iterator[nn.Module | None]:
    """`module` with its parameters' requires_grad off (gradients flow through it to its inputs, never into its
    weights), restored afterwards; None is nothing to freeze."""
    params = [] if module is None else list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def update_nets(recipe: Recipe, update: Literal["generator", "critic"], trained: nn.Module | None = None,
                target: nn.Module | None = None) -> Iterator[Nets]:
    """The :class:`Nets` of one `update` of `recipe`, with the network it does not train frozen while it runs.
    `trained` is the updated network as the trainer prepared it; None: the recipe's own (one process, no
    accelerate, e.g. a test calling a loss directly)."""
    own, other = (recipe.generator, recipe.critic) if update == "generator" else (recipe.critic, recipe.generator)
    with frozen(other):
        yield Nets(generator=recipe.generator, critic=recipe.critic, trained=own if trained is None else trained,
                   target=target)
