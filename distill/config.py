"""YAML configs validated by pydantic v2: every key declares its type, range, choices and relations beside it.

A config file has fixed sections (`run`, `teacher`, `data`, `student`, `trainer`, `export`) and one `recipe`
section whose `name` picks a recipe; the remaining keys of that section are checked against that recipe's `Config`
(a :class:`Section`), so a new recipe brings its own schema without touching this file. This module imports no
recipe: :func:`parse_config` is handed the lookup (`distill.training.registry.recipe_module`).

Conventions for every section, base or recipe:

* a field is ``name: type = Field(default, ge=/gt=/le=/lt=..., description="...")``; choices are ``Literal``;
* a relation between fields is checked in a ``@model_validator(mode="after")`` with :func:`require`, which names
  the dotted key at fault;
* a value that means "never" or "all" (``checkpoint_every: 0``) says so in its description;
* checking is strict: no "3" for an int, no 1.5 for an int, no 1 for a bool, no NaN or inf anywhere.

Everything is checked when the config is loaded, before any model is loaded or any folder is written; an error
is a :class:`ConfigError` whose message starts with the dotted key and says what was given and what is valid
(written from the declaration by :func:`describe`). This module reads no file but the YAML: the files and folders a
config names are checked one stage up, by `distill.training.preflight`, before anything is loaded or written.
docs/config.md is the guide for recipe authors; tests/test_config_properties.py derives bad values for every key.
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from distill.base.errors import ConfigError
from distill.base.paths import RECIPES_DIR

# ---------------------------------------------------------------------------------------------------------------
# YAML: exponent floats without a dot (1e-4) are floats (PyYAML implements YAML 1.1, which reads them as strings)
# ---------------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text the way configs and overrides are parsed."""
    return yaml.load(text, Loader=_Loader)


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; values are finite and of their declared type."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    def check_run(self, cfg: "Config") -> None:
        """A recipe section's relations to the rest of the run (its data, its teacher), checked when the config
        is loaded, after the teacher folder: raise a ConfigError that names the key at fault and says why (e.g.
        :func:`require_images`). Nothing by default."""


def require(ok: bool, key: str, message: str) -> None:
    """In a section's ``@model_validator(mode="after")``: fail with an error naming `key` (relative to the
    section, dotted for a nested one) unless `ok`."""
    if not ok:
        raise PydanticCustomError("relation", "{message}", {"key": key, "message": message})


#: a path: not empty, not only blanks (`run.output_dir=` must not mean "the current directory").
PATH_PATTERN = r"^\s*\S"


class RunConfig(Section):
    output_dir: str = Field("runs/default", min_length=1, pattern=PATH_PATTERN,
                            description="the run directory (config.yaml, checkpoints, logs, samples, the exported "
                                        "pipeline); a folder that holds another run is refused unless "
                                        "trainer.resume is set")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds model heads, noise and data batches (with the "
                                                           "step and rank)")
    max_steps: int = Field(1000, ge=1, description="generator updates; at least one, so nothing untrained is "
                                                   "exported as a result")


class TeacherConfig(Section):
    path: str = Field("builtin:digits_teacher", min_length=1, pattern=PATH_PATTERN,
                      description="a diffusers folder (`unet/` or `transformer/` with config.json and safetensors "
                                  "weights, `scheduler/scheduler_config.json`), or `builtin:digits_teacher`; "
                                  "checked when the config is loaded")
    prediction: Literal["x0", "epsilon", "v", "flow", "trigflow", "edm", "cm"] | None = Field(
        None, description="the network's output kind; null infers it from the scheduler config")
    guidance_scale: float = Field(1.0, ge=0.0, description="classifier-free guidance, convention uncond + w "
                                                           "(cond - uncond); 1.0 = the plain conditional model, "
                                                           "0.0 = the unconditional one")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the frozen teacher's weights (the student and critic copied from it stay float32 "
                               "for their optimizers; trainer.fsdp.param_dtype sets what their passes compute in)")
    offload: bool = Field(False, description="keep the frozen teacher's weights in CPU memory: under "
                                             "trainer.parallel: fsdp2 its shards stay on the CPU and each block is "
                                             "gathered to the device for its pass (FSDP2 CPUOffloadPolicy); under "
                                             "ddp its blocks are moved to the device for their pass (accelerate's "
                                             "cpu_offload hooks). Slower, one model's worth of device memory less")


