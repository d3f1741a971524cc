"""Tiny random-config versions of whole pipelines (network, VAE, text encoders, tokenizers), built locally with no
download, saved as the diffusers folders a user would have: SD1.5, SDXL, SD3, Flux (dev: embedded guidance, dynamic
shift), Wan 2.1 (text-to-video), PixArt-alpha (512 and the 1024 model's micro-conditions) and DiT (class labels,
saved under the legacy class name `Transformer2DModel` as the hub's DiT-XL-2 is). Tokenizers are CLIP BPE and T5
unigram tokenizers over a generated vocabulary of single letters."""

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


def umt5_text(d_model: int = 32, seed: int = 3):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()


def build_flux(root: Path) -> Path:
    """FluxPipeline like FLUX.1-dev: a guidance-embedding FluxTransformer2DModel on 2x2-packed 16-channel latents,
    CLIP (pooled) and T5 encoders, and the dynamic (resolution-dependent) shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    vae = tiny_vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                   use_post_quant_conv=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_text(False),
                        tokenizer=clip_tokenizer(root.parent / f"_{root.name}_tok"), text_encoder_2=t5_text(),
                        tokenizer_2=t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def build_wan(root: Path) -> Path:
    """WanPipeline like Wan2.1-T2V: WanTransformer3DModel on video latents (VAE factors 2 in space and time), a
    UMT5 encoder, and the UniPC flow scheduler with a static flow_shift."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=16,
                                        num_layers=2, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.8, 1.0, 2.0],
                           scale_factor_spatial=2, scale_factor_temporal=2).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=t5_tokenizer(), text_encoder=umt5_text(), vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def build_pixart(root: Path, sample_size: int = 64) -> Path:
    """PixArtAlphaPipeline like PixArt-XL-2-512x512 (sample_size 64; 128 is the 1024 model, whose pipeline adds the
    size and aspect-ratio micro-conditions, each a third of the width): learned-variance PixArtTransformer2DModel,
    T5 encoder, DPM-Solver scheduler with the linear beta schedule."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, out_channels=8,
                                           num_layers=2, attention_head_dim=12, num_attention_heads=2,
                                           cross_attention_dim=24, caption_channels=32, norm_type="ada_norm_single")
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    pipe = PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_text(), vae=tiny_vae(),
                               transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(root, safe_serialization=True)
    return root


def build_pixart_1024(root: Path) -> Path:
    return build_pixart(root, sample_size=128)


def build_pixart_sigma(root: Path) -> Path:
    """PixArtSigmaPipeline (300 T5 tokens, no micro-conditions), from the alpha folder's components."""
    from diffusers import PixArtAlphaPipeline, PixArtSigmaPipeline

    alpha = PixArtAlphaPipeline.from_pretrained(build_pixart(root.parent / f"_{root.name}_alpha"))
    PixArtSigmaPipeline(**alpha.components).save_pretrained(root, safe_serialization=True)
    return root


def build_dit(root: Path) -> Path:
    """DiTPipeline like facebook/DiT-XL-2-256: a class-conditional, learned-variance DiT (8x8 latents: 16 px with
    the VAE factor 2) saved, as the hub's is, under the legacy class name `Transformer2DModel`."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler).save_pretrained(
        root, safe_serialization=True)
    config = json.loads((root / "transformer" / "config.json").read_text())
    (root / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    index = json.loads((root / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "Transformer2DModel"]
    index["id2label"] = dict(enumerate(DIT_CLASS_NAMES))  # as the hub's: what `pipe.get_label_ids` reads
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


#: the tiny DiT's class names (its model_index.json's id2label, as DiT-XL-2's holds the ImageNet names).
DIT_CLASS_NAMES = ["zero", "one", "two", "three, trio", "four", "five", "six", "seven", "eight", "nine"]


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "sd3": build_sd3, "flux": build_flux, "wan": build_wan,
            "pixart": build_pixart, "pixart_1024": build_pixart_1024, "pixart_sigma": build_pixart_sigma,
            "dit": build_dit}

#: DiT's "prompts" are class indices (one per line); the tiny DiT has classes 0..9.
CLASS_PROMPTS = ["3", "1", "4", "1"]


def write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    path.write_text("\n".join(prompts) + "\n")
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
