"""What cannot be exported, refused when the config is loaded (before anything is trained), with the reason."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from distill.base.errors import ConfigError, ExportRefused
from distill.base.paths import resolve_path
from distill.data.prompts import read_prompts
from distill.families.target import pipeline_class, read_json, target_for, teacher_target


def check_exportable(folder: Path, prediction: str | None, key: str = "teacher.path", resolution: int | None = None,
                     num_frames: int = 1, prompts: Path | None = None) -> None:
    """Refuse, before anything is loaded, a teacher whose student cannot leave as a stock pipeline, and (given the
    data section's `resolution`, `num_frames` and `prompts` file) a size its pipeline would not sample or class
    indices a DiT teacher does not have."""

    sub = next((s for s in ("unet", "transformer") if (folder / s / "config.json").is_file()), None)
    if sub is None:
        return  # distill.training.files names the missing network folder
    net = read_json(folder / sub / "config.json")
    try:
        target = target_for(net, read_json(folder / "scheduler" / "scheduler_config.json"), prediction,
                            pipeline_class(folder))
    except ExportRefused as e:
        raise ConfigError(f"{key}: {str(folder)!r}: {e}") from None
    if target is not None and not (folder / "model_index.json").is_file():
        raise ConfigError(f"{key}: {str(folder)!r} has no model_index.json: a {target.network} teacher is a whole "
                          f"{target.pipeline} folder (its VAE, text encoders and tokenizers are exported with the "
                          "student and encode the prompts)")
    if target is not None and resolution is not None:
        try:
            target.latent_shape(folder, net, resolution, num_frames)
        except ExportRefused as e:  # the message starts with the data key
            raise ConfigError(f"{e} (teacher {str(folder)!r})") from None
    if target is not None and target.class_conditional and prompts is not None and prompts.is_file():
        target.check_prompts(read_prompts(prompts), net)


def check_custom_timesteps(cfg: Any, timesteps: list[int] | None, key: str = "recipe.timesteps") -> None:
    """Refuse, when the config is loaded, custom pipeline timesteps for a teacher whose export target is not
    ConsistencyModelPipeline (the latent families' schedules are their pipelines' own `num_inference_steps`)."""
    if timesteps is None:
        return
    from distill.base.errors import ConfigError

    target, _, _ = teacher_target(resolve_path(cfg.teacher.path), cfg.teacher.prediction)
    if target is not None:
        raise ConfigError(f"{key}: custom timesteps {timesteps} are a ConsistencyModelPipeline option; a "
                          f"{target.pipeline} student samples the trailing timesteps of num_inference_steps "
                          "(set it to null)")


def check_expert_export(folder: Path, prediction: str | None, key: str = "recipe.name") -> None:
    """Refuse, when the config is loaded, an expert-per-step student (Phased DMD) of a latent family whose stock
    pipeline has no `callback_on_step_end`, through which :data:`LATENT_EXPERT_LOOP` switches experts."""

    from distill.base.errors import ConfigError

    target, _, _ = teacher_target(folder, prediction)
    if target is None:
        return
    call = target.diffusers_pipeline().__call__
    if "callback_on_step_end" not in inspect.signature(call).parameters:
        raise ConfigError(f"{key}: an expert-per-step student is exported as {target.pipeline} with its network "
                          "switched between steps by the pipeline's callback_on_step_end, which "
                          f"{target.pipeline} does not have; no stock pipeline can sample this student")
