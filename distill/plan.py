"""`distill plan CONFIG`: the per-rank peak memory of one training step, by role, without a GPU and without weights.

How (docs/scale.md):

* the teacher's network is built from its diffusers config alone (a shipped model config,
  `distill/assets/model_configs/<name>.json`, or the teacher folder's own `config.json` files: no weights are read)
  on the meta device, the recipe is built from it by its own `build(cfg, teacher, dataset)` with a data set of
  the right shapes (:class:`SyntheticData`), and then every network's tensors become tensors of PyTorch's
  FakeTensorMode (torch._subclasses.fake_tensor: shapes, dtypes and devices, no data; :func:`to_fake`);
* the trainer's own pieces make the rest: the memory modes (`distill.training.parallel.apply_memory_modes`), FSDP2
  sharding on a fake process group of the planned world size (`shard_roles`, torch's FakeStore and backend
  "fake"), the optimizers (`distill.training.optim.make_optimizer`), diffusers' EMAModel, the target network;
* one iteration runs as `distill.training.trainer` runs it (`trainer.critic_steps` critic updates, one generator
  update, each loss inside `update_nets`, backward, clipping, the optimizer step; the EMA; the target network),
  under torch's MemTracker (torch.distributed._tools.mem_tracker), which follows every storage the step
  allocates and frees and records the peak.

What the trace cannot see is added or taken away by exact counts, each stated in the report: DDP's gradient
buckets (DDP cannot be built on a fake process group), what offloading keeps in host memory (the trace runs on one
device), the 8-bit optimizer's states (bitsandbytes runs on CUDA only). The CUDA context, the caching allocator's
fragmentation and NCCL's buffers are outside any trace: a stated reserve is added before comparing with
`--gpu-memory`.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map_only

from distill.base.batch import Batch, Condition
from distill.base.errors import ConfigError
from distill.base.paths import ASSETS, resolve_path
from distill.config import Config

#: the shipped model configs (one JSON each: network and scheduler config, VAE factors, condition shapes)
MODEL_CONFIGS = ASSETS / "model_configs"
GiB = 2**30
#: what the trace cannot see, reserved before comparing with the GPU's memory: the CUDA context (with cuBLAS and
#: cuDNN workspaces, 0.5 - 1 GiB) and a fraction of the peak for the caching allocator's fragmentation and NCCL's
#: buffers
CONTEXT_GIB = 1.0
FRAGMENTATION = 0.10
#: DTYPES of config keys (teacher.dtype, trainer.fsdp.param_dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# Model configs: a network without its weights
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """A shipped model config: the network's diffusers config, its scheduler's, the VAE's factors and what one
    training batch holds per sample (`conditions`: name -> shape, float32; `{"shape": [...], "dtype": "int64"}` for
    another dtype). `parameters` is the network's parameter count (tests/test_plan.py builds it and checks)."""

    name: str
    title: str
    network: dict
    scheduler: dict
    vae: dict
    pipeline: str
    conditions: dict
    hub_ids: tuple[str, ...] = ()
    parameters: int | None = None
    published: str = ""
    resolution: int = 1024
    num_frames: int = 1


def model_config_names() -> list[str]:
    """The shipped model configs, by name."""
    return sorted(p.stem for p in MODEL_CONFIGS.glob("*.json"))


def read_model_config(name: str | Path) -> ModelConfig:
    """A shipped model config by name (`sdxl`), or a JSON file of the same keys."""
    path = Path(name)
    if not path.suffix == ".json":
        path = MODEL_CONFIGS / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"--model: no model config {str(name)!r}; shipped: {model_config_names()} (or a JSON file "
                          "with the keys of distill/assets/model_configs/sdxl.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {e}") from None
    missing = [k for k in ("name", "network", "scheduler", "pipeline", "conditions") if k not in data]
    if missing:
        raise ConfigError(f"{str(path)!r}: model config keys missing: {missing}")
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{str(path)!r}: unknown model config keys {unknown}; valid: {sorted(known)}")
    data["hub_ids"] = tuple(data.get("hub_ids", ()))
    data.setdefault("title", data["name"])
    data.setdefault("vae", {})
    return ModelConfig(**data)


@contextlib.contextmanager
def model_folder(model: ModelConfig) -> Iterator[Path]:
    """A temporary diffusers folder of `model`'s configs, no weights (the network's `config.json`, the scheduler's,
    the VAE's and a `model_index.json` naming the pipeline), so everything that reads a teacher folder (latent
    shapes, the dynamic shift, the export target) reads it as it reads a downloaded one."""
    from distill.families import family_for
    from distill.families.target import network_class

    sub = family_for(network_class(model.network)).subfolder
    with tempfile.TemporaryDirectory(prefix=f"distill-plan-{model.name}-") as tmp:
        root = Path(tmp)
        files = {f"{sub}/config.json": model.network, "scheduler/scheduler_config.json": model.scheduler,
                 "vae/config.json": model.vae, "model_index.json": {"_class_name": model.pipeline}}
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(json.dumps(content))
        yield root


