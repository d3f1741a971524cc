"""Cheap checks of the files and folders a config names, run before any model is loaded or any folder is written.

Each check reads only what it must (a JSON file, the 8-byte length and JSON header of a safetensors file, the
central directory of a torch zip archive) and fails with a :class:`~distill.base.errors.ConfigError` whose message
starts with the config key that named the file (``teacher.path: ...``) and names the file itself. The CLI turns
those into exit status 2 without a traceback.

* :func:`check_teacher_folder` -- a diffusers folder: ``scheduler/scheduler_config.json`` and ``unet/`` or
  ``transformer/`` with ``config.json`` and complete safetensors weights;
* :func:`check_checkpoint` -- a complete checkpoint written by :meth:`distill.training.trainer.Trainer.save_checkpoint`;
* :func:`check_run_dir` -- ``run.output_dir`` does not hold another run (unless ``trainer.resume`` is set).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import yaml

from distill.base.errors import ConfigError
from distill.config import Config, config_to_yaml

SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
NETWORK_FOLDERS = ("unet", "transformer")
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
#: what a complete checkpoint folder holds (see distill.training.trainer.save_checkpoint; accelerate names the files).
CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_GENERATOR = "model.safetensors"
CHECKPOINT_SHARDED = "sharded"


def _named(key: str | None, text: str) -> ConfigError:
    return ConfigError(f"{key}: {text}" if key else text)


def read_json(path: Path, key: str | None = None, what: str = "file") -> dict[str, Any]:
    """The JSON object in `path`; a missing, unreadable or corrupt file, or one that does not hold an object, is
    a named error."""
    if not path.is_file():
        raise _named(key, f"{str(path)!r} is missing: {what}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _named(key, f"{str(path)!r} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise _named(key, f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def check_safetensors(path: Path, key: str | None = None) -> None:
    """A complete safetensors file: an 8-byte header length, a JSON header, and exactly the data its tensors'
    `data_offsets` describe (a truncated download or an interrupted copy is shorter)."""
    if not path.is_file():
        raise _named(key, f"{str(path)!r} is missing")
    size = path.stat().st_size
    bad = f"{str(path)!r} is truncated or corrupt (not a complete safetensors file)"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _named(key, f"{bad}: {size} bytes")
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                raise _named(key, f"{bad}: its header needs {8 + header_len} bytes, the file has {size}")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _named(key, f"{bad}: {e}") from None
    if not isinstance(header, dict):
        raise _named(key, f"{bad}: the header is not a JSON object")
    try:
        data_end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise _named(key, f"{bad}: a tensor entry has no data_offsets") from None
    if size != 8 + header_len + data_end:
        raise _named(key, f"{bad}: {size} bytes, its header describes {8 + header_len + data_end}")
    from safetensors import SafetensorError, safe_open

    try:  # dtypes, shapes and offsets consistent (reads the header only)
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise _named(key, f"{bad}: {e}") from None


def _torch_archive(path: Path, key: str | None) -> None:
    """A file written by torch.save (a zip archive): truncation loses the central directory at its end."""
    if not zipfile.is_zipfile(path):
        raise _named(key, f"{str(path)!r} is truncated or corrupt (not a complete torch.save archive)")


def _kind_hint(root: Path) -> str:
    """What a folder given in the wrong place looks like, to say so in the error."""
    if (root / CHECKPOINT_STATE).is_file():
        return f"; {str(root)!r} is a distill checkpoint (use it as trainer.resume)"
    if (root / "config.yaml").is_file() and (root / "checkpoints").is_dir():
        return (f"; {str(root)!r} is a distill run directory (its exported pipeline is {str(root / 'pipeline')!r}, "
                f"`distill export {root} OUT` writes one)")
    if (root / "model_index.json").is_file():
        return "; it has model_index.json but no scheduler config"
    return ""


def check_teacher_folder(root: Path, key: str | None = "teacher.path") -> None:
    """A diffusers folder a teacher can be loaded from, checked without loading it."""
    if not root.exists():
        hub = "" if "/" not in str(root) or str(root).startswith(("/", ".", "~")) else (
            f"; a Hugging Face id is read from the local cache only: `huggingface-cli download {root}` first, or "
            "give the downloaded folder")
        raise _named(key, f"folder {str(root)!r} does not exist{hub}")
    if not root.is_dir():
        raise _named(key, f"{str(root)!r} is a file; a teacher is a diffusers folder (unet/ or transformer/, "
                          "scheduler/)")
    sched_file = root / SCHEDULER_CONFIG
    if not sched_file.is_file():
        raise _named(key, f"{str(sched_file)!r} is missing: a teacher folder needs a scheduler config"
                          f"{_kind_hint(root)}")
    sched = read_json(sched_file, key)
    from distill.models.denoiser import process_from_scheduler_config

    try:
        # a dynamic shift's mu comes with the resolution when the teacher is loaded; any mu checks the rest here
        process_from_scheduler_config(sched, mu=0.0 if sched.get("use_dynamic_shifting") else None)
    except (ValueError, NotImplementedError, TypeError, KeyError) as e:
        raise _named(key, f"{str(sched_file)!r}: {e}") from None
    sub = next((root / s for s in NETWORK_FOLDERS if (root / s / "config.json").is_file()), None)
    if sub is None:
        raise _named(key, f"no 'unet/config.json' or 'transformer/config.json' under {str(root)!r}{_kind_hint(root)}")
    model_config = read_json(sub / "config.json", key)
    if not isinstance(model_config.get("_class_name"), str):
        raise _named(key, f"{str(sub / 'config.json')!r} names no diffusers class (_class_name)")
    if (sub / WEIGHTS_INDEX).is_file():
        index = read_json(sub / WEIGHTS_INDEX, key)
        shards = index.get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise _named(key, f"{str(sub / WEIGHTS_INDEX)!r} has no weight_map")
        for shard in sorted(set(map(str, shards.values()))):
            check_safetensors(sub / shard, key)
    elif (sub / WEIGHTS).is_file():
        check_safetensors(sub / WEIGHTS, key)
    else:
        raise _named(key, f"{str(sub / WEIGHTS)!r} is missing: the teacher's weights must be safetensors")


def check_checkpoint(path: Path, key: str | None = None) -> int:
    """A complete checkpoint folder (trainer state, the generator's safetensors, readable optimizer, RNG and
    EMA archives; or, written sharded, readable safetensors shards); returns its step."""
    if not path.is_dir():
        what = "is a file, not a checkpoint folder" if path.exists() else "does not exist"
        raise _named(key, f"checkpoint folder {str(path)!r} {what}")
    state_file = path / CHECKPOINT_STATE
    if not state_file.is_file():
        hint = (f"; {str(path)!r} is a run directory: resume it with trainer.resume=latest and "
                f"run.output_dir={path}" if (path / "checkpoints").is_dir() else
                " (its save was interrupted, or it is not a checkpoint folder)")
        raise _named(key, f"{str(state_file)!r} is missing: {str(path)!r} is not a complete checkpoint{hint}")
    state = read_json(state_file, key)
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _named(key, f"{str(state_file)!r}: 'step' must be an integer >= 0, got {step!r}")
    if state.get("format") == "sharded":  # trainer.parallel: fsdp2 (distill.training.checkpoints)
        shards = sorted((path / CHECKPOINT_SHARDED).glob("*.safetensors"))
        if not shards:
            raise _named(key, f"{str(path / CHECKPOINT_SHARDED)!r} holds no safetensors shards: {str(path)!r} is "
                              "not a complete checkpoint")
        for f in shards:
            check_safetensors(f, key)
        return step
    if not (path / CHECKPOINT_GENERATOR).is_file():
        raise _named(key, f"{str(path / CHECKPOINT_GENERATOR)!r} is missing: {str(path)!r} is not a complete "
                          "checkpoint")
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            check_safetensors(f, key)
        elif f.suffix in (".bin", ".pkl"):
            _torch_archive(f, key)
    return step


def _checkpoint_entries(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in list(old) + [k for k in new if k not in old]:
            out += changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix[:-1]]


#: keys that say where a run is and how it was started, not what it is: a moved or resumed run is the same run.
NOT_THE_RUN = ("run.output_dir", "trainer.resume")


def saved_config_changes(cfg: Config) -> list[str] | None:
    """Keys (other than NOT_THE_RUN) in which `run.output_dir`/config.yaml differs from `cfg`; None when there
    is no config.yaml."""
    saved = Path(cfg.run.output_dir) / "config.yaml"
    if not saved.is_file():
        return None
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return ["config.yaml (unreadable)"]
    return [k for k in changed_keys(old, yaml.safe_load(config_to_yaml(cfg))) if k not in NOT_THE_RUN]


def check_run_dir(cfg: Config) -> None:
    """`run.output_dir` is a folder (or does not exist yet) that holds no other run. With `trainer.resume`
    null, a folder with checkpoints or a config.yaml of a different config is refused: training there would
    overwrite that run's files or mix its checkpoints with this one's (`latest` would pick the other run's)."""
    run_dir = Path(cfg.run.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.output_dir: {str(run_dir)!r} is a file, not a folder")
    if not run_dir.is_dir() or cfg.trainer.resume is not None:
        return
    entries = _checkpoint_entries(run_dir)
    changes = saved_config_changes(cfg)
    if entries:
        why = f"checkpoints {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}"
    elif changes:
        why = f"a config.yaml that differs in {', '.join(changes[:5])}{', ...' if len(changes) > 5 else ''}"
    else:
        return
    raise ConfigError(
        f"run.output_dir: {str(run_dir)!r} already holds another run: {why}; continue it with "
        f"trainer.resume=latest, or choose another run.output_dir")
