"""Train the bundled 2-D toy teacher: an EDM-preconditioned `ToyMLP` on the Gaussian mixture of distill/data/toy.py.

Stored like the digits teacher (a `CMStochasticIterativeScheduler` config: c_in x, c_noise = 250 log sigma,
x0 = c_skip x + c_out F; Karras et al. 2022, Table 1), so every recipe distils it unchanged.

    OMP_NUM_THREADS=1 python scripts/train_toy_teacher.py --out distill/assets/toy_teacher --steps 4000

Prints the teacher's error against the exact denoiser of the mixture (distill.data.toy) at a few noise levels.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import CMStochasticIterativeScheduler
from diffusers.training_utils import EMAModel

from distill.data.toy import toy_mixture
from distill.families.toy import ToyFamily, ToyMLP
from distill.models.denoiser import Denoiser
from distill.parametrization import EDMProcess, add_noise

SIGMA_DATA = 0.5


def edm_loss(teacher: Denoiser, x0: torch.Tensor, labels: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """EDM denoising loss (Karras et al. 2022, eq. 2 with lambda(sigma) of Table 1), per sample."""
    sigma = (torch.randn(x0.shape[0]) * p_std + p_mean).exp()
    x_t = add_noise(teacher.process, x0, torch.randn_like(x0), sigma)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    return weight * (teacher(x_t, sigma, {"class_labels": labels}) - x0).pow(2).mean(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="distill/assets/toy_teacher")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--label-dropout", type=float, default=0.1, help="share of labels set to the null class (CFG)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    mixture = toy_mixture()
    sched = CMStochasticIterativeScheduler(sigma_data=SIGMA_DATA)
    process = EDMProcess(sigma_min=sched.config.sigma_min, sigma_max=sched.config.sigma_max, sigma_data=SIGMA_DATA)
    teacher = Denoiser(ToyMLP(), process, "edm", ToyFamily())
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr, weight_decay=0.0)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    ema = EMAModel(teacher.model.parameters(), decay=0.999)
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(args.steps):
        x0, _ = mixture.sample(args.batch_size, g)
        labels = torch.where(torch.rand(args.batch_size, generator=g) < args.label_dropout, 1, 0)
        loss = edm_loss(teacher, x0, labels, p_mean=-1.2, p_std=1.2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_decay.step()
        ema.step(teacher.model.parameters())
        if step % 500 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    ema.copy_to(teacher.model.parameters())
    teacher.model.eval()
    x0, _ = mixture.sample(4096, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for sigma in (0.02, 0.1, 0.5, 2.0):
            s = torch.full((len(x0),), sigma)
            x = x0 + sigma * torch.randn_like(x0)
            err = (teacher(x, s, {"class_labels": torch.zeros(len(x0), dtype=torch.int64)}) - mixture.denoise(x, s))
            print(f"sigma {sigma}: rms error against the exact denoiser {err.pow(2).mean().sqrt():.4f}")
    out = Path(args.out)
    teacher.model.save_pretrained(out / "unet", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    (out / "README.md").write_text(
        "# distill toy teacher\n\nAn EDM-preconditioned `distill.families.toy.ToyMLP` (class 0 = the data, class 1 = "
        "the null class for CFG) trained on the 8-mode ring of `distill.data.toy.toy_mixture()`.\n\n"
        f"    OMP_NUM_THREADS=1 python scripts/train_toy_teacher.py --out {args.out} --steps {args.steps}\n\n"
        f"Trained in {time.time() - start:.0f} s on one CPU thread.\n")
    print(f"wrote {out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
