"""YAML configs checked against dataclasses: an unknown key, a wrong type or a missing path names the key.

A config file has fixed sections (`run`, `teacher`, `data`, `student`, `trainer`, `export`) and one `recipe`
section whose `name` picks `distill.recipes.<name>`; the remaining keys of that section are checked against
that module's `Config` dataclass, so a new recipe brings its own schema without touching this file.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_PREFIX = "builtin:"
# Exponent floats without a dot (1e-4): YAML 1.1, which PyYAML implements, reads them as strings.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config problem; the message names the offending key (dotted) or file."""


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000


@dataclass
class TeacherConfig:
    #: a diffusers folder (`unet/` or `transformer/` + `scheduler/`), or `builtin:digits_teacher`.
    path: str = "builtin:digits_teacher"
    #: the network's output kind; null infers it from the scheduler config.
    prediction: str | None = None
    #: classifier-free guidance, convention uncond + w (cond - uncond); 1.0 = no guidance.
    guidance_scale: float = 1.0


@dataclass
class DataConfig:
    name: Literal["digits"] = "digits"
    resolution: int = 16
    batch_size: int = 64


@dataclass
class StudentConfig:
    #: sampling steps of the distilled student (1 to 4 usually); the export bakes them in.
    num_steps: int = 1


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0


@dataclass
class TrainerConfig:
    generator: OptimizerConfig = field(default_factory=OptimizerConfig)
    critic: OptimizerConfig = field(default_factory=OptimizerConfig)
    #: critic (fake score) updates per generator update: DMD2's two time-scale rule.
    critic_steps: int = 1
    gradient_accumulation_steps: int = 1
    #: "auto" = bf16 on CUDA, fp32 elsewhere; or "no", "bf16", "fp16".
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    max_grad_norm: float | None = 1.0
    ema_decay: float = 0.99
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    log_every: int = 10
    #: what a non-finite loss or gradient does: "skip" the update (counted and logged) or "stop" the run.
    on_nonfinite: Literal["skip", "stop"] = "skip"
    #: stop anyway after this many consecutive skipped updates.
    max_consecutive_nonfinite: int = 20
    #: null (start fresh), "latest" (newest complete checkpoint in the run, else fresh) or a checkpoint path.
    resume: str | None = None
    progress_bar: bool = True


@dataclass
class ExportConfig:
    #: write the stock diffusers pipeline at the end of training (into <output_dir>/pipeline).
    at_end: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    #: the recipe's name (module distill.recipes.<name>) and its own validated config.
    recipe_name: str = "dmd2"
    recipe: Any = None


# ---------------------------------------------------------------------------------------------------------------
# Checking values against dataclass fields
# ---------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError naming the key."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        keys = ", ".join(f"{prefix + '.' if prefix else ''}{k}" for k in unknown)
        raise ConfigError(f"unknown config key {keys}; valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix + '.' if prefix else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe dict of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def recipe_module(name: str) -> types.ModuleType:
    """The module `distill.recipes.<name>`; a clear error lists the recipes that exist."""
    try:
        return importlib.import_module(f"distill.recipes.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"distill.recipes.{name}":
            raise
        import distill.recipes as pkg

        found = sorted(p.stem for p in Path(pkg.__file__).parent.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"recipe.name: no recipe {name!r}; available: {found}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. trainer.critic_steps=5)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def resolve_path(path: str) -> Path:
    """`builtin:NAME` -> the shipped asset folder; anything else is a filesystem path."""
    if path.startswith(BUILTIN_PREFIX):
        return ASSETS / path[len(BUILTIN_PREFIX):]
    return Path(path).expanduser()


def build_config(data: dict) -> Config:
    """Validate a raw mapping (a parsed YAML file plus overrides) into a Config."""
    data = dict(data or {})
    recipe_data = data.pop("recipe", None)
    if not isinstance(recipe_data, dict) or "name" not in recipe_data:
        raise ConfigError("recipe.name: every config needs a recipe section with a name (e.g. recipe: {name: dmd2})")
    recipe_data = dict(recipe_data)
    name = recipe_data.pop("name")
    if not isinstance(name, str):
        raise ConfigError(f"recipe.name: expected a string, got {name!r}")
    module = recipe_module(name)
    cfg = from_dict(Config, data)
    cfg.recipe_name = name
    cfg.recipe = from_dict(module.Config, recipe_data, "recipe")
    teacher_dir = resolve_path(cfg.teacher.path)
    if not teacher_dir.is_dir():
        raise ConfigError(f"teacher.path: folder {str(teacher_dir)!r} does not exist")
    if cfg.student.num_steps < 1:
        raise ConfigError(f"student.num_steps: must be >= 1, got {cfg.student.num_steps}")
    if cfg.trainer.gradient_accumulation_steps < 1:
        raise ConfigError("trainer.gradient_accumulation_steps: must be >= 1")
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `key=value` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        shipped = Path(__file__).resolve().parent.parent / "recipes" / path.name
        import distill.recipes as pkg

        installed = Path(pkg.__file__).parent / path.name
        path = next((p for p in (shipped, installed) if p.is_file()), path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r}: the top level must be a mapping")
    return build_config(apply_overrides(data, overrides or []))


def config_to_yaml(cfg: Config) -> str:
    data = to_dict(cfg)
    recipe = {"name": data.pop("recipe_name"), **(data.pop("recipe") or {})}
    return yaml.safe_dump({"recipe": recipe, **data}, sort_keys=False)
