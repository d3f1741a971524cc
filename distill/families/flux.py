"""diffusers `FluxTransformer2DModel` (Flux.1): latents are packed into 2x2 patches of tokens with positional ids,
the prompt is T5 tokens (`encoder_hidden_states`) plus pooled CLIP (`pooled_projections`), and guidance-distilled
checkpoints (dev) take the embedded guidance `guidance` (per sample) as FluxPipeline passes `guidance_scale`.

The adapter packs and unpacks itself (FluxPipeline's `_pack_latents` layout), so recipes see (N, C, H, W) latents
like every other family; the time input is s (the pipeline passes timestep / 1000, the model scales by 1000).

Export target: `FluxPipeline` with stochastic FlowMatchEulerDiscreteScheduler; the pipeline sets its own sigmas
linspace(1, 1/k, k) (shifted by the dynamic mu of the resolution), and a guidance-distilled Flux (dev) is called
with the embedded guidance it was distilled with.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.families.target import Target, flow_euler_config, pipeline_mu
from distill.families.text import TextConditioned, token_features

#: the embedded guidance a guidance-distilled Flux (dev) is called with: FluxPipeline's default guidance_scale.
FLUX_EMBEDDED_GUIDANCE = 3.5

#: LoRA targets in FluxTransformer2DModel: the attention of the double-stream blocks (image `to_*`, text
#: `add_*_proj`, `to_add_out`) and of the single-stream blocks (`to_q`, `to_k`, `to_v`), both double-stream
#: feed-forwards and the single blocks' MLP input `proj_mlp` (their `proj_out` shares its name with the model's
#: output projection, which stays frozen).
FLUX_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")


def pack(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H/2 * W/2, 4C), FluxPipeline._pack_latents' order."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack` for latent height `h` and width `w` (FluxPipeline._unpack_latents)."""
    n, _, d = tokens.shape
    return tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Positional ids (row, column) of the packed tokens (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxTarget(Target):
    def flow_config(self, teacher_scheduler_config: dict, num_steps: int) -> dict:
        """The teacher's shift alone: the pipeline's sigmas already end at the trailing step 1/k, and a
        shift_terminal would stretch them again."""
        return flow_euler_config(teacher_scheduler_config)

    def set_timesteps(self, scheduler, num_steps: int, image_seq_len: int) -> None:
        """FluxPipeline's call: sigmas = linspace(1, 1/k, k), with the dynamic shift mu of the token count."""
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                                mu=pipeline_mu(scheduler.config, image_seq_len))

    def embedded_guidance(self, network_config: dict) -> float | None:
        """Flux dev (`guidance_embeds`) takes FluxPipeline's default guidance_scale, as its teacher was called."""
        return FLUX_EMBEDDED_GUIDANCE if network_config.get("guidance_embeds") else None

    def micro_conditions(self, network_config: dict, resolution: int, n: int) -> Condition:
        """Flux dev's embedded guidance, one per sample."""
        guidance = self.embedded_guidance(network_config)
        return {} if guidance is None else {"guidance": torch.full((n,), guidance)}

    def encode(self, pipe, prompts: list[str], resolution: int, device: torch.device) -> Condition:
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


FLUX = FluxTarget("FluxTransformer2DModel", "FluxPipeline", "transformer", "flow", packed=True, guidance_off=0.0)


class FluxFamily(TextConditioned):
    text_keys = ("encoder_hidden_states", "pooled_projections")
    lora_targets = FLUX_LORA_TARGETS

    def export_target(self, network_config: dict, scheduler_config: dict, prediction: str | None,
                      pipeline: str | None) -> Target:
        return FLUX

    def call(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> Tensor:
        h, w = x.shape[-2:]
        if h % 2 or w % 2:
            raise ValueError(f"Flux packs 2x2 latent patches: latent height and width must be even, got {h}x{w}")
        guidance = None
        if model.config.guidance_embeds:
            if "guidance" not in cond:
                raise ValueError("this Flux transformer embeds guidance (guidance_embeds=True): the condition needs "
                                 "a 'guidance' entry (N,), the pipeline's guidance_scale")
            guidance = cond["guidance"].to(x.dtype)
        text = cond["encoder_hidden_states"]
        out = model(hidden_states=pack(x), timestep=timestep / 1000.0, guidance=guidance,
                    pooled_projections=cond["pooled_projections"], encoder_hidden_states=text,
                    txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
                    img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def call_with_features(self, model: nn.Module, x: Tensor, timestep: Tensor, cond: Condition) -> tuple[Tensor, Tensor]:
        return token_features(model, model.transformer_blocks, lambda: self.call(model, x, timestep, cond),
                              (x.shape[-2] // 2, x.shape[-1] // 2))

    def feature_channels(self, model: nn.Module) -> int:
        return model.inner_dim
