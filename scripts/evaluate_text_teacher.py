"""A text teacher's curve: agreement and FD-shapes against sampling steps and guidance, from its own stock pipeline.

    python scripts/evaluate_text_teacher.py --steps 5 10 20 --guidance 1 2 3 5 --threads 1
    python scripts/evaluate_text_teacher.py --teacher builtin:flow_text_teacher --steps 20 28 --guidance 1 2 --threads 1

Each row samples the judge's 960 protocol captions (20 per caption) with the teacher folder's own pipeline and
sampler (the VP `text_teacher`: StableDiffusionPipeline, DPM-Solver++(2M); the `flow_text_teacher`:
StableDiffusion3Pipeline, flow-matching Euler), seed 1234, and scores them with the shapes judge
(distill/demo/shapes_judge.py; FD-shapes is not Inception FID). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.base.paths import resolve_path
from distill.demo.evaluate_text import pipeline_images
from distill.demo.shapes_judge import ShapesJudge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="builtin:text_teacher")
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    judge = ShapesJudge()
    captions = judge.protocol_captions()
    print(f"floor (train vs reference, {judge.count} images): FD-shapes {judge.floor():.3f}\n")
    print("| steps | w | agreement | shape | colour | position | FD-shapes | precision | recall | seconds |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for steps in args.steps:
        for w in args.guidance:
            start = time.perf_counter()
            images = pipeline_images(resolve_path(args.teacher), captions, args.seed, steps, w)
            seconds = time.perf_counter() - start
            r = judge.report(images, captions)
            print(f"| {steps} | {w:g} | {r['agreement']:.3f} | {r['shape']:.3f} | {r['colour']:.3f} | "
                  f"{r['position']:.3f} | {r['fd_shapes']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                  f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
