"""MSD: multi-student distillation (Song, Lorraine, Nie, Kreis & Lucas 2024, "Multi-student Diffusion Distillation
for Better One-step Generators", arXiv 2410.23274; ICML 2025).

The paper (read: its abstract, the NVIDIA project page and third-party summaries; not its method section). A
conditional teacher is distilled into K one-step students, each responsible for a subset of the conditioning
(here: of the class labels); a request is routed to the student that owns its condition. With the same capacity
per student, a student that covers fewer conditions gets better quality; with smaller students, inference is
faster. The students are distilled with distribution matching (DM) and adversarial distillation (ADM); a smaller
student follows a three-stage path whose first stage is Teacher Score Matching (TSM), a pretraining that gives the
smaller network a stable initialisation before distillation.

Here one run trains ONE student of the K (`recipe.classes`, its share of the classes); `scripts/msd.py` runs K
of them, routes and exports. DMD2 (`distill.recipes.dmd2`) is held, not copied: the k-step schedule and backward
simulation, the fake score and its critic update, the time sampler and the normalised DMD gradient. MSD adds:

1. The class subset. The trainer draws its batches from `ClassSubset`: the data's rows whose label is one of
   `recipe.classes` (their empirical frequencies, as DMD2 draws all rows), so every label the student, the fake
   score and the teacher see in this run is one of the student's classes; each loss checks it.

2. A smaller student (`recipe.block_out_channels`, optionally `layers_per_block`): a freshly initialised network
   of the teacher's design with other widths (`distill.models.denoiser.smaller_network`, shared with SlimFlow), with the
   export target's output kind; null = DMD2's student, a copy of the teacher.

3. TSM (derived here: the paper's TSM loss was not read). For the first T = `tsm_steps` iterations the generator
   update regresses the student, used as a denoiser, on the teacher's denoiser at noised data:

       x_t = alpha_t x + sigma_t n,   x a data image of the student's classes, t ~ U[min_t, max_t] (unit time)
       L_TSM = || F_T(x0_S(x_t, t)) - F_T(x0_T(x_t, t)) ||^2 / D

   where x0_T is the frozen teacher with its guidance, x0_S the student's x0 through its own (consistency)
   preconditioning, and F_T(x0) the teacher's native output that gives x0 at (x_t, t) (`Denoiser.to_native`).
   For the EDM teacher F_T(a) - F_T(b) = (a - b) / c_out(sigma), so L_TSM = lambda(sigma) ||x0_S - x0_T||^2 / D
   with EDM's weighting lambda = 1 / c_out^2 (EDM, Karras et al. 2022, eq. 8 and Table 1): EDM's own training
   loss with the teacher's denoiser in place of the clean image. It is zero for a student equal to the teacher.
   After T iterations the generator update is DMD2's. The phase is a pure function of the trainer's step, so a
   resumed run switches where the uninterrupted one does. The fake score is trained on the student's samples in
   both phases (DMD2's critic update, unchanged), so when distillation starts it already models the
   TSM-initialised student's distribution (a choice made here).

Derived here, not from a source: the TSM loss above (its inputs, weighting and guidance), the phase switch by
update index, the fake score as a full-size teacher copy for a smaller student, training it during TSM, and the
class split used by `scripts/msd.py` (contiguous, balanced). With one student holding every class, the teacher's
network and T = 0, this recipe is DMD2 without its GAN head, gradient for gradient (tested).

Left out: DMD2's GAN head and the paper's adversarial (ADM) stage (`recipe.gan` is refused as an unknown key; the
subset restriction would carry over to real images, but it is not implemented); the paper's later stages beyond
TSM then DM; text conditions (a subset of prompts; here class labels only); routing inside one pipeline (each
student is its own stock pipeline and a routing table says which folder holds a class).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.batch import Batch, Condition
from distill.base.errors import ConfigError
from distill.config import Config as RunConfig
from distill.config import Section, require, require_images
from distill.models.denoiser import Denoiser, smaller_network
from distill.models.schedules import student_prediction, student_schedule
from distill.parametrization import add_noise
from distill.recipes.dmd2 import DMD2, denoising_loss
from distill.recipes.dmd2 import Config as DMD2Config
from distill.training.recipe import Nets, Recipe

logger = logging.getLogger("distill")


class Config(Section):
    min_t: float = Field(0.02, ge=0.0, le=1.0, description="lowest noise level of the DMD gradient, the fake-score "
                                                           "loss and the TSM loss, in unit time (0 clean, 1 "
                                                           "noisiest); below recipe.max_t")
    max_t: float = Field(0.98, ge=0.0, le=1.0, description="highest noise level, unit time; above recipe.min_t")
    dmd_weight: float = Field(1.0, gt=0.0, description="weight of the distribution matching loss; > 0")
    classes: tuple[Annotated[int, Field(ge=0)], ...] | None = Field(
        None, min_length=1,
        description="the class labels this student owns (each once, each a class of the data); it trains on "
                    "them only; null = every class (one student)")
    block_out_channels: tuple[Annotated[int, Field(ge=1)], ...] | None = Field(
        None, min_length=1, max_length=8,
        description="null = DMD2's student, a copy of the teacher; else a new network of the teacher's design "
                    "with these widths (one per block), initialised by TSM (recipe.tsm_steps)")
    layers_per_block: int | None = Field(None, ge=1, description="with block_out_channels: layers per block; "
                                                                 "null = the teacher's")
    tsm_steps: int = Field(0, ge=0, description="iterations T of teacher score matching before distillation: the "
                                                "generator update regresses the teacher's denoiser on noised data "
                                                "images; counted in run.max_steps; 0 = none")

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        require(self.min_t < self.max_t, "min_t", f"must be < recipe.max_t ({self.max_t}), got {self.min_t}")
        require(self.layers_per_block is None or self.block_out_channels is not None, "layers_per_block",
                "only applies with recipe.block_out_channels (a new, smaller network)")
        return self

    def check_run(self, cfg: RunConfig) -> None:
        if self.tsm_steps > 0:
            require_images(cfg, "recipe.tsm_steps", "TSM regresses the teacher on noised data images")


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------------------


def tsm_loss(teacher: Denoiser, x0_student: Tensor, x0_teacher: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Per-sample teacher score matching loss: the MSE of the two x0 estimates expressed as the teacher's native
    outputs at (x_t, t); for an EDM teacher lambda(sigma) ||x0_student - x0_teacher||^2 / D, lambda = 1 / c_out^2
    (EDM eq. 8). Pass the teacher's estimate detached."""
    return denoising_loss(teacher.to_native(x0_student, x_t, t), teacher.to_native(x0_teacher.detach(), x_t, t))


