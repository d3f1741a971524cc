"""Hyper-SD's chain of TSCD stages on the digits teacher (distill/recipes/tscd.py): 8, 4, 2 and 1 segments
(recipes/digits/tscd_stages/stage_<k>.yaml), each trained for `--budget` updates and exported; every stage after
the first starts from the previous stage's EMA student (its generator, the trainer's EMA target network and its
exported EMA all loaded with it before `train()`); the teacher stays the original. Optionally a last one-step
DMD2 stage (Hyper-SD sec. 3.3, recipes/digits/dmd2.yaml) starts the same way from the 1-segment student.
Stage k writes <out>/stage_<k>/ (its pipeline <out>/stage_<k>/pipeline, sampled with num_inference_steps=k).
With `--score`, each stage's EMA student is scored at its own k exactly as a headline-table cell is
(`scripts/compare_recipes.py: score_student`, the same 898 fixed noises of seed `--seed`), printed and written to
<out>/chain_scores.json, so a chained stage reads beside the table's directly trained `tscd` cell at that k.

    OMP_NUM_THREADS=1 python scripts/tscd_chain.py --budget 100 --out runs/tscd_chain [--stages 8 4 2 1]
        [--dmd2-budget 100] [--score] [--set key=value ...]

`--set` overrides apply to every stage (`recipe.*` ones to the TSCD stages only); the chain's own
run.output_dir, run.max_steps, export.at_end (and student.num_steps=1 for DMD2) win over them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # compare_recipes: one scorer for the table and this script
STAGES = REPO / "recipes" / "digits" / "tscd_stages"
DMD2 = REPO / "recipes" / "digits" / "dmd2.yaml"


def stage_config(k: int) -> Path:
    path = STAGES / f"stage_{k}.yaml"
    if not path.is_file():
        raise SystemExit(f"--stages: no {path.relative_to(REPO)}; available: "
                         f"{sorted(int(p.stem.split('_')[1]) for p in STAGES.glob('stage_*.yaml'))}")
    return path


def ema_student(trainer) -> dict[str, torch.Tensor]:
    """The EMA weights of `trainer`'s generator (what its export holds), copied."""
    with trainer.ema_weights() as gen:
        return {k: v.detach().clone() for k, v in gen.state_dict().items()}


@torch.no_grad()
def initialise_student(trainer, state: dict[str, torch.Tensor]) -> None:
    """Start a constructed, untrained `trainer` from `state`: its generator, its EMA target network (if any) and
    its EMA average all take the weights (before `train()`; a resumed checkpoint still wins)."""
    gen = trainer.recipe.generator
    try:
        gen.load_state_dict(state)
    except RuntimeError as err:
        raise SystemExit(f"the previous stage's student does not fit this stage's generator "
                         f"({type(gen).__name__}): {str(err).splitlines()[0]}") from None
    if trainer.target_network is not None:
        trainer.target_network.load_state_dict(state)
    for shadow, p in zip(trainer.ema.shadow_params, gen.parameters()):
        shadow.copy_(p)


def run_stage(config: Path, overrides: list[str], start: dict[str, torch.Tensor] | None):
    """Build one stage's trainer, start it from `start` (None: the teacher), train and export; the trainer."""
    from distill.training.preflight import load_config
    from distill.training.trainer import Trainer

    trainer = Trainer(load_config(config, overrides))
    if start is not None:
        initialise_student(trainer, start)
    trainer.train()
    return trainer


def run_chain(stages: list[int], budget: int, out: Path, overrides: list[str] = (),
              dmd2_budget: int = 0, on_stage: Callable[[str, object], None] | None = None) -> list[Path]:
    """Train the stages in order, each from the previous one's EMA student; the exported pipeline folders.
    `on_stage(name, trainer)` is called after each stage has trained (name "stage_<k>" or "dmd2")."""
    if not stages or any(a <= b for a, b in zip(stages, stages[1:])):
        raise SystemExit(f"--stages must be strictly decreasing segment counts, got {stages}")
    if dmd2_budget and stages[-1] != 1:
        raise SystemExit(f"--dmd2-budget: the DMD2 stage starts from a one-segment student; --stages ends with "
                         f"{stages[-1]}")
    general = [o for o in overrides if not o.startswith("recipe.")]
    folders, state = [], None
    for k in stages:
        run_dir = out / f"stage_{k}"
        chain = [f"run.output_dir={run_dir}", f"run.max_steps={budget}", "export.at_end=true"]
        trainer = run_stage(stage_config(k), list(overrides) + chain, state)
        state = ema_student(trainer)
        if on_stage is not None:
            on_stage(f"stage_{k}", trainer)
        folders.append(run_dir / "pipeline")
        print(f"stage {k}: {budget} updates from {'the previous stage' if len(folders) > 1 else 'the teacher'} "
              f"-> {folders[-1]} (num_inference_steps={k})", flush=True)
    if dmd2_budget:
        run_dir = out / "dmd2"
        chain = [f"run.output_dir={run_dir}", f"run.max_steps={dmd2_budget}", "export.at_end=true",
                 "student.num_steps=1"]
        trainer = run_stage(DMD2, general + chain, state)
        if on_stage is not None:
            on_stage("dmd2", trainer)
        folders.append(run_dir / "pipeline")
        print(f"dmd2: {dmd2_budget} updates from the 1-segment student -> {folders[-1]}", flush=True)
    return folders


def table_scorer(out: Path, seed: int) -> Callable[[str, object], None]:
    """An `on_stage` that scores each stage's EMA student as a headline-table cell and keeps the figures in
    <out>/chain_scores.json (rewritten atomically after each stage)."""
    import compare_recipes as compare

    from distill.base.paths import write_text_atomic
    from distill.demo.digits_judge import FDDigits
    judge, scores, file = FDDigits(resolution=16), {}, out / "chain_scores.json"

    def score(name: str, trainer) -> None:
        report = compare.score_student(trainer, judge, seed)
        report.update({"steps": trainer.cfg.student.num_steps, "budget": trainer.cfg.run.max_steps})
        scores[name] = report
        file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(file, json.dumps(scores, indent=2) + "\n")
        print(f"{name} at {report['steps']} steps: FD-digits {report['fd_digits']:.3f}, precision "
              f"{report['precision']:.3f}, recall {report['recall']:.3f}, diversity {report['diversity']:.3f}",
              flush=True)

    return score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, required=True, help="generator updates per TSCD stage")
    parser.add_argument("--out", type=Path, default=Path("runs/tscd_chain"), help="one run folder per stage in it")
    parser.add_argument("--stages", type=int, nargs="+", default=[8, 4, 2, 1], help="segment counts, in order")
    parser.add_argument("--dmd2-budget", type=int, default=0, help="updates of a last one-step DMD2 stage; 0: none")
    parser.add_argument("--score", action="store_true", help="score each stage as a headline-table cell")
    parser.add_argument("--seed", type=int, default=0, help="the scored noises' seed (compare_recipes --seed)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every stage")
    args = parser.parse_args(argv)
    if args.budget < 1 or args.dmd2_budget < 0:
        raise SystemExit(f"--budget must be >= 1 and --dmd2-budget >= 0, got {args.budget}, {args.dmd2_budget}")
    on_stage = table_scorer(args.out, args.seed) if args.score else None
    run_chain(args.stages, args.budget, args.out, args.set, args.dmd2_budget, on_stage)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
