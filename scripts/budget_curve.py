"""FD-digits against generator updates, and the budget at which a recipe matches the best other recipe.

One training run per recipe (its `recipes/digits/<name>.yaml` at k = `--steps`, trained to the largest of
`--budgets`), its EMA student scored at each budget exactly as `scripts/compare_recipes.py` scores a cell: the same
898 fixed noises, judge, diversity and diagnostics. The trainer's learning rates are constant after warm-up and its
RNG is drawn per update from (run.seed, update), so the student at update B of a longer run is the student of a
B-update run; the run checks it where the headline table holds that cell (`docs/compare/results.json`, same
budget, seed and --set) and prints both figures. (Phased DMD's phase switches read run.max_steps: for it, B below the
largest budget is partway through a longer run, not a B-update run.)

The bar: the best row of the headline table at the same k and `--table-budget` among the recipes not curved here
(only rows without a --set other than run.seed; a row's figure is the mean over its seeds). A recipe matches it at
the first budget whose FD-digits is at most the bar's mean plus its seed sd (its own value where it has one seed).

    OMP_NUM_THREADS=1 python scripts/budget_curve.py --recipes sign --steps 1 --budgets 200 400 800 --out runs/curve
    # writes <out>/budget_curve.json and <out>/fd_vs_updates.png; resumable per (recipe, steps, seed, --set)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from distill.base.paths import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # compare_recipes: one scorer for the table and this script

import compare_recipes as compare  # noqa: E402


def bar(results: dict[str, dict], steps: int, budget: int, exclude: set[str]) -> dict | None:
    """The best table row at `steps` and `budget` among recipes not in `exclude` and without a --set other than the
    seed: {"label", "mean", "sd", "seeds"} (sd 0.0 for one seed), or None when the table has no such row."""
    best = None
    for row in compare.seed_rows(results):
        own_config = row["label"] == row["recipe"]  # no --set but the seed
        if row["steps"] != steps or row["budget"] != budget or row["recipe"] in exclude or not own_config:
            continue
        mean, sd = compare.mean_sd([r["fd_digits"] for r in row["runs"]])
        if best is None or mean < best["mean"]:
            best = {"label": row["label"], "mean": mean, "sd": sd or 0.0, "seeds": row["seeds"]}
    return best


def first_match(curve: list[dict], target: dict | None) -> int | None:
    """The first budget of `curve` (ascending) whose FD-digits is within the bar: <= mean + sd."""
    if target is None:
        return None
    limit = target["mean"] + target["sd"]
    return next((p["budget"] for p in curve if p["fd_digits"] <= limit), None)


def table_entry(results: dict[str, dict], name: str, steps: int, budget: int, sets: list[str]) -> dict | None:
    return results.get(f"{name}|steps={steps}|budget={budget}|set={' '.join(sets)}")


def run_curve(name: str, config: Path, steps: int, budgets: list[int], judge, seed: int, workdir: Path,
              sets: list[str]) -> list[dict]:
    """Train once to max(budgets), scoring the EMA student at each budget; one point per budget."""
    from distill.data.pairs import ensure_store
    from distill.training.trainer import Trainer

    cfg = compare.cell_config(name, config, steps, max(budgets), workdir, sets)
    ensure_store(cfg)
    trainer = Trainer(cfg)
    curve, start = [], time.perf_counter()
    for budget in sorted(budgets):
        while trainer.step < budget:
            trainer.train_step()
        seconds = time.perf_counter() - start
        point = compare.score_student(trainer, judge, seed)
        point.update({"budget": budget, "train_seconds": seconds})
        curve.append(point)
        print(f"{name} {steps}-step at {budget} updates: FD-digits {point['fd_digits']:.3f}, "
              f"recall {point['recall']:.3f}, {seconds:.0f}s", flush=True)
    return curve


def plot(curves: dict[str, list[dict]], target: dict | None, path: Path, steps: int) -> None:
    series = {name: [(p["budget"], p["fd_digits"]) for p in curve] for name, curve in curves.items()}
    if target is not None:
        xs = sorted({p["budget"] for c in curves.values() for p in c})
        series[f"bar: {target['label']} (mean)"] = [(x, target["mean"]) for x in (xs[0], xs[-1])]
    compare.line_chart(series, path, f"{steps}-step students", "FD-digits", xlabel="generator updates")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", required=True, help="names of recipes/digits/<name>.yaml")
    ap.add_argument("--steps", type=int, default=1, help="student steps k")
    ap.add_argument("--budgets", type=int, nargs="+", default=[200, 400, 800], help="updates at which to score")
    ap.add_argument("--table-budget", type=int, default=400, help="the headline table's budget (the bar's rows)")
    ap.add_argument("--seed", type=int, default=0, help="sampling-noise seed, as compare_recipes --seed")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    ap.add_argument("--table", type=Path, default=REPO / "docs" / "compare" / "results.json",
                    help="the headline table's results.json (the bar, and the cells the curve must reproduce)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if any(b <= 0 for b in args.budgets):
        raise SystemExit(f"--budgets: every budget must be positive, got {args.budgets}")

    configs = compare.digits_configs()
    unknown = [n for n in args.recipes if n not in configs]
    if unknown:
        raise SystemExit(f"--recipes: no recipes/digits/<name>.yaml for {unknown}; available: {sorted(configs)}")
    from distill.demo.digits_judge import FDDigits

    table = json.loads(args.table.read_text())
    target = bar(table, args.steps, args.table_budget, set(args.recipes))
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "budget_curve.json"
    held = json.loads(results_file.read_text()) if results_file.is_file() else {}
    judge = FDDigits(resolution=16)
    curves = {}
    for name in args.recipes:
        key = f"{name}|steps={args.steps}|seed={args.seed}|set={' '.join(args.set)}"
        if key in held and {p["budget"] for p in held[key]["curve"]} >= set(args.budgets):
            curves[name] = [p for p in held[key]["curve"] if p["budget"] in args.budgets]
            print(f"{name}: measured before, skipped")
            continue
        curves[name] = run_curve(name, configs[name], args.steps, args.budgets, judge, args.seed,
                                 args.out / "runs", args.set)
        held[key] = {"curve": curves[name]}
        write_text_atomic(results_file, json.dumps(held, indent=2) + "\n")
    for name, curve in curves.items():
        cell = table_entry(table, name, args.steps, args.table_budget, args.set)
        at_table = next((p for p in curve if p["budget"] == args.table_budget), None)
        if cell is not None and at_table is not None:
            print(f"{name}: at {args.table_budget} updates {at_table['fd_digits']:.4f}, the table's cell "
                  f"{cell['fd_digits']:.4f} (the same run up to that update)")
        match = first_match(curve, target)
        where = f"matches at {match} updates" if match else f"does not match within {max(args.budgets)} updates"
        bar_text = "no bar (the table has no other row)" if target is None else (
            f"bar {target['label']} {target['mean']:.3f} + sd {target['sd']:.3f} over seeds {target['seeds']}")
        print(f"{name} ({args.steps} step): {where}; {bar_text}")
        held[f"{name}|steps={args.steps}|seed={args.seed}|set={' '.join(args.set)}"].update(
            {"bar": target, "matches_at": match})
    write_text_atomic(results_file, json.dumps(held, indent=2) + "\n")
    plot(curves, target, args.out / "fd_vs_updates.png", args.steps)
    print(f"wrote {results_file} and {args.out / 'fd_vs_updates.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
