"""Train the bundled class-conditional digits teacher (EDM, Karras et al. 2022) on scikit-learn's digits.

The teacher is a diffusers `UNet2DModel` (16x16, one channel, 10 classes + 1 null class for classifier-free
guidance) preconditioned as EDM with the consistency-model conventions of diffusers'
`CMStochasticIterativeScheduler`: input c_in x, time c_noise = 250 log(sigma), x0 = c_skip x + c_out F.
A one-step student exported under that scheduler therefore starts from these weights unchanged.

    python scripts/train_digits_teacher.py --out distill/assets/digits_teacher --steps 4000

Writes `unet/` (safetensors), `scheduler/` (the noise-level parameters) and a README model card.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import CMStochasticIterativeScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from distill.data.digits import NUM_DIGIT_CLASSES, digits_split, load_digits
from distill.models.denoiser import Denoiser
from distill.parametrization import EDMProcess, add_noise

SIGMA_DATA = 0.5


def build_unet(resolution: int = 16) -> UNet2DModel:
    return UNet2DModel(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=32,
        norm_num_groups=8,
        num_class_embeds=NUM_DIGIT_CLASSES + 1,  # the last row is the null class for CFG
    )


def edm_loss(teacher: Denoiser, x0: torch.Tensor, labels: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """EDM denoising loss (Karras et al. 2022, eq. 2 with lambda(sigma) of Table 1), per sample."""
    sigma = (torch.randn(x0.shape[0]) * p_std + p_mean).exp()
    x_t = add_noise(teacher.process, x0, torch.randn_like(x0), sigma)
    x0_hat = teacher(x_t, sigma, {"class_labels": labels})
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    return weight * (x0_hat - x0).pow(2).flatten(1).mean(1)


def write_model_card(out: Path, args: argparse.Namespace, info: dict) -> None:
    """The teacher folder's README: what it is, how to load and sample it, and the command that trained it."""
    half = "the train half (half B, 898 images) of " if args.data == "train" else "all of "
    command = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    (out / "README.md").write_text(
        "# distill digits teacher\n\n"
        f"A class-conditional EDM denoiser (diffusers `UNet2DModel`, 16x16, 1 channel) trained on {half}\n"
        "scikit-learn's digits by `scripts/train_digits_teacher.py`. Classes 0-9; class 10 is the null class for\n"
        "classifier-free guidance (uncond + w (cond - uncond)).\n\n"
        "Preconditioning: EDM with sigma_data = 0.5, network input c_in x = x / sqrt(sigma^2 + 0.25) and time\n"
        "c_noise = 250 log(sigma) (the conventions of `CMStochasticIterativeScheduler`, whose config in `scheduler/`\n"
        "stores sigma_min, sigma_max and sigma_data); output F with x0 = c_skip x + c_out F (EDM scalings).\n"
        "It is a multi-step model: load it with `distill.models.denoiser.load_denoiser(path, prediction='edm')` and sample\n"
        "with `distill.models.sampling.sample` (its default: 20 DPM-Solver++(2M) steps on the Karras grid, w = 1).\n"
        "See docs/teacher.md for its FD-digits curve and the ablation behind the training settings.\n\n"
        f"Trained with `python scripts/train_digits_teacher.py {command}`\n"
        f"({info['train_seconds']:.0f} s wall on the training machine).\n\n"
        f"Training: {json.dumps(info)}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="distill/assets/digits_teacher")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument("--p-mean", type=float, default=-1.2)
    ap.add_argument("--p-std", type=float, default=1.2)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--data", choices=["train", "all"], default="train",
                    help="train = half B, the protocol's train half; all = every digit, half A (the FD reference) "
                         "included -- only to reproduce the old teacher in the ablation")
    ap.add_argument("--augment", choices=["none", "roll"], default="none",
                    help="roll = the old teacher's one-pixel random circular shifts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    images, labels = digits_split("train", args.resolution) if args.data == "train" else load_digits(args.resolution)
    process = EDMProcess(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA)
    teacher = Denoiser(build_unet(args.resolution), process, prediction="edm")
    teacher.model.train()
    ema = EMAModel(teacher.model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    opt = torch.optim.Adam(teacher.model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / args.steps * 3.14159)).item()))
    )

    null_class = NUM_DIGIT_CLASSES
    start, running = time.time(), None
    for step in range(args.steps):
        idx = torch.randint(0, images.shape[0], (args.batch_size,))
        x0, y = images[idx], labels[idx].clone()
        if args.augment == "roll":
            shift = torch.randint(-1, 2, (2,))
            x0 = torch.roll(x0, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        y[torch.rand(y.shape) < args.label_dropout] = null_class
        loss = edm_loss(teacher, x0, y, args.p_mean, args.p_std).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(teacher.model.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  {time.time() - start:.0f}s", flush=True)

    ema.copy_to(teacher.model.parameters())
    out = Path(args.out)
    teacher.model.save_pretrained(out / "unet", safe_serialization=True)
    CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA).save_pretrained(out / "scheduler")
    info = {**vars(args), "final_loss_ema": running, "train_seconds": round(time.time() - start, 1)}
    (out / "training_args.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(out, args, info)
    print(f"saved teacher to {out}")


if __name__ == "__main__":
    main()
