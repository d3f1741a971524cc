"""Speed of a distilled student against its teacher, both loaded with plain diffusers, in one run.

    python scripts/bench_speed.py TEACHER_PIPELINE STUDENT_PIPELINE --prompts prompts.txt \\
        --student-steps 1 2 4 --batch-size 1 --device cuda --dtype fp16

The teacher runs at its default steps with its default classifier-free guidance (or --teacher-steps /
--teacher-guidance), the student at each of --student-steps with guidance off (the guidance_scale in its
distill.json call, else 1.0, which turns classifier-free guidance off in the SD1.5, SDXL and SD3 pipelines; a
guidance-distilled Flux takes its embedded guidance from distill.json or --student-guidance), with the other
arguments of its distill.json call (PixArt: use_resolution_binning=False). A distill export is refused at more
steps than it was trained for; fewer are allowed (an LCMScheduler export then visits a subset of its trained times).
Each setting is called
--warmup times untimed and --repeats times timed on the same batch of prompts (the first --batch-size of the file);
the figure is the median call. Printed per row: steps, whether CFG ran, NFE (network evaluations per image:
steps x 2 with CFG), seconds per call, milliseconds per image, images per second, and the speed-up over the
teacher measured in the same run (teacher seconds per image / row seconds per image). The text encoders and VAE
decode are inside every call, as a user sees them.

Absolute times mean something only on the device and dtype you will serve on (a GPU, with the batch you will use);
on a CPU, or with the tiny test pipelines, only the ratios are indicative.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from distill.evaluation.t2i_eval import (
    BadInput,
    CallSettings,
    add_device_args,
    call_settings,
    exported_extra,
    exported_guidance,
    format_table,
    load_pipeline,
    read_prompts,
    run_script,
    script_parser,
    student_meta,
    torch_dtype,
    trained_steps,
    write_json,
)


def timed_calls(pipe, prompts: list[str], settings: CallSettings, warmup: int, repeats: int, seed: int,
                device: str) -> tuple[list[float], dict]:
    """Seconds of each of `repeats` timed calls (after `warmup` untimed ones), and what the pipeline reported
    running (steps, CFG) after its last call."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    seconds = []
    for i in range(warmup + repeats):
        generators = [torch.Generator("cpu").manual_seed(seed + j) for j in range(len(prompts))]
        sync()
        t0 = time.perf_counter()
        pipe(prompts, generator=generators, output_type="np", **settings.kwargs())
        sync()
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
    steps = getattr(pipe, "num_timesteps", None) or settings.steps
    cfg = getattr(pipe, "do_classifier_free_guidance", None)
    if cfg is None:  # pipelines without the property: CFG runs above a guidance scale of 1
        cfg = settings.guidance_scale is not None and settings.guidance_scale > 1
    return seconds, {"steps": int(steps), "cfg": bool(cfg)}


def speed_rows(measured: list[dict], batch_size: int) -> list[dict]:
    """Rows from measurements {name, seconds: [per call], steps, cfg, guidance}; the first is the teacher, the
    reference of every ratio."""
    rows = []
    for m in measured:
        call = statistics.median(m["seconds"])
        rows.append({"name": m["name"], "steps": m["steps"], "guidance": m["guidance"],
                     "cfg": "yes" if m["cfg"] else "no", "nfe": m["steps"] * (2 if m["cfg"] else 1),
                     "seconds_per_call": call, "ms_per_image": 1000 * call / batch_size,
                     "images_per_second": batch_size / call, "repeats": len(m["seconds"])})
    teacher = rows[0]
    for r in rows:
        r["speedup"] = teacher["ms_per_image"] / r["ms_per_image"]
        r["throughput_ratio"] = r["images_per_second"] / teacher["images_per_second"]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = script_parser(__doc__)
    ap.add_argument("teacher", help="the teacher's diffusers pipeline folder")
    ap.add_argument("student", help="the distilled student's pipeline folder (a distill export)")
    ap.add_argument("--prompts", required=True, metavar="FILE", help="one prompt a line (the first --batch-size used)")
    ap.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--teacher-steps", type=int, help="default: the teacher pipeline's default")
    ap.add_argument("--teacher-guidance", type=float, help="default: the teacher pipeline's default (CFG on)")
    ap.add_argument("--student-guidance", type=float, help="default: distill.json's call, else 1.0 (off)")
    ap.add_argument("--image-size", type=int, metavar="PX", help="both pipelines (default: the student's distill.json resolution)")
    ap.add_argument("--batch-size", type=int, default=1, help="images per call (default 1: latency)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per setting (default 2)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per setting; the median counts (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    add_device_args(ap)
    return run_script(run, ap.parse_args(argv))


def run(args) -> int:
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1),
                               ("--warmup", args.warmup, 0), ("--student-steps", min(args.student_steps), 1)):
        if value < least:
            raise BadInput(f"{flag}: must be at least {least}, got {value}")
    trained = trained_steps(args.student)
    if trained is not None and max(args.student_steps) > trained:
        raise BadInput(f"--student-steps: {max(args.student_steps)} steps asked, but {args.student} was trained for "
                       f"{trained} step{'s' if trained > 1 else ''} (num_inference_steps in its distill.json); its "
                       f"scheduler has no trained time for more. Ask for 1 to {trained}")
    prompts = read_prompts(args.prompts)
    batch = [prompts[i % len(prompts)] for i in range(args.batch_size)]
    dtype = torch_dtype(args.dtype, args.device)
    size = args.image_size or student_meta(args.student).get("resolution") or None

    measured = []
    teacher = load_pipeline(args.teacher, args.device, dtype)
    settings = call_settings(teacher, args.teacher, args.teacher_steps, args.teacher_guidance, size)
    seconds, ran = timed_calls(teacher, batch, settings, args.warmup, args.repeats, args.seed, args.device)
    measured.append({"name": "teacher", "seconds": seconds, "guidance": settings.guidance_scale, **ran})
    del teacher
    if str(args.device).startswith("cuda"):
        torch.cuda.empty_cache()

    student = load_pipeline(args.student, args.device, dtype)
    guidance = args.student_guidance
    if guidance is None:
        guidance = 1.0 if exported_guidance(args.student) is None else exported_guidance(args.student)
    for k in args.student_steps:
        settings = CallSettings(k, guidance, size, "student", exported_extra(args.student))
        seconds, ran = timed_calls(student, batch, settings, args.warmup, args.repeats, args.seed, args.device)
        measured.append({"name": f"student {k} step{'s' if k > 1 else ''}", "seconds": seconds, "guidance": guidance,
                         **ran})

    rows = speed_rows(measured, args.batch_size)
    device = torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else "cpu"
    header = {"teacher": args.teacher, "student": args.student, "device": device,
              "dtype": str(dtype).replace("torch.", ""), "batch": args.batch_size,
              "size": f"{size}x{size}" if size else "pipeline default",
              "timing": f"median of {args.repeats} calls after {args.warmup} warm-up calls"}
    for key, value in header.items():
        print(f"{key + ':':<9}{value}")
    print(format_table(rows, [("steps", "steps", "d"), ("guidance", "guidance", "g"), ("cfg", "CFG", "s"),
                              ("nfe", "NFE", "d"), ("seconds_per_call", "s/call", ".4f"),
                              ("ms_per_image", "ms/image", ".2f"), ("images_per_second", "images/s", ".2f"),
                              ("speedup", "speed-up", ".2f")]))
    print("speed-up: teacher ms/image over the row's, same run. Absolute times mean something only on the device "
          "and dtype you serve on; on a CPU only the ratios are indicative.")
    write_json(args.json, {**header, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