class DataConfig(Section):
    name: Literal["digits", "prompts", "images", "toy"] = Field(
        "digits", description="the data set (digits: the train half of scikit-learn's digits, "
                              "distill.data.digits.digits_split; prompts: the lines of data.prompts, encoded once by the "
                              "teacher pipeline's own text encoders and cached in data.cache_dir, no images; "
                              "images: the captioned images of data.images as the teacher pipeline's VAE latents "
                              "(distill/data/images.py); toy: 2-D points of the Gaussian mixture of distill/data/toy.py, "
                              "resolution unused)")
    prompts: str | None = Field(None, min_length=1, pattern=PATH_PATTERN,
                                description="a text file, one prompt per line (DiT: one class index per line), or "
                                            "`builtin:text_teacher/prompts.txt`; required with data.name: "
                                            "prompts, null otherwise")
    images: str | None = Field(None, min_length=1, pattern=PATH_PATTERN,
                               description="a folder of images with metadata.jsonl (one JSON object per line: "
                                           "file_name, text); required with data.name: images, null otherwise")
    cache_dir: str = Field("~/.cache/distill", min_length=1, pattern=PATH_PATTERN,
                           description="where prompt embeddings are cached (keyed by the text encoders and prompts)")
    num_frames: int = Field(1, ge=1, le=1025, description="frames per sample for video teachers (Wan: 4k + 1); "
                                                            "1 for images")
    resolution: int = Field(16, ge=8, le=1024, multiple_of=4,
                            description="image side in pixels (digits: 8x8 upsampled); a multiple of 4 for the "
                                        "UNet's two downsamplings")
    batch_size: int = Field(64, ge=1, description="per process and micro-batch")

    @model_validator(mode="after")
    def _relations(self) -> "DataConfig":
        require((self.prompts is not None) == (self.name == "prompts"), "prompts",
                f"a prompts file goes with data.name: prompts (and only then), got name {self.name!r} and "
                f"prompts {self.prompts!r}")
        require((self.images is not None) == (self.name == "images"), "images",
                f"an images folder goes with data.name: images (and only then), got name {self.name!r} and "
                f"images {self.images!r}")
        return self

    @property
    def has_images(self) -> bool:
        """Whether batches carry data samples (digits, toy points, image latents); prompts alone do not."""
        return self.name != "prompts"


class StudentConfig(Section):
    num_steps: int = Field(1, ge=1, le=1000, description="sampling steps of the distilled student (1 to 4 "
                                                          "usually); the export bakes them in")


#: an Adam beta: in [0, 1) (1 would never forget; torch refuses it).
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class OptimizerConfig(Section):
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="AdamW learning rate (after warm-up)")
    betas: tuple[Beta, Beta] = Field((0.0, 0.999), description="AdamW (beta1, beta2), each in [0, 1)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's decoupled weight decay; 0 = none")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up in updates, at most run.max_steps: update k "
                                                   "(from 0) runs at lr * k / warmup_steps while k < "
                                                   "warmup_steps, the first at learning rate 0 (diffusers' "
                                                   "constant_with_warmup), then at lr; 0 = none")


