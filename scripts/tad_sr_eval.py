"""Evaluate digits super-resolution on the held-out half A: PSNR against the ground-truth 16x16 and FD-digits.

The teacher at k sampler steps (k network calls, deterministic DDIM on the Karras grid) beside each student's one
step, plus the interpolation baselines (nearest and bilinear upsampling of the 4x4 input). Every model sees half A's
4x4 images and the same fixed noise (seed).

    OMP_NUM_THREADS=1 python scripts/tad_sr_eval.py --teacher distill/assets/digits_sr_teacher \
        --teacher-steps 1 2 4 8 16 --student runs/tad_sr --out runs/tad_sr/eval.json

PSNR = 10 log10(2^2 / MSE) per image on the [-1, 1] range (outputs clamped), averaged over the 899 images.
FD-digits (NOT Inception FID) uses the protocol judge distill.demo.digits_judge.FDDigits on the first 898 outputs
against half A; note that these outputs are conditioned on half A's own low-res images, so the figure can sit
below the real-vs-real floor, which is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.data.digits import digits_split
from distill.recipes.tad_sr import downsample, load_sr_denoiser, low_res_condition, one_step, sample_sr, upsample


def psnr(images: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the [-1, 1] range (peak-to-peak 2), images clamped to [-1, 1]."""
    mse = (images.clamp(-1, 1) - truth).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


def evaluate(outputs: dict[str, torch.Tensor], truth: torch.Tensor, judge=None) -> list[dict]:
    rows = []
    for name, images in outputs.items():
        row = {"model": name, "psnr_db": round(psnr(images, truth).mean().item(), 3)}
        if judge is not None:
            row["fd_digits"] = round(judge(images[: judge.count].clamp(-1, 1)), 3)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="distill/assets/digits_sr_teacher")
    ap.add_argument("--teacher-steps", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--student", nargs="*", default=[], help="exported student folders (one step each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fd", action="store_true", help="PSNR only")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    truth, _ = digits_split("reference", 16)  # half A: never trained on
    cond = low_res_condition(truth)
    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(args.seed))
    lr = downsample(truth)
    outputs = {"nearest upsampling": upsample(lr),
               "bilinear upsampling": F.interpolate(lr, scale_factor=4, mode="bilinear", align_corners=False)}
    seconds = {}
    teacher = load_sr_denoiser(args.teacher)
    with torch.no_grad():
        for k in args.teacher_steps:
            start = time.time()
            outputs[f"teacher, {k} steps"] = sample_sr(teacher, cond, noise, k)
            seconds[f"teacher, {k} steps"] = time.time() - start
        for folder in args.student:
            start = time.time()
            outputs[f"student {folder}, 1 step"] = one_step(load_sr_denoiser(folder), cond, noise)
            seconds[f"student {folder}, 1 step"] = time.time() - start
    judge = None
    if not args.no_fd:
        from distill.demo.digits_judge import FDDigits

        judge = FDDigits(resolution=16)
    rows = evaluate(outputs, truth, judge)
    for row in rows:
        row["seconds_899"] = round(seconds.get(row["model"], 0.0), 2)
    floor = None if judge is None else round(judge.floor(), 3)
    print(f"half A, {len(truth)} images, noise seed {args.seed}; FD-digits floor (half B vs half A): {floor}")
    print("| model | PSNR (dB) | FD-digits | s / 899 images |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['psnr_db']:.2f} | {row.get('fd_digits', '-')} | {row['seconds_899']} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "fd_floor": floor, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
