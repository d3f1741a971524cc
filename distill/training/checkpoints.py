"""A run's checkpoints: where they are, which are complete, and how they are written, read and resumed.

A checkpoint is accelerate's state (the prepared models as safetensors, optimizers, RNG states of every rank, and
every object registered with `accelerator.register_for_checkpointing`: schedulers, EMA, target network) plus the
trainer's own counters in `trainer_state.json`. It is written into a hidden `.tmp-*` folder and renamed into
place, so a kill mid-save leaves the previous checkpoint intact and never lists a partial one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from distill.base.errors import ConfigError
from distill.training.files import check_checkpoint

logger = logging.getLogger("distill")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (folders being written are hidden `.tmp-*` and never listed)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of `step` (every rank calls this: RNG states are per rank) with the trainer's `state`,
    then delete all but the newest `keep` (at least one). Returns its folder."""
    root = run_dir / CHECKPOINT_DIR
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | Path) -> dict[str, Any]:
    """Load a checkpoint into the accelerator's models, optimizers and registered objects; returns the trainer's
    state. Files that are missing, truncated or do not fit this run's networks are a named error."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{str(state_file)!r} is missing: {str(path)!r} is not a complete checkpoint")
    check_checkpoint(path)  # truncated or corrupt files: a named error, before accelerate reads them
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. weights of other shapes: another recipe or model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint {str(path)!r} does not fit this run's networks: {first}") from e
    return json.loads(state_file.read_text())


def resume_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint `trainer.resume` names: None (start fresh), "latest" (the newest complete one of `run_dir`,
    or a fresh start when there is none yet), or a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            logger.info("resume: latest -- no checkpoint in %s yet, starting fresh", run_dir)
            return None
    else:
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise FileNotFoundError(f"trainer.resume: checkpoint folder {resume!r} does not exist")
    check_checkpoint(ckpt, "trainer.resume")
    return ckpt
