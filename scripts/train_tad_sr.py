"""Distil the digits SR teacher into a one-step student with TAD-SR (distill.recipes.tad_sr), and export it.

TAD-SR's image condition is carried by its own family (distill.recipes.tad_sr.LowResConcatFamily), which
`distill train` cannot load without a shared change (see the recipe's docstring), so this script drives the
recipe's self-contained training loop on the train half B of the digits protocol.

    OMP_NUM_THREADS=1 python scripts/train_tad_sr.py --teacher distill/assets/digits_sr_teacher --out runs/tad_sr

Writes `<out>/` as an exported student (unet/ + scheduler/ + README.md model card) and `<out>/train_log.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from distill.data.digits import digits_split
from distill.recipes.tad_sr import TADSRConfig, export_student, load_sr_denoiser, train_tad_sr


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="distill/assets/digits_sr_teacher")
    ap.add_argument("--out", default="runs/tad_sr")
    defaults = TADSRConfig()
    for name, value in vars(defaults).items():
        if name == "sigma_range":
            ap.add_argument("--sigma-range", type=float, nargs=2, default=list(value))
        else:
            ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TADSRConfig(**{k: (tuple(v) if k == "sigma_range" else v) for k, v in vars(args).items()
                         if k in vars(defaults)})
    cfg.check()
    torch.manual_seed(cfg.seed)
    teacher = load_sr_denoiser(args.teacher)
    images, _ = digits_split("train", 16)  # half B only
    start = time.time()
    student, rows = train_tad_sr(teacher, images, cfg)
    info = {**vars(args), "train_seconds": round(time.time() - start, 1)}
    export_student(student, args.out, info)
    (Path(args.out) / "train_log.json").write_text(json.dumps({"args": info, "rows": rows}) + "\n")
    print(f"saved the one-step student to {args.out} ({info['train_seconds']} s)")


if __name__ == "__main__":
    main()
