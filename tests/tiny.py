"""A tiny class-conditional teacher and tiny run configs, shared by the config, trainer, export and DDP tests.

Also a script for the DDP test: under `accelerate launch` it trains like `distill train` and then makes every
rank write the weights it holds, so the test can check that the ranks agree:

    accelerate launch ... tests/tiny.py DUMP_DIR CONFIG key=value ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DIGITS_YAML = REPO / "recipes" / "digits/dmd2.yaml"


def tiny_unet(num_class_embeds: int | None = 11, attention: bool = True):
    """An untrained 8x8 one-channel UNet2DModel (seeded); class-conditional with 10 digits + the null class."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), down_block_types=down,
        up_block_types=up, layers_per_block=1, norm_num_groups=4, attention_head_dim=8 if attention else 4,
        num_class_embeds=num_class_embeds,
    )


def build_tiny_teacher(root: Path) -> Path:
    """An untrained 8x8 class-conditional UNet2DModel (10 digits + the null class) with a consistency scheduler,
    saved as a diffusers folder the way the shipped teacher is."""
    from diffusers import CMStochasticIterativeScheduler

    unet = tiny_unet()
    unet.save_pretrained(root / "unet", safe_serialization=True)
    CMStochasticIterativeScheduler().save_pretrained(root / "scheduler")
    return root


def tiny_overrides(teacher: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides of recipes/digits/dmd2.yaml for a run of seconds; later entries in `extra` win."""
    return [
        f"teacher.path={teacher}",
        f"run.output_dir={run_dir}",
        "data.resolution=8",
        "data.batch_size=4",
        "run.max_steps=2",
        "trainer.progress_bar=false",
        "trainer.sample_every=0",
        "trainer.checkpoint_every=0",
        "trainer.log_every=1",
        "export.at_end=false",
        *extra,
    ]


def tiny_config(teacher: Path, run_dir: Path, *extra: str):
    from distill.training.preflight import load_config

    return load_config(DIGITS_YAML, tiny_overrides(teacher, run_dir, *extra))


# The first lines of every script that loads an exported pipeline in a fresh interpreter: importing `distill`
# fails there (and is recorded in NoDistill.tried), so loading and sampling must need diffusers only.
NO_DISTILL = r"""
import importlib.abc, json, sys

class NoDistill(importlib.abc.MetaPathFinder):
    tried = []
    def find_spec(self, name, path=None, target=None):
        if name == "distill" or name.startswith("distill."):
            NoDistill.tried.append(name)
            raise ImportError(f"{name} must not be needed to load an exported pipeline")
        return None

sys.meta_path.insert(0, NoDistill())
"""


def subprocess_env() -> dict[str, str]:
    """Environment for child processes: one thread each (tiny models gain nothing from more, and two processes
    fighting over two cores with several threads each are many times slower)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# Samples each exported ConsistencyModelPipeline folder of a spec's runs, in such a fresh interpreter: its default
# call must work, then class labels, a seeded generator and the run's steps (or custom timesteps).
CM_CLEAN_SAMPLE = NO_DISTILL + r"""
import torch
from diffusers import ConsistencyModelPipeline, DiffusionPipeline

spec = json.load(open(sys.argv[1]))
labels = spec["labels"]
out = {}
for name, run in spec["runs"].items():
    pipe = DiffusionPipeline.from_pretrained(run["folder"])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is ConsistencyModelPipeline, type(pipe)
    assert len(pipe(batch_size=2).images) == 2  # default arguments work
    custom = run.get("timesteps")
    steps = {"timesteps": custom, "num_inference_steps": None} if custom else {"num_inference_steps": run["steps"]}
    out[name] = pipe(batch_size=len(labels), class_labels=labels, generator=torch.Generator().manual_seed(spec["seed"]),
                     output_type="pt", **steps).images
torch.save(out, spec["results"])
assert not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""


def sample_exports_cleanly(runs: dict, labels: list[int], seed: int, work: Path) -> dict[str, torch.Tensor]:
    """The images of each exported ConsistencyModelPipeline of `runs` ({name: {"folder", "steps"[, "timesteps"]}}),
    sampled with plain diffusers in a process where `distill` cannot be imported; keyed by str(name)."""
    import json
    import subprocess

    spec = work / "clean_sample_spec.json"
    results = work / "clean_sample_out.pt"
    spec.write_text(json.dumps({"labels": labels, "seed": seed, "runs": {str(k): v for k, v in runs.items()},
                                "results": str(results)}))
    proc = subprocess.run([sys.executable, "-c", CM_CLEAN_SAMPLE, str(spec)], capture_output=True, text=True,
                          timeout=300, env=subprocess_env(), cwd=work)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    return torch.load(results)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a tensor, gathered whole when it is an FSDP2 shard (every process must call this)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def weights(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """CPU copies of a trainer's generator, critic and EMA weights (whole, under FSDP2 too)."""
    critic = trainer.recipe.critic
    out = {
        "generator": {k: _full(v) for k, v in trainer.recipe.generator.state_dict().items()},
        "critic": {} if critic is None else {k: _full(v) for k, v in critic.state_dict().items()},
    }
    out["ema"] = {str(i): _full(p) for i, p in enumerate(trainer.ema.shadow_params)}
    return out


def _train_and_dump(dump_dir: str, config: str, overrides: list[str]) -> None:
    from distill.training.preflight import load_config
    from distill.training.trainer import Trainer

    trainer = Trainer(load_config(config, overrides))
    steps_run, logs = [], []
    train_step = trainer.train_step

    def counting_step():
        steps_run.append(trainer.step)
        logs.append(train_step())
        return logs[-1]

    trainer.train_step = counting_step
    held = {}
    end_training = trainer.accelerator.end_training

    def gather_then_end():  # FSDP2 shards are gathered while the process group still exists
        held.update(weights(trainer))
        end_training()

    trainer.accelerator.end_training = gather_then_end
    trainer.train()
    rank = trainer.accelerator.process_index
    Path(dump_dir).mkdir(parents=True, exist_ok=True)
    torch.save({**held, "steps_run": steps_run, "logs": logs,
                "world_size": trainer.accelerator.num_processes},
               Path(dump_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distill").setLevel(logging.INFO)
    _train_and_dump(sys.argv[1], sys.argv[2], sys.argv[3:])
