"""FD-digits of a teacher at several step counts and guidance scales (DPM-Solver++(2M), same seed and labels).

    python scripts/evaluate_teacher.py [--teacher builtin:digits_teacher] [--steps 1 2 4 8 50] [--guidance 1 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.config import resolve_path
from distill.denoiser import load_denoiser
from distill.metrics import FDDigits
from distill.sampling import sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="builtin:digits_teacher")
    ap.add_argument("--prediction", default="edm")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 50])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    teacher = load_denoiser(resolve_path(args.teacher), prediction=args.prediction)
    judge = FDDigits()
    labels = torch.arange(judge.count) % 10
    noise = torch.randn((judge.count, 1, 16, 16), generator=torch.Generator().manual_seed(args.seed))
    print(f"FD-digits floor (real vs real, {judge.count}): {judge.floor():.3f}")
    print(f"{'steps':>5s} {'w':>5s} {'FD-digits':>10s} {'accuracy':>9s} {'seconds':>8s}")
    for w in args.guidance:
        for k in args.steps:
            t0 = time.perf_counter()
            x = sample(teacher, {"class_labels": labels}, noise, num_steps=k, guidance_scale=w)
            dt = time.perf_counter() - t0
            print(f"{k:5d} {w:5.2f} {judge(x):10.3f} {judge.accuracy(x, labels).accuracy:9.3f} {dt:8.1f}", flush=True)


if __name__ == "__main__":
    main()
