"""Model families: everything that differs between kinds of diffusers network, one module per family.

A family module declares (the :class:`Family` contract): how to call its network with its native time and
conditioning (and, where a recipe needs them, the bottleneck features and the null condition for classifier-free
guidance); the modules its LoRA adapters go on (`lora_targets`); and its export targets, the stock pipelines its
students leave as (`distill.families.target.Target` instances, a subclass where the pipeline encodes prompts or is
called its own way), with the rule that picks one from a teacher's configs (`export_target`). Everything else
(noise process, prediction conversions, guidance) lives in :class:`distill.models.denoiser.Denoiser`, and what
every target shares in :mod:`distill.families.target`.

Adding a family is exactly one new module here plus one line in `_FAMILIES`, and no other edit.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from torch import Tensor, nn

from distill.base.batch import Condition


class Family(Protocol):
    """The contract a model family fulfils."""

    #: the folder of a pipeline directory that holds this family's network ("unet", "transformer").
    subfolder: str
    #: its students leave as a latent pipeline (a `Target`); False for the pixel families, whose consistency-model
    #: students distill.export.pipeline writes as ConsistencyModelPipeline.
    latent: bool
    #: the modules LoRA adapters go on (distill.models.adapters): peft module-name suffixes, or one regex that peft
    #: full-matches, as diffusers names them in this network class.
    lora_targets: tuple[str, ...] | str
    #: optional: the class names of the blocks FSDP2 shards one by one (distill.training.parallel); without it, the
    #: diffusers class's own `_no_split_modules`.
    shard_blocks: tuple[str, ...]

    def export_target(self, network_config: dict, scheduler_config: dict, prediction: str | None,
                      pipeline: str | None) -> Any:  # a Target (distill.families.target imports this module)
        """The `distill.families.target.Target` a teacher's student leaves as, picked from its network and
        scheduler configs, `teacher.prediction` and the pipeline class its folder was saved as (`pipeline`); None
        where the student leaves as `ConsistencyModelPipeline` (the pixel families, distill.export.pipeline);
        ExportRefused, saying why, where no stock pipeline can sample it."""
        ...

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        """The network's raw output for already-scaled input `x` and native `timestep` (shape (N,))."""
        ...

    def call_with_features(
        self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition
    ) -> tuple[Tensor, Tensor]:
        """Raw output and bottleneck features (N, C, ...) from the same forward pass (for GAN heads)."""
        ...

    def null_condition(self, model: nn.Module, cond: Condition) -> Condition:
        """The unconditional counterpart of `cond` for classifier-free guidance."""
        ...

    def feature_channels(self, model: nn.Module) -> int:
        """Channel count of :meth:`call_with_features`' features."""
        ...


# diffusers model class name -> "module:Adapter". One line per family.
_FAMILIES: dict[str, str] = {
    "UNet2DModel": "distill.families.unet2d:UNet2DFamily",
    "UNet2DConditionModel": "distill.families.unet2d_condition:UNet2DConditionFamily",
    "SD3Transformer2DModel": "distill.families.sd3:SD3Family",
    "FluxTransformer2DModel": "distill.families.flux:FluxFamily",
    "WanTransformer3DModel": "distill.families.wan:WanFamily",
    "DiTTransformer2DModel": "distill.families.dit:DiTFamily",
    "PixArtTransformer2DModel": "distill.families.dit:PixArtFamily",
    "ToyMLP": "distill.families.toy:ToyFamily",
}

# Network classes that are not part of diffusers (loaded by `distill.models.denoiser.load_denoiser` by class name).
_MODEL_CLASSES: dict[str, str] = {
    "ToyMLP": "distill.families.toy:ToyMLP",
}


def supported_networks() -> list[str]:
    """The network classes that have a family."""
    return sorted(_FAMILIES)


def model_class(name: str) -> type | None:
    """The network class a teacher folder's config names: a diffusers class, else one of `_MODEL_CLASSES`."""
    import diffusers

    found = getattr(diffusers, name, None)
    if found is None and name in _MODEL_CLASSES:
        module_name, attr = _MODEL_CLASSES[name].split(":")
        found = getattr(importlib.import_module(module_name), attr)
    return found


def family_for(model: nn.Module | str) -> Family:
    """The adapter for a diffusers model instance or class name; a clear error names unsupported classes."""
    name = model if isinstance(model, str) else type(model).__name__
    if name not in _FAMILIES:
        raise ValueError(f"no model-family adapter for {name!r}; supported: {supported_networks()}")
    module_name, attr = _FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), attr)()


