"""The recipe contract: what the trainer asks of a recipe, and the helpers a recipe may use."""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

from torch import Tensor, nn

from distill.base.batch import Batch


class Recipe(Protocol):
    """What the trainer needs from a recipe. `critic` may be None (single-network recipes).

    Optional members (the trainer looks them up with `getattr`):

    * `export_model(generator) -> Denoiser`: the part of the generator that is exported, when the generator
      carries more than the student (e.g. sCM's learned log-variance head, trained and checkpointed with the
      student and kept in its EMA, but not part of the pipeline). Default: the generator itself.
    * `target_decay: float`: ask the trainer for an EMA *target network* (consistency distillation's
      theta^-, LCM): a frozen copy of the generator, updated after every generator update as
      target <- decay * target + (1 - decay) * generator, checkpointed with the run. The trainer hands it to the
      recipe as `recipe.target_network` before the first step. Independent of the exported EMA
      (`trainer.ema_decay`).
    * `export_timesteps: list[int] | None`: custom pipeline timesteps the student was trained to be sampled
      at (see `distill.models.schedules.student_schedule`); written into the export's model card and `distill.json`.
    * `dataset`: an object with `sample(batch_size, generator) -> Batch`, `image_shape` and `grid_condition`
      to train on instead of the data section's (a pair store; see `distill.recipes.build_recipe`).
    * `export(generator, out_dir, num_steps, config) -> Path`: a writer for a generator whose export target is
      not `distill.export.pipeline.export_pipeline`'s (Phased DMD's experts, a reflowed flow in teacher format).
    """

    generator: nn.Module
    critic: nn.Module | None

    def generator_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss for the generator update and scalars to log."""
        ...

    def critic_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss for one critic update and scalars to log."""
        ...

    def generate(self, generator: nn.Module, cond: dict[str, Tensor], noise: Tensor) -> Tensor:
        """Student samples in data space for `noise` (standard normal) and conditioning."""
        ...

def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / compile / accelerate wrappers."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(module)

@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Use a trainable network inside another network's loss: unwrapped (no DDP bookkeeping) with its parameters'
    requires_grad off, so gradients flow through it to its inputs but never into its weights."""
    inner = unwrap(module)
    flags = [p.requires_grad for p in inner.parameters()]
    inner.requires_grad_(False)
    try:
        yield inner
    finally:
        for p, f in zip(inner.parameters(), flags):
            p.requires_grad_(f)
