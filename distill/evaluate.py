"""`distill eval`: every evaluation of finished runs and of teachers, one subcommand per question.

    distill eval digits RUN_DIR [--pipeline DIR] [--teacher-steps 20] [--teacher-guidance W]
    distill eval text RUN_DIR [--pipeline DIR] [--teacher-steps 20] [--teacher-guidance W]
    distill eval runs RUN_DIR [RUN_DIR ...] [--teacher-steps 50 (0: none)] [--grids DIR]
    distill eval steps RUN_DIR [RUN_DIR ...] [--steps 2]
    distill eval reflow [--flow NAME=DIR ...] [--student NAME=DIR ...] [--teacher-steps 50] [--out FILE]
    distill eval teacher [--teacher builtin:digits_teacher] [--steps 1 2 4 8 20 50] [--guidance 1 1.5 2]
        [--markdown FILE] [--plot FILE]
    distill eval text-teacher [--teacher builtin:text_teacher] [--steps 5 10 20] [--guidance 1 2 3 5]

The subcommands share their arguments (`--seed`, `--threads`, a run folder's, a teacher curve's), so a flag means
the same everywhere. Students are read from their exported folders with plain diffusers, so every figure is that of
the artifact a user gets. FD-digits and FD-shapes are Frechet distances in the features of the shipped judges, not
Inception FID (docs/fd_digits.md, docs/text_to_image.md); the Inception FID, CLIP score and speed of large
text-to-image students are scripts/eval_fid.py, eval_clip.py and bench_speed.py.
"""
# This module sits at the top of the package beside `distill.cli` (which registers it with `add_eval_parser`): it
# reads the judges and comparisons of the bundled teachers (`distill.demo`) and the shared metrics (`distill.evaluation`).

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from distill.base.errors import ConfigError
from distill.base.optional import require
from distill.base.paths import resolve_path
from distill.config import Config
from distill.demo.digits import DEFAULT_TEACHER_STEPS
from distill.demo.evaluate_text import DEFAULT_TEXT_TEACHER_STEPS
from distill.training.preflight import load_config

#: the seed of every evaluation: the one the demo and docs' tables use
SEED = 1234
#: who needs matplotlib, in the message of a missing one
PLOT_NEEDED_BY = "distill eval teacher --plot"


# --- arguments that several subcommands share ------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser, threads: int) -> None:
    """--seed and --threads. `threads` is the default: 1 where the table's seconds were measured single-threaded,
    0 (torch's default) where only the scores matter."""
    p.add_argument("--seed", type=int, default=SEED, help=f"noise and label seed (default {SEED})")
    p.add_argument("--threads", type=int, default=threads,
                   help=f"torch CPU threads (0 = torch's default; default {threads})")


