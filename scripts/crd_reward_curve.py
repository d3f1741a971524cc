"""Reward, FD-digits and recall over a CRD run (recipes/crd.py), so reward hacking is visible: the reward rises
while FD-digits and recall (the judge's, `distill.demo.digits_judge.FDDigits`) get worse.

Trains `recipes/digits/crd.yaml` (or `--config`) update by update with the public `Trainer.train_step`, and every
`--every` updates (and at 0 and the end) samples 898 images from the EMA student's own k-step rollout
(`recipe.generate`, labels 0..9 in turn, fixed noise) and scores them: FD-digits, precision, recall, classifier
accuracy, and the mean of the recipe's reward on the same images. Writes `<out>/crd_curve.json` and
`<out>/crd_curve.png`. Nothing is exported and no checkpoint is written.

    OMP_NUM_THREADS=1 python scripts/crd_reward_curve.py --budget 400 --every 50 --out docs/crd
    python scripts/crd_reward_curve.py --budget 400 --every 50 --set recipe.reward=ink --out /tmp/crd_ink
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from distill.base.optional import exit_if_missing, require
from distill.base.seeding import seeded_renoising

FIGURES = ("reward", "fd_digits", "recall", "precision", "accuracy")


def evaluate(trainer, judge, seed: int) -> dict[str, float]:
    """The judge's report and the recipe's mean reward on `judge.count` EMA-student samples."""
    recipe, cfg = trainer.recipe, trainer.cfg
    labels = torch.arange(judge.count) % 10
    shape = (1, cfg.data.resolution, cfg.data.resolution)
    noise = torch.randn((judge.count, *shape), generator=torch.Generator().manual_seed(seed))
    device = next(recipe.generator.parameters()).device
    images, rewards = [], []
    with torch.no_grad(), trainer.ema_weights() as gen, seeded_renoising(seed, device):  # the re-noising too
        for i in range(0, judge.count, 256):
            cond = {"class_labels": labels[i: i + 256].to(device)}
            x = recipe.generate(gen, cond, noise[i: i + 256].to(device)).clamp(-1, 1)
            rewards.append(recipe.reward(x, cond).float().cpu())
            images.append(x.float().cpu())
    report = judge.report(torch.cat(images), labels)
    report["reward"] = float(torch.cat(rewards).mean())
    return report


def plot(rows: list[dict], floor: dict[str, float], path: Path, title: str) -> Path:
    """Three panels over updates: reward, FD-digits (floor dashed), recall (floor dashed)."""
    matplotlib = require("matplotlib", "scripts/crd_reward_curve.py (its plot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, label in zip(axes, ("reward", "fd_digits", "recall"), ("mean reward", "FD-digits", "recall")):
        ax.plot(steps, [r[key] for r in rows], marker="o")
        if key in floor:
            ax.axhline(floor[key], color="grey", linestyle="--", label="real vs real (floor)")
            ax.legend(fontsize=8)
        ax.set_xlabel("generator updates")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="digits/crd.yaml", help="a crd config (default recipes/digits/crd.yaml)")
    parser.add_argument("--budget", type=int, default=None, help="generator updates (default: run.max_steps)")
    parser.add_argument("--every", type=int, default=50, help="evaluate every N updates (and at 0 and the end)")
    parser.add_argument("--out", type=Path, default=Path("runs/crd_curve"), help="folder of the JSON and PNG")
    parser.add_argument("--seed", type=int, default=1234, help="the evaluation noise's seed")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    exit_if_missing("matplotlib", "scripts/crd_reward_curve.py (its plot)")
    if args.every < 1:
        parser.error("--every must be >= 1")

    from distill.demo.digits_judge import FDDigits
    from distill.training.preflight import load_config
    from distill.training.trainer import Trainer

    overrides = [f"run.output_dir={args.out / 'run'}", "trainer.progress_bar=false", "export.at_end=false",
                 "trainer.checkpoint_every=0", "trainer.sample_every=0", *args.set]
    if args.budget is not None:
        overrides.append(f"run.max_steps={args.budget}")
    cfg = load_config(args.config, overrides)
    if cfg.recipe_name != "crd":
        parser.error(f"--config {args.config} is a {cfg.recipe_name} config, not crd")
    trainer = Trainer(cfg)
    judge = FDDigits(resolution=cfg.data.resolution)
    floor_p, floor_r = judge.floor_precision_recall()
    floor = {"fd_digits": judge.floor(), "precision": floor_p, "recall": floor_r}
    rows, train_seconds, budget = [], 0.0, cfg.run.max_steps
    while True:
        if trainer.step % args.every == 0 or trainer.step == budget:
            row = {"step": trainer.step, **evaluate(trainer, judge, args.seed),
                   "train_seconds": train_seconds}
            rows.append(row)
            print(" ".join(f"{k} {row[k]:.4g}" for k in ("step", *FIGURES)), flush=True)
        if trainer.step >= budget:
            break
        t0 = time.perf_counter()
        trainer.train_step()
        train_seconds += time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"config": str(args.config), "overrides": args.set, "budget": budget, "every": args.every,
              "seed": args.seed, "recipe": cfg.recipe.model_dump(), "num_steps": cfg.student.num_steps,
              "floor": floor, "rows": rows}
    (args.out / "crd_curve.json").write_text(json.dumps(result, indent=1))
    title = f"CRD on digits, reward {cfg.recipe.reward}, beta {cfg.recipe.beta}, kl_weight {cfg.recipe.kl_weight}, " \
            f"{cfg.student.num_steps}-step student"
    plot(rows, floor, args.out / "crd_curve.png", title)
    print(f"wrote {args.out / 'crd_curve.json'} and {args.out / 'crd_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
