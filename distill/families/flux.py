"""diffusers `FluxTransformer2DModel` (Flux.1): latents are packed into 2x2 patches of tokens with positional ids,
the prompt is T5 tokens (`encoder_hidden_states`) plus pooled CLIP (`pooled_projections`), and guidance-distilled
checkpoints (dev) take the embedded guidance `guidance` (per sample) as FluxPipeline passes `guidance_scale`.

The adapter packs and unpacks itself (FluxPipeline's `_pack_latents` layout), so recipes see (N, C, H, W) latents
like every other family; the time input is s (the pipeline passes timestep / 1000, the model scales by 1000).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.families.text import TextConditioned, token_features


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


class FluxFamily(TextConditioned):
    text_keys = ("encoder_hidden_states", "pooled_projections")

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
