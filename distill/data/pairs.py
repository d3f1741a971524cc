"""Teacher ODE pairs: a resumable, sharded store of (noise, teacher sample, condition), and regression on it.

DMD (v1), reflow, InstaFlow and SlimFlow all start from pairs (z, x) where x is the teacher's probability-flow ODE
integrated from the noise z (Liu et al. 2022, arXiv 2209.03003, sec. 2.3; DMD, arXiv 2311.18828, sec. 3.3).
Making them is the expensive part, so the store is written to survive being killed:

* pairs are written in shards (`shard-000000.safetensors`: tensors `noise`, `sample`, `cond.<key>` or
  `prompt_index`), each to a temporary file that is fsync'ed and renamed into place, so a shard on disk is always
  complete;
* shard i is drawn from its own generator seeded by (seed, i), never from a running RNG, so a rerun after a kill
  skips the finished shards and the final store is byte-identical to an uninterrupted one;
* `manifest.json` (the generation spec and one record per finished shard, with its sha256) is rewritten
  atomically, under a file lock, after each shard; under `accelerate launch` process r writes the shards
  i = r, r + P, r + 2P, ... and every process adds its own to the one manifest;
* conditions only are drawn from the train half of the data (its label distribution, or uniform labels): no
  training image enters the store;
* optionally (:class:`PathPairsConfig`: TBCM's trajectory points, distill/recipes/tbcm.py) a shard also keeps states
  of each pair's ODE path: `path` (N, P, ...) the input states of P of the solver's steps (step 0, the scaled noise,
  first), `path_times` (N, P) their native times and `path_x0` (N, P, ...) the teacher's (guided) x0 estimate at
  each, the very values the solver stepped with; `sample` is the same as without them. Without the option the spec
  and the shards are exactly those of a store made before it existed;
* on a text-conditioned (latent) family (data.name: prompts or images) each pair's condition is a prompt (a
  caption) drawn uniformly from the data's prompts by the shard's generator; the shard stores its index
  (`prompt_index`), and the spec the sha256 of the prompts in order, so a store of other prompts is never resumed
  or reused. Reading resolves the indices to the data's cached prompt embeddings (the condition tensors the network
  takes: `encoder_hidden_states`, `pooled_projections`, ...): stored per pair they would cost megabytes each (SD3:
  333 x 4096 float32), indices cost 8 bytes.

Reading streams shards: :class:`PairDataset` draws each batch from one shard (chosen in proportion to its size)
and keeps only the `cache_shards` most recently used shards in memory.

    distill pairs digits/reflow.yaml                       # the `recipe.pairs` section of a config
    accelerate launch -m distill.cli pairs digits/reflow.yaml
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.base.errors import ConfigError
from distill.config import Section, require

logger = logging.getLogger("distill")

MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
FORMAT = "distill-pairs"
VERSION = 1
COND_PREFIX = "cond."
PROMPT_INDEX = "prompt_index"


class PairsConfig(Section):
    """How a pair store is made (the `pairs:` section of a recipe that trains on teacher ODE pairs)."""

    path: str = Field("runs/pairs/digits", min_length=1, description="the store's folder (shards + manifest.json)")
    num_pairs: int = Field(4096, ge=1, description="pairs in the store")
    shard_size: int = Field(512, ge=1, description="pairs per shard: a kill loses at most one shard in progress")
    num_steps: int = Field(20, ge=1, le=1000, description="teacher ODE steps per pair")
    solver: Literal["dpm_solver_2m", "ddim"] = Field("dpm_solver_2m", description="teacher ODE solver "
                                                     "(distill.models.sampling); ddim is its first-order case")
    labels: Literal["train", "uniform"] = Field(
        "train", description="class labels: drawn from the train half's label distribution, or uniformly "
                             "(text families: prompts are always drawn uniformly from the data's prompts)")
    seed: int = Field(0, ge=0, description="shard i is drawn from a generator seeded by (seed, i)")
    batch_size: int = Field(256, ge=1, description="teacher calls are batched this large")
    cache_shards: int = Field(2, ge=1, description="shards held in memory while reading (LRU)")
    progress_bar: bool = Field(True, description="a progress bar with pairs/s on the main process")


class PathPairsConfig(PairsConfig):
    """A pair store that also keeps states of each pair's ODE path (TBCM's trajectory points; the `pairs:` section
    of a recipe that trains on them). A subclass, so that the configs and stores of PairsConfig stay as they were."""

    path_points: int = Field(20, ge=1, le=1000, description="keep the input states of this many of the solver's "
                             "steps (evenly spread, step 0 first), their times and the teacher's x0 estimates there")

    @model_validator(mode="after")
    def _relations(self) -> "PathPairsConfig":
        require(self.path_points <= self.num_steps, "path_points",
                f"must be <= pairs.num_steps ({self.num_steps}): a path keeps the input states of the solver's "
                f"steps, got {self.path_points}")
        return self


# ---------------------------------------------------------------------------------------------------------------
# Regression on stored pairs (DMD eq. 6's regression term; InstaFlow / reflow distillation)
# ---------------------------------------------------------------------------------------------------------------

RegressionKind = Literal["l2", "pseudo_huber", "perceptual"]


TEXT_DATA = ("prompts", "images")


def is_text_store(cfg) -> bool:
    """Whether `cfg`'s pair store holds prompt conditions (a latent family's data) rather than class labels."""
    return cfg.data.name in TEXT_DATA


def pseudo_huber_c(dim: int) -> float:
    """Song & Dhariwal 2023 (iCT, arXiv 2310.14189, sec. 3.3): c = 0.00054 sqrt(d) for d data dimensions."""
    return 0.00054 * math.sqrt(dim)


def regression_loss(pred: Tensor, target: Tensor, kind: RegressionKind = "l2", c: float | None = None,
                    perceptual: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Per-sample distance between a student's output and the stored teacher sample.

    * "l2": mean over dimensions of (pred - target)^2;
    * "pseudo_huber": sqrt(||pred - target||^2 + c^2) - c (iCT sec. 3.3), c = 0.00054 sqrt(d) when None;
    * "perceptual": `perceptual(pred, target)` (e.g. LPIPS, as DMD and InstaFlow use), flattened to (N,).
    """
    if pred.shape != target.shape:
        raise ValueError(f"regression: prediction {tuple(pred.shape)} and stored sample {tuple(target.shape)} differ")
    diff = (pred - target).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean(1)
    if kind == "pseudo_huber":
        c = pseudo_huber_c(diff.shape[1]) if c is None else c
        sq = diff.pow(2).sum(1)
        return sq / ((sq + c * c).sqrt() + c)  # = sqrt(sq + c^2) - c, without the cancellation for small sq
    if kind == "perceptual":
        if perceptual is None:
            raise ValueError("regression kind 'perceptual' needs a perceptual network (config: perceptual_network)")
        return perceptual(pred, target).reshape(pred.shape[0], -1).mean(1)
    raise ValueError(f"unknown regression kind {kind!r}; expected 'l2', 'pseudo_huber' or 'perceptual'")