def _add_teacher(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--teacher", default=default, help=f"teacher folder (default {default})")


def _add_teacher_steps(p: argparse.ArgumentParser, default: int, note: str = "") -> None:
    p.add_argument("--teacher-steps", type=int, default=default,
                   help=f"teacher sampling steps (default {default}{note})")


def _add_run(p: argparse.ArgumentParser, teacher_steps: int) -> None:
    """A finished run folder compared with its teacher: `distill eval digits` and `distill eval text`."""
    p.add_argument("run_dir", help="a run folder (its config.yaml; the student from <run_dir>/pipeline)")
    p.add_argument("--pipeline", default=None, help="exported folder (default: <run_dir>/pipeline)")
    _add_teacher_steps(p, teacher_steps)
    p.add_argument("--teacher-guidance", type=float, default=None, help="override the run's teacher.guidance_scale")


def _add_curve(p: argparse.ArgumentParser, teacher: str, steps: list[int], guidance: list[float]) -> None:
    """A teacher measured on a grid of sampling steps and guidance scales."""
    _add_teacher(p, teacher)
    p.add_argument("--steps", type=int, nargs="+", default=steps, help="sampling steps, one row each")
    p.add_argument("--guidance", type=float, nargs="+", default=guidance, help="guidance scales, one row each")


def _named(text: str) -> tuple[str, str]:
    name, _, path = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _load_run(run: Path, guidance: float | None = None) -> Config:
    """The run's own config, pointed at the folder it now lives in (runs are moved and copied)."""
    overrides = [f"run.output_dir={run}"]
    if guidance is not None:
        overrides.append(f"teacher.guidance_scale={guidance}")
    return load_config(run / "config.yaml", overrides)


# --- the subcommands -----------------------------------------------------------------------------------------

def _compare_run(args: argparse.Namespace, compare) -> int:
    """`compare` (the digits or the text teacher-versus-student table) on the run folder and exported pipeline
    that `args` name, at the run's own config with `--teacher-guidance` applied."""
    run = Path(args.run_dir)
    cfg = _load_run(run, args.teacher_guidance)
    print(compare(cfg, Path(args.pipeline) if args.pipeline else run / "pipeline", run,
                  teacher_steps=args.teacher_steps, seed=args.seed))
    return 0


def cmd_digits(args: argparse.Namespace) -> int:
    """FD-digits and accuracy of a finished digits run's teacher and exported student; writes
    <run>/teacher_vs_student.png and <run>/metrics.json and prints the table (as `distill demo` does after training)."""
    from distill.demo.digits import compare_teacher_student

    return _compare_run(args, compare_teacher_student)


def cmd_text(args: argparse.Namespace) -> int:
    """Agreement and FD-shapes of a finished text-to-image shapes run's teacher and exported student; writes
    <run>/teacher_vs_student.png and <run>/metrics.json and prints the table (as `distill demo --task text` does)."""
    from distill.demo.evaluate_text import compare_text_teacher_student

    return _compare_run(args, compare_text_teacher_student)


def cmd_runs(args: argparse.Namespace) -> int:
    """FD-digits of several finished digits runs in one pass, each distinct teacher guidance scale evaluated once.

    Every run's exported pipeline is sampled at the run's own `student.num_steps`, with the labels and seed of
    `distill eval digits`; writes <run>/fd_digits.json per run, with `--grids` one 4x10 grid per run and per teacher,
    and prints a markdown table."""
    from distill.base.imaging import save_grid
    from distill.demo.digits import student_images, teacher_images
    from distill.demo.digits_judge import FDDigits

    runs = [Path(r) for r in args.runs]
    cfgs = {r: _load_run(r) for r in runs}
    resolution = {c.data.resolution for c in cfgs.values()}
    if len(resolution) != 1:
        raise ConfigError(f"runs differ in data.resolution {sorted(resolution)}: evaluate them separately")
    judge = FDDigits(resolution=resolution.pop())
    labels = torch.arange(judge.count) % 10
    grids = Path(args.grids) if args.grids else None

    floor_p, floor_r = judge.floor_precision_recall()
    rows = [("real half B (the floor)", "-", "-",
             {"fd_digits": judge.floor(), "precision": floor_p, "recall": floor_r})]
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
    print(f"FD-digits (classifier features; not Inception FID), {judge.count} samples vs 899 real (half A), "
          f"seed {args.seed}")
    print("| run | steps | recipe | FD-digits | x floor | precision | recall | accuracy |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, steps, recipe, r in rows:
        fmt = lambda k: f"{r[k]:.3f}" if k in r else ""  # noqa: E731
        print(f"| {name} | {steps} | {recipe} | {r['fd_digits']:.3f} | {r['fd_digits'] / floor:.2f} | "
              f"{fmt('precision')} | {fmt('recall')} | {fmt('accuracy')} |")
    return 0


def cmd_steps(args: argparse.Namespace) -> int:
    """FD-digits of exported 16x16 digits students sampled by their own pipeline at another step count (consistency
    students are any-step): reads <run>/pipeline, writes <run>/student_<k>step.png, prints a line per run."""
    from distill.base.imaging import save_grid
    from distill.demo.digits import student_images
    from distill.demo.digits_judge import FDDigits

    judge = FDDigits(resolution=16)
    labels = torch.arange(judge.count) % 10
    for run in args.runs:
        imgs = student_images(f"{run}/pipeline", labels, args.seed, num_steps=args.steps)
        p, r = judge.precision_recall(imgs)
        print(f"{run} {args.steps} steps: FD-digits {judge(imgs):.3f} "
              f"accuracy {judge.accuracy(imgs, labels).accuracy:.3f} precision {p:.3f} recall {r:.3f}")
        save_grid(imgs[:40], f"{run}/student_{args.steps}step.png", nrow=10)
    return 0


def _unet_parameters(folder: Path) -> int:
    """The parameter count of an exported UNet, read from its safetensors header (no weights loaded)."""
    from safetensors import safe_open

    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return sum(int(torch.tensor(f.get_slice(k).get_shape()).prod()) for k in f.keys())


def cmd_reflow(args: argparse.Namespace) -> int:
    """Straightness of flows and FD-digits of one-step students on the 16x16 digits protocol, in one table.

    Straightness: the mean squared deviation of a flow's 20-step Euler paths from their chords (recipes/reflow.py),
    over 256 noises with labels 0..9, and the squared error of its one Euler step against its 20-step endpoint. A
    folder in teacher format (the teacher, or a reflowed flow) is read as an EDM-preconditioned network. Students
    are exported folders, sampled with plain diffusers at their default (one) step; the teacher row is
    DPM-Solver++(2M)."""
    from distill.demo.digits import student_images
    from distill.demo.digits_judge import FDDigits
    from distill.models.denoiser import load_denoiser
    from distill.models.sampling import sample
    from distill.recipes.reflow import flow_straightness, sample_flow

    rows: dict[str, dict] = {}
    g = torch.Generator().manual_seed(args.seed)
    noise, labels = torch.randn(256, 1, 16, 16, generator=g), torch.arange(256) % 10
    for name, path in args.flow:
        flow = load_denoiser(resolve_path(path), prediction="edm")
        cond = {"class_labels": labels}
        with torch.no_grad():
            s = flow_straightness(flow, cond, noise, 20)
            one, fine = sample_flow(flow, cond, noise, 1), sample_flow(flow, cond, noise, 20)
        rows[f"flow {name}"] = {"straightness": s, "one_step_mse_vs_20": float((one - fine).pow(2).mean()),
                                "parameters": sum(p.numel() for p in flow.model.parameters())}
        print(name, rows[f"flow {name}"], flush=True)

    judge = FDDigits(resolution=16)
    labels = torch.arange(judge.count) % 10
    teacher = load_denoiser(resolve_path(args.teacher), prediction="edm")
    t0 = time.perf_counter()
    noise = torch.randn((len(labels), 1, 16, 16), generator=torch.Generator().manual_seed(args.seed))
    images = sample(teacher, {"class_labels": labels}, noise, num_steps=args.teacher_steps)
    rows["floor (real half B)"] = {"fd_digits": judge.floor()}
    rows[f"teacher ({args.teacher_steps} steps, w=1)"] = {**judge.report(images, labels),
                                                          "seconds": time.perf_counter() - t0}
    for name, path in args.student:
        t0 = time.perf_counter()
        images = student_images(path, labels, args.seed)
        folder = resolve_path(path)
        unet = json.loads((folder / "unet" / "config.json").read_text())
        rows[f"student {name} (1 step)"] = {**judge.report(images, labels), "seconds": time.perf_counter() - t0,
                                            "parameters": _unet_parameters(folder),
                                            "block_out_channels": unet["block_out_channels"]}
    for name, r in rows.items():
        print(f"{name:40s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _teacher_markdown(rows: list[dict], floor: float, floor_pr: tuple[float, float]) -> str:
    lines = [f"Floor (real half B vs half A, 898 images): FD-digits {floor:.3f}, precision {floor_pr[0]:.3f}, "
             f"recall {floor_pr[1]:.3f}.", "",
             "| steps | w | FD-digits | x floor | precision | recall | accuracy | seconds |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['steps']} | {r['guidance']:g} | {r['fd_digits']:.3f} | {r['fd_digits'] / floor:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['accuracy']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _teacher_plot(rows: list[dict], floor: float, path: Path) -> None:
    matplotlib = require("matplotlib", PLOT_NEEDED_BY)
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


def cmd_teacher(args: argparse.Namespace) -> int:
    """A digits teacher's curve: FD-digits, precision, recall, accuracy and seconds against sampling steps and
    guidance (DPM-Solver++(2M), the same seed and labels for every cell), one printed line per cell as it is
    measured; `--markdown` writes the table, `--plot` a PNG (docs/teacher.md)."""
    from distill.demo.digits_judge import FDDigits
    from distill.models.denoiser import load_denoiser
    from distill.models.sampling import sample

    if args.plot:  # a missing matplotlib stops the command before any cell is measured
        require("matplotlib", PLOT_NEEDED_BY)
    teacher = load_denoiser(resolve_path(args.teacher), prediction=args.prediction)
    judge = FDDigits()
    floor, floor_pr = judge.floor(), judge.floor_precision_recall()
    print(f"FD-digits floor (real half B vs half A, {judge.count}): {floor:.3f}; precision {floor_pr[0]:.3f}, "
          f"recall {floor_pr[1]:.3f}")
    print(f"{'steps':>5s} {'w':>5s} {'FD-digits':>10s} {'precision':>9s} {'recall':>7s} {'accuracy':>9s} "
          f"{'seconds':>8s}")
    labels = torch.arange(judge.count) % 10
    noise = torch.randn((judge.count, 1, judge.resolution, judge.resolution),
                        generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for w in args.guidance:
        for k in args.steps:
            t0 = time.perf_counter()
            x = sample(teacher, {"class_labels": labels}, noise, num_steps=k, guidance_scale=w)
            seconds = time.perf_counter() - t0
            row = {"steps": k, "guidance": w, **judge.report(x, labels), "seconds": seconds}
            rows.append(row)
            print(f"{k:5d} {w:5.2f} {row['fd_digits']:10.3f} {row['precision']:9.3f} {row['recall']:7.3f} "
                  f"{row['accuracy']:9.3f} {seconds:8.1f}", flush=True)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(_teacher_markdown(rows, floor, floor_pr))
    if args.plot:
        _teacher_plot(rows, floor, args.plot)
    return 0


def cmd_text_teacher(args: argparse.Namespace) -> int:
    """A text teacher's curve: agreement and FD-shapes against sampling steps and guidance, from its own stock
    pipeline and sampler (the VP `text_teacher`: StableDiffusionPipeline, DPM-Solver++(2M); the `flow_text_teacher`:
    StableDiffusion3Pipeline, flow-matching Euler) on the judge's 960 protocol captions (20 per caption), scored by
    the shapes judge; prints a markdown table (docs/text_to_image.md)."""
    from distill.demo.evaluate_text import pipeline_images
    from distill.demo.shapes_judge import ShapesJudge

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
    return 0


def _run(args: argparse.Namespace) -> int:
    """Every subcommand: set the thread count, then evaluate."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return args.evaluate(args)


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Register `eval` and its subcommands on `distill`'s subparsers."""
    ev = sub.add_parser("eval", help="evaluate finished runs and teachers (digits, text, runs, steps, reflow, "
                                     "teacher, text-teacher)", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ev.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")

    def add(name: str, fn, summary: str, threads: int) -> argparse.ArgumentParser:
        p = what.add_parser(name, help=summary, description=fn.__doc__)
        _add_common(p, threads)
        p.set_defaults(fn=_run, evaluate=fn)
        return p

    p = add("digits", cmd_digits, "a digits run's teacher and exported student: FD-digits, accuracy, grid", 0)
    _add_run(p, DEFAULT_TEACHER_STEPS)
    p = add("text", cmd_text, "a text-to-image shapes run's teacher and exported student: agreement, FD-shapes, "
                              "grid", 0)
    _add_run(p, DEFAULT_TEXT_TEACHER_STEPS)
    p = add("runs", cmd_runs, "FD-digits of several digits runs in one markdown table", 1)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with config.yaml and pipeline/)")
    _add_teacher_steps(p, 50, "; 0: no teacher rows")
    p.add_argument("--grids", default=None, help="write a 4x10 sample grid per run and per teacher into this folder")
    p = add("steps", cmd_steps, "FD-digits of exported digits students at another step count", 1)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with pipeline/)")
    p.add_argument("--steps", type=int, default=2, help="the students' sampling steps (default 2)")
    p = add("reflow", cmd_reflow, "straightness of flows and FD-digits of one-step students", 1)
    p.add_argument("--flow", type=_named, action="append", default=[], metavar="NAME=DIR",
                   help="a flow in teacher format (the teacher, a reflowed flow); repeatable")
    p.add_argument("--student", type=_named, action="append", default=[], metavar="NAME=DIR",
                   help="an exported one-step pipeline folder; repeatable")
    _add_teacher(p, "builtin:digits_teacher")
    _add_teacher_steps(p, 50)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p = add("teacher", cmd_teacher, "a digits teacher's curve over sampling steps and guidance", 0)
    _add_curve(p, "builtin:digits_teacher", [1, 2, 4, 8, 20, 50], [1.0])
    p.add_argument("--prediction", default="edm", help="the teacher's parametrization (default edm)")
    p.add_argument("--markdown", type=Path, default=None, help="write the table to this file")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG plot to this file (needs matplotlib: "
                                                           "pip install -e \".[plot]\")")
    p = add("text-teacher", cmd_text_teacher, "a text teacher's curve over sampling steps and guidance", 1)
    _add_curve(p, "builtin:text_teacher", [5, 10, 20], [1.0, 2.0, 3.0, 5.0])
