"""Any-step sampling of one toy flow map (recipes/flow_map.py): deterministic jumps X_{s_i, s_{i+1}} on grids of 1,
2, 4 and 8 jumps, beside the exported pipeline's sampler (X_{s_i, t0} and fresh noise) at the same step counts, all
from one trained model, scored with `distill.demo.toy_metrics.toy_report`. Prints a markdown table.

    OMP_NUM_THREADS=1 python scripts/flow_map_any_step.py [--config recipes/toy/flow_map.yaml] [--budget 1000]
        [--jumps 1 2 4 8] [--set recipe.objective=esd ...] [--run runs/flow_map_toy]

With `--run` pointing at a finished run (its `config.yaml` and last checkpoint), the model is loaded, not trained.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [("modes_covered", "modes", "{:.0f}/8"), ("on_mode", "on-mode", "{:.3f}"),
           ("mode_weight_kl", "mode-weight KL", "{:.3f}"), ("precision", "precision", "{:.3f}"),
           ("recall", "recall", "{:.3f}"), ("nll", "NLL (nats)", "{:.3f}")]


def trained(config: Path, budget: int | None, extra: list[str], workdir: Path, run: Path | None):
    """A Trainer holding the trained toy flow map: trained now, or loaded from the last checkpoint of `run`."""
    from distill.training.preflight import load_config
    from distill.training.trainer import Trainer

    if run is not None:
        from distill.training.checkpoints import latest_checkpoint

        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise SystemExit(f"--run: no checkpoint in {run} (train it with trainer.checkpoint_every > 0)")
        trainer = Trainer(load_config(run / "config.yaml", [f"run.output_dir={run}", *extra]))
        trainer.load_checkpoint(ckpt)
        return trainer, 0.0
    overrides = [f"run.output_dir={workdir / 'flow_map'}", "trainer.progress_bar=false", "export.at_end=false",
                 "trainer.checkpoint_every=0", "trainer.sample_every=0", *extra]
    if budget is not None:
        overrides.append(f"run.max_steps={budget}")
    trainer = Trainer(load_config(config, overrides))
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "recipes" / "toy" / "flow_map.yaml")
    ap.add_argument("--budget", type=int, default=None, help="generator updates (default: the config's)")
    ap.add_argument("--jumps", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", type=Path, default=None, help="a finished run folder to load instead of training")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from distill.base.seeding import seeded_renoising
    from distill.data.toy import toy_mixture
    from distill.demo.toy_metrics import toy_report
    from distill.models.schedules import rollout, student_schedule
    from distill.recipes.flow_map import jump_grid, sample_flow_map

    with tempfile.TemporaryDirectory() as tmp:
        trainer, seconds = trained(args.config, args.budget, args.set, Path(tmp), args.run)
        recipe, mixture = trainer.recipe, toy_mixture(torch.float64)
        noise = torch.randn(args.samples, 2, generator=torch.Generator().manual_seed(args.seed))
        cond = trainer.dataset.grid_condition(args.samples)
        rows = []
        with torch.no_grad(), trainer.ema_weights() as gen:
            for k in args.jumps:
                points = sample_flow_map(gen, cond, noise, jump_grid(recipe.process, k))
                rows.append((f"flow-map jumps X_(s_i, s_i+1), {k}", toy_report(mixture, points.double(), args.seed)))
                schedule = student_schedule(gen.student, k)
                with seeded_renoising(args.seed):  # the pipeline's re-noising: not the starting noise again
                    points = rollout(gen, schedule, cond, noise)
                rows.append((f"pipeline sampler (X_(s_i, t0), re-noise), {k}", toy_report(mixture, points.double(),
                                                                                          args.seed)))
    cfg = trainer.cfg
    print(f"Toy flow map: {cfg.recipe.mode}, {cfg.recipe.objective}, gradient {cfg.recipe.gradient}, "
          f"{cfg.run.max_steps} updates ({seconds:.0f} s); {args.samples} samples, seed {args.seed}; jumps evenly "
          "spaced in flow time (deterministic); the pipeline's steps at its own sigmas\n")
    print("| sampler, steps | " + " | ".join(c[1] for c in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, r in rows:
        print(f"| {name} | " + " | ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
