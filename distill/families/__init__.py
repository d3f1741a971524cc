"""Model-family adapters: how to call one kind of diffusers model with its native time and conditioning.

An adapter overrides only the raw call (and, where a recipe needs them, the bottleneck features and the null
condition for classifier-free guidance). Everything else (noise process, prediction conversions, guidance)
lives in :class:`distill.models.denoiser.Denoiser`. A new family is a new module here plus one line in `_FAMILIES`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from distill.base.batch import Condition


class Family(Protocol):
    """The contract a model-family adapter fulfils."""

    #: the folder of a pipeline directory that holds this family's network ("unet", "transformer").
    subfolder: str

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
        raise ValueError(f"no model-family adapter for {name!r}; supported: {sorted(_FAMILIES)}")
    module_name, attr = _FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), attr)()


