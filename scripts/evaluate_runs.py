"""FD-digits of several finished digits runs in one pass, with each teacher guidance scale evaluated once.

    python scripts/evaluate_runs.py RUN_DIR [RUN_DIR ...] [--teacher-steps 50 (0: none)] [--grids DIR]

For every run: its exported pipeline (loaded with plain diffusers, sampled at the run's own `student.num_steps`)
against half A, with the same labels and seed as `scripts/evaluate_digits.py`; for every distinct
`teacher.guidance_scale` among the runs: the teacher at `--teacher-steps` (computed once). Prints a markdown table
and, with `--grids`, writes one 4x10 sample grid per run (and per teacher) into that folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from distill.training.preflight import load_config
from distill.evaluation.digits import student_images, teacher_images
from distill.base.imaging import save_grid
from distill.evaluation.metrics import FDDigits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--teacher-steps", type=int, default=50, help="0: no teacher rows")
    ap.add_argument("--grids", default=None)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = [Path(r) for r in args.runs]
    cfgs = {r: load_config(r / "config.yaml", [f"run.output_dir={r}"]) for r in runs}
    resolution = {c.data.resolution for c in cfgs.values()}
    if len(resolution) != 1:
        raise SystemExit(f"runs differ in data.resolution {sorted(resolution)}: evaluate them separately")
    judge = FDDigits(resolution=resolution.pop())
    labels = torch.arange(judge.count) % 10
    grids = Path(args.grids) if args.grids else None

    floor_p, floor_r = judge.floor_precision_recall()
    rows = [("real half B (the floor)", "-", "-", {"fd_digits": judge.floor(), "precision": floor_p, "recall": floor_r})]
    done: set[float] = set()
    for run, cfg in cfgs.items():
        w = cfg.teacher.guidance_scale
        if w not in done and args.teacher_steps > 0:
            done.add(w)
            images = teacher_images(cfg, labels, args.seed, args.teacher_steps)
            rows.append((f"teacher, w={w}", f"{args.teacher_steps} (NFE {args.teacher_steps * (1 if w == 1 else 2)})",
                         "-", judge.report(images, labels)))
            if grids:
                save_grid(images[:40], grids / f"teacher_w{w}.png", nrow=10)
    for run, cfg in cfgs.items():
        images = student_images(run / "pipeline", labels, args.seed, cfg.student.num_steps)
        recipe = cfg.recipe.model_dump() if cfg.recipe is not None else {}
        rows.append((run.name, str(cfg.student.num_steps), f"{cfg.recipe_name} (w={cfg.teacher.guidance_scale})",
                     judge.report(images, labels)))
        if grids:
            save_grid(images[:40], grids / f"{run.name}.png", nrow=10)
        (run / "fd_digits.json").write_text(json.dumps({"recipe": recipe, **rows[-1][3]}, indent=2) + "\n")

    floor = judge.floor()
    print(f"FD-digits (classifier features; not Inception FID), {judge.count} samples vs 899 real (half A), seed {args.seed}")
    print("| run | steps | recipe | FD-digits | x floor | precision | recall | accuracy |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, steps, recipe, r in rows:
        fmt = lambda k: f"{r[k]:.3f}" if k in r else ""  # noqa: E731
        print(f"| {name} | {steps} | {recipe} | {r['fd_digits']:.3f} | {r['fd_digits'] / floor:.2f} | "
              f"{fmt('precision')} | {fmt('recall')} | {fmt('accuracy')} |")


if __name__ == "__main__":
    main()
