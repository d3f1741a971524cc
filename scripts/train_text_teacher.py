"""Train the bundled text-to-image teacher: a whole, tiny `StableDiffusionPipeline` on the captioned shapes.

    python scripts/train_text_teacher.py --out distill/assets/text_teacher --threads 1

What it builds (everything local, nothing downloaded), in the order it trains them:

1. a word-level CLIP BPE tokenizer over the captions' 14 words (each word one token; the merges are written so)
   and a frozen, randomly initialised one-layer `CLIPTextModel` (width 32): the captions' embeddings are distinct
   (checked), and the UNet learns to read them;
2. a tiny `AutoencoderTiny` (the TAESD architecture: plain convolutions, no normalisation; 24x24x3 <-> 12x12x4,
   VAE factor 2), trained to reconstruct the train split; its `scaling_factor` makes the latents unit-variance,
   as SD's does. (A tiny `AutoencoderKL` learned far slower: GroupNorm-heavy, blurry after 300 steps where this
   one is sharp; StableDiffusionPipeline decodes with either, `vae.decode(latents / scaling_factor)`);
3. a `UNet2DConditionModel` on those latents: cross-attention on the text tokens, plus the pooled text added to
   the time embedding (`addition_embed_type="text"`, the DeepFloyd-IF option; SD1.5 leaves it off). A cosine
   VP schedule with v-prediction: a one-step student from pure noise at t = 999 reads x0 = alpha x - sigma v
   without dividing by alpha(999) (epsilon-prediction would amplify errors by 1 / alpha there). Captions are
   dropped 10% of the time (the empty prompt) for classifier-free guidance.

The folder is a stock diffusers pipeline with a `DPMSolverMultistepScheduler`, so plain diffusers samples it:
`StableDiffusionPipeline.from_pretrained(folder)("a red circle at the top left", num_inference_steps=20,
guidance_scale=3.0)`. It also holds `prompts.txt` (the 48 captions: the `data.prompts` of recipes/dmd2_text.yaml),
`training_args.json` and a model card. Only the train split of distill/shapes.py is read.
"""

from __future__ import annotations

import argparse
import json
import string
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel

from distill.denoiser import Denoiser, process_from_scheduler_config
from distill.parametrization import add_noise
from distill.shapes import CAPTIONS, NUM_CAPTIONS, RESOLUTION, shapes_split

MAX_TOKENS = 10  # <start> + up to 8 words + <end>
TEXT_WIDTH = 32
LATENT_CHANNELS = 4
VAE_FACTOR = 2


def build_tokenizer(folder: Path):
    """A CLIP BPE tokenizer whose merges turn each caption word into one token (longest words' merges first, so
    no shorter word's merge splits a longer word); other words fall back to letters."""
    from transformers import CLIPTokenizer

    words = sorted({w for c in CAPTIONS for w in c.split()}, key=lambda w: (-len(w), w))
    merges, pieces = [], []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = parts[0]
        for part in parts[1:]:
            merges.append(f"{prefix} {part}")
            prefix += part
            pieces.append(prefix)
    letters = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    vocab = list(dict.fromkeys(["<|startoftext|>", "<|endoftext|>"] + letters + pieces))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    for caption in CAPTIONS:
        tokens = tokenizer(caption).input_ids
        if len(tokens) != len(caption.split()) + 2:
            raise RuntimeError(f"the tokenizer splits a word of {caption!r}: {tokenizer.convert_ids_to_tokens(tokens)}")
    return tokenizer


def build_text_encoder(vocab_size: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                            projection_dim=TEXT_WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """What StableDiffusionPipeline.encode_prompt computes: the last hidden states of max-length-padded tokens."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def build_vae() -> AutoencoderTiny:
    return AutoencoderTiny(encoder_block_out_channels=(32, 32), decoder_block_out_channels=(32, 32),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=LATENT_CHANNELS)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION // VAE_FACTOR, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=8,
        addition_embed_type="text", addition_embed_type_num_heads=4)


def build_scheduler() -> DPMSolverMultistepScheduler:
    """The teacher's sampler in its own pipeline: DPM-Solver++(2M) on a cosine VP schedule with v-prediction."""
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                       prediction_type="v_prediction", steps_offset=1)


def cosine_lr(total: int, warmup: int = 100):
    return lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + torch.cos(torch.tensor(s / total * torch.pi)).item()))


def train_vae(vae: AutoencoderTiny, images: torch.Tensor, args) -> float:
    """Reconstruction (L1 + MSE) from latents with a little Gaussian noise added (`--latent-noise`, in units of
    the latents' scale), so the decoder tolerates latents a little off the encoder's, as a diffusion model's
    are; returns the final running loss."""
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lr(args.vae_steps, warmup=50))
    vae.train()
    running, start = None, time.time()
    for step in range(args.vae_steps):
        x = images[torch.randint(0, len(images), (args.vae_batch_size,))]
        z = vae.encode(x).latents
        recon = vae.decode(z + args.latent_noise * z.detach().std() * torch.randn_like(z)).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.vae_steps - 1:
            print(f"vae step {step:5d}  reconstruction {running:.4f}  {time.time() - start:.0f}s", flush=True)
    return running


