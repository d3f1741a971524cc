"""Diversity distillation on digits: the hybrid sampler (teacher for the first n student steps, the student for the
rest; `distill.models.hybrid`, arXiv 2503.10637) beside the student alone and the teacher alone.

Every row samples the same 898 fixed noises, labels 0..9 in turn, and is scored as `scripts/compare_recipes.py`
scores a student: FD-digits, precision and recall (`distill.demo.digits_judge.FDDigits`), diversity
(`class_diversity`: mean pairwise judge-feature distance within a class). "time / student": the row's sampling
wall time over the student alone's in the same run (one thread).

    OMP_NUM_THREADS=1 python scripts/hybrid_sampling.py STUDENT --n 0 1 2 3   # teacher steps as in the paper code
    OMP_NUM_THREADS=1 python scripts/hybrid_sampling.py STUDENT --n 0 1 2 3 --teacher-steps 1
    OMP_NUM_THREADS=1 python scripts/hybrid_sampling.py STUDENT --export runs/hybrid_n2 --export-n 2   # and its folder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def timed_samples(fn, labels: torch.Tensor, noise: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, float]:
    """(images, seconds) of fn(cond, noise) over chunks."""
    start = time.perf_counter()
    out = [fn({"class_labels": labels[i:i + chunk]}, noise[i:i + chunk]) for i in range(0, len(noise), chunk)]
    return torch.cat(out).float().clamp(-1, 1), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student", type=Path, help="an exported student pipeline folder (ConsistencyModelPipeline)")
    ap.add_argument("--teacher", default="builtin:digits_teacher")
    ap.add_argument("--n", type=int, nargs="+", default=None,
                    help="teacher steps n (hand-over at the student's step n; default 0..k-1)")
    ap.add_argument("--teacher-steps", type=int, default=None,
                    help="the teacher's solver steps from sigma_max to the hand-over level (default: as the paper's "
                         "code, the steps of the teacher's --full-teacher-steps grid above that level)")
    ap.add_argument("--full-teacher-steps", type=int, default=20, help="steps of the teacher-alone row")
    ap.add_argument("--guidance", type=float, default=1.0, help="the teacher's CFG scale in the hybrid and alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--export", type=Path, default=None, help="also export the hybrid with --export-n teacher steps")
    ap.add_argument("--export-n", type=int, default=1, help="teacher steps n of the exported hybrid")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from compare_recipes import class_diversity

    from distill.data.digits import digits_split
    from distill.demo.digits_judge import FDDigits
    from distill.export.hybrid import export_hybrid
    from distill.models.hybrid import (
        handover_sigma,
        hybrid_sample,
        load_pair,
        matching_teacher_steps,
        teacher_state,
    )

    teacher, student, schedule, _ = load_pair(args.teacher, args.student)
    k = schedule.num_steps
    ns = list(range(k)) if args.n is None else args.n
    judge = FDDigits(resolution=16)
    labels = torch.arange(judge.count) % 10
    shape = (1, *[student.model.config.sample_size] * 2)
    noise = torch.randn((judge.count, *shape), generator=torch.Generator().manual_seed(args.seed))

    def score(name: str, n: int | str, steps: int | str, images: torch.Tensor, seconds: float) -> dict:
        report = judge.report(images, labels)
        report.update(diversity=class_diversity(judge.features(images), labels), sampler=name, n=n,
                      teacher_steps=steps, seconds=seconds)
        return report

    rows = []
    held_out, held_labels = digits_split("train", 16)
    real = judge.report(held_out, held_labels)
    real.update(diversity=class_diversity(judge.features(held_out), held_labels), sampler="real half B (floor)",
                n="-", teacher_steps="-", seconds=float("nan"))
    for n in ns:
        sigma = handover_sigma(schedule, n)
        steps = args.teacher_steps or matching_teacher_steps(teacher.process, sigma, args.full_teacher_steps)
        g = torch.Generator().manual_seed(args.seed + 1)  # the student's re-noising

        def fn(cond, x, sigma=sigma, g=g, steps=steps):
            return hybrid_sample(teacher, student, schedule, cond, x, sigma, steps, args.guidance, generator=g)

        images, seconds = timed_samples(fn, labels, noise)
        name = "student alone" if n == 0 else ("teacher alone" if n == k else f"hybrid (hand-over sigma {sigma:.4g})")
        rows.append(score(name, n, steps if n else 0, images, seconds))
        print(f"n={n}: FD-digits {rows[-1]['fd_digits']:.3f}, recall {rows[-1]['recall']:.3f}, diversity "
              f"{rows[-1]['diversity']:.3f}, {seconds:.1f}s", flush=True)
    images, seconds = timed_samples(lambda c, x: teacher_state(teacher, c, x, 0.0, args.full_teacher_steps,
                                                               args.guidance), labels, noise)
    rows.append(score("teacher alone", k, args.full_teacher_steps, images, seconds))
    base = next((r["seconds"] for r in rows if r["n"] == 0), None)
    lines = [f"student: `{args.student}` ({k} steps, levels {[round(float(s), 4) for s in schedule.times]}); "
             f"teacher: `{args.teacher}`, guidance {args.guidance}, DPM-Solver++(2M)", "",
             "| sampler | n | teacher solver steps | FD-digits | precision | recall | diversity | seconds | "
             "time / student |", "|---|---|---|---|---|---|---|---|---|"]
    for r in [real, *rows]:
        ratio = f"{r['seconds'] / base:.2f}" if base and r["seconds"] == r["seconds"] else "-"
        secs = f"{r['seconds']:.1f}" if r["seconds"] == r["seconds"] else "-"
        lines.append(f"| {r['sampler']} | {r['n']} | {r['teacher_steps']} | {r['fd_digits']:.3f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['diversity']:.3f} | {secs} | {ratio} |")
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps({"real": real, "rows": rows}, indent=2) + "\n")
    if args.export is not None:
        sigma = handover_sigma(schedule, args.export_n)
        steps = args.teacher_steps or matching_teacher_steps(teacher.process, sigma, args.full_teacher_steps)
        folder = export_hybrid(args.teacher, args.student, args.export, args.export_n, steps, args.guidance)
        print(f"exported the hybrid with n={args.export_n}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
