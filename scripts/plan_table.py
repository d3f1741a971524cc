"""The memory table of docs/scale.md: `distill plan` for every real model family x recipe x memory mode.

    python scripts/plan_table.py --jobs 2 --write docs/scale.md     # about two hours on two cores

Each cell is one plan (distill/plan.py) at `--world-size` ranks of `--gpu-memory` GiB, with the family's shipped DMD2
config's resolution, frames and batch (recipes/<target>/dmd2.yaml), `teacher.dtype: bfloat16`,
`trainer.mixed_precision: bf16`, `trainer.parallel: fsdp2`, `trainer.fsdp.param_dtype: --param-dtype` and
`trainer.ema_decay: 0.99` (an EMA of the student kept; at 0 none is); the
recipe section is the recipe's defaults (rCM and LCM train on data images, `data.name: images`). The modes add up
from left to right after `adapters` (DMD2 only): full fine-tuning, LoRA adapters on one base, + gradient
checkpointing, + CPU offload of every role's shards. Results are cached in `--cache` (one JSON line per cell), so a
run resumes (delete a cell's line to plan it again); `--write` replaces the table between the `<!-- plan_table -->`
markers of a Markdown file.

"Smallest world size": the persistent bytes of a plan scale as 1 / N with FSDP2 (every role's weights, gradients,
optimizer states and averages are sharded) and the traced rest (activations, one gathered block at a time) does not
depend on N; the smallest power of two whose estimate fits is given (1: no sharding, everything whole; "> 64": none
up to 64).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: family -> (model config, the shipped DMD2 config whose data section the cells take)
FAMILIES = {
    "SD1.5": ("sd15", "recipes/sd15/dmd2.yaml"),
    "SDXL": ("sdxl", "recipes/sdxl/dmd2.yaml"),
    "SD3.5-medium": ("sd35_medium", "recipes/sd3/dmd2.yaml"),
    "Flux-dev": ("flux_dev", "recipes/flux/dmd2.yaml"),
    "Wan 1.3B": ("wan_1_3b", "recipes/wan/dmd2.yaml"),
    "Wan 14B": ("wan_14b", "recipes/wan/dmd2.yaml"),
}
RECIPES = {"DMD2": "dmd2", "rCM": "rcm", "LCM": "lcm"}
#: mode -> (recipe keys, trainer keys, teacher keys); "adapters" is DMD2's only
MODES = {
    "full": ({}, {}, {}),
    "adapters": ({"adapters": True}, {}, {}),
    "+ gradient checkpointing": ({}, {"gradient_checkpointing": True}, {}),
    "+ CPU offload": ({}, {"gradient_checkpointing": True, "fsdp": {"offload": True}}, {"offload": True}),
}
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)
#: every cell keeps an EMA of the student, as most runs do (the shipped real-family configs' ema_decay 0 keeps none:
#: their plans are lower by the EMA row, one float32 copy of the student / N)
EMA_DECAY = 0.99


def cell_config(family: str, recipe: str, mode: str, param_dtype: str = "float32") -> dict:
    """The raw config of one cell (validated by distill.plan.load_plan_config's parser)."""
    from distill.config import read_config

    model, base = FAMILIES[family]
    data = read_config(REPO / base)
    recipe_keys, trainer_keys, teacher_keys = MODES[mode]
    data["recipe"] = {"name": RECIPES[recipe], **recipe_keys}
    data["teacher"] = {**data["teacher"], "dtype": "bfloat16", **teacher_keys}
    fsdp = {"param_dtype": param_dtype, **trainer_keys.get("fsdp", {})}
    data["trainer"] = {**data.get("trainer", {}), "mixed_precision": "bf16", "parallel": "fsdp2", **trainer_keys,
                       "fsdp": fsdp, "ema_decay": EMA_DECAY}
    if RECIPES[recipe] != "dmd2":  # sCM, rCM and LCM noise data samples: captioned images as latents
        data["data"] = {**data["data"], "name": "images", "images": "images", "prompts": None}
    return data


def plan_cell(task: tuple) -> dict:
    family, recipe, mode, world_size, gpu, *rest = task
    param_dtype = rest[0] if rest else "float32"
    from distill.config import parse_config
    from distill.plan import plan_config
    from distill.training.registry import recipe_module

    cell = {"family": family, "recipe": recipe, "mode": mode, "world_size": world_size, "gpu": gpu,
            "param_dtype": param_dtype}
    start = time.perf_counter()
    try:
        cfg = parse_config(cell_config(family, recipe, mode, param_dtype), lambda name: recipe_module(name).Config)
        plan = plan_config(cfg, world_size=world_size, gpu_memory_gib=gpu, model=FAMILIES[family][0],
                           config_name=f"{family} {recipe} {mode}")
    except Exception as e:  # a cell that cannot be planned says why in the table, and the others still run
        return {**cell, "error": f"{type(e).__name__}: {e}"}
    return {**cell, "peak": plan.peak, "needs": plan.needs, "fits": plan.fits, "persistent": plan.persistent,
            "host": plan.host_resident, "transient": plan.transient, "seconds": round(time.perf_counter() - start)}


def smallest_world_size(r: dict) -> int | None:
    """The smallest of WORLD_SIZES whose estimate fits (module doc): on N >= 2 the persistent bytes scale as 1 / N
    (offloaded ones stay in host memory); one process shards and offloads nothing (the trainer's rule)."""
    from distill.plan import CONTEXT_GIB, FRAGMENTATION, GiB

    for n in WORLD_SIZES:
        persistent = (r["persistent"] + r.get("host", 0)) * r["world_size"] if n == 1 else \
            r["persistent"] * r["world_size"] / n
        if (persistent + r["transient"]) * (1 + FRAGMENTATION) + CONTEXT_GIB * GiB <= r["gpu"] * GiB:
            return n
    return None


def cells(families, recipes) -> list[tuple[str, str, str]]:
    return [(f, r, m) for f in families for r in recipes for m in MODES if not (m == "adapters" and r != "DMD2")]


def markdown(results: list[dict], world_size: int, gpu: float) -> str:
    """One row per family and recipe; per mode: peak GiB per rank, a tick when it fits, the smallest world size."""
    by = {(r["family"], r["recipe"], r["mode"]): r for r in results}
    head = ["family", "recipe"] + list(MODES)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family in FAMILIES:
        for recipe in RECIPES:
            row = [family, recipe]
            for mode in MODES:
                r = by.get((family, recipe, mode))
                if mode == "adapters" and recipe != "DMD2":
                    row.append("n/a")
                elif r is None:
                    row.append("")
                elif "error" in r:
                    row.append("error")
                else:
                    smallest = smallest_world_size(r)
                    row.append(f"{r['peak'] / 2**30:.1f} {'fits' if r['fits'] else '**no**'} "
                               f"(N={smallest if smallest else '> 64'})")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0)
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="trainer.fsdp.param_dtype: what the trained networks' gathered blocks compute in")
    p.add_argument("--jobs", type=int, default=1, help="plans traced at once (one process each)")
    p.add_argument("--cache", default=str(REPO / "runs" / "plan_table.jsonl"), help="results, one JSON per line")
    p.add_argument("--write", default=None, help="a Markdown file whose <!-- plan_table --> block is replaced")
    args = p.parse_args(argv)

    cache = Path(args.cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    done = [r for r in done if r["world_size"] == args.world_size and r["gpu"] == args.gpu_memory
            and r.get("param_dtype", "float32") == args.param_dtype]
    have = {(r["family"], r["recipe"], r["mode"]) for r in done}
    todo = [(*c, args.world_size, args.gpu_memory, args.param_dtype) for c in cells(args.families, args.recipes)
            if c not in have]
    ctx = multiprocessing.get_context("spawn")  # a fresh process per plan: each makes its own fake process group
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(plan_cell, todo):
            done.append(result)
            with cache.open("a") as f:
                f.write(json.dumps(result) + "\n")
            verdict = result.get("error") or \
                f"{result['peak'] / 2**30:7.1f} GiB {'fits' if result['fits'] else 'does not fit'}"
            print(f"{result['family']:>13} {result['recipe']:>5} {result['mode']:<25} {verdict}", flush=True)
    table = markdown(done, args.world_size, args.gpu_memory)
    if args.write:
        doc = Path(args.write)
        text = doc.read_text()
        block = re.compile(r"(<!-- plan_table -->\n).*?(<!-- /plan_table -->)", re.S)
        if not block.search(text):
            raise SystemExit(f"{doc}: no <!-- plan_table --> ... <!-- /plan_table --> block")
        doc.write_text(block.sub(lambda m: m.group(1) + table + m.group(2), text))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