class FSDPConfig(Section):
    reshard_after_forward: bool = Field(True, description="free each block's gathered weights after its forward "
                                                          "(gathered again for backward): less memory, more "
                                                          "communication; false = keep them until backward")
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the dtype the trained networks' blocks compute in (FSDP2 MixedPrecisionPolicy); "
                               "the sharded weights and optimizer states stay float32")
    reduce_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the dtype gradients are reduced across processes in")
    offload: bool = Field(False, description="the trained networks' weight shards, gradients and optimizer states "
                                             "in CPU memory, the optimizer stepping on the CPU (FSDP2 "
                                             "CPUOffloadPolicy)")
    meta_init: bool = Field(True, description="on several processes, only the main process loads the teacher and "
                                              "builds the networks with weights; the others build them on the meta "
                                              "device (no memory) and receive their shards from it after sharding, "
                                              "so one machine holds one full set of the networks, not one per "
                                              "process")


class TrainerConfig(Section):
    generator: OptimizerConfig = Field(default_factory=OptimizerConfig, description="the student's optimizer")
    critic: OptimizerConfig = Field(default_factory=OptimizerConfig,
                                    description="the critic's optimizer (recipes without a critic ignore it)")
    critic_steps: int = Field(1, ge=1, description="critic (fake score) updates per generator update: DMD2's "
                                                    "two time-scale rule")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per update")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description='"auto" = bf16 on CUDA, fp32 elsewhere')
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="gradient clipping; null = no clipping (the "
                                                                  "norm is still measured)")
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="EMA of the generator; 0 = the raw weights")
    checkpoint_every: int = Field(500, ge=0, description="updates between checkpoints (and one at the last "
                                                         "update); 0 = never, not even at the end (then "
                                                         "`distill export` and trainer.resume have nothing to "
                                                         "read)")
    keep_checkpoints: int = Field(2, ge=1, description="the newest checkpoints kept; older ones are deleted")
    sample_every: int = Field(500, ge=0, description="updates between sample grids (<output_dir>/samples); "
                                                     "0 = never")
    log_every: int = Field(10, ge=1, description="updates between log lines (and the last update)")
    on_nonfinite: Literal["skip", "stop"] = Field(
        "skip", description='a non-finite loss or gradient: "skip" the update (counted, logged) or "stop"')
    max_consecutive_nonfinite: int = Field(20, ge=0, description="stop anyway after more than this many "
                                                                 "consecutive skipped updates of one network; "
                                                                 "0 = stop at the first one")
    resume: str | None = Field(None, min_length=1, pattern=PATH_PATTERN,
                               description='null (fresh; refused if run.output_dir holds another run), "latest" '
                                           '(newest complete checkpoint of the run, else fresh) or the path of a '
                                           'checkpoint folder (checked when the config is loaded)')
    progress_bar: bool = Field(True, description="a tqdm bar on the main process; false = log lines instead")
    parallel: Literal["ddp", "fsdp2"] = Field(
        "ddp", description='how the processes share the work: "ddp" (each holds every network, gradients '
                           'averaged) or "fsdp2" (every network, the frozen teacher included, sharded block by '
                           'block over the processes with torch FSDP2 `fully_shard`; checkpoints are sharded '
                           '(torch.distributed.checkpoint) and resume on any number of processes). See docs/scale.md')
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig, description="FSDP2 settings (trainer.parallel: fsdp2)")
    gradient_checkpointing: bool = Field(False, description="recompute the trained networks' activations in "
                                                            "backward instead of keeping them (diffusers' own "
                                                            "gradient checkpointing of the network's blocks)")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description='"adamw" (torch) or "adamw_8bit" (bitsandbytes\' AdamW8bit: 2 bytes of state per '
                             'parameter instead of 8; needs `pip install bitsandbytes` and a GPU)')
    ema_device: Literal["device", "cpu"] = Field(
        "device", description='where the generator\'s EMA weights live: "device" or "cpu" (one model\'s worth '
                              'of device memory less; the EMA update copies the weights to the CPU every '
                              'update)')


