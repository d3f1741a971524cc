"""diffusers `SD3Transformer2DModel` (Stable Diffusion 3 / 3.5): joint attention on the prompt tokens
(`encoder_hidden_states`: CLIP-L, CLIP-G and T5 concatenated) and the pooled CLIP embeddings
(`pooled_projections`); fed the flow time 1000 s as StableDiffusion3Pipeline feeds it."""

from __future__ import annotations

from torch import Tensor, nn

from distill.base.batch import Condition
from distill.families.text import TextConditioned, patch_token_features


class SD3Family(TextConditioned):
    text_keys = ("encoder_hidden_states", "pooled_projections")

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    def call_with_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        return patch_token_features(self, model, x, timestep, cond)

    def feature_channels(self, model: nn.Module) -> int:
        return model.inner_dim
