"""diffusers `UNet2DModel`, optionally class-conditional through `num_class_embeds`.

Convention for classifier-free guidance: a class-conditional model carries one extra embedding row, the last
(index num_class_embeds - 1), as the null class; it is trained with label dropout to that row. The export drops it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.base.batch import Condition


class UNet2DFamily:
    subfolder = "unet"

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        labels = cond.get("class_labels")
        return model(x, timestep, class_labels=labels, return_dict=False)[0]

    def call_with_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []
        handle = model.mid_block.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            out = self.call(model, x, timestep, cond)
        finally:
            handle.remove()
        return out, captured[0]

    def null_condition(self, model: nn.Module, cond: Condition) -> Condition:
        n_embeds = model.config.num_class_embeds
        if n_embeds is None or "class_labels" not in cond:
            raise ValueError("classifier-free guidance needs a class-conditional UNet2DModel (num_class_embeds set)")
        labels = cond["class_labels"]
        return {**cond, "class_labels": torch.full_like(labels, n_embeds - 1)}

    def feature_channels(self, model: nn.Module) -> int:
        return model.config.block_out_channels[-1]