class ExportConfig(Section):
    at_end: bool = Field(True, description="write the stock diffusers pipeline into <output_dir>/pipeline")


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="where the run writes, its seed and length")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the diffusion model to distill")
    data: DataConfig = Field(default_factory=DataConfig, description="the images and conditions trained on")
    student: StudentConfig = Field(default_factory=StudentConfig, description="the distilled model's sampler")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="optimizers, precision, clipping, "
                                                                             "EMA, checkpoints, logging")
    export: ExportConfig = Field(default_factory=ExportConfig, description="the stock diffusers pipeline")
    #: the recipe's name (module distill.recipes.<name>) and its own validated config (set by build_config).
    recipe_name: str = "dmd2"
    recipe: Any = None

    @model_validator(mode="after")
    def _relations(self) -> "Config":
        for net in ("generator", "critic"):
            warm = getattr(self.trainer, net).warmup_steps
            require(warm <= self.run.max_steps, f"trainer.{net}.warmup_steps",
                    f"must be <= run.max_steps ({self.run.max_steps}), got {warm}")
        require(not (self.data.name == "toy" and self.export.at_end), "export.at_end",
                "must be false with data.name: toy (2-D points have no diffusers pipeline), got true")
        require(not (self.trainer.parallel == "fsdp2" and self.trainer.mixed_precision == "fp16"),
                "trainer.mixed_precision", 'fp16 cannot combine with trainer.parallel: fsdp2 (no gradient scaler '
                'for sharded gradients); use "bf16" or trainer.fsdp.param_dtype: bfloat16')
        require(not (self.trainer.parallel == "ddp" and self.trainer.fsdp.offload), "trainer.fsdp.offload",
                "needs trainer.parallel: fsdp2, got ddp")
        require(not (self.trainer.fsdp.offload and self.trainer.optimizer == "adamw_8bit"), "trainer.optimizer",
                "adamw_8bit steps on the GPU; it cannot combine with trainer.fsdp.offload (the optimizer on the CPU)")
        return self


# ---------------------------------------------------------------------------------------------------------------
# Validation with errors that name the key
# ---------------------------------------------------------------------------------------------------------------


def _dotted(prefix: str, loc: tuple) -> str:
    key = prefix
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key or "config"


def _valid_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    model = cls
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field is not None else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return sorted(model.model_fields)


def field_at(cls: type[BaseModel], loc: tuple) -> tuple[Any, list] | None:
    """(annotation, constraint metadata) of the value at `loc` (field names, tuple indices) under section `cls`."""
    ann: Any = cls
    meta: list = []
    for part in loc:
        if isinstance(part, str) and isinstance(ann, type) and issubclass(ann, BaseModel):
            field = ann.model_fields.get(part)
            if field is None:
                return None
            ann, meta = field.annotation, list(field.metadata)
        elif isinstance(part, int) and get_origin(ann) is tuple and part < len(get_args(ann)):
            ann, meta = get_args(ann)[part], []
        else:
            return None
        ann, more = _unwrap(ann)
        meta += more
    return ann, meta


def _unwrap(ann: Any) -> tuple[Any, list]:
    """`Annotated[T, Field(...)]` -> (T, its constraint metadata); anything else -> (ann, [])."""
    if get_origin(ann) is not Annotated:
        return ann, []
    base, *extra = get_args(ann)
    meta: list = []
    for item in extra:
        meta += list(getattr(item, "metadata", [item]))
    return base, meta


