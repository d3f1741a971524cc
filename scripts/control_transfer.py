"""Control transfer on digits (arXiv 2503.10637, "control distillation"): a thick-stroke LoRA trained on the teacher
by plain denoising score matching, loaded unchanged into the distilled student.

The style: the train half (half B) dilated with a 3x3 cross (`distill.models.lora_transfer.dilate`: every stroke
one pixel thicker on each side), labels kept. The LoRA (peft, the UNet2DModel family's targets: resnet convs, time
projections, attention) is fitted to it on the teacher with EDM's loss, then loaded by module name into the student.
Four samplers on the same 898 fixed noises, labels 0..9 in turn: the teacher (DPM-Solver++(2M), --teacher-steps) and
the student (its k-step pipeline rollout), each without and with the LoRA. Figures: mean ink (the style), FD-digits
against real half A and precision/recall/diversity (`scripts/compare_recipes.py`'s judge), and FD against half A
dilated the same way ("FD to thick": the raw `fd_digits`, 898 against 899).

    OMP_NUM_THREADS=1 python scripts/control_transfer.py /tmp/dc_student/pipeline --steps 200 \
        --export /tmp/dc_student_thick --save-lora /tmp/thick_lora
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


def samples(fn, labels: torch.Tensor, noise: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    with torch.no_grad():
        out = [fn({"class_labels": labels[i:i + chunk]}, noise[i:i + chunk]) for i in range(0, len(noise), chunk)]
    return torch.cat(out).float().clamp(-1, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student", type=Path, help="an exported student pipeline folder (ConsistencyModelPipeline)")
    ap.add_argument("--teacher", default="builtin:digits_teacher")
    ap.add_argument("--steps", type=int, default=200, help="LoRA training steps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--teacher-steps", type=int, default=20, help="the teacher's sampling steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--export", type=Path, default=None, help="the student + LoRA (fused) as a stock pipeline here")
    ap.add_argument("--save-lora", type=Path, default=None,
                    help="the LoRA alone here (peft factors as safetensors + lora.json)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from compare_recipes import class_diversity

    from distill.data.digits import digits_split
    from distill.demo.digits_judge import FDDigits, fd_digits, protocol_halves
    from distill.export.pipeline import export_pipeline
    from distill.models.adapters import AdapterDenoiser
    from distill.models.hybrid import load_pair
    from distill.models.lora_transfer import apply_lora, dilate, ink, train_lora
    from distill.models.sampling import sample
    from distill.models.schedules import rollout

    teacher, student, schedule, call = load_pair(args.teacher, args.student)
    images, labels = digits_split("train", 16)
    thick = dilate(images)
    start = time.perf_counter()
    role, losses = train_lora(teacher, thick, labels, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              rank=args.rank, null_class=teacher.model.config.num_class_embeds - 1, seed=args.seed,
                              log_every=max(1, args.steps // 10))
    train_seconds = time.perf_counter() - start
    state, config = role.lora_weights()
    styled = apply_lora(student, state, config)
    print(f"LoRA: rank {args.rank}, {len(config['target_modules'])} modules, {args.steps} steps in "
          f"{train_seconds:.0f}s; loaded into the student with every module matched", flush=True)

    judge = FDDigits(resolution=16)
    thick_reference = dilate(protocol_halves(16)[0])
    n_labels = torch.arange(judge.count) % 10
    noise = torch.randn((judge.count, 1, 16, 16), generator=torch.Generator().manual_seed(args.seed))
    base = AdapterDenoiser(teacher, None)
    samplers = {
        "teacher": lambda c, x: sample(base, c, x, num_steps=args.teacher_steps),
        "teacher + LoRA": lambda c, x: sample(role, c, x, num_steps=args.teacher_steps),
        "student": lambda c, x: rollout(student, schedule, c, x),
        "student + LoRA": lambda c, x: rollout(styled, schedule, c, x),
    }
    rows = [{"sampler": "real half B", "ink": float(ink(images).mean()), **judge.report(images, labels),
             "diversity": class_diversity(judge.features(images), labels),
             "fd_thick": fd_digits(images, thick_reference)},
            {"sampler": "real half B dilated (the style)", "ink": float(ink(thick).mean()),
             **judge.report(thick, labels), "diversity": class_diversity(judge.features(thick), labels),
             "fd_thick": fd_digits(thick, thick_reference)}]
    for name, fn in samplers.items():
        torch.manual_seed(args.seed + 1)  # the student's re-noising
        x = samples(fn, n_labels, noise)
        rows.append({"sampler": name, "ink": float(ink(x).mean()), **judge.report(x, n_labels),
                     "diversity": class_diversity(judge.features(x), n_labels),
                     "fd_thick": fd_digits(x, thick_reference)})
        print(f"{name}: ink {rows[-1]['ink']:.4f}, FD-digits {rows[-1]['fd_digits']:.3f}", flush=True)
    lines = [f"student `{args.student}` ({schedule.num_steps} steps), teacher `{args.teacher}` ({args.teacher_steps} "
             f"DPM-Solver++(2M) steps); LoRA rank {args.rank}, {args.steps} steps, batch {args.batch_size}, lr "
             f"{args.lr}, {train_seconds:.0f}s", "",
             "| sampler | mean ink | FD-digits | FD to thick | accuracy | precision | recall | diversity |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['ink']:.4f} | {r['fd_digits']:.3f} | {r['fd_thick']:.3f} | "
                     f"{r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['diversity']:.3f} |")
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "train_seconds": train_seconds, "losses": losses}, indent=2))
    if args.save_lora is not None:
        from safetensors.torch import save_file

        args.save_lora.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, args.save_lora / "lora.safetensors")
        (args.save_lora / "lora.json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"LoRA saved: {args.save_lora}")
    if args.export is not None:  # the student's classes are already 0..9: no null row to drop
        from types import SimpleNamespace

        info = json.loads((args.student / "distill.json").read_text())
        recipe = f"{info.get('recipe')} + a thick-stroke LoRA trained on the teacher, fused"
        folder = export_pipeline(styled.merged(), args.export, num_steps=schedule.num_steps, drop_null_class=False,
                                 timesteps=call.get("timesteps"), config=SimpleNamespace(recipe_name=recipe))
        with open(folder / "README.md", "a") as card:
            card.write(f"\n## Control transfer\n\nThe student `{args.student.name}` with a rank-{args.rank} LoRA "
                       f"fused into its weights (W + (alpha / r) B A, {len(config['target_modules'])} modules). The "
                       f"LoRA was trained on the teacher `{args.teacher}` alone ({args.steps} steps of EDM denoising "
                       "score matching on the digits train half dilated with a 3x3 cross: thick strokes) and loaded "
                       "into the student unchanged (arXiv 2503.10637's control transfer). Mean ink of 898 samples: "
                       f"{rows[4]['ink']:.4f} without the LoRA, {rows[5]['ink']:.4f} with it "
                       f"(`scripts/control_transfer.py`).\n")
        print(f"exported the student with the LoRA fused: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