class PerceptualDistance(nn.Module):
    """A user-supplied perceptual network (LPIPS and the like) behind the regression hook. Images go in as
    (N, 3, H, W) in [-1, 1] (one-channel images repeated), the LPIPS convention; the network stays frozen."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape[1] == 1:
            pred, target = pred.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        return self.net(pred, target)


def load_perceptual(spec: str) -> PerceptualDistance:
    """`"module:factory"` (e.g. `"lpips:LPIPS"`): import the module and call the factory with no arguments; it must
    return a module d(x, y) -> per-sample distances. Its weights are the user's to have."""
    if ":" not in spec:
        raise ConfigError(f"perceptual_network: expected 'module:factory', got {spec!r}")
    module_name, attr = spec.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"perceptual_network: cannot load {spec!r} ({e})") from None
    return PerceptualDistance(factory())


class RegressionConfig(Section):
    """The distance of a regression on stored pairs (DMD's regression loss, InstaFlow's distillation)."""

    loss: RegressionKind = Field("l2", description='"l2", "pseudo_huber" (iCT) or "perceptual" (needs '
                                                    'perceptual_network)')
    pseudo_huber_c: float | None = Field(None, gt=0.0, description="pseudo-Huber c; null = 0.00054 sqrt(d) (iCT)")
    perceptual_network: str | None = Field(
        None, min_length=3, description="'module:factory' returning a network d(x, y) -> per-sample distance, "
                                        "e.g. 'lpips:LPIPS' (its weights are the user's); null = none")

    @model_validator(mode="after")
    def _relations(self) -> "RegressionConfig":
        require(self.loss != "perceptual" or self.perceptual_network is not None, "loss",
                '"perceptual" needs perceptual_network (a "module:factory", e.g. "lpips:LPIPS"); it is null')
        return self

    def distance(self) -> Callable[[Tensor, Tensor], Tensor]:
        """(pred, target) -> per-sample regression loss as configured (loads the perceptual network once)."""
        net = load_perceptual(self.perceptual_network) if self.loss == "perceptual" else None
        return lambda pred, target: regression_loss(pred, target, self.loss, self.pseudo_huber_c, net)


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


