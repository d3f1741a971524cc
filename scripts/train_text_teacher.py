"""Train a bundled text-to-image teacher: a whole, tiny stock pipeline on the captioned shapes.

    python scripts/train_text_teacher.py --out distill/assets/text_teacher --threads 1
    python scripts/train_text_teacher.py --family sd3 --vae distill/assets/text_teacher \\
        --out distill/assets/flow_text_teacher --threads 1

`--family sd` (the default) builds a `StableDiffusionPipeline`, in the order it trains its parts:

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
   Sampler in the folder: `DPMSolverMultistepScheduler`.

`--family sd3` builds a `StableDiffusion3Pipeline`, a rectified-flow teacher:

1. the same tokenizer (as `tokenizer` and `tokenizer_2`) and two frozen random one-layer
   `CLIPTextModelWithProjection` (width 32, seeds `seed` and `seed + 1`): the pipeline concatenates their
   penultimate token states (64 wide) and their pooled projections (64); no T5 (`text_encoder_3` is saved as
   None, and the pipeline puts `max_sequence_length` = 256 rows of zeros in its place);
2. the VAE: `--vae FOLDER` reuses the trained `AutoencoderTiny` of a pipeline folder (the VP teacher's: same
   images, same latents; without `--vae` one is trained as above), with SD3's latent normalisation
   `(z - shift_factor) * scaling_factor` fitted on the train split (StableDiffusion3Pipeline decodes
   `vae.decode(latents / scaling_factor + shift_factor)`);
3. an `SD3Transformer2DModel` (patch 2 on the 12x12x4 latents: 36 image tokens; width 64, 4 joint blocks)
   trained with the rectified-flow loss ||v_hat(x_s, s) - (eps - x0)||^2, x_s = (1 - s) x0 + s eps, at
   logit-normal times s = sigmoid(n), n ~ N(0, 1) (Esser et al. 2024, SD3, sec. 3.1 eq. 19, the best of their
   time samplers in Table 1); 10% empty captions. Sampler in the folder: `FlowMatchEulerDiscreteScheduler`
   with `--shift` (the training does not depend on it: the times above are drawn in unshifted s).
   The 256 zero rows are identical, and stay identical through every block (per-token layers; identical queries
   attend identically), so training feeds them as ONE token whose attention logit gets + log 256
   (`RepeatedLastToken`): the same function of the weights, 5x cheaper; checked against the stock call at the end.

Both families keep an EMA of the network. The folder is a stock diffusers pipeline that plain diffusers samples
(`DiffusionPipeline.from_pretrained(folder)("a red circle at the top left", num_inference_steps=20,
guidance_scale=...)`; sd3: `from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`, as diffusers loads
any SD3 without T5); it also holds `prompts.txt` (the 48 captions: the `data.prompts` of the text recipes),
`training_args.json` and a model card. Only the train split of distill/demo/shapes.py is read.
"""

from __future__ import annotations

import argparse
import json
import math
import string
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderTiny,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.training_utils import EMAModel
from torch.overrides import TorchFunctionMode

from distill.demo.shapes import CAPTIONS, NUM_CAPTIONS, RESOLUTION, shapes_split
from distill.families.sd3 import SD3
from distill.families.unet2d_condition import SD15
from distill.models.denoiser import Denoiser, process_from_scheduler_config
from distill.parametrization import add_noise

MAX_TOKENS = 10  # <start> + up to 8 words + <end>
TEXT_WIDTH = 32
LATENT_CHANNELS = 4
VAE_FACTOR = 2
#: SD3 transformer: heads x head width = 64, joint blocks
SD3_HEADS, SD3_HEAD_DIM, SD3_LAYERS = 2, 32, 4

#: per family: the pipeline it builds, where it is shipped, and its network's training defaults
FAMILIES = {
    "sd": {"pipeline": "StableDiffusionPipeline", "out": "distill/assets/text_teacher", "steps": 2000, "lr": 1e-3},
    "sd3": {"pipeline": "StableDiffusion3Pipeline", "out": "distill/assets/flow_text_teacher", "steps": 6000,
            "lr": 1e-3},
}


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


