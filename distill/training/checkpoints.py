"""A run's checkpoints: where they are, which are complete, and how they are written, read and resumed.

A checkpoint is accelerate's state (the prepared models as safetensors, optimizers, RNG states of every rank, and
every object registered with `accelerator.register_for_checkpointing`: schedulers, EMA, target network) plus the
trainer's own counters in `trainer_state.json`; under `trainer.parallel: fsdp2` it is sharded instead
(:func:`save_sharded_checkpoint`: every tensor as safetensors shards in `sharded/`, readable on any number of
processes). It is written into a hidden `.tmp-*` folder and renamed into
place, so a kill mid-save leaves the previous checkpoint intact and never lists a partial one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.base.errors import ConfigError
from distill.training.files import check_checkpoint

logger = logging.getLogger("distill")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
SHARDED_DIR = "sharded"


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


@dataclass
class ShardedParts:
    """What a sharded checkpoint holds besides the trainer's counters: name -> (network, its optimizer or None),
    the EMA's averages and name -> learning-rate schedule."""

    nets: dict[str, tuple[nn.Module, Any]]
    ema: list[torch.Tensor]
    schedulers: dict[str, Any] = field(default_factory=dict)


def _sharded_tensors(parts: ShardedParts) -> tuple[dict[str, torch.Tensor], dict[str, tuple[dict, dict | None]]]:
    """Every tensor of `parts` under a flat name (this process's shards where the networks are sharded), and per
    network the (model, optimizer) state dicts those tensors belong to (torch.distributed.checkpoint.state_dict:
    references to the live tensors, so loading into the flat dict loads into them)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    flat: dict[str, torch.Tensor] = {}
    dicts: dict[str, tuple[dict, dict | None]] = {}
    for name, (module, opt) in parts.nets.items():
        if opt is not None:
            msd, osd = get_state_dict(module, opt)  # initialises the optimizer's states if it has not stepped yet
        else:
            msd, osd = get_model_state_dict(module), None
        dicts[name] = (msd, osd)
        flat.update({f"{name}.model.{k}": v for k, v in msd.items()})
        for fqn, st in (osd or {}).get("state", {}).items():
            for k, v in st.items():
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"optimizer state {name}.{fqn}.{k} is a {type(v).__name__}, not a tensor")
                flat[f"{name}.optim.{fqn}.{k}"] = v
    flat.update({f"ema.{i}": t for i, t in enumerate(parts.ema)})
    return flat, dicts


def save_sharded_checkpoint(accelerator, run_dir: Path, step: int, state: dict[str, Any], parts: ShardedParts,
                            keep: int) -> Path:
    """:func:`save_checkpoint` for `trainer.parallel: fsdp2`: every process writes its shards of the networks,
    optimizer states and EMA as safetensors (torch.distributed.checkpoint's HuggingFaceStorageWriter) into
    `sharded/`, and the main process the trainer's counters and the learning-rate schedules as JSON; the folder is
    renamed into place when complete. The random streams and the data position are functions of the step
    (distill.base.seeding), so nothing else is needed to continue exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    root = run_dir / CHECKPOINT_DIR
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / SHARDED_DIR).mkdir(parents=True)
    accelerator.wait_for_everyone()
    flat, _ = _sharded_tensors(parts)
    distributed = accelerator.num_processes > 1
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED_DIR), save_distributed=distributed),
             no_dist=not distributed)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scheds = {k: {kk: vv for kk, vv in s.state_dict().items() if kk != "lr_lambdas"}
                  for k, s in parts.schedulers.items()}
        with open(tmp / STATE_FILE, "w") as f:
            json.dump({**state, "format": "sharded", "schedulers": scheds}, f)
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


def load_sharded_checkpoint(path: str | Path, parts: ShardedParts) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_sharded_checkpoint`, on any number of processes (the shards are
    re-cut for this one's); returns the trainer's state."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{str(state_file)!r} is missing: {str(path)!r} is not a complete checkpoint")
    check_checkpoint(path)
    state = json.loads(state_file.read_text())
    if state.get("format") != "sharded":
        raise ConfigError(f"checkpoint {str(path)!r} was written with trainer.parallel: ddp (accelerate's format); "
                          "this run has trainer.parallel: fsdp2. Resume it with trainer.parallel: ddp")
    flat, dicts = _sharded_tensors(parts)
    try:
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path / SHARDED_DIR)),
                 no_dist=not dist.is_initialized())
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint {str(path)!r} does not fit this run's networks: {first}") from e
    for name, (module, opt) in parts.nets.items():
        msd, osd = dicts[name]
        if opt is None:
            set_state_dict(module, [], model_state_dict=msd, optim_state_dict={})
        else:
            set_state_dict(module, opt, model_state_dict=msd, optim_state_dict=osd)
    for name, sched in parts.schedulers.items():
        saved = state.get("schedulers", {}).get(name)
        if saved is None:
            raise ConfigError(f"checkpoint {str(path)!r} has no learning-rate schedule for the {name}")
        sched.load_state_dict({**saved, "lr_lambdas": [None] * len(saved.get("base_lrs", []))})
    return state


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
