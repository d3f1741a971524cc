"""Teacher-versus-student evaluation on the digits protocol (FD-digits, classifier accuracy, speed, grid).

The student is loaded from its exported folder with plain diffusers, so the figures are those of the artifact a
user gets. FD-digits is a Frechet distance in the features of the shipped digits classifier: it is not Inception
FID and is not comparable to paper FIDs (see docs/fd_digits.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from distill.base.paths import resolve_path
from distill.config import Config

#: the digits teacher's default sampling steps (DPM-Solver++(2M)): at the floor from 20 steps on (docs/teacher.md)
DEFAULT_TEACHER_STEPS = 20


def student_images(pipeline_dir: str | Path, labels: torch.Tensor, seed: int, num_steps: int | None = None,
                   batch_size: int = 512) -> torch.Tensor:
    """Images in [-1, 1] from an exported pipeline folder, loaded with diffusers only."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    meta_file = Path(pipeline_dir) / "distill.json"
    if num_steps is None:
        num_steps = json.loads(meta_file.read_text())["num_inference_steps"] if meta_file.is_file() else 1
    g = torch.Generator().manual_seed(seed)
    outs = []
    for start in range(0, len(labels), batch_size):
        lab = labels[start:start + batch_size]
        out = pipe(batch_size=len(lab), class_labels=lab.tolist(), num_inference_steps=num_steps, generator=g,
                   output_type="pt")
        outs.append(out.images * 2 - 1)  # "pt" output is (N, C, H, W) in [0, 1]
    return torch.cat(outs).float()


def teacher_images(cfg: Config, labels: torch.Tensor, seed: int, num_steps: int) -> torch.Tensor:
    from distill.models.denoiser import load_denoiser
    from distill.models.sampling import sample

    teacher = load_denoiser(resolve_path(cfg.teacher.path), prediction=cfg.teacher.prediction)
    noise = torch.randn((len(labels), 1, cfg.data.resolution, cfg.data.resolution), generator=torch.Generator().manual_seed(seed))
    return sample(teacher, {"class_labels": labels}, noise, num_steps=num_steps, guidance_scale=cfg.teacher.guidance_scale)


def compare_teacher_student(cfg: Config, pipeline_dir: str | Path, out_dir: str | Path, teacher_steps: int = DEFAULT_TEACHER_STEPS,
                            seed: int = 1234) -> str:
    """FD-digits and accuracy for the teacher (`teacher_steps`) and the exported student; writes
    `<out_dir>/teacher_vs_student.png` and `<out_dir>/metrics.json`; returns a printable report."""
    from distill.base.imaging import save_grid
    from distill.demo.digits_judge import FDDigits

    out_dir = Path(out_dir)
    judge = FDDigits(resolution=cfg.data.resolution)
    labels = torch.arange(judge.count) % 10
    student_steps = cfg.student.num_steps

    t0 = time.perf_counter()
    teacher = teacher_images(cfg, labels, seed, teacher_steps)
    t_teacher = time.perf_counter() - t0
    t0 = time.perf_counter()
    student = student_images(pipeline_dir, labels, seed, student_steps)
    t_student = time.perf_counter() - t0

    floor = judge.floor()
    floor_p, floor_r = judge.floor_precision_recall()
    rows = {
        "real half B (the floor)": {"fd_digits": floor, "precision": floor_p, "recall": floor_r, "nfe": 0},
        f"teacher ({teacher_steps} steps, w={cfg.teacher.guidance_scale})": {
            **judge.report(teacher, labels),
            "nfe": teacher_steps * (1 if cfg.teacher.guidance_scale == 1.0 else 2), "seconds": t_teacher},
        f"student ({student_steps} step{'s' if student_steps > 1 else ''}, diffusers pipeline)": {
            **judge.report(student, labels), "nfe": student_steps, "seconds": t_student},
    }
    for r in rows.values():
        r["x_floor"] = r["fd_digits"] / floor
    # Grid: per column one digit; the first 4 rows teacher, the last 4 rows student (same labels).
    n = 40
    row_labels = [f"teacher {teacher_steps} steps"] * 4 + [f"student {student_steps} step{'s' if student_steps > 1 else ''}"] * 4
    save_grid(torch.cat([teacher[:n], student[:n]]), out_dir / "teacher_vs_student.png", nrow=10,
              row_labels=row_labels)
    metrics = {"count": judge.count, "reference": "digits half A (899), split_halves(1797, seed=0)",
               "train_half": "digits half B (898): the only digits any training path reads",
               "precision_recall": "Kynkaanniemi et al. 2019, k = 3, in the judge's features",
               "device": "cpu", "rows": rows}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    lines = [f"FD-digits (classifier features; not Inception FID), {judge.count} samples vs 899 real (half A):",
             f"{'':44s} {'FD-digits':>9s} {'x floor':>7s} {'precision':>9s} {'recall':>6s} {'accuracy':>8s} "
             f"{'NFE':>4s} {'seconds':>7s}"]
    for name, r in rows.items():
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else ""
        sec = f"{r['seconds']:.1f}" if "seconds" in r else ""
        lines.append(f"{name:44s} {r['fd_digits']:9.3f} {r['x_floor']:7.2f} {r['precision']:9.3f} "
                     f"{r['recall']:6.3f} {acc:>8s} {r['nfe']:4d} {sec:>7s}")
    t_ratio = t_teacher / max(t_student, 1e-9)
    teacher_row, student_row = (rows[k] for k in list(rows)[1:])
    lines.append(f"student/teacher FD ratio: {student_row['fd_digits'] / teacher_row['fd_digits']:.2f}; "
                 f"student/floor: {student_row['x_floor']:.2f}; sampling speed-up (same run, CPU): {t_ratio:.1f}x")
    lines.append(f"grid: {out_dir / 'teacher_vs_student.png'} (rows 1-4 teacher, 5-8 student)")
    return "\n".join(lines)
