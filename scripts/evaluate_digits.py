"""Evaluate a finished digits run: FD-digits and accuracy of the teacher and of the exported student.

    python scripts/evaluate_digits.py runs/dmd2_digits [--pipeline runs/dmd2_digits/pipeline] [--teacher-steps 20]

The student is loaded from its exported pipeline folder with plain diffusers. Writes
<run>/teacher_vs_student.png and <run>/metrics.json and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.training.preflight import load_config
from distill.evaluation.digits import DEFAULT_TEACHER_STEPS, compare_teacher_student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--pipeline", default=None, help="exported folder (default: <run_dir>/pipeline)")
    ap.add_argument("--teacher-steps", type=int, default=DEFAULT_TEACHER_STEPS)
    ap.add_argument("--teacher-guidance", type=float, default=None, help="override the run's teacher.guidance_scale")
    args = ap.parse_args()
    run = Path(args.run_dir)
    overrides = [f"run.output_dir={run}"]
    if args.teacher_guidance is not None:
        overrides.append(f"teacher.guidance_scale={args.teacher_guidance}")
    cfg = load_config(run / "config.yaml", overrides)
    print(compare_teacher_student(cfg, Path(args.pipeline) if args.pipeline else run / "pipeline", run,
                                  teacher_steps=args.teacher_steps))


if __name__ == "__main__":
    main()
