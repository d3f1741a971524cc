"""FD-digits against training iterations for DisBack and DMD2 on the digits teacher, on one plot.

Each recipe's `recipes/digits/<name>.yaml` is trained for `--budget` trainer iterations (run.max_steps) and its EMA
student is scored every `--every` iterations, and at 0 and at the end, with the table's own scorer
(`scripts/compare_recipes.py: score_student`: the student's k-step rollout of 898 fixed noises, labels 0..9 in
turn, judged by `distill.demo.digits_judge.FDDigits`). The x axis counts trainer iterations, the degradation
phase of DisBack included (its first `recipe.degradation_steps` iterations train the fake score only: the same
budget gives DisBack that many fewer generator updates); dotted lines mark where DisBack's degradation ends and
where its target becomes the teacher. Writes <out>/disback_convergence.json and <out>/disback_convergence.png.

    OMP_NUM_THREADS=1 python scripts/disback_convergence.py --budget 400 --every 40 --out docs/disback
    python scripts/disback_convergence.py --budget 4 --every 2 --out /tmp/smoke --set data.batch_size=8 \
        recipe.degradation_steps=2 recipe.path_nodes=2 recipe.backtrack_steps=1   # a smoke run (recipe.* keys
        # reach the recipes that have them)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # compare_recipes: one scorer for the table and this script


def recipe_sets(config: Path, sets: list[str]) -> list[str]:
    """The overrides of `sets` that apply to `config`: every non-recipe key, and the `recipe.*` keys its recipe has
    (`recipe.degradation_steps=20` reaches DisBack and leaves DMD2 alone)."""
    import yaml

    from distill.training.registry import recipe_module

    fields = recipe_module(yaml.safe_load(config.read_text())["recipe"]["name"]).Config.model_fields
    return [o for o in sets if not o.startswith("recipe.") or o.split("=", 1)[0].split(".")[1] in fields]


def curve(name: str, steps: int, budget: int, every: int, judge, seed: int, workdir: Path, sets: list[str]) -> dict:
    """Train recipes/digits/<name>.yaml at k = `steps` for `budget` iterations (configured as a cell of
    scripts/compare_recipes.py, `cell_config`), scoring its EMA student at 0, every `every`
    iterations and at the end. Returns {"points": [{"step", "fd_digits", ...}], "phases": {...}, "seconds"}."""
    import compare_recipes as compare

    from distill.training.registry import recipe_configs
    from distill.training.trainer import Trainer
    config = recipe_configs("digits", [name])[name]
    cfg = compare.cell_config(name, config, steps, budget, workdir, recipe_sets(config, sets))  # a table cell's
    trainer = Trainer(cfg)
    points, start, train_seconds = [], time.perf_counter(), 0.0
    while True:
        if trainer.step % every == 0 or trainer.step == budget:
            report = compare.score_student(trainer, judge, seed)
            points.append({"step": trainer.step, **{k: report[k] for k in ("fd_digits", "accuracy", "recall")}})
            print(f"{name} step {trainer.step}: FD-digits {report['fd_digits']:.3f}, accuracy "
                  f"{report['accuracy']:.3f}, recall {report['recall']:.3f}", flush=True)
        if trainer.step >= budget:
            break
        t0 = time.perf_counter()
        trainer.train_step()
        train_seconds += time.perf_counter() - t0
    phases = {}
    rc = cfg.recipe
    if hasattr(rc, "degradation_steps") and rc.degradation_steps > 0:
        phases = {"degradation_end": rc.degradation_steps,
                  "teacher_from": rc.degradation_steps + (rc.path_nodes - 1) * rc.backtrack_steps}
    return {"points": points, "phases": phases, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - start}


def plot(curves: dict[str, dict], floor: float, path: Path, title: str) -> Path:
    """One line per recipe (FD-digits against iterations), the real-data floor dashed, DisBack's phases dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    colours = plt.get_cmap("tab10").colors
    for i, (name, c) in enumerate(sorted(curves.items())):
        xs = [p["step"] for p in c["points"]]
        ys = [p["fd_digits"] for p in c["points"]]
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, color=colours[i % 10], label=name)
        for key, label in (("degradation_end", "degradation ends"), ("teacher_from", "target = teacher")):
            if key in c["phases"]:
                ax.axvline(c["phases"][key], color=colours[i % 10], linestyle=":", linewidth=1)
                ax.annotate(f"{name}: {label}", (c["phases"][key], 1.0), xycoords=("data", "axes fraction"),
                            textcoords="offset points", xytext=(3, -12), fontsize=7, color=colours[i % 10])
    ax.axhline(floor, color="0.6", linestyle="--", linewidth=1)
    ax.annotate(f"real half B {floor:.3g}", (0, floor), textcoords="offset points", xytext=(4, 4), fontsize=8,
                color="0.45")
    ax.set_yscale("log")
    ax.set_xlabel("trainer iterations (DisBack's degradation iterations included)")
    ax.set_ylabel("FD-digits (EMA student)")
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=400, help="trainer iterations per recipe (run.max_steps)")
    ap.add_argument("--steps", type=int, default=1, help="the students' step count k (student.num_steps)")
    ap.add_argument("--every", type=int, default=40, help="score the EMA student every N iterations")
    ap.add_argument("--recipes", nargs="+", default=["disback", "dmd2"], help="recipes/digits/<name>.yaml to run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the scored noises")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "disback", help="folder of the JSON and the PNG")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides; a recipe.* key only for the recipes that have it")
    args = ap.parse_args(argv)
    if args.budget < 1 or args.every < 1:
        raise SystemExit(f"--budget and --every: expected counts >= 1, got {args.budget} and {args.every}")
    from distill.base.optional import exit_if_missing

    exit_if_missing("matplotlib", "scripts/disback_convergence.py (its plot)")
    torch.set_num_threads(1)
    from distill.demo.digits_judge import FDDigits

    judge = FDDigits(resolution=16)
    floor = judge.floor()
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            curves[name] = curve(name, args.steps, args.budget, args.every, judge, args.seed, Path(tmp), args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"steps": args.steps, "budget": args.budget, "every": args.every, "seed": args.seed, "set": args.set,
              "floor": floor, "curves": curves}
    (args.out / "disback_convergence.json").write_text(json.dumps(result, indent=2) + "\n")
    png = plot(curves, floor, args.out / "disback_convergence.png",
               f"digits teacher, {args.budget} iterations, {args.steps}-step students")
    print(f"wrote {args.out / 'disback_convergence.json'} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
