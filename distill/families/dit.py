"""diffusers `DiTTransformer2DModel` (class-conditional DiT) and `PixArtTransformer2DModel` (PixArt-alpha/sigma,
T5 prompt tokens with their attention mask). Both may predict a learned variance in the second half of the
channels (`out_channels = 2 * in_channels`); as DiTPipeline and PixArtSigmaPipeline do, only the first half (the
noise prediction) is the output."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.families.text import TextConditioned, patch_token_features


def _drop_learned_variance(model: nn.Module, out: Tensor, channels: int) -> Tensor:
    return out[:, :channels] if model.config.out_channels == 2 * channels else out


class DiTFamily:
    """Class labels 0..num_embeds_ada_norm - 1; the null class (for guidance) is index num_embeds_ada_norm, as
    DiTPipeline's `class_null`."""

    subfolder = "transformer"

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        out = model(x, timestep=timestep, class_labels=cond["class_labels"], return_dict=False)[0]
        return _drop_learned_variance(model, out, x.shape[1])

    def call_with_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        return patch_token_features(self, model, x, timestep, cond)

    def null_condition(self, model: nn.Module, cond: Condition) -> Condition:
        labels = cond["class_labels"]
        return {**cond, "class_labels": torch.full_like(labels, model.config.num_embeds_ada_norm)}

    def feature_channels(self, model: nn.Module) -> int:
        return model.inner_dim


class PixArtFamily(TextConditioned):
    """A transformer with `use_additional_conditions` (PixArt-alpha 1024, sample_size 128) also takes the image size
    `resolution` (N, 2) and `aspect_ratio` (N, 1) as PixArtAlphaPipeline passes them; they stay in the null
    condition (they are not text)."""

    text_keys = ("encoder_hidden_states",)

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        added = {"resolution": cond.get("resolution"), "aspect_ratio": cond.get("aspect_ratio")}
        if model.use_additional_conditions and (added["resolution"] is None or added["aspect_ratio"] is None):
            raise ValueError("this PixArt transformer uses additional conditions (use_additional_conditions=True, "
                             "PixArt-alpha 1024): the condition needs 'resolution' (N, 2) and 'aspect_ratio' (N, 1); "
                             f"got {sorted(cond)}")
        out = model(x, encoder_hidden_states=cond["encoder_hidden_states"],
                    encoder_attention_mask=cond.get("encoder_attention_mask"), timestep=timestep,
                    added_cond_kwargs=added, return_dict=False)[0]
        return _drop_learned_variance(model, out, x.shape[1])

    def call_with_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        return patch_token_features(self, model, x, timestep, cond)

    def feature_channels(self, model: nn.Module) -> int:
        return model.inner_dim