def choose_model(cfg: Config, model: str | None) -> tuple[ModelConfig | None, Path | None]:
    """(model config, None) or (None, the teacher folder): `--model` when given; else the teacher folder when it
    exists here (its own config.json files, no weights read); else the shipped model config that lists
    `teacher.path` among its Hugging Face ids."""
    if model:
        return read_model_config(model), None
    folder = resolve_path(cfg.teacher.path)
    if folder.is_dir():
        return None, folder
    for name in model_config_names():
        found = read_model_config(name)
        if cfg.teacher.path in found.hub_ids:
            return found, None
    raise ConfigError(f"teacher.path: {cfg.teacher.path!r} is not a folder here and no shipped model config lists "
                      f"it; pass --model NAME (one of {model_config_names()}) or --model FILE.json")


# ---------------------------------------------------------------------------------------------------------------
# Batches of the right shapes
# ---------------------------------------------------------------------------------------------------------------


def folder_conditions(folder: Path, network_config: dict, resolution: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-sample condition shapes of a latent teacher folder's batches, as its pipeline encodes prompts
    (`distill.data.prompts.PromptDataset`): the token counts from its tokenizers (CLIP: model_max_length; T5:
    the pipelines' max_sequence_length, 256 for SD3, 512 for Flux and Wan), the widths from the network config.
    tests/test_plan.py checks them against the prompt embeddings of the tiny pipelines."""
    from distill.families.target import network_class, read_json, target_for

    def clip_tokens() -> int:
        return int(read_json(folder / "tokenizer" / "tokenizer_config.json").get("model_max_length", 77))

    net, cls = network_config, network_class(network_config)
    if cls == "UNet2DConditionModel":
        out = {"encoder_hidden_states": (clip_tokens(), net["cross_attention_dim"])}
        if net.get("addition_embed_type") == "text_time":
            time_ids = 6  # StableDiffusionXLPipeline: original size, crop top-left, target size
            pooled = net["projection_class_embeddings_input_dim"] - time_ids * net["addition_time_embed_dim"]
            out["text_embeds"] = (pooled,)
            out["time_ids"] = (time_ids,)
    elif cls == "SD3Transformer2DModel":
        out = {"encoder_hidden_states": (clip_tokens() + 256, net["joint_attention_dim"]),
               "pooled_projections": (net["pooled_projection_dim"],)}
    elif cls == "FluxTransformer2DModel":
        out = {"encoder_hidden_states": (512, net["joint_attention_dim"]),
               "pooled_projections": (net["pooled_projection_dim"],)}
    elif cls == "WanTransformer3DModel":
        out = {"encoder_hidden_states": (512, net["text_dim"])}
    else:
        raise ConfigError(f"teacher.path: no condition shapes known for a {cls} teacher's prompts; plan it with a "
                          "model config (--model FILE.json, keys as distill/assets/model_configs/sdxl.json)")
    shapes = {k: (tuple(v), "float32") for k, v in out.items()}
    target = target_for(net, read_json(folder / "scheduler" / "scheduler_config.json"))
    for k, v in target.micro_conditions(net, resolution, 1).items():  # Flux dev's embedded guidance
        shapes[k] = (tuple(v.shape[1:]), str(v.dtype).removeprefix("torch."))
    return shapes


class SyntheticData:
    """A data set of the right shapes (the `sample(batch_size, generator) -> Batch`, `image_shape`,
    `grid_condition(n)` of docs/design.md): Gaussian latents and conditions of the teacher pipeline's shapes,
    drawn when sampled (fake tensors under FakeTensorMode). `images`: whether batches carry data samples
    (data.name: images) or only conditions (data.name: prompts); `null_condition`: the empty prompt, (1, ...)."""

    latent = True

    def __init__(self, image_shape: tuple[int, ...], conditions: dict[str, tuple[tuple[int, ...], str]],
                 images: bool):
        self.image_shape = tuple(image_shape)
        self.conditions = conditions
        self.images = images
        self.null_condition = {k: torch.zeros(1, *shape, dtype=getattr(torch, dtype))
                               for k, (shape, dtype) in conditions.items() if dtype.startswith("float")}

    def _condition(self, n: int, generator: torch.Generator | None) -> Condition:
        out = {}
        for k, (shape, dtype) in self.conditions.items():
            dt = getattr(torch, dtype)
            out[k] = torch.randn(n, *shape, generator=generator, dtype=dt) if dt.is_floating_point else \
                torch.zeros(n, *shape, dtype=dt)
        return out

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        images = torch.randn(batch_size, *self.image_shape, generator=generator) if self.images else None
        return Batch(images, self._condition(batch_size, generator))

    def grid_condition(self, n: int) -> Condition:
        return self._condition(n, None)


def make_data(cfg: Config, folder: Path, model: ModelConfig | None):
    """The data set of the plan: the real one for the pixel data sets (digits, toy: small, no model needed), else
    :class:`SyntheticData` of the teacher pipeline's latent and condition shapes."""
    from distill.data import make_dataset
    from distill.families.target import teacher_target

    if cfg.data.name in ("digits", "toy"):
        return make_dataset(cfg.data.name, cfg.data.resolution)
    target, net, _ = teacher_target(folder, cfg.teacher.prediction)
    if target is None:
        raise ConfigError(f"data.name: {cfg.data.name} needs a latent teacher; {str(folder)!r} is a pixel one")
    shape = target.latent_shape(folder, net, cfg.data.resolution, cfg.data.num_frames)
    if model is not None:
        conditions = {k: (tuple(v), "float32") if isinstance(v, list) else
                      (tuple(v["shape"]), v.get("dtype", "float32")) for k, v in model.conditions.items()}
    else:
        conditions = folder_conditions(folder, net, cfg.data.resolution)
    return SyntheticData(shape, conditions, images=cfg.data.name == "images")


# ---------------------------------------------------------------------------------------------------------------
# Networks without weights
# ---------------------------------------------------------------------------------------------------------------


def config_teacher(folder: Path, cfg: Config, dtype: torch.dtype):
    """The teacher of a folder as `distill.models.denoiser.load_denoiser` loads it (in `dtype` but the modules
    diffusers keeps in float32), built from its network config on the meta device: no weights read, no memory.
    (Made fake only once the recipe is built: a module of fake tensors cannot change dtype, `Denoiser.copy` does.)"""
    from distill.models.denoiser import load_denoiser

    if not any((folder / s / "config.json").is_file() for s in ("unet", "transformer")):
        raise ConfigError(f"teacher.path: no 'unet/config.json' or 'transformer/config.json' under {str(folder)!r}")
    return load_denoiser(folder, prediction=cfg.teacher.prediction, dtype=dtype, resolution=cfg.data.resolution,
                         meta=True)


def to_fake(mode, roots: list[nn.Module | None]) -> None:
    """Every parameter and buffer of `roots` (and of the modules they hold) as a tensor of FakeTensorMode `mode`,
    in place: meta and real ones (a recipe's heads, LoRA factors) become fake CPU tensors of their shape, dtype
    and `requires_grad`, each once however many modules hold it, so shared ones stay shared. Fake tensors of
    another fake mode (a deep copy makes its own) are re-made in `mode` too. A peft LoRA factor takes its base
    layer's dtype, as peft casts it on a real device (on the meta device it casts the first adapter only)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (old, new): the old one is kept alive
    dtypes: dict[int, torch.dtype] = {}
    for root in roots:
        for m in [] if root is None else root.modules():
            base = getattr(m.get_base_layer(), "weight", None) if isinstance(m, BaseTunerLayer) else None
            if base is not None and base.is_floating_point():
                for name in m.adapter_layer_names:
                    dtypes.update({id(p): base.dtype for p in getattr(m, name).parameters()})

    def fake(t: torch.Tensor, param: bool) -> torch.Tensor:
        dtype = dtypes.get(id(t), t.dtype)
        if isinstance(t, FakeTensor) and t.fake_mode is mode and dtype == t.dtype:
            return t
        if id(t) not in memo:
            with mode:
                new = torch.empty_strided(t.size(), t.stride(), dtype=dtype, device="cpu")
            memo[id(t)] = (t, nn.Parameter(new, requires_grad=t.requires_grad) if param else new)
        return memo[id(t)][1]

    for root in roots:
        if root is None:
            continue
        for m in root.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = fake(p, True)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = fake(b, False)


def fake_copy(mode, module: nn.Module) -> nn.Module:
    """`copy.deepcopy(module)` with its tensors in fake mode `mode` (copied outside any mode: a deep copy of a fake
    tensor makes a fake tensor of another mode, which :func:`to_fake` re-makes in `mode`)."""
    twin = copy.deepcopy(module)
    to_fake(mode, [twin])
    return twin


META, CPU = torch.device("meta"), torch.device("cpu")
#: `tensor.device` of a fake tensor, asked through the dispatch modes
DEVICE_QUERY = torch.ops.prim.device.default


def _is_real(t: torch.Tensor) -> bool:
    """A tensor with data: not fake, not a subclass, not a functorch wrapper (inside torch.func.jvp a fake tensor
    arrives wrapped, as a plain-looking Tensor)."""
    return type(t) in (torch.Tensor, nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t) \
        and t.device.type != "meta"


class FakeValues(TorchDispatchMode):
    """A dispatch mode inside FakeTensorMode for what asks a tensor's value: ops whose tensor inputs are all real
    (a recipe's schedule times and grids, made when it was built) run for real, so their values stay; the value of
    a fake tensor (`.item()` of a logged loss, a random step index) is a stand-in: 0, or True."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is DEVICE_QUERY:
            return func(*args, **kwargs)
        if any(t is DTensor for t in types):
            return NotImplemented  # DTensor desugars into local ops first, as MemTracker lets it
        if any(d == META for d in tree_leaves((args, kwargs)) if isinstance(d, torch.device)):
            # forward AD's group_norm rule (sCM's JVP) asks for a fake tensor's device in C++ and gets its meta
            # storage's; nothing in a traced step means the meta device (deep copies are made outside this mode)
            args, kwargs = tree_map_only(torch.device, lambda d: CPU if d == META else d, (args, kwargs))
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors and all(_is_real(t) for t in tensors):
            with _disable_current_modes():
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            constant = getattr(t, "constant", None) if isinstance(t, FakeTensor) else None
            if constant is not None:
                return constant.item()
            return True if t.dtype == torch.bool else 0
        return func(*args, **kwargs)


class StepMemTracker(MemTracker):
    """torch's MemTracker for one training step. Its storage accounting, and so the peak, is MemTracker's own; what
    differs is per-module bookkeeping a step needs otherwise:

    * a step calls a network more than once at the top level (the teacher in two terms of one loss, the student in
      a rollout and again with gradient), which MemTracker refuses ("multiple iterative calls", for its per-module
      statistics): a module's statistics restart at such a call;
    * MemTracker's gradient hooks cannot be registered on frozen parameters (the teacher, the network an update
      does not train): such a module is tracked without them (its trained submodules get theirs; the hooks only
      name gradients as such);
    * under torch.func.jvp (sCM's tangent) a module's inputs are functorch wrappers without readable storages: the
      per-module input and output sizes are not taken;
    * the per-module peaks are not kept (a pass over every module seen, at every operation);
    * Python's cyclic garbage collector is off for the step (collected before it): what reference cycles hold
      counts until the step ends, whenever a collection would have come (a fake trace allocates many more Python
      objects than a real step, so the collector would run at other moments).
    """

    def __enter__(self) -> "StepMemTracker":
        if self._depth == 0:
            gc.collect()
            self._gc_was_enabled = gc.isenabled()
            gc.disable()
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        if self._depth == 0 and self._gc_was_enabled:
            gc.enable()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is DEVICE_QUERY:  # no storage; two thirds of the calls a fake trace makes
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        if not self._mod_tracker.is_bw:  # a call in backward is a recomputation (gradient checkpointing)
            self.memory_tracking.pop(module, None)
        super()._pre_fw_hook(module, inputs)

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        frozen = any(not p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and not frozen)

    def _track_inputs_or_outputs(self, args: Any) -> int:
        return 0  # the operations' results are tracked as ever: __torch_dispatch__ sees the unwrapped tensors

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


def peak_snapshot(tracker, device: str = "cpu") -> dict[str, int]:
    """The tracker's peak on `device` (the one a trace runs on) as {category: bytes, "Total": bytes}. Meta tensors
    (forward AD makes some for its shape checks) hold no memory and are left out."""
    snap = tracker.get_tracker_snapshot("peak").get(torch.device(device), {"Total": 0})
    return {getattr(k, "value", k): int(v) for k, v in snap.items()}


@contextlib.contextmanager
def gpu_jvp_attention() -> Iterator[None]:
    """sCM and rCM's JVP attention (distill.kernels.jvp_attention) as it runs on a GPU, for a trace on the CPU: the
    backend chosen for a CUDA tensor (the Triton kernel for bf16/fp16, and for fp32 with tf32 allowed; else the
    PyTorch formulas, which materialise the attention matrices), and the kernel's launch as what it allocates, its
    outputs (O, the tangent of O, the log-sum-exp: linear in the sequence length), since a Triton kernel cannot run
    on fake tensors."""
    from distill.kernels import jvp_attention as kernel

    select, launch = kernel.select_backend, kernel._launch_triton

    def select_for_cuda(device, dtype=torch.float32, backend=None):
        return select(torch.device("cuda"), dtype, backend)

    def outputs(q, k, v, tq, tk, tv, attn_mask, is_causal, scale, interpret, out=None, tangent_out=None,
                lse_out=None):
        b, h, lq, _ = q.shape
        o = out if out is not None else torch.empty((b, h, lq, v.shape[-1]), device=q.device, dtype=q.dtype)
        to = None
        if tq is not None or tk is not None or tv is not None:
            to = tangent_out if tangent_out is not None else torch.empty_like(o)
        lse = lse_out if lse_out is not None else torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
        return o, to, lse

    kernel.select_backend, kernel._launch_triton = select_for_cuda, outputs
    try:
        yield
    finally:
        kernel.select_backend, kernel._launch_triton = select, launch


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[Any]:
    """A fake process group (torch.testing's FakeStore, backend "fake": collectives return at once) of
    `world_size` processes, this one rank 0, and its one-dimensional CPU device mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("distill plan makes its own fake process group; a process group is already initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# Exact counts
# ---------------------------------------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of `t` on this rank: numel x element size; an FSDP2 shard (a DTensor) holds ceil(dim0 / N) rows of
    its dim 0 (FSDP2 pads every shard to that)."""
    if isinstance(t, DTensor):
        n = t.device_mesh.size()
        rows = t.shape[0] if t.dim() else 1
        per_row = t.numel() // rows if rows else 0
        return math.ceil(rows / n) * per_row * t.element_size()
    return t.numel() * t.element_size()


def unique_params(*modules: nn.Module | None) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def adamw_bytes(params: list[torch.Tensor], kind: str = "adamw") -> int:
    """AdamW's states on this rank: exp_avg and exp_avg_sq of every trained parameter's dtype (float32), and one
    float32 `step` per parameter tensor (a host tensor on a GPU, unless fused or capturable). `adamw_8bit`
    (bitsandbytes AdamW8bit): one byte per state element for tensors of at least 4096 elements (its
    min_8bit_size; smaller ones keep float32 states), quantisation statistics not counted (< 2 %)."""
    total = 0
    for p in params:
        b = tensor_bytes(p)
        total += 2 * b // p.element_size() if kind == "adamw_8bit" and p.numel() >= 4096 else 2 * b
        total += 4
    return total


@dataclass
class RoleMemory:
    """One role's memory on each rank, in bytes."""

    role: str
    parameters: int = 0
    gradients: int = 0
    optimizer: int = 0
    on_host: bool = False  # offloaded: in host memory, not counted in the device's peak

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer


@dataclass
class MemoryPlan:
    """The plan of one config: exact counts per role, the traced peak, what was added or taken away, the verdict."""

    config: str
    model: str
    world_size: int
    parallel: str
    mixed_precision: str
    teacher_dtype: str
    batch_size: int
    sample_shape: list[int]
    gradient_checkpointing: bool
    roles: list[RoleMemory]
    buffers: int
    ddp_buckets: int
    traced_peak: int
    traced_breakdown: dict[str, int]
    host_resident: int
    optimizer_correction: int
    peak: int
    reserve: int
    gpu_memory: int
    notes: list[str] = field(default_factory=list)

    @property
    def persistent(self) -> int:
        """Device bytes held through the whole step: parameters, buffers, optimizer states, EMA, DDP buckets."""
        return sum(r.parameters + r.optimizer for r in self.roles if not r.on_host) + self.buffers + self.ddp_buckets

    @property
    def transient(self) -> int:
        """Activations, gradients and temporaries at the peak."""
        return self.peak - self.persistent

    @property
    def needs(self) -> int:
        return self.peak + self.reserve

    @property
    def fits(self) -> bool:
        return self.needs <= self.gpu_memory

    def to_json(self) -> dict:
        out = asdict(self)
        out["roles"] = [{**asdict(r), "total": r.total} for r in self.roles]
        out.update(persistent=self.persistent, transient=self.transient, needs=self.needs, fits=self.fits,
                   units="bytes per rank")
        return out

    def table(self) -> str:
        """The report `distill plan` prints (GiB, or MiB for a plan under 1 GiB)."""
        unit, scale = ("GiB", GiB) if self.peak >= GiB else ("MiB", 2**20)

        def n(b: int) -> str:
            return f"{b / scale:10.2f}"

        w = 32
        lines = [f"{self.config}: {self.model}",
                 f"world size {self.world_size}, {self.parallel}, mixed precision {self.mixed_precision}, teacher "
                 f"{self.teacher_dtype}, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, "
                 f"batch {self.batch_size} x {tuple(self.sample_shape)} per rank",
                 "",
                 f"{unit + ' per rank':<{w}}{'parameters':>10} {'gradients':>10} {'optimizer':>10} {'total':>10}"]
        for r in self.roles:
            lines.append(f"{r.role + (' (host)' if r.on_host else ''):<{w}}{n(r.parameters)} {n(r.gradients)} "
                         f"{n(r.optimizer)} {n(r.total)}")
        if self.buffers:
            lines.append(f"{'buffers':<{w}}{n(self.buffers)}{'':>22}{n(self.buffers)}")
        if self.ddp_buckets:
            lines.append(f"{'DDP gradient buckets':<{w}}{'':>33}{n(self.ddp_buckets)}")
        rows = [("persistent: parameters, buffers, optimizer, EMA, buckets", self.persistent),
                ("activations, gradients and temporaries at the peak", self.transient),
                ("peak per rank", self.peak),
                ("reserve: CUDA context, fragmentation, NCCL buffers", self.reserve),
                ("needs", self.needs),
                ("--gpu-memory", self.gpu_memory)]
        lines += [""] + [f"{label:<{w + 33}}{n(b)}" for label, b in rows]
        lines += ["", ("fits" if self.fits else "does not fit") + f": needs {self.needs / GiB:.1f} GiB per rank of "
                  f"{self.gpu_memory / GiB:g} GiB"]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one training iteration needs, as the trainer holds it."""

    cfg: Config
    recipe: Any
    teacher: Any
    dataset: Any
    optimizers: dict[str, Any]
    schedulers: dict[str, Any]
    ema: Any
    target: nn.Module | None
    sharded: bool
    autocast: Any  # () -> context manager
    step: int = 1


def resolve_mixed_precision(cfg: Config, device: str) -> str:
    """trainer.mixed_precision as the trainer resolves it on `device` ("auto": bf16 on CUDA, "no" elsewhere)."""
    mp = cfg.trainer.mixed_precision
    return ("bf16" if device == "cuda" else "no") if mp == "auto" else mp


def autocast_for(mixed_precision: str):
    """accelerate's autocast for a mixed precision, on the CPU the trace runs on."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext


def update(run: Run, name: str, stream: int) -> None:
    """One update of network `name` as `distill.training.trainer.Trainer._update` runs it: the micro-batches'
    losses and backward passes (gradients reduced at the last), clipping, the optimizer and schedule steps."""
    from distill.base.seeding import step_seed
    from distill.training import parallel
    from distill.training.nets import update_nets

    r, tc = run.recipe, run.cfg.trainer
    module = r.generator if name == "generator" else r.critic
    loss_fn = r.generator_loss if name == "generator" else r.critic_loss
    k = tc.gradient_accumulation_steps
    seeds = [step_seed(run.cfg.run.seed, run.step, i, 1000 + 64 * stream) for i in range(k)]
    batches = [run.dataset.sample(run.cfg.data.batch_size, torch.Generator().manual_seed(s)) for s in seeds]
    with update_nets(r, name, module, run.target) as nets:
        if run.sharded:
            parallel.sync_requires_grad([r.generator, r.critic, run.target])
        for i, batch in enumerate(batches):
            local = run.sharded and i < k - 1  # gradients accumulate unreduced until the last micro-batch
            with parallel.no_gradient_sync(module) if local else contextlib.nullcontext():
                with run.autocast():
                    loss, _ = loss_fn(nets, batch, run.step)
                (loss / k).backward()
    max_norm = math.inf if tc.max_grad_norm is None else tc.max_grad_norm
    torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)
    run.optimizers[name].step()
    run.schedulers[name].step()
    run.optimizers[name].zero_grad(set_to_none=True)


def iteration(run: Run) -> None:
    """One iteration as `Trainer.train_step` runs it: a critic update, the generator update, the EMA, the target
    network."""
    r = run.recipe
    if r.critic is not None:
        # one of the `trainer.critic_steps` critic updates: each starts and ends with the same tensors alive (the
        # networks, the optimizer states, the EMA), so the others repeat its memory exactly (tests/test_plan.py)
        update(run, "critic", 1)
    update(run, "generator", 0)
    if run.cfg.trainer.ema_decay != 0.0:  # decay 0: the averages are the weights (the trainer's raw_ema)
        run.ema.step(r.generator.parameters())
    if run.target is not None:
        with torch.no_grad():
            for t, p in zip(run.target.parameters(), r.generator.parameters()):
                t.lerp_(p.detach(), 1.0 - float(r.target_decay))


def initial_optimizer_states(optimizers) -> None:
    """Every optimizer's states as after its first step (zero gradients, so no weight moves), so the traced step is
    a later one: the states live through all of it."""
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def tracked_objects(run: Run) -> list:
    """What exists before a step and lives through it, for MemTracker.track_external: the networks (the recipe's
    and the teacher's), the optimizers, the EMA's averages, the target network."""
    out = [m for m in (run.recipe.generator, run.recipe.critic, run.target) if m is not None]
    out.append(run.teacher.model)
    out += list(run.optimizers.values())
    out += list(run.ema.shadow_params)
    return out


def role_memory(run: Run, world_size: int, device: str) -> tuple[list[RoleMemory], int, int, list[str]]:
    """Exact bytes per role on this rank: (roles, buffers, DDP gradient buckets, notes)."""
    from distill.training import parallel

    cfg, r = run.cfg, run.recipe
    tc = cfg.trainer
    offload_trained = tc.parallel == "fsdp2" and run.sharded and tc.fsdp.offload and device == "cuda"
    offload_teacher = cfg.teacher.offload and device == "cuda"
    kind = getattr(tc, "optimizer", "adamw")
    roles, counted = [], set()
    for name, module in (("generator", r.generator), ("critic", r.critic)):
        if module is None:
            continue
        params = unique_params(module)
        counted.update(id(p) for p in params)
        trained = [p for p in params if p.requires_grad]
        roles.append(RoleMemory(name, sum(tensor_bytes(p) for p in params), sum(tensor_bytes(p) for p in trained),
                                adamw_bytes(trained, kind), on_host=offload_trained))
    base = parallel.teacher_network(run.teacher)
    frozen = [p for p in unique_params(base) if id(p) not in counted]
    shared = len(frozen) < len(unique_params(base))  # adapter roles: their LoRA factors sit in the teacher's network
    roles.append(RoleMemory("teacher" + (" (the adapters' base)" if shared else ""),
                            sum(tensor_bytes(p) for p in frozen),
                            on_host=offload_trained if shared else offload_teacher))
    ema = 0 if tc.ema_decay == 0.0 else sum(tensor_bytes(p) for p in run.ema.shadow_params)  # 0: the weights
    roles.append(RoleMemory("EMA of the generator", ema, on_host=getattr(tc, "ema_device", "device") == "cpu"
                            and device == "cuda" and ema > 0))
    if run.target is not None:
        roles.append(RoleMemory("target network", sum(tensor_bytes(p) for p in unique_params(run.target)),
                                on_host=offload_trained))  # sharded (and offloaded) like the trained networks
    buffers = sum(tensor_bytes(b) for m in (r.generator, r.critic, base, run.target) if m is not None
                  for b in m.buffers())
    ddp = 0
    notes = []
    if tc.parallel == "ddp" and world_size > 1:
        # DDP (gradient_as_bucket_view off, accelerate's default) keeps a flat bucket per gradient bucket: one more
        # copy of every trained gradient, allocated when the network is wrapped
        ddp = sum(x.gradients for x in roles[:2] if x.role in ("generator", "critic"))
        notes.append("DDP's gradient buckets are counted, not traced (DDP cannot be built on a fake process group): "
                     "one more copy of every trained gradient")
    return roles, buffers, ddp, notes


def plan_config(cfg: Config, world_size: int = 1, gpu_memory_gib: float = 80.0, model: str | None = None,
                device: str = "cuda", config_name: str = "", context_gib: float = CONTEXT_GIB,
                fragmentation: float = FRAGMENTATION) -> MemoryPlan:
    """The memory plan of one training step of `cfg` per rank of `world_size`, for a `device` ("cuda": what a GPU
    run does, bf16 autocast for "auto", AdamW's foreach kernels, offloading; "cpu": what a CPU run does, for the
    comparison with a traced CPU run in tests/test_plan.py)."""
    if world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world_size}")
    chosen, folder = choose_model(cfg, model)
    with model_folder(chosen) if chosen is not None else contextlib.nullcontext(folder) as root:
        check_plannable(cfg, root, weights=chosen is None)
        sharded = cfg.trainer.parallel == "fsdp2" and world_size > 1
        with fake_process_group(world_size) if sharded else contextlib.nullcontext() as mesh:
            plan = _plan(cfg, root, chosen, world_size, mesh, device)
    name = chosen.name if chosen is not None else str(folder)
    title = f"{name}" + (f" ({chosen.title})" if chosen is not None else "")
    plan.config = config_name or plan.config
    plan.model = title
    plan.gpu_memory = int(gpu_memory_gib * GiB)
    plan.reserve = int(context_gib * GiB + fragmentation * plan.peak)
    plan.notes.append(f"reserve: {context_gib:g} GiB (CUDA context, cuBLAS/cuDNN workspaces) + {fragmentation:.0%} of "
                      "the peak (caching-allocator fragmentation, NCCL buffers), which no trace sees")
    return plan


def check_plannable(cfg: Config, folder: Path, weights: bool = True) -> None:
    """What `distill train` checks before loading that a plan needs too (the files of the data section are not
    needed): the teacher folder (`weights`: as `distill train` checks it, a model config's folder has none), its
    export target at the data's size, the recipe's relations."""
    from distill.export.checks import check_exportable
    from distill.training.files import check_teacher_folder

    if weights:
        check_teacher_folder(folder, "teacher.path")
    check_exportable(folder, cfg.teacher.prediction, resolution=cfg.data.resolution, num_frames=cfg.data.num_frames)
    real_path = cfg.teacher.path
    cfg.teacher.path = str(folder)  # a recipe's relations that read the teacher folder read this one
    try:
        cfg.recipe.check_run(cfg)
    finally:
        cfg.teacher.path = real_path


def _plan(cfg: Config, folder: Path, model: ModelConfig | None, world_size: int, mesh, device: str) -> MemoryPlan:
    from diffusers.training_utils import EMAModel

    from distill.training import parallel
    from distill.training.optim import make_optimizer
    from distill.training.recipe import Recipe
    from distill.training.registry import recipe_module

    tc = cfg.trainer
    torch.manual_seed(cfg.run.seed)
    notes: list[str] = []
    # the teacher (meta), the data and the recipe, as distill.training.registry.build_run makes them
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    teacher = config_teacher(folder, cfg, DTYPES[getattr(cfg.teacher, "dtype", "float32")])
    dataset = make_data(cfg, folder, model)
    null = getattr(dataset, "null_condition", None)
    if null:
        teacher.family.set_null_embeddings(null)
    recipe = recipe_module(cfg.recipe_name).build(cfg, teacher, dataset)
    if recipe.critic is not None and type(recipe).critic_loss is Recipe.critic_loss:
        raise ConfigError(f"recipe.name: {cfg.recipe_name}: {type(recipe).__name__} has a critic but no critic_loss")
    dataset = dataset if recipe.dataset is None else recipe.dataset

    to_fake(mode, [teacher, recipe.generator, recipe.critic])
    # the trainer's set-up (distill.training.trainer.Trainer.__init__), in its order
    parallel.apply_memory_modes(recipe, teacher, cfg, torch.device("cpu"))  # sets flags, makes no tensor
    target = None
    if recipe.target_decay is not None:
        target = fake_copy(mode, recipe.generator).requires_grad_(False)
    with mode, FakeValues():
        sharded = mesh is not None
        if sharded:
            parallel.shard_roles(recipe, teacher, cfg, mesh=mesh, extra=[target])
        kind = getattr(tc, "optimizer", "adamw")
        optimizers, schedulers = {}, {}
        for name, module in (("generator", recipe.generator), ("critic", recipe.critic)):
            if module is None:
                continue
            # adamw_8bit (bitsandbytes, CUDA only) is traced as torch's AdamW; its states are counted below
            optimizers[name], schedulers[name] = make_optimizer(module, getattr(tc, name), "adamw")
            if device == "cuda":  # AdamW's default on CUDA: the foreach kernels (temporaries of all states at once)
                for group in optimizers[name].param_groups:
                    group["foreach"] = True
        if tc.ema_decay == 0.0:  # as the trainer: the averages are the generator's own weights, no copy
            ema = EMAModel([], decay=0.0)
            ema.shadow_params = list(recipe.generator.parameters())
        else:
            ema = EMAModel(recipe.generator.parameters(), decay=tc.ema_decay)
        initial_optimizer_states(optimizers.values())
        run = Run(cfg, recipe, teacher, dataset, optimizers, schedulers, ema, target, sharded,
                  autocast_for(resolve_mixed_precision(cfg, device)))

        roles, buffers, ddp, more = role_memory(run, world_size, device)
        notes += more
        tracker = StepMemTracker()
        tracker.track_external(*tracked_objects(run))
        with gpu_jvp_attention() if device == "cuda" else contextlib.nullcontext(), tracker:
            iteration(run)
    traced = peak_snapshot(tracker)

    # what the trace (one CPU device) cannot see
    host = sum(x.parameters + x.optimizer for x in roles if x.on_host)
    if any(x.on_host for x in roles):
        notes.append("host memory (offloaded): " + ", ".join(x.role for x in roles if x.on_host) + "; taken off the "
                     "traced peak" + ("; the gradients of offloaded trained networks stay counted on the device (an "
                                      "over-estimate by at most their size)"
                                      if any(x.on_host and x.gradients for x in roles) else ""))
    trained = [p for p in unique_params(recipe.generator, recipe.critic) if p.requires_grad]
    correction = adamw_bytes(trained, kind) - adamw_bytes(trained) if kind == "adamw_8bit" else 0
    if correction:
        notes.append("trainer.optimizer adamw_8bit is traced as torch's AdamW; its 8-bit states are counted instead")
    if cfg.teacher.offload and tc.parallel == "ddp" and device == "cuda":
        largest = max((sum(tensor_bytes(p) for p in m.parameters(recurse=False))
                       for m in parallel.teacher_network(teacher).modules()), default=0)
        host -= largest  # accelerate's cpu_offload brings one module's weights to the device for its pass
        notes.append("teacher.offload under ddp: one module's weights at a time on the device (the largest counted)")
    peak = traced["Total"] - host + correction + ddp
    ema = next(x for x in roles if x.role.startswith("EMA"))
    if ema.on_host:
        # the trainer brings the averages to the device for their update (diffusers' EMAModel updates in place):
        # the device then holds them with everything persistent, and the update's two temporaries of a weight
        largest = max((tensor_bytes(p) for p in unique_params(recipe.generator)), default=0)
        resident = sum(x.parameters + x.optimizer for x in roles if not x.on_host) + buffers + ddp + correction
        peak = max(peak, resident + ema.parameters + 2 * largest)
        notes.append("trainer.ema_device cpu: the averages are on the device only for their update (counted then)")
    return MemoryPlan(config="", model="", world_size=world_size, parallel=tc.parallel,
                      mixed_precision=resolve_mixed_precision(cfg, device),
                      teacher_dtype=getattr(cfg.teacher, "dtype", "float32"), batch_size=cfg.data.batch_size,
                      sample_shape=list(dataset.image_shape),
                      gradient_checkpointing=bool(getattr(tc, "gradient_checkpointing", False)), roles=roles,
                      buffers=buffers, ddp_buckets=ddp, traced_peak=traced["Total"], traced_breakdown=traced,
                      host_resident=host, optimizer_correction=correction, peak=peak, reserve=0, gpu_memory=0,
                      notes=notes)


def traced_trainer_step(trainer) -> dict[str, int]:
    """The peak of one real `Trainer.train_step` on this machine's CPU, traced by the same tracker as a plan: after
    one untracked step (which makes the optimizer states, as a plan's steady state has them), the next step's peak
    as {category: bytes, "Total": bytes}. What tests/test_plan.py compares a plan with."""
    r = trainer.recipe
    trainer.train_step()
    tracker = StepMemTracker()
    modules = [m for m in (r.generator, r.critic, trainer.target_network) if m is not None]
    teacher = getattr(r, "teacher", None)
    if teacher is not None:
        modules.append(teacher.model)
    optimizers = [o for o in (trainer.generator_opt, trainer.critic_opt) if o is not None]
    tracker.track_external(*modules, *optimizers, *trainer.ema.shadow_params)
    with tracker:
        trainer.train_step()
    return peak_snapshot(tracker)


def load_plan_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """A config validated as `distill train` validates it, without the checks of the files it names (a plan reads
    no weights and no data; the teacher folder's configs are checked by :func:`check_plannable`)."""
    from distill.config import parse_config, read_config
    from distill.training.registry import recipe_module

    return parse_config(read_config(path, overrides), lambda name: recipe_module(name).Config)
