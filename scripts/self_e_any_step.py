"""Any-step FD-digits of one Self-E model (recipes/self_e.py): the same trained model sampled at 1, 2, 4 and 50 steps,
beside the shipped digits teacher's figures (docs/teacher.md, w = 1). Prints a markdown table.

One Self-E digits model is trained (`recipes/digits/self_e.yaml`, `--budget` updates, its CPU wall time printed) or
loaded from a finished run (`--run`, its last checkpoint). Each step count k is scored exactly as
`scripts/compare_recipes.py` scores a cell (`score_student`: the EMA model's own k-step rollout of the same 898 fixed
noises, seed `--seed`, labels 0..9 in turn, FD-digits judge): "pipeline" rows are the exported
ConsistencyModelPipeline's sampler at k (the clean edge D(x, s_i, t0), then re-noising), which `distill export`
writes; with `--diagonal`, also k deterministic DDIM steps of the model's own flow-matched denoiser D(x, s, s) on a
uniform flow-time grid (the flow-matching half alone, not the export).

    OMP_NUM_THREADS=1 python scripts/self_e_any_step.py [--budget 400] [--steps 1 2 4 50] [--diagonal]
        [--out runs/self_e_any_step | --run runs/self_e_digits] [--set recipe.self_eval_weight=0 ...]

A step count the exported scheduler cannot take (CMStochasticIterativeScheduler has `num_train_timesteps` = 40
levels, so 50 pipeline steps do not exist) gets a row saying why; its diagonal row is still scored. Rows print as
they are scored; with `--out` the trained run keeps its last checkpoint, so `--run <out>/self_e` scores it again
without training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # compare_recipes: one scorer for the table and this script
#: the shipped teacher, DPM-Solver++(2M) at w = 1, 898 samples (docs/teacher.md); floor 1.466
TEACHER_FD = {1: 11.447, 2: 5.323, 4: 2.658, 8: 1.530, 20: 1.464, 50: 1.468}
FLOOR = 1.466


def trained(config: Path, budget: int | None, extra: list[str], workdir: Path, run: Path | None, keep: bool = False):
    """(trainer holding the trained model, training wall seconds, updates run): trained now (in `workdir`/self_e,
    with a checkpoint at the last update if `keep`), or loaded from `run`."""
    from distill.training.preflight import load_config
    from distill.training.trainer import Trainer

    if run is not None:
        from distill.training.checkpoints import latest_checkpoint

        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise SystemExit(f"--run: no checkpoint in {run} (train it with trainer.checkpoint_every > 0)")
        trainer = Trainer(load_config(run / "config.yaml", [f"run.output_dir={run}", *extra]))
        trainer.load_checkpoint(ckpt)
        return trainer, None, trainer.step
    overrides = [f"run.output_dir={workdir / 'self_e'}", "trainer.progress_bar=false", "export.at_end=false",
                 f"trainer.checkpoint_every={10**9 if keep else 0}", "trainer.sample_every=0", *extra]
    if budget is not None:
        overrides.append(f"run.max_steps={budget}")
    trainer = Trainer(load_config(config, overrides))
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start, trainer.step


class DiagonalDDIM:
    """A stand-in for the recipe's generate: k DDIM steps of the model's diagonal D(x, s, s), flow times evenly
    spaced from s_max to t0, from the pipeline's start s_max z; returns the clean end, clipped like the pipeline."""

    def __init__(self, recipe, k: int):
        self.recipe, self.k = recipe, k

    @torch.no_grad()
    def __call__(self, generator, cond, noise):
        from distill.recipes.flow_map import jump_grid, map_from_x0, two_time_x0

        recipe, t0 = self.recipe, self.recipe.t0
        times = jump_grid(recipe.process, self.k).tolist()
        x = noise * times[0]
        for s, t in zip(times[:-1], times[1:]):
            s_, t_ = (torch.full((x.shape[0],), v, device=x.device) for v in (s, t))
            x = map_from_x0(x, two_time_x0(generator, recipe.process, x, s_, s_, cond), s_, t_, t0)
        return (x / (1 - t0)).clamp(-1, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "recipes" / "digits" / "self_e.yaml")
    ap.add_argument("--budget", type=int, default=None, help="generator updates (default: the config's)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 50])
    ap.add_argument("--seed", type=int, default=0, help="the scoring noise (compare_recipes' --seed)")
    ap.add_argument("--diagonal", action="store_true", help="also the diagonal's deterministic DDIM at each k")
    ap.add_argument("--run", type=Path, default=None, help="a finished run folder to load instead of training")
    ap.add_argument("--out", type=Path, default=None, help="train in <out>/self_e and keep its last checkpoint")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import compare_recipes as compare

    from distill.demo.digits_judge import FDDigits
    from distill.models.schedules import student_schedule

    if args.run is not None and args.out is not None:
        raise SystemExit("--run loads a finished run and --out trains a new one: give one of them")
    judge = FDDigits(resolution=16)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) if args.out is None else args.out
        trainer, seconds, updates = trained(args.config, args.budget, args.set, workdir, args.run,
                                            keep=args.out is not None)
        recipe = trainer.recipe
        rows = []

        def scored(name: str, k: int, report: dict | str) -> None:
            rows.append((name, k, report))
            figure = report if isinstance(report, str) else f"FD-digits {report['fd_digits']:.3f}"
            print(f"{name}: {figure}", flush=True)

        for k in args.steps:
            try:
                recipe.schedule = student_schedule(recipe.generator.student, k)  # the exported pipeline at k steps
            except ValueError as err:  # more steps than the exported scheduler has levels
                scored(f"pipeline, {k}", k, f"not possible: {err}")
            else:
                scored(f"pipeline, {k}", k, compare.score_student(trainer, judge, args.seed))
            if args.diagonal:
                own = recipe.generate
                recipe.generate = DiagonalDDIM(recipe, k)
                try:
                    scored(f"diagonal DDIM, {k}", k, compare.score_student(trainer, judge, args.seed))
                finally:
                    recipe.generate = own
    cfg = trainer.cfg
    budget = ("loaded from " + str(args.run)) if seconds is None else (
        f"{updates} updates in {seconds:.0f} s wall on one CPU thread (batch {cfg.data.batch_size}, "
        f"{cfg.trainer.critic_steps} critic update(s) each)")
    print(f"Self-E digits model: {args.config.name} {' '.join(args.set)}; training: {budget}; scored with "
          f"compare_recipes' judge and noise (898 samples, seed {args.seed}); floor {FLOOR}\n")
    print("| sampler, steps | FD-digits | x floor | precision | recall | accuracy | teacher FD-digits (w = 1) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, k, r in rows:
        teacher = TEACHER_FD.get(k)
        if isinstance(r, str):
            print(f"| {name} | {r} | | | | | {'-' if teacher is None else f'{teacher:.3f}'} |")
            continue
        print(f"| {name} | {r['fd_digits']:.3f} | {r['fd_digits'] / FLOOR:.2f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['accuracy']:.3f} | {'-' if teacher is None else f'{teacher:.3f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