def build_text_encoder(vocab_size: int, seed: int, projection: bool = False):
    """A frozen random one-layer CLIP text encoder (`CLIPTextModelWithProjection` with `projection`: SD3's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                            projection_dim=TEXT_WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return model.eval().requires_grad_(False)


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


def build_transformer() -> SD3Transformer2DModel:
    """SD3's MMDiT at toy size; the text side is the two CLIP encoders' 2 x 32 = 64 wide tokens and pooled text."""
    width = SD3_HEADS * SD3_HEAD_DIM
    side = RESOLUTION // VAE_FACTOR
    return SD3Transformer2DModel(
        sample_size=side, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=SD3_LAYERS, attention_head_dim=SD3_HEAD_DIM, num_attention_heads=SD3_HEADS,
        joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=width, pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=side // 2)


def build_scheduler(family: str, shift: float = 1.0):
    """The teacher's sampler in its own pipeline. sd: DPM-Solver++(2M) on a cosine VP schedule with v-prediction;
    sd3: the flow-matching Euler sampler at `shift`."""
    if family == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                       prediction_type="v_prediction", steps_offset=1)


def build_pipeline(family: str, tokenizer, text_encoders: list, vae, network, scheduler):
    if family == "sd3":
        first, second = text_encoders
        return StableDiffusion3Pipeline(transformer=network, scheduler=scheduler, vae=vae, text_encoder=first,
                                        tokenizer=tokenizer, text_encoder_2=second, tokenizer_2=tokenizer,
                                        text_encoder_3=None, tokenizer_3=None)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizer, unet=network,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def check_distinct(cond: dict[str, torch.Tensor], null: dict[str, torch.Tensor]) -> None:
    """Every caption's condition differs from every other caption's and from the empty prompt's, in every key."""
    for key, captions in cond.items():
        flat = captions.flatten(1)
        gaps = torch.cdist(flat, torch.cat([flat, null[key].flatten(1)]))
        gaps.fill_diagonal_(float("inf"))
        if float(gaps.min()) < 1e-3:
            raise RuntimeError(f"two captions' {key} are (almost) equal: min distance {float(gaps.min()):.2e}")


class RepeatedLastToken(TorchFunctionMode):
    """While active, each `scaled_dot_product_attention` call treats its last key (and value) as `count` copies:
    + log(count) on that key's attention logit, so softmax weighs it as `count` identical keys would be weighed.

    For SD3's joint attention (keys: image tokens, then text tokens) with a prompt whose last `count` rows are
    identical (T5 absent: zeros), feeding those rows once under this mode computes what the stock call computes
    on all of them: identical rows meet the same per-token layers and, as identical queries, attend identically,
    so they stay identical through every block, and only their share of each softmax depends on their number."""

    def __init__(self, count: int):
        super().__init__()
        self.log_count = math.log(count)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = args[:3]
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise ValueError("RepeatedLastToken: attention with its own mask is not supported")
        bias = torch.zeros(key.shape[-2], dtype=query.dtype, device=query.device)
        bias[-1] = self.log_count
        return func(query, key, value, *args[3:], **{**kwargs, "attn_mask": bias.view(1, 1, 1, -1)})


def collapse_repeated_rows(cond: dict[str, torch.Tensor], first: int) -> tuple[dict[str, torch.Tensor], int]:
    """(the condition with the prompt's rows from `first` on kept once, how many there were); refuses rows that
    are not all identical (the trick of RepeatedLastToken would not be exact)."""
    states = cond["encoder_hidden_states"]
    tail = states[:, first:]
    if not torch.equal(tail, tail[:, :1].expand_as(tail)):
        raise RuntimeError(f"encoder_hidden_states rows {first}.. are not identical: cannot train them as one token")
    return {**cond, "encoder_hidden_states": states[:, :first + 1]}, tail.shape[1]


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


