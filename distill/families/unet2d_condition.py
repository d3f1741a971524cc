"""diffusers `UNet2DConditionModel`: SD1.5 (cross-attention on text) and SDXL (plus the added time and pooled-text
embeddings, `added_cond_kwargs = {"text_embeds", "time_ids"}`, carried flat in the condition)."""

from __future__ import annotations

from torch import Tensor, nn

from distill.base.batch import Condition
from distill.families.text import TextConditioned
from distill.families.unet2d import UNet2DFamily

ADDED_KEYS = ("text_embeds", "time_ids")


class UNet2DConditionFamily(TextConditioned):
    subfolder = "unet"
    text_keys = ("encoder_hidden_states", "text_embeds")  # SDXL's pooled text is nulled with the prompt

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        added = {k: cond[k] for k in ADDED_KEYS if k in cond}
        if model.config.addition_embed_type == "text_time" and len(added) != 2:
            raise ValueError(f"an SDXL UNet needs condition keys {list(ADDED_KEYS)}; got {sorted(cond)}")
        return model(x, timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                     added_cond_kwargs=added or None, return_dict=False)[0]

    # the bottleneck features and their width are UNet2DModel's: the mid block's output
    call_with_features = UNet2DFamily.call_with_features
    feature_channels = UNet2DFamily.feature_channels
