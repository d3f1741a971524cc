"""The headline table: every registered recipe on the digits teacher at the same budget.

A recipe takes part when `recipes/digits/<name>.yaml` exists (a new recipe joins by adding its config). For
each recipe and each step count k of `--steps` a student is trained FOR k steps (`student.num_steps=k`, so
multi-step recipes run their own k-step training; Phased DMD gets k phases) for `--budget` generator updates,
then scored at its trained step count. Samples are the EMA student's own k-step rollout (`recipe.generate`,
which the export tests show equals its exported pipeline called with `num_inference_steps=k`), 898 images, labels
0..9 in turn, fixed noise. Figures: FD-digits, classifier accuracy, precision and recall
(`distill.demo.digits_judge.FDDigits.report`), diversity (mean pairwise judge-feature distance between samples of
the same class, averaged over classes), training seconds, and a method's own figures (`recipe.diagnostics`). The real
train half gives the reference row.

Resumable: results live in `<out>/compare/results.json`, keyed by recipe, steps and budget; a measured entry is
not rerun. One progress line per student. Cells trained in parallel, each process with its own `--out`, join the
table with `--merge`: their entries and grids are copied in, and an entry that differs from one already held under
the same key is refused (naming both files) rather than overwritten. `--jobs N` does that in one command: N cells at
a time, each a child process of this script on one thread with its own `--out`, merged into the table as each ends
(the pair stores the pair-trained recipes share are made first, once, before any child starts). Each cell runs on
one thread either way, so a cell's figures do not depend on N.

    python scripts/compare_recipes.py --budget 400 --steps 1 2 4 --jobs 2 [--recipes dmd2 phased_dmd]
    OMP_NUM_THREADS=1 python scripts/compare_recipes.py --budget 400 --steps 1 2 4   # the same cells, one at a time
    python scripts/compare_recipes.py --report-only --budget 400 --merge /tmp/cells_a /tmp/cells_b   # then commit docs/
    python scripts/compare_recipes.py --budget 400 --steps 1 --seeds 0 1 2 --recipes dmd2 scm   # 3 training seeds

Training seeds (`--seeds`): each seed S is the cell run with `run.seed=S` (seed 0, every config's own, needs no
override), so seed S's entry is the one `--set run.seed=S` makes and merges with it. Entries that differ only in
`run.seed` form one row of the table: every figure as the mean over seeds with their sample standard deviation
(`mean ± sd`), and the FD-digits of each seed; a one-seed row has no spread and says so (`seeds` 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill.base.optional import exit_if_missing, require
from distill.base.paths import write_text_atomic

REPO = Path(__file__).resolve().parents[1]


def digits_configs() -> dict[str, Path]:
    """name -> config for every recipes/digits/<name>.yaml."""
    from distill.training.registry import recipe_configs

    return recipe_configs("digits")


def class_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean pairwise Euclidean distance between features of the same class."""
    per_class = []
    for c in labels.unique():
        f = features[labels == c].double()
        if len(f) < 2:
            continue
        d = torch.cdist(f, f)
        per_class.append(d.sum() / (len(f) * (len(f) - 1)))
    return float(torch.stack(per_class).mean())


def grid_name(name: str, steps: int, overrides: list[str]) -> str:
    """The grid's file name: recipe, step count and the --set overrides (so runs with other settings keep theirs)."""
    tag = "".join(f"_{o.split('=', 1)[0].split('.')[-1]}-{Path(o.split('=', 1)[1]).name}" for o in overrides)
    return f"{name}{tag}_{steps}step.png"


def cell_config(name: str, config: Path, steps: int, budget: int | None, workdir: Path, overrides: list[str]):
    """The run config of one cell: `config` at k = `steps`, trained for `budget` updates in its own run folder
    (one per seed and --set), with no export, checkpoint or sample grid."""
    from distill.training.preflight import load_config

    run_dir = workdir / grid_name(name, steps, overrides).removesuffix(".png")  # one per seed and --set
    extra = [f"run.output_dir={run_dir}", f"student.num_steps={steps}",
             "trainer.progress_bar=false", "export.at_end=false", "trainer.checkpoint_every=0",
             "trainer.sample_every=0", *overrides]
    if budget is not None:
        extra.append(f"run.max_steps={budget}")
    return load_config(config, extra)


