"""diffusers `DiTTransformer2DModel` (class-conditional DiT) and `PixArtTransformer2DModel` (PixArt-alpha/sigma,
T5 prompt tokens with their attention mask). Both may predict a learned variance in the second half of the
channels (`out_channels = 2 * in_channels`); as DiTPipeline and PixArtSigmaPipeline do, only the first half (the
noise prediction) is the output.

Export targets, all with LCMScheduler: `DiTPipeline` (class labels; it samples only at its transformer's
`sample_size`), and for PixArt the teacher's own pipeline class, `PixArtAlphaPipeline` (120 T5 tokens) or
`PixArtSigmaPipeline` (300; also a teacher folder without model_index.json).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.base.errors import ConfigError, ExportRefused
from distill.families.target import Target
from distill.families.text import TextConditioned, patch_token_features

#: LoRA targets in the transformer blocks of DiT and PixArt (diffusers' BasicTransformerBlock): self-attention
#: `attn1`, PixArt's cross-attention `attn2`, and the feed-forward `ff`.
BLOCK_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def class_indices(lines: list[str], num_classes: int | None = None) -> Tensor:
    """DiT's "prompts": one class index per line, each in 0..num_classes - 1 (the next row is the null class)."""
    bad = [p for p in lines if not p.strip().isdigit()]
    if bad:
        raise ConfigError(f"data.prompts: a class-conditional (DiT) teacher takes one class index per line, got "
                          f"{bad[:3]}")
    labels = torch.tensor([int(p) for p in lines], dtype=torch.int64)
    if num_classes is not None and int(labels.max()) >= num_classes:
        raise ConfigError(f"data.prompts: class {int(labels.max())} does not exist; the teacher has classes "
                          f"0..{num_classes - 1} (num_embeds_ada_norm)")
    return labels


class DiTTarget(Target):
    def latent_shape(self, folder: Path, network_config: dict, resolution: int, num_frames: int = 1) -> tuple[int, ...]:
        """DiTPipeline has no height or width argument: it samples only at its transformer's sample_size."""
        shape = super().latent_shape(folder, network_config, resolution, num_frames)
        if shape[-1] != network_config.get("sample_size"):
            spatial, _ = self.vae_factors(folder)
            native = network_config.get("sample_size", 0) * spatial
            raise ExportRefused(f"data.resolution: {self.pipeline} samples only at its transformer's sample_size "
                                f"({network_config.get('sample_size')} latents, {native} px; it has no height or "
                                f"width argument), got {resolution}; use data.resolution={native}")
        return shape

    def call_arguments(self, num_steps: int, resolution: int, guidance: float, num_frames: int) -> str:
        """Two class labels; no prompt, no size (its transformer's sample_size)."""
        return f"class_labels=[0, 1], num_inference_steps={num_steps}, guidance_scale={guidance}"

    def encode(self, pipe, prompts: list[str], resolution: int, device: torch.device) -> Condition:
        """The class labels themselves (`pipe` is not used: DiT has no text encoder)."""
        return {"class_labels": class_indices(prompts)}

    def check_prompts(self, prompts: list[str], network_config: dict) -> None:
        class_indices(prompts, network_config.get("num_embeds_ada_norm"))


class PixArtTarget(Target):
    def call_arguments(self, num_steps: int, resolution: int, guidance: float, num_frames: int) -> str:
        # binning would sample at the nearest bin, not the trained size
        return super().call_arguments(num_steps, resolution, guidance, num_frames) + ", use_resolution_binning=False"

    def encode(self, pipe, prompts: list[str], resolution: int, device: torch.device) -> Condition:
        """As the call encodes: captions cleaned (`clean_caption=True`)."""
        with torch.no_grad():
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                    clean_caption=True)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


class PixArtAlphaTarget(PixArtTarget):
    def micro_conditions(self, network_config: dict, resolution: int, n: int) -> Condition:
        """The 1024 model (sample_size 128) embeds the image size and aspect ratio; its pipeline passes them."""
        if network_config.get("sample_size") != 128:
            return {}
        return {"resolution": torch.tensor([[float(resolution)] * 2]).expand(n, 2).clone(),
                "aspect_ratio": torch.ones(n, 1)}


DIT = DiTTarget("DiTTransformer2DModel", "DiTPipeline", "transformer", "vp", class_conditional=True)
PIXART_ALPHA = PixArtAlphaTarget("PixArtTransformer2DModel", "PixArtAlphaPipeline", "transformer", "vp",
                                 passes_generator=True)
PIXART_SIGMA = PixArtTarget("PixArtTransformer2DModel", "PixArtSigmaPipeline", "transformer", "vp",
                            passes_generator=True)


def _drop_learned_variance(model: nn.Module, out: Tensor, channels: int) -> Tensor:
    return out[:, :channels] if model.config.out_channels == 2 * channels else out


class DiTFamily:
    """Class labels 0..num_embeds_ada_norm - 1; the null class (for guidance) is index num_embeds_ada_norm, as
    DiTPipeline's `class_null`."""

    subfolder = "transformer"
    latent = True
    lora_targets = BLOCK_LORA_TARGETS
    #: FSDP2 sharding blocks (distill.training.parallel); DiTTransformer2DModel declares no `_no_split_modules`
    shard_blocks = ("BasicTransformerBlock",)

    def export_target(self, network_config: dict, scheduler_config: dict, prediction: str | None,
                      pipeline: str | None) -> Target:
        return DIT

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
    lora_targets = BLOCK_LORA_TARGETS

    def export_target(self, network_config: dict, scheduler_config: dict, prediction: str | None,
                      pipeline: str | None) -> Target:
        """The pipeline class the teacher's folder was saved as: alpha and sigma differ in their text encoding."""
        return PIXART_ALPHA if pipeline == "PixArtAlphaPipeline" else PIXART_SIGMA

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
