"""Tiny random-config versions of whole text-to-image pipelines (network, VAE, text encoders, tokenizers), built
locally with no download, saved as the diffusers folders a user would have: SD1.5-style, SDXL-style, SD3-style and
Flux-style. Tokenizers are CLIP BPE tokenizers over a generated vocabulary of single letters."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

PROMPTS = ["a red square", "a blue circle on the left", "two green triangles", "a yellow star"]


def clip_tokenizer(root: Path):
    """A CLIP BPE tokenizer whose vocabulary is the letters (word-final and not) and the special tokens."""
    from transformers import CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + list(string.ascii_lowercase) + [
        c + "</w>" for c in string.ascii_lowercase + string.digits] + list(string.digits)
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=12)


def clip_text(projection: bool, hidden: int = 16, projection_dim: int = 16, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=67, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=12, projection_dim=projection_dim,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_tokenizer():
    """A T5 unigram tokenizer over the letters (transformers builds it from a vocabulary list, no file)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in string.ascii_lowercase + "▁"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def t5_text(d_model: int = 32, seed: int = 2):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=32, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()


def tiny_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16, **extra).eval()


def build_sd15(root: Path, prediction_type: str = "epsilon") -> Path:
    """StableDiffusionPipeline: UNet2DConditionModel, VAE factor 2, CLIP text encoder, DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=8, norm_num_groups=8)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=clip_text(False), tokenizer=clip_tokenizer(root.parent / f"_{root.name}_tok"),
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def build_sdxl(root: Path) -> Path:
    """StableDiffusionXLPipeline: a UNet with SDXL's added time and pooled-text embeddings, two CLIP encoders."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=16 + 6 * 4,
                                transformer_layers_per_block=1)
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   timestep_spacing="leading", steps_offset=1)
    tok = clip_tokenizer(root.parent / f"_{root.name}_tok")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=clip_text(False), text_encoder_2=clip_text(True, seed=1),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def build_sd3(root: Path, shift: float = 3.0) -> Path:
    """StableDiffusion3Pipeline: SD3Transformer2DModel, two CLIP encoders and a T5 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=8)
    tok = clip_tokenizer(root.parent / f"_{root.name}_tok")
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
                                    text_encoder=clip_text(True), tokenizer=tok,
                                    text_encoder_2=clip_text(True, seed=1), tokenizer_2=tok,
                                    text_encoder_3=t5_text(), tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(root, safe_serialization=True)
    return root


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "sd3": build_sd3}


def write_prompts(path: Path) -> Path:
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def build_clip(root: Path) -> Path:
    """A tiny random CLIPModel (text + vision towers, 16 px images) with its CLIPProcessor, saved as the local
    folder a CLIP-score user passes (`CLIPModel.from_pretrained(root)`, `CLIPProcessor.from_pretrained(root)`)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    text = clip_text(False).config.to_dict()
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}
    torch.manual_seed(3)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval().save_pretrained(root)
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    tokenizer = clip_tokenizer(root.parent / f"_{root.name}_tok")
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(root)
    return root


class StandInFeatures(torch.nn.Module):
    """A seeded random convolution and mean pool: a stand-in for Inception in FID tests (uint8 images in, 6 features
    per image out), so no Inception weights are needed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv((images.float() - 128) / 128)).mean((2, 3))


def stand_in_features() -> torch.nn.Module:
    return StandInFeatures().eval()
