"""What `trainer.fsdp.meta_init` saves while a run is built: each process's peak memory (RSS) through
`Trainer(cfg)` under 2-process FSDP2 on the CPU (gloo), with and without it.

    python scripts/meta_init_memory.py                  # a 103M-parameter random UNet teacher, DMD2; ~3 minutes

A random-weight UNet2DModel teacher of `--width` channels is written to a temporary folder; DMD2 (teacher, student,
fake score) is built on two processes by `accelerate launch`; each process reports its peak RSS after its imports
and after the trainer is built (getrusage: the process's high-water mark). The difference is what building costs
it (the networks, their shards, the EMA; freed memory the allocator keeps counts as held). With meta_init every
process but the main builds on the meta device and receives its shards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(out: str, config: str, overrides: list[str]) -> None:
    """Under accelerate launch: build the trainer, write this rank's peaks."""
    from distill.training.preflight import load_config
    from distill.training.trainer import Trainer

    imported = peak_mib()
    trainer = Trainer(load_config(config, overrides))
    built = peak_mib()
    rank = trainer.accelerator.process_index
    full = sum(p.numel() * p.element_size() for p in trainer.recipe.teacher.model.parameters()) / 2**20
    Path(out, f"rank{rank}.json").write_text(json.dumps({"imported": imported, "built": built, "local": full}))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def make_teacher(root: Path, width: int) -> int:
    import torch
    from diffusers import CMStochasticIterativeScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(width, 2 * width, 2 * width),
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), layers_per_block=2,
                       norm_num_groups=32, attention_head_dim=64, num_class_embeds=11)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    CMStochasticIterativeScheduler().save_pretrained(root / "scheduler")
    return sum(p.numel() for p in unet.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256, help="the teacher UNet's first block's channels")
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4], help="process counts to launch")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distill-meta-init-") as tmp:
        root = Path(tmp)
        n = make_teacher(root / "teacher", args.width)
        print(f"teacher: a random UNet2DModel of {n / 1e6:.1f}M parameters ({4 * n / 2**20:.0f} MiB in float32)")
        rows = []
        for processes, meta_init in ((n, m) for n in args.processes for m in ("true", "false")):
            out = root / f"out_{processes}_{meta_init}"
            out.mkdir()
            overrides = [f"teacher.path={root / 'teacher'}", f"run.output_dir={out / 'run'}",
                         "data.resolution=8", "data.batch_size=2", "trainer.parallel=fsdp2",
                         f"trainer.fsdp.meta_init={meta_init}", "trainer.sample_every=0", "trainer.progress_bar=false",
                         "trainer.mixed_precision='no'"]
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, "--worker",
                   str(out), str(REPO / "recipes" / "digits" / "dmd2.yaml"), *overrides]
            env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            if proc.returncode:
                print(proc.stderr[-3000:])
                return 1
            ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]
            others = ranks[1:]
            rows.append((processes, meta_init, ranks[0]["built"] - ranks[0]["imported"],
                         max(r["built"] - r["imported"] for r in others),
                         sum(r["built"] - r["imported"] for r in ranks)))
        print("| processes | trainer.fsdp.meta_init | building, main process (MiB) | building, each other process "
              "(largest, MiB) | all processes (MiB) |")
        print("|---|---|---|---|---|")
        for processes, meta_init, main_cost, other, total in rows:
            print(f"| {processes} | {meta_init} | {main_cost:.0f} | {other:.0f} | {total:.0f} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(main())
