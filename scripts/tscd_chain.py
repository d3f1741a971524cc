"""Hyper-SD's chain of TSCD stages on the digits teacher (distill/recipes/tscd.py): 8, 4, 2 and 1 segments
(recipes/digits/tscd_stages/stage_<k>.yaml), each trained for `--budget` updates and exported, each stage's student
starting from the previous stage's exported EMA student (`recipe.init_from`); the teacher stays the original.
Stage k writes <out>/stage_<k>/ (its pipeline: <out>/stage_<k>/pipeline, sampled with num_inference_steps=k).

    OMP_NUM_THREADS=1 python scripts/tscd_chain.py --budget 100 --out runs/tscd_chain [--stages 8 4 2 1]
        [--set key=value ...]

`--set` overrides apply to every stage, after the chain's own run.output_dir, run.max_steps, export.at_end and
recipe.init_from=null, before the previous stage's recipe.init_from (so the first stage may start from another
run with --set recipe.init_from=FOLDER).
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "recipes" / "digits" / "tscd_stages"


def stage_config(k: int) -> Path:
    path = STAGES / f"stage_{k}.yaml"
    if not path.is_file():
        raise SystemExit(f"--stages: no {path.relative_to(REPO)}; available: "
                         f"{sorted(int(p.stem.split('_')[1]) for p in STAGES.glob('stage_*.yaml'))}")
    return path


def run_chain(stages: list[int], budget: int, out: Path, overrides: list[str]) -> list[Path]:
    """Train the stages in order, each from the previous one's export; the exported pipeline folders."""
    from distill.training.preflight import load_config
    from distill.training.trainer import Trainer

    if any(a <= b for a, b in zip(stages, stages[1:])):
        raise SystemExit(f"--stages must be strictly decreasing segment counts, got {stages}")
    folders: list[Path] = []
    for k in stages:
        chain = [f"run.output_dir={out / f'stage_{k}'}", f"run.max_steps={budget}", "export.at_end=true",
                 "recipe.init_from=null"]  # the first stage starts from the teacher, whichever stage it is
        previous = [f"recipe.init_from={folders[-1]}"] if folders else []
        cfg = load_config(stage_config(k), chain + overrides + previous)
        folders.append(Trainer(cfg).train())
        start = cfg.recipe.init_from or "the teacher"
        print(f"stage {k}: {budget} updates from {start} -> {folders[-1]} (num_inference_steps={k})", flush=True)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, required=True, help="generator updates per stage")
    parser.add_argument("--out", type=Path, default=Path("runs/tscd_chain"), help="one run folder per stage in it")
    parser.add_argument("--stages", type=int, nargs="+", default=[8, 4, 2, 1], help="segment counts, in order")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every stage")
    args = parser.parse_args(argv)
    if args.budget < 1:
        raise SystemExit(f"--budget must be >= 1, got {args.budget}")
    run_chain(args.stages, args.budget, args.out, args.set)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
