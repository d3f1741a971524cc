"""Teacher-versus-student evaluation of the text-to-image task (captioned shapes): agreement, FD-shapes, speed, grid.

Both rows are sampled with plain diffusers: the teacher from its own folder (its pipeline and sampler: the VP
teacher's `StableDiffusionPipeline` with DPM-Solver++, the flow teacher's `StableDiffusion3Pipeline` with the Euler
flow sampler; at `teacher.guidance_scale`), the student from its exported folder (one step, guidance off: the
teacher's guidance was distilled in). Each draws 960 images, 20 per caption, image i with seed 1234 + i, so
image i of both rows starts from the same latents. Scores come from the shapes judge (distill/demo/shapes_judge.py);
FD-shapes is NOT Inception FID.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from distill.base.paths import resolve_path
from distill.config import Config

#: the text teachers' default sampling steps; docs/text_to_image.md has their curves
DEFAULT_TEXT_TEACHER_STEPS = 20
#: the captions of the grid's rows (one teacher row and one student row each): every shape, colour and position
GRID_CAPTIONS = ("a red circle at the top left", "a green square at the top right",
                 "a blue triangle at the bottom left", "a yellow circle at the bottom right",
                 "a red square at the bottom left", "a yellow triangle at the top left",
                 "a blue circle at the top right", "a green triangle at the bottom right")
GRID_COLUMNS = 8


def pipeline_images(folder: str | Path, captions: list[str], seed: int, num_steps: int, guidance_scale: float,
                    batch_size: int = 240) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W), from a text-to-image pipeline folder loaded with diffusers only, drawn
    as the evaluation scripts draw them (`distill.evaluation.t2i_eval.generate`: image i from its own generator seeded
    seed + i, rounded to uint8 as a saved PNG is)."""
    from distill.evaluation.t2i_eval import CallSettings, generate, load_pipeline

    pipe = load_pipeline(folder)
    settings = CallSettings(num_steps, guidance_scale, None, "distill demo --task text / text-flow")
    images = torch.cat([batch for _, batch in generate(pipe, captions, settings, seed, batch_size)])
    return images.float() / 127.5 - 1.0


def _plural(n: int) -> str:
    return f"{n} step{'s' if n > 1 else ''}"


def compare_text_teacher_student(cfg: Config, pipeline_dir: str | Path, out_dir: str | Path,
                                 teacher_steps: int = DEFAULT_TEXT_TEACHER_STEPS, seed: int = 1234) -> str:
    """Agreement and FD-shapes for the teacher (`teacher_steps`, its guidance) and the exported student; writes
    `<out_dir>/teacher_vs_student.png` and `<out_dir>/metrics.json`; returns a printable report."""
    from distill.base.imaging import save_grid
    from distill.demo.shapes import shapes_split
    from distill.demo.shapes_judge import ShapesJudge

    out_dir = Path(out_dir)
    judge = ShapesJudge()
    captions = judge.protocol_captions()
    w = cfg.teacher.guidance_scale
    student_steps = cfg.student.num_steps

    t0 = time.perf_counter()
    teacher = pipeline_images(resolve_path(cfg.teacher.path), captions, seed, teacher_steps, w)
    t_teacher = time.perf_counter() - t0
    t0 = time.perf_counter()
    student = pipeline_images(pipeline_dir, captions, seed, student_steps, 0.0)  # 0: the pipeline's "no CFG"
    t_student = time.perf_counter() - t0

    real, _, real_captions = shapes_split("train", judge.count)
    floor_p, floor_r = judge.floor_precision_recall()
    rows = {
        "real train split (the floor)": {**judge.attribute_scores(real, real_captions), "fd_shapes": judge.floor(),
                                         "precision": floor_p, "recall": floor_r, "nfe": 0},
        f"teacher ({_plural(teacher_steps)}, w={w})": {
            **judge.report(teacher, captions), "nfe": teacher_steps * (1 if w <= 1.0 else 2), "seconds": t_teacher},
        f"student ({_plural(student_steps)}, diffusers pipeline)": {
            **judge.report(student, captions), "nfe": student_steps, "seconds": t_student},
    }
    # Grid: per caption of GRID_CAPTIONS a teacher row and a student row of its first protocol samples.
    picks, labels = [], []
    for caption in GRID_CAPTIONS:
        idx = [i for i, c in enumerate(captions) if c == caption][:GRID_COLUMNS]
        picks += [teacher[idx], student[idx]]
        labels += [f"teacher {_plural(teacher_steps)}: {caption}", f"student {_plural(student_steps)}: {caption}"]
    save_grid(torch.cat(picks), out_dir / "teacher_vs_student.png", nrow=GRID_COLUMNS, row_labels=labels)
    metrics = {"count": judge.count, "reference": "distill.demo.shapes reference split (960 images, 20 per caption)",
               "floor": "the first 960 images of the train split (20 per caption) against the reference",
               "judge": "distill/assets/shapes_judge (trained on the train split only)",
               "precision_recall": "Kynkaanniemi et al. 2019, k = 3, in the judge's features",
               "teacher_guidance_scale": w, "student_guidance": "none (distilled in)", "device": "cpu",
               "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    lines = [f"Text-image agreement (shapes judge) and FD-shapes (judge features; not Inception FID), {judge.count} "
             "samples (20 per caption) vs the 960-image reference split:",
             f"{'':40s} {'agree':>6s} {'shape':>6s} {'colour':>6s} {'place':>6s} {'FD-shapes':>9s} "
             f"{'precision':>9s} {'recall':>6s} {'NFE':>4s} {'seconds':>7s}"]
    for name, r in rows.items():
        sec = f"{r['seconds']:.1f}" if "seconds" in r else ""
        lines.append(f"{name:40s} {r['agreement']:6.3f} {r['shape']:6.3f} {r['colour']:6.3f} {r['position']:6.3f} "
                     f"{r['fd_shapes']:9.3f} {r['precision']:9.3f} {r['recall']:6.3f} {r['nfe']:4d} {sec:>7s}")
    lines.append(f"sampling speed-up (same run, CPU): {t_teacher / max(t_student, 1e-9):.1f}x")
    lines.append(f"grid: {out_dir / 'teacher_vs_student.png'} (per caption a teacher row, then a student row)")
    return "\n".join(lines)
