"""diffusers `UNet2DConditionModel`: SD1.5 (cross-attention on text) and SDXL (plus the added time and pooled-text
embeddings, `added_cond_kwargs = {"text_embeds", "time_ids"}`, carried flat in the condition)."""

from __future__ import annotations

from torch import Tensor, nn

from distill.families import Condition
from distill.families.text import TextConditioned

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

    def call_with_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        handle = model.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            out = self.call(model, x, timestep, cond)
        finally:
            handle.remove()
        return out, captured[0]

    def feature_channels(self, model: nn.Module) -> int:
        return model.config.block_out_channels[-1]