def _number(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


#: annotated_types constraint class -> the attribute holding its value (what pydantic's Field(ge=...) declares).
_BOUND_ATTR = {"Ge": "ge", "Gt": "gt", "Le": "le", "Lt": "lt", "MultipleOf": "multiple_of", "MinLen": "min_length",
               "MaxLen": "max_length"}


def describe(ann: Any, meta: list) -> str:
    """What a value of a field must be, in words: `an integer >= 8 and a multiple of 4`, `a number in [0, 1)`,
    `one of 'skip', 'stop'`, `a number > 0, or null`."""
    args = get_args(ann)
    nullable = get_origin(ann) in (Union, types.UnionType) and type(None) in args
    if nullable:
        rest = [a for a in args if a is not type(None)]
        ann = rest[0] if len(rest) == 1 else ann
    bound = {type(m).__name__: getattr(m, _BOUND_ATTR[type(m).__name__]) for m in meta
             if type(m).__name__ in _BOUND_ATTR}
    lo = ("[", bound["Ge"]) if "Ge" in bound else ("(", bound["Gt"]) if "Gt" in bound else None
    hi = (bound["Le"], "]") if "Le" in bound else (bound["Lt"], ")") if "Lt" in bound else None
    if get_origin(ann) is Literal:
        text = "one of " + ", ".join(repr(c) for c in get_args(ann))
    elif ann is bool:
        text = "true or false"
    elif ann in (int, float):
        text = "an integer" if ann is int else "a number"
        if lo and hi:
            text += f" in {lo[0]}{_number(lo[1])}, {_number(hi[0])}{hi[1]}"
        elif lo:
            text += f" {'>=' if lo[0] == '[' else '>'} {_number(lo[1])}"
        elif hi:
            text += f" {'<=' if hi[1] == ']' else '<'} {_number(hi[0])}"
        if "MultipleOf" in bound:
            text += f" and a multiple of {_number(bound['MultipleOf'])}"
    elif ann is str:
        text = "a non-empty string" if bound.get("MinLen") or any(getattr(m, "pattern", None) for m in meta) \
            else "a string"
    elif get_origin(ann) is tuple:
        items = [describe(*_unwrap(a)) for a in get_args(ann)]
        same = len(set(items)) == 1
        text = f"a list of {len(items)} items, " + (f"each {items[0]}" if same else ", ".join(items))
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        text = "a mapping"
    else:
        text = "a valid value"
    return text + (", or null" if nullable else "")


def _message(cls: type[BaseModel], err: dict, prefix: str) -> str:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "relation":
        return f"{_dotted(prefix, loc + tuple(err['ctx']['key'].split('.')))}: {err['ctx']['message']}"
    if kind == "extra_forbidden":
        return (f"unknown config key {_dotted(prefix, loc)}; valid keys here: "
                f"{[k for k in _valid_keys(cls, loc[:-1]) if k not in ('recipe', 'recipe_name')]}")
    if kind == "missing" and loc and isinstance(loc[-1], int) or kind == "too_long":
        loc = loc[:-1] if loc and isinstance(loc[-1], int) else loc
        found = field_at(cls, loc)
        what = describe(*found) if found else "the declared number of items"
        return f"{_dotted(prefix, loc)}: wrong number of items, must be {what}, got {err.get('input')!r}"
    if kind == "missing":
        return f"{_dotted(prefix, loc)}: required key missing"
    found = field_at(cls, loc)
    if found is None:
        return f"{_dotted(prefix, loc)}: {err['msg']}, got {err.get('input')!r}"
    what = describe(*found)
    if kind == "finite_number":
        what = what.replace("a number", "a finite number")
    return f"{_dotted(prefix, loc)}: must be {what}, got {err.get('input')!r}"


def validate_section(cls: type[BaseModel], data: Any, prefix: str = "") -> Any:
    """Validate mapping `data` against section `cls`; a ConfigError names every key at fault."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    try:
        # JSON strict mode: lists are tuples, ints are floats, and nothing else is coerced.
        return cls.model_validate_json(json.dumps(data, default=str), strict=True)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # A list of the wrong length is reported before what is wrong with its items.
        errors.sort(key=lambda err: not (err["type"] == "too_long" or err["type"] == "missing" and err["loc"]
                                         and isinstance(err["loc"][-1], int)))
        messages = [_message(cls, err, prefix) for err in errors]
        raise ConfigError("; ".join(dict.fromkeys(messages))) from None


def from_dict(cls: type[BaseModel], data: Any, prefix: str = "") -> Any:
    """Build section `cls` from a mapping (alias of :func:`validate_section`)."""
    return validate_section(cls, data, prefix)


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe dict of a (nested) section."""
    if isinstance(obj, BaseModel):
        return {name: to_dict(getattr(obj, name)) for name in type(obj).model_fields}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. trainer.critic_steps=5)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.strip().split("."), yaml_load(raw) if raw != "" else ""


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