def score_student(trainer, judge, seed: int, grid: Path | None = None) -> dict:
    """The table's figures of `trainer`'s EMA student as it stands: its own k-step rollout (`recipe.generate`) of
    898 fixed noises (`seed`), labels 0..9 in turn, scored by the judge; diversity; `recipe.diagnostics` where the
    recipe has it; 10 samples of each class drawn to `grid`. The rollout's re-noising draws (k > 1) come from a
    stream of `seed` too (`seeded_renoising`), so the figures are a function of the student and `seed` alone."""
    from distill.base.imaging import save_grid
    from distill.base.seeding import seeded_renoising

    cfg = trainer.cfg
    labels = torch.arange(judge.count) % 10
    shape = (1, cfg.data.resolution, cfg.data.resolution)  # digits images (a pair store may be the dataset)
    noise = torch.randn((judge.count, *shape), generator=torch.Generator().manual_seed(seed))
    images, device = [], trainer.accelerator.device
    with torch.no_grad(), trainer.ema_weights() as gen, seeded_renoising(seed, device):
        for chunk in range(0, judge.count, 256):
            cond = {"class_labels": labels[chunk: chunk + 256]}
            images.append(trainer.recipe.generate(gen, cond, noise[chunk: chunk + 256]).float().cpu())
    images = torch.cat(images).clamp(-1, 1)
    diagnostics = {}
    if callable(getattr(trainer.recipe, "diagnostics", None)):  # a method's own figure (a residual, ...)
        with torch.no_grad(), trainer.ema_weights() as gen, seeded_renoising(seed, device):
            cond = {"class_labels": labels[:256]}
            diagnostics = {k: float(v) for k, v in trainer.recipe.diagnostics(gen, cond, noise[:256]).items()}
    if grid is not None:  # 10 samples of each class, one class per column
        save_grid(images[:100], grid, nrow=10, scale=2)
    report = judge.report(images, labels)
    report["diversity"] = class_diversity(judge.features(images), labels)
    if diagnostics:
        report["diagnostics"] = diagnostics
    return report


def measure(name: str, config: Path, steps: int, budget: int | None, judge, seed: int, workdir: Path,
            overrides: list[str], grids: Path | None = None) -> dict:
    from distill.data.pairs import ensure_store
    from distill.training.trainer import Trainer

    cfg = cell_config(name, config, steps, budget, workdir, overrides)
    ensure_store(cfg)  # pair-trained recipes: their teacher ODE pair store, made once
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.train()
    seconds = time.perf_counter() - start
    report = score_student(trainer, judge, seed, None if grids is None else grids / grid_name(name, steps, overrides))
    report.update({"recipe": name, "steps": steps, "budget": cfg.run.max_steps, "train_seconds": seconds})
    return report


def merge_results(results: dict[str, dict], sources: list[Path], results_file: Path, grids: Path) -> int:
    """Copy into `results` (and `grids`) the entries and grids of other `--out` folders; returns how many were new.

    An entry already held under the same key must be identical: two different measurements of one cell are an error
    naming both files, never a silent overwrite.
    """
    import shutil

    added = 0
    for source in sources:
        file = source / "compare" / "results.json" if source.is_dir() else source
        if not file.is_file():
            raise SystemExit(f"--merge: no results file at {file}")
        try:
            theirs = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"--merge: {file} is not JSON ({e})") from None
        if not isinstance(theirs, dict):
            raise SystemExit(f"--merge: {file} holds a {type(theirs).__name__}, not a results object")
        for key, entry in theirs.items():
            if key in results and results[key] != entry:
                raise SystemExit(f"--merge: {key!r} differs between {file} and {results_file}; remove one of them")
            added += key not in results
            results[key] = entry
        for grid in sorted((file.parent / "grids").glob("*.png")):
            target = grids / grid.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(grid, target)
    return added


