"""diffusers `UNet2DConditionModel`: SD1.5 (cross-attention on text) and SDXL (plus the added time and pooled-text
embeddings, `added_cond_kwargs = {"text_embeds", "time_ids"}`, carried flat in the condition).

Export targets: `StableDiffusionPipeline`, or `StableDiffusionXLPipeline` for a UNet with SDXL's added embeddings
(`addition_embed_type: text_time`); both with LCMScheduler, which they hand the call's generator.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.families.target import Target
from distill.families.text import TextConditioned
from distill.families.unet2d import UNET_LORA_TARGETS, UNet2DFamily

ADDED_KEYS = ("text_embeds", "time_ids")


class StableDiffusionTarget(Target):
    def encode(self, pipe, prompts: list[str], resolution: int, device: torch.device) -> Condition:
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": embeds}


class StableDiffusionXLTarget(Target):
    def encode(self, pipe, prompts: list[str], resolution: int, device: torch.device) -> Condition:
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        # StableDiffusionXLPipeline._get_add_time_ids: original size, crop top-left, target size
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=embeds.dtype,
                           device=embeds.device)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": ids.expand(len(prompts), -1)}


SD15 = StableDiffusionTarget("UNet2DConditionModel", "StableDiffusionPipeline", "unet", "vp",
                             passes_generator=True, guidance_off=0.0)
SDXL = StableDiffusionXLTarget("UNet2DConditionModel", "StableDiffusionXLPipeline", "unet", "vp",
                               passes_generator=True, guidance_off=0.0)


class UNet2DConditionFamily(TextConditioned):
    subfolder = "unet"
    text_keys = ("encoder_hidden_states", "text_embeds")  # SDXL's pooled text is nulled with the prompt
    lora_targets = UNET_LORA_TARGETS

    def export_target(self, network_config: dict, scheduler_config: dict, prediction: str | None,
                      pipeline: str | None) -> Target:
        return SDXL if network_config.get("addition_embed_type") == "text_time" else SD15

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        added = {k: cond[k] for k in ADDED_KEYS if k in cond}
        if model.config.addition_embed_type == "text_time" and len(added) != 2:
            raise ValueError(f"an SDXL UNet needs condition keys {list(ADDED_KEYS)}; got {sorted(cond)}")
        return model(x, timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                     added_cond_kwargs=added or None, return_dict=False)[0]

    # the bottleneck features and their width are UNet2DModel's: the mid block's output
    call_with_features = UNet2DFamily.call_with_features
    feature_channels = UNet2DFamily.feature_channels