@torch.no_grad()
def encode_latents(vae: AutoencoderTiny, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    vae.eval()
    return torch.cat([vae.encode(images[i:i + batch]).latents for i in range(0, len(images), batch)])


def v_loss(teacher: Denoiser, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The v-prediction denoising loss (Salimans & Ho 2022, sec. 4): ||v_hat - (alpha eps - sigma x0)||^2 at a
    uniform timestep, per sample."""
    t = torch.randint(0, teacher.process.num_train_timesteps, (x0.shape[0],))
    x_t = add_noise(teacher.process, x0, torch.randn_like(x0), t)
    raw = teacher.raw(x_t, t, {"encoder_hidden_states": cond})
    return (raw - teacher.to_native(x0, x_t, t)).pow(2).flatten(1).mean(1)


def write_model_card(out: Path, args: argparse.Namespace, info: dict) -> None:
    command = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    (out / "README.md").write_text(
        "# distill text teacher\n\n"
        "A tiny text-to-image model: a stock `StableDiffusionPipeline` (UNet2DConditionModel on 12x12x4 latents,\n"
        "AutoencoderTiny with VAE factor 2, a one-layer CLIPTextModel and a word-level CLIPTokenizer) trained by\n"
        "`scripts/train_text_teacher.py` on the train split of the captioned shapes of `distill/shapes.py`\n"
        "(24x24 RGB; captions like \"a red circle at the top left\": 3 shapes x 4 colours x 4 positions).\n"
        "The text encoder is random and frozen; the VAE (the TAESD architecture) and the UNet are trained. Cosine VP schedule, v-prediction,\n"
        "10% empty captions for classifier-free guidance (uncond + w (cond - uncond)).\n\n"
        "```python\nfrom diffusers import StableDiffusionPipeline\n\n"
        "pipe = StableDiffusionPipeline.from_pretrained(\"distill/assets/text_teacher\")\n"
        "images = pipe([\"a red circle at the top left\"], num_inference_steps=20, guidance_scale=3.0).images  # 24x24\n"
        "```\n\n"
        "`prompts.txt` holds the 48 captions (the prompts of `recipes/dmd2_text.yaml`). Figures: docs/text_to_image.md.\n\n"
        f"Trained with `python scripts/train_text_teacher.py {command}`\n"
        f"({info['cpu_seconds']:.0f} s of CPU time on one thread; {info['train_seconds']:.0f} s wall on the shared "
        "training machine).\n\n"
        f"Training: {json.dumps(info)}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="distill/assets/text_teacher")
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--vae-batch-size", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--latent-noise", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=2000, help="UNet updates")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(args.seed)
    images, _, captions = shapes_split("train")
    caption_index = torch.tensor([CAPTIONS.index(c) for c in captions])

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    text_encoder = build_text_encoder(len(tokenizer), args.seed)
    caption_embeds = encode_prompts(tokenizer, text_encoder, list(CAPTIONS))
    empty = encode_prompts(tokenizer, text_encoder, [""])
    gaps = torch.cdist(caption_embeds.flatten(1), torch.cat([caption_embeds, empty]).flatten(1))
    gaps.fill_diagonal_(float("inf"))
    if float(gaps.min()) < 1e-3:
        raise RuntimeError(f"two captions' embeddings are (almost) equal: min distance {float(gaps.min()):.2e}")

    vae = build_vae()
    vae_loss = train_vae(vae, images, args)
    latents = encode_latents(vae, images)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    vae_seconds = time.time() - start

    scheduler = build_scheduler()
    process, prediction = process_from_scheduler_config(dict(scheduler.config))
    teacher = Denoiser(build_unet(), process, prediction)
    teacher.model.train()
    ema = EMAModel(teacher.model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    opt = torch.optim.Adam(teacher.model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lr(args.steps, warmup=200))
    running = None
    for step in range(args.steps):
        idx = torch.randint(0, len(latents), (args.batch_size,))
        cond = caption_embeds[caption_index[idx]]
        drop = torch.rand(len(idx)) < args.caption_dropout
        cond = torch.where(drop[:, None, None], empty.expand_as(cond), cond)
        loss = v_loss(teacher, latents[idx], cond).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(teacher.model.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"unet step {step:5d}  loss {running:.4f}  {time.time() - start:.0f}s", flush=True)
    ema.copy_to(teacher.model.parameters())

    out = Path(args.out)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=teacher.model.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    info = {**vars(args), "vae_reconstruction_loss": vae_loss, "vae_scaling_factor": scaling,
            "final_loss_ema": running, "vae_seconds": round(vae_seconds, 1),
            "train_seconds": round(time.time() - start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "captions": NUM_CAPTIONS}
    (out / "training_args.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(out, args, info)
    print(f"saved teacher to {out} ({info['train_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
