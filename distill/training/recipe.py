"""The recipe contract: the hooks the trainer calls on a recipe, and the networks it hands each loss.

A recipe (one distillation method, `recipes/<name>.py`) subclasses :class:`Recipe`. It owns its networks and its
losses, nothing else: the trainer alone prepares networks for the processes (DDP today, FSDP later), freezes the
network a loss does not train, keeps optimizers, precision, EMA, checkpoints and logging, and the registry
(`distill.training.registry.build_recipe`) moves the trained networks to the device (the teacher arrives there).
So a recipe never unwraps or freezes a network, never moves a network or tensor to a device (new tensors are
made on the device of the inputs or the teacher), and never reads a wrapper.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill.base.batch import Batch, Condition


@dataclass(frozen=True)
class Nets:
    """The networks one loss sees, handed in by the trainer for the update it runs.

    * `generator`, `critic`: the recipe's own networks (`critic` None without one). The one this update does not
      train has its parameters' requires_grad off for the update, so a pass through it carries gradient to its
      inputs but never into its weights (DMD2's GAN loss reaches the student through the critic). Every pass that
      takes no gradient into the trained weights uses these: rollouts without gradient, JVP targets, attributes.
    * `trained`: the network this update trains, as the trainer prepared it for the processes (under DDP a
      wrapper that averages gradients across processes). The loss's pass with gradient into the trained weights
      goes through it, once per loss: DDP expects one forward per backward, and passes without gradient must not
      go through it (ranks may run different numbers of them).
    * `target`: the EMA target network when the recipe asks for one (:attr:`Recipe.target_decay`), else None.
    """

    generator: nn.Module
    critic: nn.Module | None
    trained: nn.Module
    target: nn.Module | None = None


class Recipe(ABC):
    """What the trainer asks of a recipe; subclass it and set `generator` (and `critic`, if any) in `__init__`.

    Per iteration the trainer runs `trainer.critic_steps` critic updates (when `critic` is not None), then one
    generator update; each calls the loss with the :class:`Nets` of its update, a batch and the update's step.
    The optional hooks below have defaults that fit a recipe whose generator is the exported student.
    """

    #: The student (or a module holding it, see :meth:`export_model`), trained by :meth:`generator_loss`.
    generator: nn.Module
    #: A second trained network (fake score, discriminator), trained by :meth:`critic_loss`; None: no critic and no
    #: critic updates.
    critic: nn.Module | None = None
    #: Asks the trainer for an EMA *target network* (consistency distillation's theta^-, LCM): a frozen copy of
    #: the generator updated after every generator update as target <- decay * target + (1 - decay) * generator,
    #: checkpointed with the run and handed to the losses as `nets.target`. Independent of the exported EMA
    #: (`trainer.ema_decay`). None: no target network.
    target_decay: float | None = None
    #: Custom pipeline timesteps the student was trained to be sampled at (see
    #: `distill.models.schedules.student_schedule`), written into the export; None: the pipeline's own spacing.
    export_timesteps: list[int] | None = None
    #: Data to train on instead of the data section's (a pair store): an object with
    #: `sample(batch_size, generator) -> Batch`, `image_shape` and `grid_condition(n)`. None: the data section's.
    dataset: Any | None = None

    @abstractmethod
    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss of one generator update and scalars to log."""

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss of one critic update and scalars to log; required exactly when `critic` is set."""
        raise NotImplementedError(f"{type(self).__name__} has a critic but no critic_loss")

    @abstractmethod
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        """Student samples in data space from `noise` (standard normal) and conditioning, as the export samples;
        `generator` is the (EMA) generator, called without gradient."""

    def export_model(self, generator: nn.Module) -> nn.Module:
        """The part of `generator` that is exported, when the generator carries more than the student (sCM's
        learned log-variance head is trained, checkpointed and averaged with the student, but not exported)."""
        return generator

    def export(self, generator: nn.Module, out_dir: str | Path, num_steps: int, config: Any) -> Path:
        """Write the (EMA) generator to `out_dir` as a stock diffusers pipeline. Override for another target
        (Phased DMD's experts, a reflowed flow in the teacher's format)."""
        from distill.export.pipeline import export_pipeline

        return export_pipeline(self.export_model(generator), out_dir, num_steps=num_steps, config=config,
                               timesteps=self.export_timesteps)