def split_classes(num_classes: int, students: int) -> list[list[int]]:
    """0 .. num_classes - 1 in `students` contiguous groups whose sizes differ by at most one (the first ones
    larger): the routing scripts/msd.py trains."""
    if not 1 <= students <= num_classes:
        raise ValueError(f"cannot split {num_classes} classes among {students} students")
    base, extra = divmod(num_classes, students)
    out, start = [], 0
    for i in range(students):
        size = base + (i < extra)
        out.append(list(range(start, start + size)))
        start += size
    return out


class ClassSubset:
    """A class-labelled data set (`images`, `labels`, `num_classes`, `image_shape`) restricted to `classes`: batches
    are drawn uniformly from the rows whose label is one of them, with the generator the trainer passes."""

    def __init__(self, data, classes: list[int]):
        self.data = data
        self.classes = torch.tensor(list(classes), dtype=torch.long)
        self.rows = torch.nonzero(torch.isin(data.labels, self.classes)).squeeze(1)
        self.image_shape = tuple(data.image_shape)
        self.num_classes = data.num_classes

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        idx = self.rows[torch.randint(0, len(self), (batch_size,), generator=generator)]
        return Batch(self.data.images[idx], {"class_labels": self.data.labels[idx]})

    def grid_condition(self, n: int) -> dict[str, Tensor]:
        """The student's classes in turn, so each grid column shows one of them."""
        return {"class_labels": self.classes[torch.arange(n) % len(self.classes)]}


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


