"""Train the digits super-resolution teacher: 16x16 digits from their 4x4 average-pooled versions (EDM).

The teacher is a diffusers `UNet2DModel` with in_channels=2 (the c_in-scaled noisy 16x16 image and the 4x4 image
upsampled to 16x16 by nearest repetition), out_channels=1, EDM-preconditioned with the consistency-model time
convention (c_noise = 250 log sigma; `distill.recipes.tad_sr.sr_denoiser`). It trains on the train half B of the
digits protocol only (`digits_split("train")`); half A stays the held-out reference of PSNR and FD-digits.

    OMP_NUM_THREADS=1 python scripts/train_digits_sr_teacher.py --out distill/assets/digits_sr_teacher

Writes `unet/` (safetensors + config), `scheduler/` (CMStochasticIterativeScheduler: sigma_min/max/data),
`training_args.json` and a README model card; `scripts/tad_sr_eval.py --teacher-only` adds the measured rows.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from diffusers import CMStochasticIterativeScheduler
from diffusers.training_utils import EMAModel

from distill.data.digits import digits_split
from distill.parametrization import add_noise
from distill.recipes.tad_sr import SIGMA_DATA, SR_PROCESS, build_sr_unet, low_res_condition, sr_denoiser


def edm_sr_loss(teacher, hr: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """EDM denoising loss (Karras et al. 2022, eq. 2, Table 1's lambda(sigma)) given the low-res image, per sample."""
    sigma = (torch.randn(hr.shape[0]) * p_std + p_mean).exp()
    x_t = add_noise(SR_PROCESS, hr, torch.randn_like(hr), sigma)
    x0_hat = teacher(x_t, sigma, low_res_condition(hr))
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    return weight * (x0_hat - hr).pow(2).flatten(1).mean(1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="distill/assets/digits_sr_teacher")
    ap.add_argument("--steps", type=int, default=1700)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--p-mean", type=float, default=-1.2)
    ap.add_argument("--p-std", type=float, default=1.2)
    ap.add_argument("--channels", default="32,64", help="block_out_channels, comma separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    images, _ = digits_split("train", 16)  # half B only: the held-out protocol
    teacher = sr_denoiser(build_sr_unet(tuple(int(c) for c in args.channels.split(","))))
    teacher.model.train()
    ema = EMAModel(teacher.model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    opt = torch.optim.Adam(teacher.model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / args.steps))))

    start, running = time.time(), None
    for step in range(args.steps):
        hr = images[torch.randint(0, images.shape[0], (args.batch_size,))]
        loss = edm_sr_loss(teacher, hr, args.p_mean, args.p_std).mean()
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
    CMStochasticIterativeScheduler(sigma_min=SR_PROCESS.sigma_min, sigma_max=SR_PROCESS.sigma_max,
                                   sigma_data=SIGMA_DATA).save_pretrained(out / "scheduler")
    info = {**vars(args), "data": "train half B (898 images)", "final_loss_ema": running,
            "train_seconds": round(time.time() - start, 1)}
    (out / "training_args.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved SR teacher to {out}")


if __name__ == "__main__":
    main()
