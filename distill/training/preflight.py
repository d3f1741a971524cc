"""The checks a config passes before a run starts: the files and folders it names, its teacher's export target and its
recipe's relations to data and teacher, all before any model is loaded or any folder is written.

`distill.config` only declares and validates values; this module is the step above it that reads the disk. Every
error is a :class:`~distill.base.errors.ConfigError` that starts with the config key at fault.
"""

from __future__ import annotations

from pathlib import Path

from distill.base.errors import ConfigError
from distill.base.paths import resolve_path
from distill.config import Config, parse_config, read_config
from distill.data.images import check_image_data
from distill.export.checks import check_exportable
from distill.training.checkpoints import latest_checkpoint
from distill.training.files import check_checkpoint, check_run_dir, check_teacher_folder
from distill.training.registry import recipe_module


def check_files(cfg: Config) -> Config:
    """The files `cfg` names, checked in the order a run would read them; returns `cfg`."""
    teacher = resolve_path(cfg.teacher.path)
    check_teacher_folder(teacher, "teacher.path")
    # before training, with the reason: no stock pipeline, a size it would not sample, classes it does not have
    check_exportable(teacher, cfg.teacher.prediction, resolution=cfg.data.resolution, num_frames=cfg.data.num_frames,
                     prompts=resolve_path(cfg.data.prompts) if cfg.data.prompts else None)
    if cfg.data.prompts is not None and not resolve_path(cfg.data.prompts).is_file():
        raise ConfigError(f"data.prompts: {cfg.data.prompts!r} is not a file (one prompt per line)")
    if cfg.data.images is not None:
        check_image_data(teacher, Path(cfg.data.images).expanduser(), cfg.teacher.prediction)
    cfg.recipe.check_run(cfg)  # the recipe's relations to the data and the teacher, before anything is loaded
    if cfg.trainer.resume not in (None, "latest"):
        check_checkpoint(Path(cfg.trainer.resume).expanduser(), "trainer.resume")
    return cfg


def build_config(data: dict) -> Config:
    """A raw mapping (a parsed YAML file plus overrides) validated and its files checked."""
    return check_files(parse_config(data, lambda name: recipe_module(name).Config))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a path, or the name of a shipped one), apply `key=value` overrides, validate it and check
    the files it names."""
    return build_config(read_config(path, overrides))


def check_run_folders(cfg: Config) -> None:
    """Everything about the run's folders that can be checked before a model is loaded: run.output_dir holds no
    other run, and the checkpoint trainer.resume=latest would pick is complete."""
    check_run_dir(cfg)
    if cfg.trainer.resume == "latest":
        ckpt = latest_checkpoint(cfg.run.output_dir)
        if ckpt is not None:
            check_checkpoint(ckpt, "trainer.resume")