def shard_seed(seed: int, index: int) -> int:
    """The seed of shard `index`: a function of (seed, index) only, so shards do not depend on each other."""
    from distill.base.seeding import step_seed

    return step_seed(seed, index, 0, stream=0x9A125)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(tmp)` into a temporary file beside `path`, fsync it, rename it into place."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock on the store's manifest (processes of one `accelerate launch` share the folder)."""
    with open(root / LOCK, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_manifest(root: str | Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); it is always written atomically, so something "
                         "else wrote it") from None


def _shard_record(root: Path, index: int) -> dict:
    from safetensors import safe_open

    path = root / shard_name(index)
    with safe_open(str(path), framework="pt") as f:
        count = f.get_slice("noise").get_shape()[0]
    return {"file": path.name, "count": int(count), "sha256": _sha256(path)}


def _record_shards(root: Path, spec: dict, indices: list[int]) -> dict:
    """Add finished shards to the manifest (created from `spec` when missing), atomically and under the lock."""
    with _locked(root):
        manifest = read_manifest(root) or {"format": FORMAT, "version": VERSION, "spec": spec, "shards": {}}
        for i in indices:
            manifest["shards"][str(i)] = _shard_record(root, i)
        manifest["shards"] = {k: manifest["shards"][k] for k in sorted(manifest["shards"], key=int)}
        manifest["complete"] = len(manifest["shards"]) == spec["num_shards"]
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        _write_atomic(root / MANIFEST, lambda tmp: tmp.write_text(text))
    return manifest


def _spec_mismatch(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} in the store, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def teacher_fingerprint(teacher_dir: Path) -> str:
    """sha256 of the teacher's weight files, so a store made by another teacher is never resumed or reused."""
    h = hashlib.sha256()
    for path in sorted(teacher_dir.glob("*/*.safetensors")):
        h.update(path.relative_to(teacher_dir).as_posix().encode())
        h.update(_sha256(path).encode())
    return h.hexdigest()


def prompts_fingerprint(prompts: list[str]) -> str:
    """sha256 of the prompts in order (a stored condition is an index into them, resolved to its embeddings)."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()


def num_rows(table: dict[str, Tensor]) -> int:
    return next(iter(table.values())).shape[0]


def draw_conditions(train_labels: Tensor | None, num_classes: int, n: int, mode: str, generator: torch.Generator,
                    prompt_conditions: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Conditions for `n` pairs. Class labels: resampled from the train half's labels ("train"), or uniform. With
    `prompt_conditions` (each (P, ...): the embeddings of P prompts), the indices of uniformly drawn prompts."""
    if prompt_conditions is not None:
        return {PROMPT_INDEX: torch.randint(0, num_rows(prompt_conditions), (n,), generator=generator)}
    if mode == "train":
        if train_labels is None:
            raise ValueError("pairs.labels=train needs the train half's labels")
        return {"class_labels": train_labels[torch.randint(0, len(train_labels), (n,), generator=generator)]}
    return {"class_labels": torch.randint(0, num_classes, (n,), generator=generator)}


def make_shard(teacher, pc: PairsConfig, index: int, image_shape: tuple[int, ...], guidance_scale: float,
               train_labels: Tensor | None, num_classes: int, device: torch.device,
               prompt_conditions: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The tensors of shard `index`: noise and conditions from the shard's own generator, then the teacher ODE."""
    from distill.models.sampling import sample

    start = index * pc.shard_size
    n = min(pc.shard_size, pc.num_pairs - start)
    g = torch.Generator().manual_seed(shard_seed(pc.seed, index))
    noise = torch.randn((n, *image_shape), generator=g)
    drawn = draw_conditions(train_labels, num_classes, n, pc.labels, g, prompt_conditions)
    cond = drawn if prompt_conditions is None else {k: v[drawn[PROMPT_INDEX]] for k, v in prompt_conditions.items()}
    if getattr(pc, "path_points", None) is None:  # a PairsConfig: the store as it always was
        x = sample(teacher, {k: v.to(device) for k, v in cond.items()}, noise.to(device), num_steps=pc.num_steps,
                   guidance_scale=guidance_scale, batch_size=pc.batch_size, solver=pc.solver)
        path = {}
    else:
        x, path = sample_with_path(teacher, pc, cond, noise, guidance_scale, device)
    tensors = {"noise": noise.contiguous(), "sample": x.float().cpu().contiguous()}
    if prompt_conditions is None:
        tensors.update({COND_PREFIX + k: v.cpu().contiguous() for k, v in cond.items()})
    else:
        tensors[PROMPT_INDEX] = drawn[PROMPT_INDEX].contiguous()
    if not torch.isfinite(tensors["sample"]).all():
        raise FloatingPointError(f"pair store: the teacher produced non-finite samples in shard {index}")
    if not all(torch.isfinite(v).all() for v in path.values()):
        raise FloatingPointError(f"pair store: the teacher's ODE path is not finite in shard {index}")
    tensors.update(path)
    return tensors


def path_steps(num_steps: int, path_points: int) -> list[int]:
    """The solver steps whose input states a path keeps: `path_points` of 0 .. num_steps - 1, evenly spread, step
    0 (the noise at the highest level) first and, from two points on, the last step (the least noisy state)."""
    if not 1 <= path_points <= num_steps:
        raise ValueError(f"path_points must be in [1, {num_steps}] for {num_steps} steps, got {path_points}")
    return torch.floor(torch.linspace(0, num_steps - 1, path_points, dtype=torch.float64) + 0.5).long().tolist()


class _RecordingTeacher:
    """The teacher behind `distill.models.sampling.sample`, which calls it once per solver step, in order; keeps
    (input state, native time, x0 estimate) of the calls in `keep`, as float32 on the CPU."""

    def __init__(self, teacher, keep: list[int]):
        self.teacher, self.process, self.keep, self.calls, self.kept = teacher, teacher.process, set(keep), 0, []

    def __call__(self, x: Tensor, t: Tensor, cond, want: str = "x0", guidance_scale: float = 1.0) -> Tensor:
        out = self.teacher(x, t, cond, want=want, guidance_scale=guidance_scale)
        if self.calls in self.keep:
            self.kept.append(tuple(v.float().cpu() for v in (x, t, out)))
        self.calls += 1
        return out


def sample_with_path(teacher, pc: PathPairsConfig, cond: dict[str, Tensor], noise: Tensor, guidance_scale: float,
                     device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
    """The teacher ODE of `noise` as :func:`make_shard` integrates it without paths (the same batches, so the same
    samples), and the states of `path_steps(pc.num_steps, pc.path_points)`: tensors `path`, `path_times`, `path_x0`."""
    from distill.models.sampling import sample

    steps = path_steps(pc.num_steps, pc.path_points)
    samples, parts = [], {"path": [], "path_times": [], "path_x0": []}
    for start in range(0, noise.shape[0], pc.batch_size):  # sample()'s own batches, one call each
        sl = slice(start, start + pc.batch_size)
        recorder = _RecordingTeacher(teacher, steps)
        samples.append(sample(recorder, {k: v[sl].to(device) for k, v in cond.items()}, noise[sl].to(device),
                              num_steps=pc.num_steps, guidance_scale=guidance_scale, batch_size=pc.batch_size,
                              solver=pc.solver))
        if recorder.calls != pc.num_steps:
            raise RuntimeError(f"pair store: the solver called the teacher {recorder.calls} times for "
                               f"{pc.num_steps} steps")
        for key, j in (("path", 0), ("path_times", 1), ("path_x0", 2)):
            parts[key].append(torch.stack([kept[j] for kept in recorder.kept], dim=1))
    return torch.cat(samples), {k: torch.cat(v).contiguous() for k, v in parts.items()}


def generate_pairs(teacher, pc: PairsConfig, spec_extra: dict[str, Any], image_shape: tuple[int, ...],
                   guidance_scale: float, train_labels: Tensor | None, num_classes: int,
                   process_index: int = 0, num_processes: int = 1, device: torch.device | str = "cpu",
                   wait: Callable[[], None] | None = None, on_shard: Callable[[int], None] | None = None,
                   prompt_conditions: dict[str, Tensor] | None = None) -> Path:
    """Write the shards of the store described by `pc` that this process owns (i % num_processes ==
    process_index) and are not on disk yet; returns the store's folder.

    `spec_extra` (teacher fingerprint, ...) joins the spec; a store with a different spec is refused. `wait` is a
    barrier between processes (accelerate's wait_for_everyone); `on_shard(i)` is called after shard i is written.
    `prompt_conditions` (text families): the embeddings of the data's prompts, drawn from instead of class labels
    (the caller puts the prompts' fingerprint into `spec_extra`).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    root = Path(pc.path)
    num_shards = -(-pc.num_pairs // pc.shard_size)
    spec = {"num_pairs": pc.num_pairs, "shard_size": pc.shard_size, "num_shards": num_shards,
            "num_steps": pc.num_steps, "solver": pc.solver, "labels": pc.labels, "seed": pc.seed,
            "image_shape": list(image_shape), "guidance_scale": guidance_scale, "num_classes": num_classes,
            "condition_keys": ["class_labels"] if prompt_conditions is None else sorted(prompt_conditions),
            **spec_extra}
    if prompt_conditions is not None:
        spec["labels"] = "prompts"
    if getattr(pc, "path_points", None) is not None:  # only then: a store without paths keeps its old spec
        spec["path_points"] = pc.path_points
    root.mkdir(parents=True, exist_ok=True)
    old = read_manifest(root)
    if old is not None and old.get("spec") != spec:
        raise ConfigError(f"pairs.path: the store {str(root)!r} was made with another spec "
                          f"({'; '.join(_spec_mismatch(old.get('spec') or {}, spec))}); choose another pairs.path "
                          "or delete the store")
    if process_index == 0:  # temporary files of killed runs (nobody writes before the barrier below)
        for stale in root.glob(".tmp-*"):
            stale.unlink()
    if wait is not None:
        wait()  # every process has checked the spec, and stale files are gone, before any writes
    # Shards on disk are complete (renamed into place only when written); ones missing from the manifest were
    # written just before a kill and are recorded now.
    done = {i for i in range(num_shards) if (root / shard_name(i)).is_file()}
    mine = [i for i in range(num_shards) if i % num_processes == process_index]
    unrecorded = [i for i in mine if i in done and str(i) not in ((old or {}).get("shards") or {})]
    if unrecorded or old is None:
        _record_shards(root, spec, unrecorded)
    todo = [i for i in mine if i not in done]
    own_pairs = sum(min(pc.shard_size, pc.num_pairs - i * pc.shard_size) for i in mine)
    finished = own_pairs - sum(min(pc.shard_size, pc.num_pairs - i * pc.shard_size) for i in todo)
    bar = tqdm(total=own_pairs, initial=finished, unit="pair", desc=f"pairs (process {process_index})",
               disable=not pc.progress_bar or process_index != 0, dynamic_ncols=True)
    start, made = time.perf_counter(), 0
    for i in todo:
        tensors = make_shard(teacher, pc, i, image_shape, guidance_scale, train_labels, num_classes,
                             torch.device(device), prompt_conditions=prompt_conditions)
        # One metadata key: safetensors writes a metadata map in no fixed order, which would make the bytes vary.
        meta = {"distill": json.dumps({"format": FORMAT, "shard": i, "seed": shard_seed(pc.seed, i)}, sort_keys=True)}
        _write_atomic(root / shard_name(i), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        _record_shards(root, spec, [i])
        made += tensors["noise"].shape[0]
        bar.update(tensors["noise"].shape[0])
        bar.set_postfix({"pairs/s": f"{made / max(time.perf_counter() - start, 1e-9):.1f}"})
        if on_shard is not None:
            on_shard(i)
    bar.close()
    if wait is not None:
        wait()
    if process_index == 0:
        manifest = _record_shards(root, spec, [])
        if not manifest["complete"]:
            raise RuntimeError(f"pair store {str(root)!r}: {len(manifest['shards'])} of {num_shards} shards after "
                               "all processes finished")
        logger.info("pair store %s complete: %d pairs in %d shards (%d made now, %.1f pairs/s on process 0)", root,
                    pc.num_pairs, num_shards, made, made / max(time.perf_counter() - start, 1e-9))
    return root


def generate_from_config(cfg) -> Path:
    """`distill pairs CONFIG`: the store of `cfg.recipe.pairs` from `cfg.teacher` (with its guidance), under the
    current accelerate processes."""
    from accelerate import PartialState

    from distill.base.paths import resolve_path
    from distill.data import make_dataset
    from distill.models.denoiser import load_denoiser

    pc = getattr(cfg.recipe, "pairs", None)
    if pc is None:
        raise ConfigError(f"recipe.pairs: recipe {cfg.recipe_name!r} has no pair store configured (set recipe.pairs)")
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as AcceleratorState reads it
    teacher_dir = resolve_path(cfg.teacher.path)
    teacher = load_denoiser(teacher_dir, prediction=cfg.teacher.prediction,
                            resolution=cfg.data.resolution).to(state.device)
    spec_extra = {"teacher": str(teacher_dir.resolve()), "teacher_sha256": teacher_fingerprint(teacher_dir),
                  "teacher_prediction": teacher.prediction, "data": f"{cfg.data.name}:train"}
    prompt_conditions = None
    if is_text_store(cfg):
        # The pipeline's own prompt embeddings (cached); guidance's unconditional half is its empty prompt.
        dataset = make_dataset(cfg.data.name, cfg.data.resolution, cfg.data, teacher)
        teacher.family.set_null_embeddings(dataset.null_condition)
        prompt_conditions = {k: v.cpu() for k, v in dataset.cond.items()}
        spec_extra.update(data=cfg.data.name, prompts_sha256=prompts_fingerprint(dataset.prompts),
                          num_prompts=len(dataset.prompts), latent=True)
        train_labels, num_classes = None, 0
    else:
        dataset = make_dataset(cfg.data.name, cfg.data.resolution)  # the train half: its labels only are used
        train_labels, num_classes = getattr(dataset, "labels", None), dataset.num_classes
    return generate_pairs(teacher, pc, spec_extra, tuple(dataset.image_shape), cfg.teacher.guidance_scale,
                          train_labels, num_classes, state.process_index, state.num_processes, state.device,
                          wait=state.wait_for_everyone, prompt_conditions=prompt_conditions)


def ensure_store(cfg) -> Path | None:
    """The store of `cfg.recipe.pairs`, made (or finished) first when it is missing or incomplete; None for a
    recipe without one. What the comparison scripts call before training a pair-trained recipe."""
    pc = getattr(cfg.recipe, "pairs", None)
    if pc is None:
        return None
    manifest = read_manifest(pc.path)
    if manifest is None or not manifest.get("complete"):
        logger.info("making the pair store %s (%d pairs)", pc.path, pc.num_pairs)
        return generate_from_config(cfg)
    return Path(pc.path)


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


class PairStore:
    """A finished store: its manifest and shards, loaded on demand with an LRU of `cache_shards` shards."""

    def __init__(self, path: str | Path, cache_shards: int = 2, verify: bool = False):
        self.root = Path(path)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"no pair store at {str(self.root)!r} (no {MANIFEST}); make it with "
                                    "`distill pairs CONFIG` first")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"{str(self.root / MANIFEST)!r} is not a {FORMAT} v{VERSION} manifest")
        self.spec = manifest["spec"]
        self.shards = [manifest["shards"][k] for k in sorted(manifest["shards"], key=int)]
        if not manifest.get("complete") or len(self.shards) != self.spec["num_shards"]:
            raise ValueError(f"pair store {str(self.root)!r} is incomplete ({len(self.shards)} of "
                             f"{self.spec['num_shards']} shards); rerun `distill pairs CONFIG` to finish it")
        for rec in self.shards:
            if not (self.root / rec["file"]).is_file():
                raise FileNotFoundError(f"pair store {str(self.root)!r}: shard {rec['file']} is missing")
            if verify and _sha256(self.root / rec["file"]) != rec["sha256"]:
                raise ValueError(f"pair store {str(self.root)!r}: shard {rec['file']} does not match its sha256")
        self.counts = torch.tensor([rec["count"] for rec in self.shards], dtype=torch.float64)
        self.image_shape = tuple(self.spec["image_shape"])
        self.cache_shards = cache_shards
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.counts.sum())

    def shard(self, i: int) -> dict[str, Tensor]:
        """Shard i's tensors (noise, sample, cond.*), from the LRU cache or disk."""
        from safetensors.torch import load_file

        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        tensors = load_file(self.root / self.shards[i]["file"])
        self._cache[i] = tensors
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return tensors

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """Every shard in order (streamed; at most `cache_shards` in memory)."""
        for i in range(len(self.shards)):
            yield self.shard(i)


class PairDataset:
    """The trainer's data interface over a pair store: `sample(batch_size, generator)` returns a Batch whose
    `images` are teacher samples, `noise` the noise each was integrated from, and `cond` their conditions: class
    labels, or (a text store) the rows of `prompt_conditions` (the data's prompt embeddings, (P, ...) each; use
    :func:`open_pairs`, which checks they are the store's prompts) at the stored prompt indices.

    Each batch comes from one shard, chosen in proportion to its size (indices drawn with replacement), so
    memory holds only the LRU of recently used shards however large the store is."""

    def __init__(self, path: str | Path, cache_shards: int = 2, prompt_conditions: dict[str, Tensor] | None = None):
        self.store = PairStore(path, cache_shards)
        self.image_shape = self.store.image_shape
        self.num_classes = int(self.store.spec["num_classes"])
        self.latent = bool(self.store.spec.get("latent", False))  # VAE latents: no pixel sample grids
        self.prompt_conditions = prompt_conditions
        if "prompts_sha256" in self.store.spec:
            count = self.store.spec["num_prompts"]
            if prompt_conditions is None or num_rows(prompt_conditions) != count:
                raise ValueError(f"pair store {str(self.store.root)!r} holds indices into {count} prompts: reading it "
                                 "needs their embeddings (the run's data section, data.name: prompts or images)")

    def __len__(self) -> int:
        return len(self.store)

    def sample(self, batch_size: int, generator: torch.Generator):
        from distill.base.batch import Batch

        i = int(torch.multinomial(self.store.counts, 1, generator=generator).item())
        shard = self.store.shard(i)
        idx = torch.randint(0, shard["noise"].shape[0], (batch_size,), generator=generator)
        if PROMPT_INDEX in shard:
            rows = shard[PROMPT_INDEX][idx]
            cond = {k: v[rows] for k, v in self.prompt_conditions.items()}
        else:
            cond = {k[len(COND_PREFIX):]: v[idx] for k, v in shard.items() if k.startswith(COND_PREFIX)}
        return Batch(shard["sample"][idx], cond, noise=shard["noise"][idx])

    def grid_condition(self, n: int) -> dict[str, Tensor]:
        if self.prompt_conditions is not None:  # the prompts in order (cycled)
            idx = torch.arange(n) % num_rows(self.prompt_conditions)
            return {k: v[idx] for k, v in self.prompt_conditions.items()}
        return {"class_labels": torch.arange(n) % self.num_classes}


def open_pairs(pc: PairsConfig, dataset, key: str = "recipe.pairs.path") -> PairDataset:
    """The store of `pc` as a recipe reads it, checked against the run's `dataset` (its image shape; a text
    store's prompts, whose embeddings it takes from the dataset)."""
    prompts = getattr(dataset, "prompts", None)
    table = dataset.cond if prompts is not None else None
    spec = PairStore(pc.path, pc.cache_shards).spec
    if prompts is not None or "prompts_sha256" in spec:
        check_prompts(spec, prompts, key)
    pairs = PairDataset(pc.path, pc.cache_shards, table)
    check_store_matches(pairs, dataset.image_shape, key)
    return pairs


def check_prompts(spec: dict, prompts: list[str] | None, key: str) -> None:
    """A text store is read with the embeddings of exactly the prompts it drew from."""
    now = None if prompts is None else prompts_fingerprint(prompts)
    if spec.get("prompts_sha256") != now:
        raise ConfigError(f"{key}: the pair store's conditions index other prompts than the data's (prompts_sha256 "
                          f"{spec.get('prompts_sha256')!r} in the store, {now!r} now); make the store with the run's "
                          "data section")


def check_store_matches(store: PairStore | PairDataset, image_shape: tuple[int, ...], key: str) -> None:
    """A clear error when a store's images do not fit the model that trains on them."""
    shape = tuple(store.image_shape)
    if shape != tuple(image_shape):
        raise ConfigError(f"{key}: the pair store holds images of shape {shape}; data: gives {tuple(image_shape)}")