class MSD(Recipe):
    """One MSD student: DMD2 (held) on its own classes, optionally a smaller network first fitted by TSM."""

    def __init__(self, cfg: Config, teacher: Denoiser, guidance_scale: float, num_steps: int,
                 image_shape: tuple[int, ...], seed: int = 0):
        self.cfg = cfg
        self.dmd = DMD2(DMD2Config(min_t=cfg.min_t, max_t=cfg.max_t, dmd_weight=cfg.dmd_weight), teacher,
                        guidance_scale, num_steps, image_shape)
        self.teacher, self.guidance_scale, self.critic = self.dmd.teacher, guidance_scale, self.dmd.critic
        if cfg.block_out_channels is None:
            self.generator = self.dmd.generator  # DMD2's student, a copy of the teacher
        else:
            with torch.random.fork_rng(devices=[]):  # the new network's initial weights, from the run's seed
                torch.manual_seed(seed)
                student = smaller_network(teacher, cfg.block_out_channels, cfg.layers_per_block)
            student.prediction = student_prediction(teacher)  # the export target's output kind, as DMD2's
            self.generator = self.dmd.generator = student  # DMD2's teacher-sized copy is dropped
        self.schedule = self.dmd.schedule = student_schedule(self.generator, num_steps)
        self.classes = None if cfg.classes is None else torch.tensor(cfg.classes, dtype=torch.long)

    def in_tsm(self, step: int) -> bool:
        return step < self.cfg.tsm_steps

    def check_classes(self, cond: Condition) -> None:
        """Refuse a batch holding a label this student does not own (the data set is restricted; this says so if
        anything else ever feeds the losses)."""
        labels = cond.get("class_labels")
        if self.classes is None or labels is None:
            return
        outside = labels[~torch.isin(labels, self.classes.to(labels.device))]
        if outside.numel():
            raise ValueError(f"msd: a batch holds labels {sorted(set(outside.tolist()))} outside this student's "
                             f"classes {self.classes.tolist()}")

    # -- the two updates -------------------------------------------------------------------------------------
    def generator_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        self.check_classes(batch.cond)
        if not self.in_tsm(step):
            loss, logs = self.dmd.generator_loss(nets, batch, step)
            return loss, {**logs, "tsm": 0.0}
        if batch.images is None:
            raise ValueError("msd: the TSM phase needs data images in the batch")
        x0, cond = batch.images, batch.cond
        t = self.dmd.sample_t(x0.shape[0], x0.device)
        x_t = add_noise(self.teacher.process, x0, torch.randn_like(x0), t)
        with torch.no_grad():
            target = self.teacher(x_t, t, cond, guidance_scale=self.guidance_scale)
        pred = nets.trained(x_t, t, cond)  # the student as a denoiser, through its own preconditioning
        loss = tsm_loss(self.teacher, pred, target, x_t, t).mean()
        return loss, {"loss": loss.item(), "tsm_loss": loss.item(), "tsm": 1.0}

    def critic_loss(self, nets: Nets, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """DMD2's fake-score loss on the student's detached samples, in both phases."""
        self.check_classes(batch.cond)
        return self.dmd.critic_loss(nets, batch, step)

    @torch.no_grad()
    def generate(self, generator: nn.Module, cond: Condition, noise: Tensor) -> Tensor:
        return self.dmd.generate(generator, cond, noise)

    def export(self, generator: nn.Module, out_dir: str | Path, num_steps: int, config: Any) -> Path:
        """DMD2's stock pipeline; a student of some classes says which in its model card and `distill.json` (its
        network still embeds every label: the others are routed to the students that own them)."""
        out = super().export(generator, out_dir, num_steps, config)
        if self.classes is not None:
            classes = self.classes.tolist()
            meta = json.loads((out / "distill.json").read_text())
            (out / "distill.json").write_text(json.dumps({**meta, "msd_classes": classes}, indent=2) + "\n")
            with open(out / "README.md", "a") as card:
                card.write(f"- MSD student: trained on classes {classes} only; sample another class from the student "
                           "that owns it (the routing card beside this folder)\n")
        return out


def check_classes(classes: tuple[int, ...], dataset, data_name: str) -> None:
    """Refuse, naming recipe.classes, a class list the data cannot serve."""
    labels, count = getattr(dataset, "labels", None), getattr(dataset, "num_classes", None)
    if labels is None or not count:
        raise ConfigError(f"recipe.classes: needs class-labelled data (data.name: digits); data.name: {data_name} "
                          "has no class labels")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"recipe.classes: each class at most once, got {list(classes)}")
    outside = [c for c in classes if not 0 <= c < count]
    if outside:
        raise ConfigError(f"recipe.classes: every class must be one of 0..{count - 1} (data.name: {data_name} has "
                          f"{count}), got {list(classes)}")
    empty = [c for c in classes if not bool((labels == c).any())]
    if empty:
        raise ConfigError(f"recipe.classes: the data holds no image of class {empty}")


def build(cfg: RunConfig, teacher: Denoiser, dataset) -> MSD:
    rc = cfg.recipe
    if rc.classes is not None:
        check_classes(rc.classes, dataset, cfg.data.name)
    if rc.tsm_steps >= cfg.run.max_steps:
        logger.warning("recipe.tsm_steps=%d >= run.max_steps=%d: the run ends in the TSM phase and the student is "
                       "never distilled", rc.tsm_steps, cfg.run.max_steps)
    if rc.block_out_channels is not None and rc.tsm_steps == 0:
        logger.warning("recipe.block_out_channels without recipe.tsm_steps: the new network starts from random "
                       "weights and is distilled without TSM's initialisation")
    recipe = MSD(rc, teacher, cfg.teacher.guidance_scale, cfg.student.num_steps, tuple(dataset.image_shape),
                 seed=cfg.run.seed)
    if rc.classes is not None:
        recipe.dataset = ClassSubset(dataset, list(rc.classes))
    return recipe
