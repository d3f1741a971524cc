"""diffusers `WanTransformer3DModel` (Wan 2.1 text-to-video): video latents (N, C, F, H, W), UMT5 prompt tokens
as `encoder_hidden_states`, flow time 1000 s as WanPipeline feeds it."""

from __future__ import annotations

from torch import Tensor, nn

from distill.base.batch import Condition
from distill.families.text import TextConditioned, token_features


class WanFamily(TextConditioned):
    text_keys = ("encoder_hidden_states",)

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"Wan takes video latents (N, C, F, H, W), got shape {tuple(x.shape)}")
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                     return_dict=False)[0]

    def call_with_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        pf, ph, pw = model.config.patch_size
        f, h, w = x.shape[-3] // pf, x.shape[-2] // ph, x.shape[-1] // pw
        out, feats = token_features(model, model.blocks, lambda: self.call(model, x, timestep, cond), (f * h, w))
        return out, feats  # frames folded into the height: a 2-D map for the GAN head

    def feature_channels(self, model: nn.Module) -> int:
        return model.config.num_attention_heads * model.config.attention_head_dim
