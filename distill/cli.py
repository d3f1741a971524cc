"""`distill` command line.

    distill train CONFIG [key=value ...]     train a recipe (also under `accelerate launch -m distill.cli train ...`)
    distill export RUN_DIR OUT_DIR           write the run's latest EMA student as a stock diffusers pipeline
    distill pairs CONFIG [key=value ...]     write the teacher ODE pair store of CONFIG's `recipe.pairs` (resumable;
                                             also under `accelerate launch -m distill.cli pairs ...`)
    distill demo [--task digits|text|text-flow] [--recipe NAME] [--out DIR] [key=value ...]
                                             the main job: a recipe (default DMD2) on the bundled digits teacher,
                                             export, grid, FD-digits; `--task text`: on the bundled text-to-image
                                             teacher, agreement and FD-shapes (docs/text_to_image.md); `--task
                                             text-flow`: the same on the bundled flow-matching (SD3) text teacher
    distill eval EVALUATION ...              evaluate finished runs and teachers: digits RUN_DIR, text RUN_DIR,
                                             runs RUN_DIR..., steps RUN_DIR..., reflow, teacher, text-teacher
                                             (distill/evaluate.py; `distill eval -h`)
    distill plan CONFIG [key=value ...] [--world-size N] [--gpu-memory GIB] [--model NAME] [--json]
                                             the per-rank peak memory of one training step, by role, and whether
                                             it fits; no GPU, no weights (distill/plan.py, docs/scale.md)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from distill.base.errors import ConfigError
from distill.base.optional import MissingPackage
from distill.evaluate import add_eval_parser
from distill.training.preflight import check_run_folders, load_config

#: the config each demo task runs, by recipe name
DEMO_CONFIG = {"digits": "digits/{recipe}.yaml", "text": "text/{recipe}.yaml", "text-flow": "text_flow/{recipe}.yaml"}


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "accelerate", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    check_run_folders(cfg)
    from distill.training.trainer import Trainer

    trainer = Trainer(cfg)
    out = trainer.train()
    if trainer.accelerator.is_main_process:
        print(f"run directory: {cfg.run.output_dir}")
        if cfg.export.at_end:
            print(f"exported pipeline: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from distill.training.checkpoints import latest_checkpoint
    from distill.training.files import check_checkpoint
    from distill.training.trainer import Trainer

    run_dir = Path(args.run_dir)
    cfg_file = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    if not cfg_file.is_file():
        raise ConfigError(f"{str(cfg_file)!r} is missing: {str(run_dir)!r} is not a distill run directory")
    ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"no complete checkpoint under {str(run_dir / 'checkpoints')!r} (trainer.checkpoint_every "
                          "was 0, or the run stopped before its first checkpoint)")
    step = check_checkpoint(ckpt, "--checkpoint" if args.checkpoint else None)
    if step == 0:
        raise ConfigError(f"checkpoint {str(ckpt)!r} is at step 0: its student is the untrained copy of the teacher; "
                          "refusing to export it as a distilled model")
    try:
        # The run's own resume setting is history (its checkpoint may be pruned by now); the export loads `ckpt`.
        cfg = load_config(cfg_file, [f"run.output_dir={run_dir}", "trainer.resume=null"])
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    trainer = Trainer(cfg)
    trainer.load_checkpoint(ckpt)
    out = trainer.export(args.out_dir)
    print(f"exported {ckpt} -> {out}")
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from distill.data.pairs import generate_from_config

    root = generate_from_config(load_config(args.config, args.overrides))
    print(f"pair store: {root}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from distill.training.trainer import Trainer

    out = Path(args.out)
    cfg = load_config(DEMO_CONFIG[args.task].format(recipe=args.recipe), [f"run.output_dir={out}", *args.overrides])
    check_run_folders(cfg)
    trainer = Trainer(cfg)
    pipeline_dir = trainer.train()
    if trainer.accelerator.is_main_process:
        if args.task in ("text", "text-flow"):
            from distill.demo.evaluate_text import DEFAULT_TEXT_TEACHER_STEPS as default_steps
            from distill.demo.evaluate_text import compare_text_teacher_student as compare
        else:
            from distill.demo.digits import DEFAULT_TEACHER_STEPS as default_steps
            from distill.demo.digits import compare_teacher_student as compare

        steps = args.teacher_steps if args.teacher_steps is not None else default_steps
        print(compare(cfg, pipeline_dir, out, teacher_steps=steps))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from distill.plan import load_plan_config, plan_config

    cfg = load_plan_config(args.config, args.overrides)
    plan = plan_config(cfg, world_size=args.world_size, gpu_memory_gib=args.gpu_memory, model=args.model,
                       config_name=str(args.config))
    print(json.dumps(plan.to_json(), indent=2) if args.json else plan.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Diffusion step distillation on diffusers.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe from a YAML config")
    t.add_argument("config", help="YAML config (a path, or the name of a shipped one such as digits/dmd2.yaml)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.critic_steps=5")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("export", help="export a run's EMA student as a stock diffusers pipeline")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    e.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the run's latest)")
    e.set_defaults(fn=cmd_export)
    pr = sub.add_parser("pairs", help="generate (or resume) the teacher ODE pair store of a config's recipe.pairs")
    pr.add_argument("config")
    pr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. recipe.pairs.num_pairs=2048")
    pr.set_defaults(fn=cmd_pairs)
    d = sub.add_parser("demo", help="distill a bundled teacher into a one-step student and evaluate it")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--task", choices=sorted(DEMO_CONFIG), default="digits",
                   help="digits: the class-conditional digits teacher (recipes/digits/NAME.yaml, FD-digits); text: "
                        "the text-to-image shapes teacher (recipes/text/NAME.yaml, agreement and FD-shapes); "
                        "text-flow: the flow-matching (SD3) shapes teacher (recipes/text_flow/NAME.yaml)")
    d.add_argument("--teacher-steps", type=int, default=None, help="teacher sampling steps for the comparison "
                   "(default: 20 for every teacher, docs/teacher.md and docs/text_to_image.md)")
    d.add_argument("--recipe", default="dmd2", help="recipe whose recipes/<task>/NAME.yaml runs (digits: dmd2, scm, "
                                                   "rcm, lcm, ...; text, text-flow: dmd2)")
    d.add_argument("overrides", nargs="*", help="key=value overrides of recipes/<task>/NAME.yaml")
    d.set_defaults(fn=cmd_demo)
    add_eval_parser(sub)
    pl = sub.add_parser("plan", help="per-rank peak memory of one training step of a config, without a GPU")
    pl.add_argument("config", help="YAML config (a path, or a shipped one such as sdxl/dmd2.yaml)")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.parallel=fsdp2")
    pl.add_argument("--world-size", type=int, default=1, help="processes (GPUs) of the run (default 1)")
    pl.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of memory per GPU (default 80)")
    pl.add_argument("--model", default=None, help="a shipped model config (distill/assets/model_configs: sd15, "
                    "sdxl, sd35_medium, flux_dev, wan_1_3b, ...) or a JSON file; default: the teacher folder's own "
                    "configs, else the model config whose hub_ids list teacher.path")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON (bytes per rank)")
    pl.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, MissingPackage) as e:
        print(f"distill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