def y_range(values: list[float]) -> tuple[float, float]:
    """The plotted y range: every value, unless some lie far above the rest (past the upper outlier fence
    q3 + 3 (q3 - q1), and at least 0.5 x the spread above the largest value below it); those are drawn at the top
    edge with their value written, so one collapsed student does not flatten every other line."""
    ys = sorted(values)
    lo, hi = ys[0], ys[-1]
    if len(ys) >= 4:
        q1, q3 = ys[len(ys) // 4], ys[(3 * len(ys)) // 4]
        inside = [y for y in ys if y <= q3 + 3 * (q3 - q1)]
        top = inside[-1]
        if hi > top + 0.5 * (top - lo) + 1e-9:
            hi = top + 0.1 * max(top - lo, 1e-3)  # headroom for the off-scale markers
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def offscale_rows(series: dict[str, list[tuple[float, float]]], y_hi: float) -> dict[tuple[str, float], int]:
    """(name, x) -> the row of its value's label for every point above `y_hi`: the off-scale points at one x are
    labelled in a column, largest value first, so their labels do not overlap."""
    rows: dict[tuple[str, float], int] = {}
    for x in {x for pts in series.values() for x, _ in pts}:
        above = sorted(((y, name) for name, pts in series.items() for px_, y in pts if px_ == x and y > y_hi),
                       reverse=True)
        rows.update({(name, x): i for i, (_, name) in enumerate(above)})
    return rows


def legend_name(label: str) -> str:
    """'fdistill (recipe.divergence=forward_kl)' -> 'fdistill, divergence=forward_kl' (the key's last part)."""
    if " (" not in label or not label.endswith(")"):
        return label
    name, sets = label[:-1].split(" (", 1)
    return ", ".join([name] + [f"{o.split('=', 1)[0].split('.')[-1]}={o.split('=', 1)[1]}" if "=" in o else o
                              for o in sets.split()])


def line_chart(series: dict[str, list[tuple[float, float]]], path: Path, title: str, ylabel: str,
               reference: float | None = None, xlabel: str = "steps") -> Path:
    """A PNG line chart (matplotlib): one line per name, x = `xlabel`; `reference` is a grey dashed line (the floor);
    values far above the rest are marked at the top edge with their value (`y_range`), one label row per point at
    the same x (`offscale_rows`)."""
    matplotlib = require("matplotlib", "scripts/compare_recipes.py (its charts)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(series)
    ys = [y for pts in series.values() for _, y in pts] + ([reference] if reference is not None else [])
    y_lo, y_hi = y_range(ys or [0.0, 1.0])
    label_row = offscale_rows(series, y_hi)
    xs = sorted({x for pts in series.values() for x, _ in pts}) or [1]
    colours = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    if reference is not None:
        ax.axhline(reference, color="0.6", linestyle="--", linewidth=1)
        ax.annotate(f"real half B {reference:.3g}", (xs[0], reference), textcoords="offset points", xytext=(4, 4),
                    color="0.45", fontsize=8)
    for i, name in enumerate(names):
        colour = colours[i % len(colours)]
        pts = sorted(series[name])
        ax.plot([x for x, _ in pts], [min(y, y_hi) for _, y in pts], marker="o", markersize=4, linewidth=1.5,
                color=colour, label=legend_name(name))
        for x, y in pts:
            if y > y_hi:  # off-scale: a triangle at the top edge and the value, in a column per x
                ax.plot([x], [y_hi], marker="^", markersize=8, color=colour)
                ax.annotate(f"{y:.3g}", (x, y_hi), textcoords="offset points", color=colour, fontsize=8,
                            xytext=(7, -12 * (label_row[name, x] + 1)))
    ax.set_xticks(xs)
    ax.set_ylim(y_lo - 0.02 * (y_hi - y_lo), y_hi + 0.02 * (y_hi - y_lo))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({ylabel} against {xlabel})")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def teacher_pairs(config: Path) -> int:
    """How many teacher ODE pairs a recipe trains on (its `recipe.pairs.num_pairs`, made once before training and not
    in its train seconds); 0 for a recipe that queries the teacher during training instead."""
    import yaml

    pairs = (yaml.safe_load(config.read_text()).get("recipe") or {}).get("pairs")
    return int(pairs.get("num_pairs", 0)) if isinstance(pairs, dict) else 0


SEED_SET = "run.seed="


def split_seed(label: str) -> tuple[str, int | None]:
    """'dmd2 (run.seed=1)' -> ('dmd2', 1); 'x (recipe.k=v run.seed=2)' -> ('x (recipe.k=v)', 2); a label without
    run.seed is the config's own seed (None)."""
    if " (" not in label or not label.endswith(")"):
        return label, None
    name, sets = label[:-1].split(" (", 1)
    items = sets.split()
    seeds = [int(i[len(SEED_SET):]) for i in items if i.startswith(SEED_SET)]
    rest = [i for i in items if not i.startswith(SEED_SET)]
    return (f"{name} ({' '.join(rest)})" if rest else name), (seeds[-1] if seeds else None)


def key_sets(key: str) -> str:
    """The --set part of a results key, without its run.seed (the seeds of one cell share a row)."""
    sets = key.split("|set=", 1)[1] if "|set=" in key else ""
    return " ".join(i for i in sets.split() if not i.startswith(SEED_SET))


def seed_rows(results: dict[str, dict]) -> list[dict]:
    """The table's rows: entries that differ only in run.seed grouped, in (label, steps) order; each row holds its
    `runs` in seed order (the config's own seed, written 0, first)."""
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for r in results.values():
        base, seed = split_seed(r.get("label", r["recipe"]))
        groups.setdefault((base, r["steps"], r["budget"]), []).append((seed or 0, r))
    rows = []
    for (base, steps, budget), members in sorted(groups.items()):
        members.sort(key=lambda m: m[0])
        rows.append({"label": base, "recipe": members[0][1]["recipe"], "steps": steps, "budget": budget,
                     "seeds": [m[0] for m in members], "runs": [m[1] for m in members]})
    return rows


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value: no spread measured)."""
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), (float(t.std()) if len(values) > 1 else None)


def spread_cell(values: list[float], digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" if sd is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def diagnostics_cell(runs: list[dict]) -> str:
    """A method's own figures (`recipe.diagnostics`), each as its mean (and sd) over seeds; '-' for none."""
    keys = sorted({k for r in runs for k in r.get("diagnostics", {})})
    return ", ".join(f"{k} {spread_cell([r['diagnostics'][k] for r in runs if k in r.get('diagnostics', {})], 4)}"
                     for k in keys) or "-"


def write_outputs(results: dict[str, dict], reference: dict, out: Path, command: str,
                  pairs: dict[str, int] | None = None) -> None:
    pairs = pairs or {}
    rows = seed_rows(results)
    lines = ["# Recipes side by side on the digits teacher", "",
             "Each student is trained for its step count at the same budget of generator updates and scored on "
             "898 samples (its own k-step rollout, equal to its export) against digits half A with the FD-digits "
             "judge (`docs/fd_digits.md`; not Inception FID). Diversity: mean pairwise judge-feature distance within "
             "a class. The real train half B is the reference row (the floor). \"teacher pairs\": the teacher ODE "
             "solutions a pair-trained recipe learns from, made once (`distill pairs`) before training and not counted "
             "in its train seconds; the other recipes query the teacher during training. \"seeds\": training seeds "
             "(`run.seed`) of the row; with more than one, every figure is the mean over them ± their sample standard "
             "deviation and \"FD per seed\" lists each seed's FD-digits (the spread a difference must exceed to be "
             "told apart). \"other\": a method's own figure (`recipe.diagnostics`).", "",
             f"Command: `{command}`" + ("; a row labelled `NAME (KEY=VALUE)` is the same command with `--recipes NAME "
                                        "--set KEY=VALUE`" if any(r["label"] != r["recipe"] for r in rows) else "")
             + " (`--jobs N` measures N cells at a time, each on one thread as here: the same figures)", "",
             "| recipe | steps | updates | teacher pairs | seeds | train s | FD-digits | FD per seed | accuracy | "
             "precision | recall | diversity | other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| real half B (floor) | - | - | - | - | - | {reference['fd_digits']:.3f} | - | "
             f"{reference['accuracy']:.3f} | {reference['precision']:.3f} | {reference['recall']:.3f} | "
             f"{reference['diversity']:.3f} | - |"]
    for row in rows:
        runs = row["runs"]
        per_seed = ", ".join(f"{r['fd_digits']:.3f}" for r in runs) if len(runs) > 1 else "-"
        lines.append(f"| {row['label']} | {row['steps']} | {row['budget']} | {pairs.get(row['recipe']) or '-'} | "
                     f"{len(runs)} | {mean_sd([r['train_seconds'] for r in runs])[0]:.0f} | "
                     f"{spread_cell([r['fd_digits'] for r in runs])} | {per_seed} | "
                     + " | ".join(spread_cell([r[k] for r in runs]) for k in ("accuracy", "precision", "recall",
                                                                               "diversity"))
                     + f" | {diagnostics_cell(runs)} |")
    lines += ["", "![FD-digits against steps](compare/fd_digits.png) ![diversity against steps](compare/diversity.png)",
              ""]
    (out / "compare_recipes.md").write_text("\n".join(lines))
    for key, label in (("fd_digits", "FD-digits"), ("diversity", "diversity")):
        series: dict[str, list[tuple[float, float]]] = {}
        for row in rows:  # the mean over seeds
            series.setdefault(row["label"], []).append((row["steps"], mean_sd([r[key] for r in row["runs"]])[0]))
        line_chart(series, out / "compare" / f"{key}.png", "digits teacher", label, reference=reference[key])


def progress_line(r: dict) -> str:
    return (f"FD-digits {r['fd_digits']:.3f}, accuracy {r['accuracy']:.3f}, precision {r['precision']:.3f}, recall "
            f"{r['recall']:.3f}, diversity {r['diversity']:.3f}, {r['train_seconds']:.0f}s")


def cell_command(name: str, steps: int, args, out: Path, sets: list[str] | None = None) -> list[str]:
    """The child process that measures one cell: this script on that recipe and step count, into `out`, with the
    cell's overrides `sets` (default: --set's; a training seed adds run.seed)."""
    sets = list(args.set) if sets is None else sets
    command = [sys.executable, str(Path(__file__).resolve()), "--recipes", name, "--steps", str(steps),
               "--seed", str(args.seed), "--out", str(out)]
    command += ["--budget", str(args.budget)] if args.budget is not None else []
    return command + (["--set", *sets] if sets else [])


def cell_sets(config: Path, overrides: list[str], seed: int | None) -> list[str]:
    """The overrides of one cell: --set's, plus run.seed=S when training seed S is not the config's own."""
    import yaml

    own = int(((yaml.safe_load(config.read_text()) or {}).get("run") or {}).get("seed", 0))
    return list(overrides) + ([f"{SEED_SET}{seed}"] if seed is not None and seed != own else [])


def run_in_parallel(cells: list[tuple[int, str, int, list[str]]], total: int, jobs: int, args, configs: dict[str, Path],
                    results: dict[str, dict], results_file: Path, tmp: Path) -> int:
    """Measure `cells` ((index, name, steps, overrides), none measured yet) `jobs` at a time, each in a child process
    of this script (one thread, its own --out under `tmp`); each child's entry and grid join `results` as it ends.
    Returns how many cells failed (each said with its log's last lines; the others go on)."""
    from distill.base.errors import ConfigError
    from distill.data.pairs import ensure_store
    from distill.training.preflight import load_config

    for name in dict.fromkeys(name for _, name, _, _ in cells):  # shared pair stores: made here once, not raced for
        try:
            ensure_store(load_config(configs[name], list(args.set)))
        except ConfigError:
            pass  # the child says it, as a cell that was not run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running, failed = list(cells), [], 0
    while pending or running:
        while pending and len(running) < jobs:
            i, name, k, sets = pending.pop(0)
            out = tmp / f"cell{i}"
            out.mkdir()
            log = open(out / "log.txt", "w")
            running.append((i, name, k, out, log, subprocess.Popen(cell_command(name, k, args, out, sets), stdout=log,
                                                                    stderr=subprocess.STDOUT,
                                                                    env=env, cwd=Path.cwd())))
            print(f"[{i + 1}/{total}] {name} {k}-step: started (log {out / 'log.txt'})", flush=True)
        time.sleep(0.2)
        for cell in [c for c in running if c[5].poll() is not None]:
            running.remove(cell)
            i, name, k, out, log, child = cell
            log.close()
            text = (out / "log.txt").read_text()
            theirs = out / "compare" / "results.json"
            if child.returncode != 0:
                failed += 1
                tail = "\n    ".join(text.strip().splitlines()[-5:])
                print(f"[{i + 1}/{total}] {name} {k}-step: FAILED (exit {child.returncode}), last lines of its log:"
                      f"\n    {tail}", flush=True)
            elif not theirs.is_file():  # the child said why (e.g. a one-step-only recipe asked for 2 steps)
                said = [line for line in text.splitlines() if "not run" in line]
                print(f"[{i + 1}/{total}] {name} {k}-step: " + (said[-1].split(": ", 1)[1] if said else "no result"),
                      flush=True)
            else:
                merge_results(results, [out], results_file, results_file.parent / "grids")
                write_text_atomic(results_file, json.dumps(results, indent=2) + "\n")  # after every student: resumable
                (r,) = json.loads(theirs.read_text()).values()
                print(f"[{i + 1}/{total}] {name} {k}-step: {progress_line(r)}", flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=None, help="generator updates per student (default: each config's)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="student step counts, each trained")
    ap.add_argument("--recipes", nargs="*", default=None, help="names (default: every recipes/digits/*.yaml)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: write the table and plots from what results.json holds (every --set, each "
                         "its own row), e.g. after merging the results of runs made in parallel")
    ap.add_argument("--merge", nargs="+", type=Path, default=[], metavar="OUT",
                    help="first copy in the results and grids of other --out folders (or results.json files), e.g. "
                         "cells trained in parallel; an entry that differs from one held under the same key is refused")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for every run (e.g. teacher.path=... for a test teacher)")
    ap.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="cells measured at a time, each a child process on one thread (default 1: in this process)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                    help="training seeds, each cell trained once per seed (run.seed=S); the table gives their mean "
                         "and spread (default: the configs' own seed)")
    args = ap.parse_args(argv)
    exit_if_missing("matplotlib", "scripts/compare_recipes.py (its charts)")  # before hours of measuring
    if args.jobs < 1:
        raise SystemExit(f"--jobs: expected a count of 1 or more, got {args.jobs}")
    torch.set_num_threads(1)
    from distill.base.errors import ConfigError
    from distill.demo.digits_judge import FDDigits
    from distill.training.registry import recipe_configs

    try:
        configs = recipe_configs("digits", args.recipes)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    names = list(configs)
    results_file = args.out / "compare" / "results.json"
    results: dict[str, dict] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if args.merge:
        added = merge_results(results, args.merge, results_file, args.out / "compare" / "grids")
        results_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(results_file, json.dumps(results, indent=2) + "\n")
        print(f"merged {added} new entries from {len(args.merge)} folder(s)", flush=True)
    judge = FDDigits(resolution=16)
    from distill.data.digits import digits_split

    held_out, held_labels = digits_split("train", 16)  # the real train half B (judge.held_out) with its labels
    reference = judge.report(held_out, held_labels)
    reference["diversity"] = class_diversity(judge.features(held_out), held_labels)
    seeds = [None] if args.seeds is None else args.seeds
    todo = [] if args.report_only else [(n, k, s) for n in names for k in args.steps for s in seeds]
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        cells = []
        for i, (name, k, seed) in enumerate(todo):
            sets = cell_sets(configs[name], args.set, seed)
            key = f"{name}|steps={k}|budget={args.budget}|set={' '.join(sets)}"
            if key in results:
                r = results[key]
                print(f"[{i + 1}/{len(todo)}] {name} {k}-step: measured before (FD-digits {r['fd_digits']:.3f}), "
                      "skipped", flush=True)
            else:
                cells.append((i, name, k, sets, key))
        if args.jobs > 1 and len(cells) > 1:
            results_file.parent.mkdir(parents=True, exist_ok=True)
            failed = run_in_parallel([(i, name, k, sets) for i, name, k, sets, _ in cells], len(todo), args.jobs,
                                     args, configs, results, results_file, Path(tmp))
            cells = []
        for i, name, k, sets, key in cells:
            try:
                r = measure(name, configs[name], k, args.budget, judge, args.seed, Path(tmp), sets,
                            args.out / "compare" / "grids")
            except ConfigError as e:  # e.g. a one-step-only recipe asked for 2 steps: said, not measured
                print(f"[{i + 1}/{len(todo)}] {name} {k}-step: not run ({e})", flush=True)
                continue
            r["label"] = name + (f" ({' '.join(sets)})" if sets else "")
            results[key] = r
            results_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(results_file, json.dumps(results, indent=2) + "\n")  # after every student: resumable
            print(f"[{i + 1}/{len(todo)}] {name} {k}-step: {progress_line(r)}", flush=True)
    this_set = " ".join(i for i in args.set if not i.startswith(SEED_SET))
    selected = {k: v for k, v in results.items()  # every seed held of the cells asked for
                if v["recipe"] in names and v["steps"] in args.steps and (args.report_only or key_sets(k) == this_set)
                and (args.budget is None or v["budget"] == args.budget)}
    command = ("OMP_NUM_THREADS=1 python scripts/compare_recipes.py"
               + (f" --budget {args.budget}" if args.budget else "") + " --steps " + " ".join(map(str, args.steps))
               + (" --recipes " + " ".join(args.recipes) if args.recipes else "")
               + (" --seeds " + " ".join(map(str, args.seeds)) if args.seeds else "")
               + (" --set " + " ".join(args.set) if args.set and not args.report_only else "")
               + (f" --out {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}"
                  if args.out != REPO / "docs" else ""))
    write_outputs(selected, reference, args.out, command, {n: teacher_pairs(c) for n, c in configs.items()})
    print(f"wrote {args.out / 'compare_recipes.md'}")
    if failed:
        print(f"{failed} cell(s) failed (said above); rerun the same command to measure them, the rest is kept")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
