"""Peak memory and step time: one base in memory (student and fake score as LoRA adapters) against three full
copies (teacher, student, fake score), on the same model, as ratios from one run.

Each configuration trains in a fresh subprocess (one torch thread) so that its peak resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is its own; the parent prints a markdown table:

    OMP_NUM_THREADS=1 python scripts/bench_adapters.py [--model digits|large|both] [--steps 4] [--batch 16] [--rank 16]

Models: `digits` is the shipped digits teacher (16x16, about 0.5M parameters, where the Python/torch baseline
dominates); `large` is a random class-conditional UNet2DModel at 32x32 (about 30M parameters) saved to a temporary
folder, where the weights and optimizer states dominate. Both run DMD2 with its GAN head (critic_steps 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _large_teacher(root: Path) -> Path:
    import torch
    from diffusers import CMStochasticIterativeScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(64, 128, 256, 256),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                       layers_per_block=2, norm_num_groups=32, attention_head_dim=64, num_class_embeds=11)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    CMStochasticIterativeScheduler().save_pretrained(root / "scheduler")
    return root


def child(spec: dict) -> None:
    """Build the trainer, one warm-up step, then time `steps` steps; print a JSON line."""
    import torch

    torch.set_num_threads(1)
    from distill.training.preflight import load_config
    from distill.training.trainer import Trainer

    baseline = _rss_mib()  # after imports, before any model
    overrides = [f"teacher.path={spec['teacher']}", f"run.output_dir={spec['run']}", f"data.resolution={spec['res']}",
                 f"data.batch_size={spec['batch']}", "run.max_steps=1000", "trainer.progress_bar=false",
                 "trainer.sample_every=0", "trainer.checkpoint_every=0", "export.at_end=false",
                 "trainer.critic_steps=1", "recipe.gan=true", f"recipe.adapters={str(spec['adapters']).lower()}",
                 f"recipe.lora_rank={spec['rank']}"]
    trainer = Trainer(load_config(REPO / "recipes" / "digits/dmd2.yaml", overrides))
    r = trainer.recipe
    trainable = sum(p.numel() for m in (r.generator, r.critic) for p in m.parameters() if p.requires_grad)
    base_params = sum(p.numel() for n, p in r.teacher.model.named_parameters() if ".lora_" not in n)
    trainer.train_step()  # warm-up: optimizer states exist from here on
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        trainer.train_step()
    step_s = (time.perf_counter() - t0) / spec["steps"]
    print(json.dumps({"peak_mib": _rss_mib(), "baseline_mib": baseline, "step_s": step_s,
                      "trainable": trainable, "base_params": base_params}))


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["digits", "large", "both"], default="both")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of each adapter")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = ["digits", "large"] if args.model == "both" else [args.model]
        for model in models:
            teacher = str(REPO / "distill/assets/digits_teacher") if model == "digits" else str(_large_teacher(Path(tmp) / "large"))
            res = 16 if model == "digits" else 32
            got = {}
            for adapters in (False, True):
                spec = {"teacher": teacher, "run": str(Path(tmp) / f"{model}-{adapters}"), "res": res,
                        "batch": args.batch, "steps": args.steps, "adapters": adapters, "rank": args.rank}
                got[adapters] = run_child(spec)
            rows.append((model, res, got))
    print(f"DMD2 + GAN head, LoRA rank {args.rank}, batch {args.batch}, {args.steps} timed steps after one warm-up, one CPU thread, fp32\n")
    print("| model | base params | setup | trainable params | peak RSS (MiB) | above imports (MiB) | step (s) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for model, res, got in rows:
        for adapters in (False, True):
            g = got[adapters]
            print(f"| {model} {res}x{res} | {g['base_params'] / 1e6:.2f}M | {'one base + 2 LoRA' if adapters else '3 full copies'} "
                  f"| {g['trainable'] / 1e6:.2f}M | {g['peak_mib']:.0f} | {g['peak_mib'] - g['baseline_mib']:.0f} "
                  f"| {g['step_s']:.3f} |")
    print("\n| model | peak RSS ratio (adapters / full) | above-imports ratio | step-time ratio |")
    print("|---|---:|---:|---:|")
    for model, res, got in rows:
        a, f = got[True], got[False]
        print(f"| {model} {res}x{res} | {a['peak_mib'] / f['peak_mib']:.2f} | "
              f"{(a['peak_mib'] - a['baseline_mib']) / (f['peak_mib'] - f['baseline_mib']):.2f} | "
              f"{a['step_s'] / f['step_s']:.2f} |")


if __name__ == "__main__":
    main()
