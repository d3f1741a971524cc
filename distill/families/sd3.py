"""diffusers `SD3Transformer2DModel` (Stable Diffusion 3 / 3.5): joint attention on the prompt tokens
(`encoder_hidden_states`: CLIP-L, CLIP-G and T5 concatenated) and the pooled CLIP embeddings
(`pooled_projections`); fed the flow time 1000 s as StableDiffusion3Pipeline feeds it.

Export target: `StableDiffusion3Pipeline` with stochastic FlowMatchEulerDiscreteScheduler at the teacher's shift.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.families.target import Target, absent_as_none
from distill.families.text import TextConditioned, patch_token_features

#: LoRA targets in SD3Transformer2DModel's joint blocks: the image stream's attention (`to_*`, also SD3.5's second
#: attention `attn2`) and the text stream's (`add_*_proj`, `to_add_out`), and both feed-forwards.
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


class StableDiffusion3Target(Target):
    def load_text_pipeline(self, folder: Path):
        """The teacher's pipeline with its transformer: SD3's encode_prompt reads the transformer's
        joint_attention_dim (the width of the T5 part)."""
        return self.diffusers_pipeline().from_pretrained(folder, **absent_as_none(folder), torch_dtype=torch.float32)

    def encode(self, pipe, prompts: list[str], resolution: int, device: torch.device) -> Condition:
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device,
                                                      do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


SD3 = StableDiffusion3Target("SD3Transformer2DModel", "StableDiffusion3Pipeline", "transformer", "flow",
                             guidance_off=0.0)


class SD3Family(TextConditioned):
    text_keys = ("encoder_hidden_states", "pooled_projections")
    lora_targets = SD3_LORA_TARGETS

    def export_target(self, network_config: dict, scheduler_config: dict, prediction: str | None,
                      pipeline: str | None) -> Target:
        return SD3

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    def call_with_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        return patch_token_features(self, model, x, timestep, cond)

    def feature_channels(self, model: nn.Module) -> int:
        return model.inner_dim
