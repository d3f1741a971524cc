"""FD-digits of exported students sampled at another step count by their own pipeline (consistency students are
any-step): `python scripts/evaluate_steps.py RUN_DIR [RUN_DIR ...] [--steps 2]` (reads RUN_DIR/pipeline, writes
RUN_DIR/student_<k>step.png)."""
import argparse

import torch

from distill.evaluation.digits import student_images
from distill.base.imaging import save_grid
from distill.evaluation.metrics import FDDigits

ap = argparse.ArgumentParser()
ap.add_argument("runs", nargs="+")
ap.add_argument("--steps", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(1)
judge = FDDigits(resolution=16)
labels = torch.arange(judge.count) % 10
for run in args.runs:
    imgs = student_images(f"{run}/pipeline", labels, 1234, num_steps=args.steps)
    p, r = judge.precision_recall(imgs)
    print(f"{run} {args.steps} steps: FD-digits {judge(imgs):.3f} accuracy {judge.accuracy(imgs, labels).accuracy:.3f} "
          f"precision {p:.3f} recall {r:.3f}")
    save_grid(imgs[:40], f"{run}/student_{args.steps}step.png", nrow=10)
