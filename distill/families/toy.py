"""A small MLP denoiser over 2-D points (`ToyMLP`), so every recipe runs unchanged on a toy with known truth.

`ToyMLP` is a diffusers `ModelMixin`/`ConfigMixin` (it saves and loads with `save_pretrained`/`from_pretrained`
as safetensors plus a config), conditioned like `UNet2DModel` through `num_class_embeds` (the last row is the
null class for classifier-free guidance). The toy teacher is `distill/assets/toy_teacher`
(scripts/train_toy_teacher.py); the data and its exact density are in :mod:`distill.data.toy`.

Points have no pipeline: the toy has no latent target. It trains with ConsistencyModelPipeline's sampler
(CMStochasticIterativeScheduler, EDM prediction) like the pixel UNet2DModel.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.base.errors import ExportRefused
from distill.families.target import consistency_sampled


class ToyMLP(ModelMixin, ConfigMixin):
    """x (N, dim), timestep (N,), class_labels (N,) -> raw output (N, dim).

    The native timestep is embedded with sinusoids of `timestep * time_scale` at `time_frequencies` geometric
    frequencies in [0.1, 10] (time_scale = 1/250 turns the consistency-model time 250 log(sigma) into log(sigma)).
    """

    @register_to_config
    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 3, num_class_embeds: int = 2,
                 time_frequencies: int = 16, time_scale: float = 1.0 / 250.0):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(0.1), math.log(10.0), time_frequencies)),
                             persistent=False)
        self.class_embedding = nn.Embedding(num_class_embeds, hidden)
        self.input = nn.Linear(dim + 2 * time_frequencies, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(layers))
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def features(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The last hidden layer (N, hidden)."""
        angle = timestep.float()[:, None] * self.config.time_scale * self.freqs[None, :]
        h = self.input(torch.cat([x, angle.sin(), angle.cos()], dim=1))
        if class_labels is not None:
            h = h + self.class_embedding(class_labels)
        for block in self.blocks:
            h = h + block(h)  # residual
        return h

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.output(self.features(x, timestep, class_labels))


class ToyFamily:
    subfolder = "unet"
    latent = False
    #: LoRA targets (a regex peft full-matches): the input layer and the Linear of every block and of the output
    lora_targets = r"(input|blocks\.\d+\.1|output\.1)"

    def export_target(self, network_config: dict, scheduler_config: dict, prediction: str | None,
                      pipeline: str | None) -> None:
        if consistency_sampled(scheduler_config, prediction):
            return None
        raise ExportRefused(f"a ToyMLP teacher samples with CMStochasticIterativeScheduler's rule (EDM prediction), "
                            f"got a {scheduler_config.get('_class_name', '')} scheduler with prediction {prediction!r}")

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        return model(x, timestep, cond.get("class_labels"))

    def call_with_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        feats = model.features(x, timestep, cond.get("class_labels"))
        return model.output(feats), feats

    def null_condition(self, model: nn.Module, cond: Condition) -> Condition:
        if "class_labels" not in cond:
            raise ValueError("classifier-free guidance needs class_labels in the condition of a ToyMLP")
        return {**cond, "class_labels": torch.full_like(cond["class_labels"], model.config.num_class_embeds - 1)}

    def feature_channels(self, model: nn.Module) -> int:
        return model.config.hidden
