"""diffusers `WanTransformer3DModel` (Wan 2.1 text-to-video): video latents (N, C, F, H, W), UMT5 prompt tokens
as `encoder_hidden_states`, flow time 1000 s as WanPipeline feeds it.

Export target: `WanPipeline` with stochastic FlowMatchEulerDiscreteScheduler at the teacher's `flow_shift` (in
place of its UniPC flow scheduler).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.families.target import Target, read_json
from distill.families.text import TextConditioned, token_features

#: LoRA targets in WanTransformer3DModel's blocks: self- and cross-attention (`attn1`, `attn2`) and the feed-forward
#: `ffn`.
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


class WanTarget(Target):
    def vae_factors(self, folder: Path) -> tuple[int, int]:
        """WanPipeline reads the VAE config's scale factors (their class defaults are 8 and 4)."""
        vae = read_json(folder / "vae" / "config.json")
        return int(vae.get("scale_factor_spatial") or 8), int(vae.get("scale_factor_temporal") or 4)

    def call_arguments(self, num_steps: int, resolution: int, guidance: float, num_frames: int) -> str:
        return super().call_arguments(num_steps, resolution, guidance, num_frames) + f", num_frames={num_frames}"

    def encode(self, pipe, prompts: list[str], resolution: int, device: torch.device) -> Condition:
        """As the call encodes: max_sequence_length=512 tokens (encode_prompt's own default is 226)."""
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                           max_sequence_length=512)
        return {"encoder_hidden_states": embeds}


#: WanPipeline.check_inputs: height and width divisible by 16.
WAN = WanTarget("WanTransformer3DModel", "WanPipeline", "transformer", "flow", video=True, size_multiple=16)


class WanFamily(TextConditioned):
    text_keys = ("encoder_hidden_states",)
    lora_targets = WAN_LORA_TARGETS

    def export_target(self, network_config: dict, scheduler_config: dict, prediction: str | None,
                      pipeline: str | None) -> Target:
        return WAN

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
