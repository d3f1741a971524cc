"""Every recipe on the 2-D toy with known truth: train, sample, score against the true mixture, draw.

Each `recipes/toy/<name>.yaml` is one entry (a new recipe joins by adding its toy config). For each, the script
trains for `--budget` generator updates (the config's run.max_steps when omitted), draws `--samples` points from
the EMA student (`recipe.generate`, the student's own k-step rollout), scores them with
`distill.demo.toy_metrics.toy_report`, writes `docs/toy/<name>.png` (samples over the true density's contours) and
the table `docs/toy_recipes.md` (with the teacher's and the true mixture's own rows). Resumable: a recipe measured
with the same flags (`docs/toy/measured.json`) is not retrained.

    OMP_NUM_THREADS=1 python scripts/toy_recipes.py [--budget 600] [--recipes dmd2 phased_dmd] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from distill.base.paths import write_text_atomic
from distill.base.seeding import seeded_renoising

REPO = Path(__file__).resolve().parents[1]


def toy_configs() -> dict[str, Path]:
    """name -> config for every recipes/toy/<name>.yaml."""
    from distill.training.registry import recipe_configs

    return recipe_configs("toy")


def recipe_name(config: Path) -> str:
    """The recipe module a config runs (its `recipe.name`)."""
    import yaml

    return yaml.safe_load(config.read_text())["recipe"]["name"]


def draw_samples(points: torch.Tensor, mixture, path: Path, title: str, size: int = 320, extent: float = 1.1) -> Path:
    """A PNG of 2-D points (red) over the true density (grey levels), axes [-extent, extent]."""
    grid = torch.linspace(-extent, extent, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid.flip(0), grid, indexing="ij")
    logp = mixture.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1).to(mixture.means.dtype)).double()
    dens = logp.exp().reshape(size, size)
    shade = (255 - 120 * (dens / dens.max()).sqrt()).clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(np.stack([shade] * 3, -1), "RGB")
    draw = ImageDraw.Draw(img)
    px = ((points[:, 0].double() + extent) / (2 * extent) * (size - 1)).round().long().tolist()
    py = ((extent - points[:, 1].double()) / (2 * extent) * (size - 1)).round().long().tolist()
    for x, y in zip(px, py):
        draw.point((x, y), fill=(200, 30, 30))
    draw.text((4, 4), title, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def teacher_points(n: int, steps: int, seed: int) -> torch.Tensor:
    """The toy teacher's own samples (DPM-Solver++(2M), `distill.models.sampling.sample`) from the students' noise."""
    from distill.base.paths import resolve_path
    from distill.models.denoiser import load_denoiser
    from distill.models.sampling import sample

    teacher = load_denoiser(resolve_path("builtin:toy_teacher"), prediction="edm")
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))  # standard normal; sample() scales it
    return sample(teacher, {"class_labels": torch.zeros(n, dtype=torch.int64)}, noise, num_steps=steps).float()


def run_recipe(name: str, config: Path, budget: int | None, n: int, seed: int, workdir: Path,
               extra: list[str] = ()) -> tuple[dict, torch.Tensor]:
    from distill.data.pairs import ensure_store
    from distill.data.toy import toy_mixture
    from distill.demo.toy_metrics import toy_report
    from distill.training.preflight import load_config
    from distill.training.trainer import Trainer

    overrides = [f"run.output_dir={workdir / name}", "trainer.progress_bar=false", "export.at_end=false",
                 "trainer.checkpoint_every=0", "trainer.sample_every=0", *extra]
    if budget is not None:
        overrides.append(f"run.max_steps={budget}")
    cfg = load_config(config, overrides)
    if getattr(cfg.recipe, "pairs", None) is not None:  # a toy pair store takes seconds: made per run, in workdir
        cfg = load_config(config, [*overrides, f"recipe.pairs.path={workdir / 'pairs' / name}"])
    ensure_store(cfg)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.train()
    seconds = time.perf_counter() - start
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, generator=g)
    cond = trainer.dataset.grid_condition(n)
    # the rollout's re-noising draws (k > 1) from the seed's stream too, not from what this process drew before
    with torch.no_grad(), trainer.ema_weights() as gen, seeded_renoising(seed, trainer.accelerator.device):
        points = trainer.recipe.generate(gen, cond, noise).float().cpu()
        diagnose = getattr(trainer.recipe, "diagnostics", None)  # a method's own figure (a residual, ...)
        diagnostics = {k: float(v) for k, v in diagnose(gen, cond, noise).items()} if callable(diagnose) else {}
    report = toy_report(toy_mixture(torch.float64), points, seed=seed)
    if diagnostics:
        report["diagnostics"] = diagnostics
    report.update({"recipe": name, "steps": cfg.student.num_steps, "budget": cfg.run.max_steps,
                   "train_seconds": seconds})
    return report, points


COLUMNS = [("modes_covered", "modes covered", "{:.0f}/8"), ("on_mode", "on-mode", "{:.3f}"),
           ("mode_weight_kl", "mode-weight KL", "{:.3f}"), ("precision", "precision", "{:.3f}"),
           ("recall", "recall", "{:.3f}"), ("nll", "NLL (nats)", "{:.3f}")]


def write_table(rows: list[dict], path: Path, command: str) -> Path:
    lines = ["# Recipes on the 2-D toy with known truth", "",
             "8 Gaussians on a ring (radius 0.7, std 0.05, weights 0.2, 0.2, 0.15, 0.15, 0.1, 0.1, 0.05, 0.05; "
             "`distill.data.toy.toy_mixture`), an EDM-preconditioned MLP teacher (`distill/assets/toy_teacher`), "
             "metrics of `distill.demo.toy_metrics` on 4,000 student samples. NLL under the true mixture: the true "
             "samples' own row is the reference (lower = crowded on heavy modes, higher = off the modes).", "",
             f"Command: `{command}`", "",
             "| recipe | steps | updates | train s | " + " | ".join(c[1] for c in COLUMNS) + " | other |",
             "|---|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        cells = [c[2].format(r[c[0]]) for c in COLUMNS]
        other = ", ".join(f"{k} {v:.4g}" for k, v in sorted(r.get("diagnostics", {}).items())) or "-"
        lines.append(f"| {r['recipe']} | {r.get('steps', '-')} | {r.get('budget', '-')} | "
                     f"{r.get('train_seconds', 0):.0f} | " + " | ".join(cells) + f" | {other} |")
    lines += ["", "![samples of every row](toy/all.png)", "",
              "One training seed per row; training seconds depend on the load of the (shared) CPU. \"other\": a "
              "method's own figure (`recipe.diagnostics`).",
              "", "Mode-weight KL: KL(true weights, student's mode shares); on-mode: share of samples within 3 std "
              "of a mode. Samples: " + ", ".join(f"[{r['recipe']}](toy/{r['recipe'].replace(' ', '_')}.png)"
                                                for r in rows), ""]
    registered = sorted(p.stem for p in (REPO / "recipes").glob("*.py") if not p.stem.startswith("_"))
    covered = {recipe_name(path) for path in toy_configs().values()}
    missing = [r for r in registered if r not in covered]
    by_divergence = [r for r in rows if r["recipe"].startswith("fdistill_")]
    if by_divergence:
        lines += ["f-distill by divergence (same teacher, budget and seed; mode-weight KL and recall are the coverage "
                  "figures): " + "; ".join(f"{r['recipe'][len('fdistill_'):]}: {r['modes_covered']:.0f}/8 modes, "
                                            f"mode-weight KL {r['mode_weight_kl']:.3f}, recall {r['recall']:.3f}"
                                            for r in by_divergence) + ".", ""]
    lines += [f"Registered recipes: {', '.join(registered)}; without a toy config: {', '.join(missing) or 'none'}.",
              ""]
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=None, help="generator updates per recipe (default: its config)")
    ap.add_argument("--recipes", nargs="*", default=None, help="names (default: every recipes/toy/*.yaml)")
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--teacher-steps", type=int, default=20, help="DPM-Solver++(2M) steps of the teacher's row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from distill.data.toy import toy_mixture
    from distill.training.registry import recipe_configs

    try:
        configs = recipe_configs("toy", args.recipes)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    names = list(configs)
    mixture = toy_mixture(torch.float64)
    from distill.demo.toy_metrics import toy_report

    truth, _ = mixture.sample(args.samples, torch.Generator().manual_seed(args.seed + 1))
    rows = [{**toy_report(mixture, truth, seed=args.seed), "recipe": "true mixture"}]
    draw_samples(truth, mixture, args.out / "toy" / "true_mixture.png", "true mixture")
    teacher = teacher_points(args.samples, args.teacher_steps, args.seed)
    rows.append({**toy_report(mixture, teacher, seed=args.seed), "recipe": "teacher", "steps": args.teacher_steps})
    draw_samples(teacher, mixture, args.out / "toy" / "teacher.png", f"teacher ({args.teacher_steps} steps)")
    results_file = args.out / "toy" / "measured.json"  # per recipe, so a measured recipe is not rerun
    measured: dict[str, dict] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            key = f"{name}|budget={args.budget}|samples={args.samples}|seed={args.seed}|set={' '.join(args.set)}"
            if key in measured and (args.out / "toy" / f"{name}.png").is_file():
                rows.append(measured[key])
                print(f"[{i + 1}/{len(names)}] {name}: measured before, skipped", flush=True)
                continue
            report, points = run_recipe(name, configs[name], args.budget, args.samples, args.seed, Path(tmp),
                                        args.set)
            draw_samples(points, mixture, args.out / "toy" / f"{name}.png", f"{name} ({report['steps']} steps)")
            rows.append(report)
            measured[key] = report
            write_text_atomic(results_file, json.dumps(measured, indent=2) + "\n")
            print(f"[{i + 1}/{len(names)}] {name}: " + ", ".join(f"{k}={report[k]:.3g}" for k, *_ in COLUMNS)
                  + f", {report['train_seconds']:.0f}s", flush=True)
    command = ("OMP_NUM_THREADS=1 python scripts/toy_recipes.py" + (f" --budget {args.budget}" if args.budget else "")
               + (f" --recipes {' '.join(args.recipes)}" if args.recipes else "")
               + (f" --set {' '.join(args.set)}" if args.set else ""))
    write_table(rows, args.out / "toy_recipes.md", command)
    strip = [Image.open(args.out / "toy" / f"{r['recipe'].replace(' ', '_')}.png") for r in rows]
    canvas = Image.new("RGB", (sum(im.width for im in strip), strip[0].height), "white")
    for i, im in enumerate(strip):
        canvas.paste(im, (sum(prev.width for prev in strip[:i]), 0))
    canvas.save(args.out / "toy" / "all.png")  # every row's samples side by side
    (args.out / "toy" / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out / 'toy_recipes.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