def v_loss(teacher: Denoiser, x0: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The v-prediction denoising loss (Salimans & Ho 2022, sec. 4): ||v_hat - (alpha eps - sigma x0)||^2 at a
    uniform timestep, per sample."""
    t = torch.randint(0, teacher.process.num_train_timesteps, (x0.shape[0],))
    x_t = add_noise(teacher.process, x0, torch.randn_like(x0), t)
    raw = teacher.raw(x_t, t, cond)
    return (raw - teacher.to_native(x0, x_t, t)).pow(2).flatten(1).mean(1)


def flow_loss(teacher: Denoiser, x0: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rectified-flow loss (Esser et al. 2024, sec. 2-3.1): ||v_hat(x_s, s) - (eps - x0)||^2 with
    x_s = (1 - s) x0 + s eps and logit-normal s = sigmoid(n), n ~ N(0, 1) (their eq. 19, m = 0, s = 1), per sample."""
    s = torch.sigmoid(torch.randn(x0.shape[0]))
    eps = torch.randn_like(x0)
    raw = teacher.raw(add_noise(teacher.process, x0, eps, s), s, cond)
    return (raw - (eps - x0)).pow(2).flatten(1).mean(1)


MODEL_CARDS = {
    "sd": ("# distill text teacher\n\n"
           "A tiny text-to-image model: a stock `StableDiffusionPipeline` (UNet2DConditionModel on 12x12x4 latents,\n"
           "AutoencoderTiny with VAE factor 2, a one-layer CLIPTextModel and a word-level CLIPTokenizer) trained by\n"
           "`scripts/train_text_teacher.py` on the train split of the captioned shapes of `distill/demo/shapes.py`\n"
           "(24x24 RGB; captions like \"a red circle at the top left\": 3 shapes x 4 colours x 4 positions).\n"
           "The text encoder is random and frozen; the VAE (the TAESD architecture) and the UNet are trained. Cosine "
           "VP schedule, v-prediction,\n10% empty captions for classifier-free guidance (uncond + w (cond - uncond))."
           "\n\n```python\nfrom diffusers import StableDiffusionPipeline\n\n"
           "pipe = StableDiffusionPipeline.from_pretrained(\"distill/assets/text_teacher\")\n"
           "images = pipe([\"a red circle at the top left\"], num_inference_steps=20, guidance_scale=3.0).images  "
           "# 24x24\n```\n\n"
           "`prompts.txt` holds the 48 captions (the prompts of `recipes/text/dmd2.yaml`). Figures: "
           "docs/text_to_image.md.\n\n"),
    "sd3": ("# distill flow-matching text teacher\n\n"
            "A tiny rectified-flow text-to-image model: a stock `StableDiffusion3Pipeline` (SD3Transformer2DModel,\n"
            "patch 2 on 12x12x4 latents, width 64, 4 joint blocks; AutoencoderTiny with VAE factor 2, the VAE of\n"
            "`distill/assets/text_teacher`; two one-layer CLIPTextModelWithProjection and a word-level CLIPTokenizer;\n"
            "no T5: `text_encoder_3` is None) trained by `scripts/train_text_teacher.py --family sd3` on the train\n"
            "split of the captioned shapes of `distill/demo/shapes.py` (24x24 RGB; captions like \"a red circle at the\n"
            "top left\"). The text encoders are random and frozen; the transformer is trained with the rectified-flow\n"
            "loss at logit-normal times (SD3), 10% empty captions for classifier-free guidance.\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\n\n"
            "pipe = DiffusionPipeline.from_pretrained(\"distill/assets/flow_text_teacher\", text_encoder_3=None,\n"
            "                                         tokenizer_3=None)  # no T5: diffusers needs both named\n"
            "images = pipe([\"a red circle at the top left\"], num_inference_steps=20, guidance_scale=1.5)"
            ".images  # 24x24\n```\n\n"
            "`prompts.txt` holds the 48 captions (the prompts of `recipes/text_flow/dmd2.yaml`). Figures: "
            "docs/text_to_image.md.\n\n"),
}


def write_model_card(out: Path, args: argparse.Namespace, info: dict) -> None:
    command = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    (out / "README.md").write_text(
        MODEL_CARDS[args.family]
        + f"Trained with `python scripts/train_text_teacher.py {command}`\n"
        f"({info['cpu_seconds']:.0f} s of CPU time on one thread; {info['train_seconds']:.0f} s wall on the shared "
        "training machine).\n\n"
        f"Training: {json.dumps(info)}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="sd",
                    help="sd: StableDiffusionPipeline, VP; sd3: StableDiffusion3Pipeline, rectified flow")
    ap.add_argument("--out", default=None, help="default: distill/assets/text_teacher (sd), flow_text_teacher (sd3)")
    ap.add_argument("--vae", default=None, help="a pipeline folder whose trained vae/ to reuse (no VAE training)")
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--vae-batch-size", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--latent-noise", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=None, help="network updates (default: 2000 sd, 6000 sd3)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--shift", type=float, default=None, help="sd3: the sampler's shift (default 1; only sampling)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    family = FAMILIES[args.family]
    args.out = args.out or family["out"]
    args.steps = args.steps or family["steps"]
    args.lr = args.lr or family["lr"]
    if args.family == "sd3":
        args.shift = 1.0 if args.shift is None else args.shift
    elif args.shift is not None:
        ap.error("--shift: only the sd3 (flow) family has a shift")
    if args.threads:
        torch.set_num_threads(args.threads)
    start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(args.seed)
    images, _, captions = shapes_split("train")
    caption_index = torch.tensor([CAPTIONS.index(c) for c in captions])

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    if args.family == "sd3":
        text_encoders = [build_text_encoder(len(tokenizer), args.seed + i, projection=True) for i in range(2)]
    else:
        text_encoders = [build_text_encoder(len(tokenizer), args.seed)]

    if args.vae:
        vae = AutoencoderTiny.from_pretrained(Path(args.vae) / "vae")
        vae_loss = None
    else:
        vae = build_vae()
        vae_loss = train_vae(vae, images, args)
    latents = encode_latents(vae, images)
    # SD's latents are z * scaling_factor; SD3's (z - shift_factor) * scaling_factor (zero mean, unit variance)
    shift_factor = float(latents.mean()) if args.family == "sd3" else 0.0
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling, shift_factor=shift_factor)
    latents = (latents - shift_factor) * scaling
    vae_seconds = time.time() - start

    network = build_transformer() if args.family == "sd3" else build_unet()
    scheduler = build_scheduler(args.family, args.shift)
    pipe = build_pipeline(args.family, tokenizer, text_encoders, vae.eval(), network, scheduler)
    # The captions as the pipeline's own call encodes them (CFG off), in the network's condition keys
    target = SD3 if args.family == "sd3" else SD15
    caption_cond = target.encode(pipe, list(CAPTIONS), RESOLUTION, torch.device("cpu"))
    empty = target.encode(pipe, [""], RESOLUTION, torch.device("cpu"))
    check_distinct(caption_cond, empty)

    process, prediction = process_from_scheduler_config({**scheduler.config, "_class_name": type(scheduler).__name__})
    teacher = Denoiser(network, process, prediction)
    loss_fn, repeated = v_loss, nullcontext()
    if args.family == "sd3":
        loss_fn = flow_loss
        caption_cond, pad_rows = collapse_repeated_rows(caption_cond, MAX_TOKENS)
        empty, _ = collapse_repeated_rows(empty, MAX_TOKENS)
        repeated = RepeatedLastToken(pad_rows)
    teacher.model.train()
    ema = EMAModel(teacher.model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    opt = torch.optim.Adam(teacher.model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lr(args.steps, warmup=200))
    running = None
    for step in range(args.steps):
        idx = torch.randint(0, len(latents), (args.batch_size,))
        drop = torch.rand(len(idx)) < args.caption_dropout
        picked = {k: v[caption_index[idx]] for k, v in caption_cond.items()}
        cond = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), empty[k].expand_as(v), v) for k, v in picked.items()}
        with repeated:
            loss = loss_fn(teacher, latents[idx], cond).mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite {args.family} teacher loss at step {step}: {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(teacher.model.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"network step {step:5d}  loss {running:.4f}  {time.time() - start:.0f}s", flush=True)
    ema.copy_to(teacher.model.parameters())
    teacher.model.eval()

    extra = {}
    if args.family == "sd3":
        extra = check_repeated_token(teacher, pipe, latents, pad_rows)
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "prompts.txt").write_text("\n".join(CAPTIONS) + "\n")
    info = {**vars(args), "vae_reconstruction_loss": vae_loss, "vae_scaling_factor": scaling,
            "vae_shift_factor": shift_factor, "final_loss_ema": running, "vae_seconds": round(vae_seconds, 1),
            "train_seconds": round(time.time() - start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "captions": NUM_CAPTIONS, **extra}
    (out / "training_args.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(out, args, info)
    print(f"saved teacher to {out} ({info['train_seconds']:.0f}s)")


@torch.no_grad()
def check_repeated_token(teacher: Denoiser, pipe, latents: torch.Tensor, pad_rows: int) -> dict[str, float]:
    """The trained transformer on the stock prompt (all rows) against the training call (RepeatedLastToken) at a
    few noisy latents: the largest difference (float rounding only; > 1e-3 stops the script), and, to show that
    the rows' number matters, the difference when they are fed once without the mode."""
    target = SD3
    full = target.encode(pipe, list(CAPTIONS[:8]) + [""], RESOLUTION, torch.device("cpu"))
    collapsed, _ = collapse_repeated_rows(full, MAX_TOKENS)
    generator = torch.Generator().manual_seed(0)
    s = torch.rand(9, generator=generator)
    x_s = add_noise(teacher.process, latents[:9], torch.randn(latents[:9].shape, generator=generator), s)
    stock = teacher.raw(x_s, s, full)
    with RepeatedLastToken(pad_rows):
        error = float((teacher.raw(x_s, s, collapsed) - stock).abs().max())
    if error > 1e-3:
        raise RuntimeError(f"the training call differs from the stock call by {error:.2e}")
    return {"repeated_token_max_error": error,
            "single_token_max_difference": float((teacher.raw(x_s, s, collapsed) - stock).abs().max())}


if __name__ == "__main__":
    main()
