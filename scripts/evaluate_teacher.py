"""A teacher's curve on the digits protocol: FD-digits, precision, recall, accuracy and seconds against sampling
steps and guidance (DPM-Solver++(2M), same seed and labels for every cell).

    python scripts/evaluate_teacher.py [--teacher builtin:digits_teacher] [--steps 1 2 4 8 20 50]
        [--guidance 1 1.5 2] [--markdown docs/teacher_curve.md] [--plot docs/teacher_curve.png]

Prints one line per cell as it is measured; `--markdown` writes the table, `--plot` a PNG (needs matplotlib:
`pip install -e ".[plot]"`). FD-digits is not Inception FID (docs/fd_digits.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from distill.base.paths import resolve_path
from distill.models.denoiser import load_denoiser
from distill.evaluation.metrics import FDDigits
from distill.base.optional import exit_if_missing, require
from distill.models.sampling import sample


def measure(teacher, judge: FDDigits, steps: list[int], guidance: list[float], seed: int) -> list[dict]:
    labels = torch.arange(judge.count) % 10
    noise = torch.randn((judge.count, 1, judge.resolution, judge.resolution), generator=torch.Generator().manual_seed(seed))
    rows = []
    for w in guidance:
        for k in steps:
            t0 = time.perf_counter()
            x = sample(teacher, {"class_labels": labels}, noise, num_steps=k, guidance_scale=w)
            seconds = time.perf_counter() - t0
            row = {"steps": k, "guidance": w, **judge.report(x, labels), "seconds": seconds}
            rows.append(row)
            print(f"{k:5d} {w:5.2f} {row['fd_digits']:10.3f} {row['precision']:9.3f} {row['recall']:7.3f} "
                  f"{row['accuracy']:9.3f} {seconds:8.1f}", flush=True)
    return rows


def markdown(rows: list[dict], floor: float, floor_pr: tuple[float, float]) -> str:
    lines = [f"Floor (real half B vs half A, 898 images): FD-digits {floor:.3f}, precision {floor_pr[0]:.3f}, "
             f"recall {floor_pr[1]:.3f}.", "",
             "| steps | w | FD-digits | x floor | precision | recall | accuracy | seconds |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['guidance']:g} | {r['fd_digits']:.3f} | {r['fd_digits'] / floor:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['accuracy']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], floor: float, path: Path) -> None:
    matplotlib = require("matplotlib", "scripts/evaluate_teacher.py --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for w in sorted({r["guidance"] for r in rows}):
        rs = [r for r in rows if r["guidance"] == w]
        steps = [r["steps"] for r in rs]
        axes[0].plot(steps, [r["fd_digits"] for r in rs], "o-", label=f"w = {w:g}")
        axes[1].plot(steps, [r["precision"] for r in rs], "o-", label=f"w = {w:g}")
        axes[2].plot(steps, [r["recall"] for r in rs], "o-", label=f"w = {w:g}")
    axes[0].axhline(floor, color="k", ls="--", lw=1, label="floor")
    for ax, name in zip(axes, ("FD-digits (lower is better)", "precision", "recall")):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="builtin:digits_teacher")
    ap.add_argument("--prediction", default="edm")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 20, 50])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the table to this file")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG plot to this file")
    args = ap.parse_args()
    if args.plot:  # before any cell is measured
        exit_if_missing("matplotlib", "scripts/evaluate_teacher.py --plot")
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = load_denoiser(resolve_path(args.teacher), prediction=args.prediction)
    judge = FDDigits()
    floor, floor_pr = judge.floor(), judge.floor_precision_recall()
    print(f"FD-digits floor (real half B vs half A, {judge.count}): {floor:.3f}; precision {floor_pr[0]:.3f}, "
          f"recall {floor_pr[1]:.3f}")
    print(f"{'steps':>5s} {'w':>5s} {'FD-digits':>10s} {'precision':>9s} {'recall':>7s} {'accuracy':>9s} {'seconds':>8s}")
    rows = measure(teacher, judge, args.steps, args.guidance, args.seed)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(rows, floor, floor_pr))
    if args.plot:
        plot(rows, floor, args.plot)


if __name__ == "__main__":
    main()