def require_images(cfg: Config, key: str, why: str) -> None:
    """For a recipe section's :meth:`Section.check_run`: refuse data without images, naming the dotted `key` at
    fault (`data.name`, or the recipe key that asks for images) and saying why the recipe needs them."""
    if not cfg.data.has_images:
        raise ConfigError(f"{key}: recipe {cfg.recipe_name} needs data images ({why}), and data.name: "
                          f"{cfg.data.name} holds captions only; use data.name: images (a folder of captioned "
                          "images, encoded by the teacher pipeline's VAE)")


def parse_config(data: dict, recipe_schema: Callable[[str], type[Section]]) -> Config:
    """Validate a raw mapping (a parsed YAML file plus overrides) into a Config: types, ranges, choices and the
    relations between keys, no file read. `recipe_schema(name)` is the `Config` of recipe `name` (a ConfigError
    naming `recipe.name` when there is none). The files the config names are checked by
    `distill.training.preflight.build_config`, which calls this first."""
    data = dict(data or {})
    recipe_data = data.pop("recipe", None)
    if not isinstance(recipe_data, dict) or "name" not in recipe_data:
        raise ConfigError("recipe.name: every config needs a recipe section with a name (e.g. recipe: {name: dmd2})")
    recipe_data = dict(recipe_data)
    name = recipe_data.pop("name")
    if not isinstance(name, str):
        raise ConfigError(f"recipe.name: expected a string, got {name!r}")
    schema = recipe_schema(name)
    for reserved in ("recipe", "recipe_name"):
        if reserved in data:
            raise ConfigError(f"unknown config key {reserved}; the recipe section is `recipe:` with a `name`")
    cfg = validate_section(Config, data)
    cfg.recipe_name = name
    cfg.recipe = validate_section(schema, recipe_data, "recipe")
    return cfg


def shipped_config(path: Path) -> Path:
    """`path` itself when it is a file, else the shipped config it names relative to `recipes/` (`digits/dmd2.yaml`,
    or `recipes/digits/dmd2.yaml` from another folder), else `path`."""
    if path.is_file() or path.is_absolute():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("recipes",) else path.parts
    shipped = RECIPES_DIR.joinpath(*parts) if parts else path
    return shipped if shipped.is_file() else path


def moved_config(path: Path) -> str:
    """For a config path of the flat layout (`recipes/dmd2_digits.yaml`, before configs were grouped by target
    into `recipes/<target>/<recipe>.yaml`): the sentence that names its new place; "" for any other path."""
    for group in sorted((p.name for p in RECIPES_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))),
                        key=len, reverse=True):
        suffix = f"_{group}.yaml"
        if path.name.endswith(suffix) and (RECIPES_DIR / group / (path.name[: -len(suffix)] + ".yaml")).is_file():
            new = f"recipes/{group}/{path.name[: -len(suffix)]}.yaml"
            return f"; the shipped configs are grouped by target: {path.name} is now {new}"
    return ""


def read_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The mapping of a YAML config file with `key=value` overrides applied (validated by :func:`parse_config`)."""
    path = shipped_config(Path(path))
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist{moved_config(path)}")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r}: the top level must be a mapping")
    return apply_overrides(data, overrides or [])


def config_to_yaml(cfg: Config) -> str:
    data = to_dict(cfg)
    recipe = {"name": data.pop("recipe_name"), **(data.pop("recipe") or {})}
    return yaml.safe_dump({"recipe": recipe, **data}, sort_keys=False)
