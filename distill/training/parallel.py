"""Scale: every role sharded with torch FSDP2, and the memory modes (docs/scale.md).

`trainer.parallel: fsdp2` shards the student, the critic (fake score and heads) and the frozen teacher block by
block over the processes with torch's own `fully_shard` (torch.distributed.fsdp): each process holds 1/N of every
network's weights, gradients and optimizer states, and gathers one block at a time for its pass. The blocks are
the family's (`Family.shard_blocks`, else the diffusers class's own `_no_split_modules`: UNet resnet and transformer
blocks, MMDiT / Flux / Wan transformer blocks), then each network's root takes the rest (embeddings, heads).

Why not accelerate's FSDP plugin: accelerate turns `--use_fsdp` into DDP on CPU processes (its distributed type is
MULTI_CPU there), so the plugin's path could not be tested on CPU machines; `fully_shard` runs the same on gloo
and NCCL. accelerate still launches the processes, sets up the process group, runs autocast and logs.

The memory modes are config keys, each applied here: `trainer.gradient_checkpointing` (diffusers' own, per
network), `teacher.dtype` and `teacher.offload`, `trainer.fsdp.{param_dtype, reduce_dtype, offload}`, and
`trainer.ema_device` / `trainer.optimizer` (in the trainer and `distill.training.optim`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import nn

from distill.base.errors import ConfigError
from distill.config import Config
from distill.models.adapters import AdapterDenoiser, adapter_checkpointing
from distill.models.denoiser import Denoiser

logger = logging.getLogger("distill")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def networks(role: nn.Module | None) -> list[nn.Module]:
    """The diffusers networks a role holds (a Denoiser's `model`; an adapter role's shared base), each once."""
    found: list[nn.Module] = []
    if role is None:
        return found
    for m in role.modules():
        net = m.model if isinstance(m, (Denoiser, AdapterDenoiser)) else None
        if net is not None and all(net is not f for f in found):
            found.append(net)
    return found


def block_names(net: nn.Module) -> tuple[str, ...]:
    """The class names of `net`'s sharding (and checkpointing) blocks: the family's `shard_blocks`, else the
    diffusers class's `_no_split_modules`."""
    from distill.families import family_for

    try:
        names = getattr(family_for(net), "shard_blocks", None)
    except (KeyError, ValueError, TypeError):
        names = None
    names = names or getattr(net, "_no_split_modules", None) or ()
    return tuple(names)


def blocks(net: nn.Module) -> list[nn.Module]:
    """The outermost submodules of `net` whose class is one of its blocks (a block inside a block is not one)."""
    names = set(block_names(net))
    out: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if type(child).__name__ in names:
                out.append(child)
            else:
                walk(child)

    walk(net)
    return out


def teacher_network(teacher: Denoiser | AdapterDenoiser) -> nn.Module:
    return teacher.model


# ---------------------------------------------------------------------------------------------------------------
# Memory modes that apply on one process as well
# ---------------------------------------------------------------------------------------------------------------


def apply_memory_modes(recipe, teacher: Denoiser, cfg: Config, device: torch.device) -> None:
    """The memory modes that change the networks themselves: gradient checkpointing of the trained networks and
    the teacher's CPU offload under DDP (under FSDP2 :func:`shard_roles` offloads)."""
    tc = cfg.trainer
    if tc.gradient_checkpointing:
        for role_name, role in (("generator", recipe.generator), ("critic", recipe.critic)):
            for net in networks(role):
                if not getattr(net, "_supports_gradient_checkpointing", False):
                    raise ConfigError(f"trainer.gradient_checkpointing: {type(net).__name__} (the {role_name}'s "
                                      "network) has no gradient checkpointing; set it to false")
                has_adapters = any(".lora_" in n for n, _ in net.named_parameters())
                net.enable_gradient_checkpointing(adapter_checkpointing if has_adapters else None)
    if cfg.teacher.offload and tc.parallel == "ddp":
        shared = {id(p) for r in (recipe.generator, recipe.critic) if r is not None for n in networks(r)
                  for p in n.parameters()}
        net = teacher_network(teacher)
        if any(id(p) in shared for p in net.parameters()):
            raise ConfigError("teacher.offload: the teacher is the shared base of the adapter roles "
                              "(recipe.adapters: true), which train through it; set teacher.offload to false")
        if device.type != "cpu":
            from accelerate import cpu_offload

            cpu_offload(net, execution_device=device)


# ---------------------------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------------------------


def _mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ConfigError("trainer.parallel: fsdp2 needs torch.distributed: launch with `accelerate launch` (any "
                          "number of processes, one included)")
    from accelerate import PartialState

    device = PartialState().device
    return init_device_mesh(device.type, (dist.get_world_size(),))


def _shard_network(net: nn.Module, mesh, mp, offload: bool, reshard: bool, fully_shard, after) -> None:
    """`fully_shard` each block of `net`, then `net` itself (the rest of its parameters); `after(module)` after
    each."""
    policy = _offload_policy(offload)
    for block in blocks(net):
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=policy, reshard_after_forward=reshard)
        after(block)
    fully_shard(net, mesh=mesh, mp_policy=mp, offload_policy=policy, reshard_after_forward=reshard)
    after(net)


def shard_roles(recipe, teacher: Denoiser, cfg: Config, mesh=None, extra: list[nn.Module | None] = (),
                after_each: Callable[[nn.Module], None] = lambda unit: None) -> None:
    """Shard the recipe's generator and critic and the frozen teacher in place with FSDP2 (`trainer.parallel:
    fsdp2`); `extra` are more roles sharded like the trained ones (the trainer's EMA target network). The
    networks keep their identity (a recipe's references stay valid); their parameters become DTensor shards. The
    teacher's network is sharded once even where the adapter roles share it as their base; an adapter role then
    re-reads its LoRA parameters from the sharded base. `after_each(unit)` runs after each `fully_shard` (on every
    process, in the same order: :meth:`MainWeights.scatter`). Call before making the optimizers."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    fc = cfg.trainer.fsdp
    mesh = mesh or _mesh()
    # Inputs are cast by Denoiser.raw (x and the conditions to the compute dtype, never the timesteps: 999 is 1000
    # in bf16), so FSDP's own input cast is off.
    trained_mp = MixedPrecisionPolicy(param_dtype=DTYPES[fc.param_dtype], reduce_dtype=DTYPES[fc.reduce_dtype],
                                      cast_forward_inputs=False)
    teacher_mp = MixedPrecisionPolicy(cast_forward_inputs=False)
    done: list[nn.Module] = []

    def shard(net: nn.Module, mp, offload: bool) -> None:
        if any(net is d for d in done):
            return
        _shard_network(net, mesh, mp, offload, fc.reshard_after_forward, fully_shard, after_each)
        if mp.param_dtype is not None:
            net.__dict__["distill_compute_dtype"] = mp.param_dtype  # read by Denoiser.raw
        done.append(net)

    base = teacher_network(teacher)
    if shares_base(recipe, teacher):  # adapter roles: the base holds the LoRA factors that train, in the trained dtype
        shard(base, trained_mp, fc.offload)
    else:
        shard(base, teacher_mp, cfg.teacher.offload)
    for role in (recipe.generator, recipe.critic, *extra):
        if role is None:
            continue
        for net in networks(role):
            shard(net, trained_mp, fc.offload)
        for m in role.modules():
            if isinstance(m, AdapterDenoiser):
                m.rebind()
        # What no network holds (heads, sCM's log-variance) is sharded module by module: the largest submodules
        # with no sharded parameter inside, each its own FSDP root (a recipe calls its networks on their own, so
        # no FSDP root may hold another).
        for m in _unsharded_subtrees(role):
            fully_shard(m, mesh=mesh, mp_policy=trained_mp, offload_policy=_offload_policy(fc.offload),
                        reshard_after_forward=fc.reshard_after_forward)
            after_each(m)
    logger.info("FSDP2: %d network(s) sharded over %d process(es)", len(done), mesh.size())


def shares_base(recipe, teacher: Denoiser) -> bool:
    """Whether the trained roles are adapters on the teacher's network (recipe.adapters: true): it then trains
    through its LoRA factors, and is sharded (and offloaded) as a trained network."""
    base = teacher_network(teacher)
    trained_nets = [n for r in (recipe.generator, recipe.critic) for n in networks(r)]
    return any(base is n for n in trained_nets) or any(
        isinstance(m, AdapterDenoiser) for r in (recipe.generator, recipe.critic) if r is not None
        for m in r.modules())


def meta_init_devices(recipe, teacher: Denoiser, cfg: Config, device: torch.device,
                      extra: list[nn.Module | None] = ()) -> dict[int, torch.device]:
    """Where each role's shards live (`id(role)` -> device), for :class:`MainWeights`: the CPU for what FSDP2
    offloads (the teacher with teacher.offload, the trained roles with trainer.fsdp.offload), else `device`."""
    cpu = torch.device("cpu")
    trained = cpu if cfg.trainer.fsdp.offload else device
    teacher_offloaded = cfg.trainer.fsdp.offload if shares_base(recipe, teacher) else cfg.teacher.offload
    out = {id(teacher): cpu if teacher_offloaded else device}
    out.update({id(r): trained for r in (recipe.generator, recipe.critic, *extra) if r is not None})
    return out


def _unsharded_subtrees(role: nn.Module) -> list[nn.Module]:
    """The largest submodules of `role` that hold parameters, none of them sharded yet."""
    out: list[nn.Module] = []

    def visit(m: nn.Module, path: str) -> None:
        params = list(m.parameters())
        if not params or all(_is_dtensor(p) for p in params):
            return
        if not any(_is_dtensor(p) for p in params):
            out.append(m)
            return
        own = [n for n, p in m.named_parameters(recurse=False) if not _is_dtensor(p)]
        if own:
            raise ConfigError(f"trainer.parallel: fsdp2 cannot shard {path or 'the role'} "
                              f"({type(m).__name__}): it holds parameters {own} of its own beside sharded "
                              "networks; move them into a submodule")
        for name, child in m.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(role, "")
    return out


def sync_requires_grad(roles: list[nn.Module | None]) -> None:
    """Give the gathered (unsharded) weights of every sharded module of `roles` the requires_grad of their shards.

    FSDP2 copies the flag when it gathers a block, with `requires_grad_`; a network frozen for one update and
    trained in the next (the generator in a critic update, distill.training.nets.frozen) would have it copied in
    the middle of its next pass, which fails inside `torch.func.jvp` (sCM/rCM's target). Called once an update's
    flags are set, outside any transform. Reads FSDP2's parameter records (torch 2.13's private layout)."""
    from torch.distributed.fsdp import FSDPModule

    for role in roles:
        if role is None:
            continue
        for m in (m for r in (*networks(role), role) for m in r.modules()):
            if not isinstance(m, FSDPModule):
                continue
            group = m._get_fsdp_state()._fsdp_param_group
            for fsdp_param in [] if group is None else group.fsdp_params:
                gathered = getattr(fsdp_param, "_unsharded_param", None)
                if gathered is not None and gathered.requires_grad != fsdp_param.sharded_param.requires_grad:
                    gathered.requires_grad_(fsdp_param.sharded_param.requires_grad)


@contextlib.contextmanager
def no_gradient_sync(role: nn.Module) -> Iterator[None]:
    """FSDP2's no_sync: the backward passes inside keep their gradients unreduced (accumulated locally) in every
    sharded module of `role` and of the networks it holds."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for r in (*networks(role), role) for m in r.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_requires_gradient_sync(True, recurse=False)


def _offload_policy(offload: bool):
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()


def _is_dtensor(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is an FSDP2 shard."""
    return any(_is_dtensor(p) for p in module.parameters())


def full_state_dict(module: nn.Module, device: torch.device, keep: bool) -> dict[str, torch.Tensor]:
    """`module`'s full state as CPU tensors where `keep` (the main process), {} elsewhere. Sharded tensors are
    gathered one at a time on `device`: every process must call this, in the same order."""
    out = {}
    for k, v in module.state_dict().items():
        if _is_dtensor(v):
            v = v.to(device).full_tensor()
        if keep:
            out[k] = v.detach().to("cpu", copy=True)
    return out


def full_states(role: nn.Module, device: torch.device, keep: bool) -> list[dict[str, torch.Tensor]]:
    """The full states of `role`'s networks (:func:`networks`: an adapter role's shared base included), then of
    `role` itself: what :func:`materialize` loads into its :func:`skeleton`."""
    return [full_state_dict(m, device, keep) for m in (*networks(role), role)]


def skeleton(role: nn.Module) -> nn.Module:
    """A copy of `role` (and of the networks it holds) whose parameters are on the meta device (no memory) and
    whose buffers are real copies: made before sharding, materialised on the CPU by :func:`materialize`."""
    import copy

    params = [p for m in (*networks(role), role) for p in m.parameters()]
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in params}
    return copy.deepcopy(role, memo)


def materialize(skel: nn.Module, states: list[dict[str, torch.Tensor]]) -> nn.Module:
    """The skeleton made real on the CPU and loaded with `states` (:func:`full_states` of the role it copies)."""
    for module, state in zip((*networks(skel), skel), states, strict=True):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_meta:
                    m._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                       requires_grad=p.requires_grad)
        module.load_state_dict(state, strict=True)
    return skel


# ---------------------------------------------------------------------------------------------------------------
# Building on the meta device: the processes other than the main receive its weights
# ---------------------------------------------------------------------------------------------------------------


def _slots(roots: list[tuple[str, nn.Module | None]]) -> list[tuple[str, nn.Module, str, str, nn.Module]]:
    """Every parameter and buffer slot of the named `roots`: (qualified name, module, "param" | "buffer", name, the
    first root that holds it), each module once, in the modules' order. The same list on every process (the same
    architecture), before and after sharding (FSDP2 keeps the modules and their names; it replaces the tensors in
    the slots)."""
    seen: set[int] = set()
    out = []
    for label, root in roots:
        if root is None:
            continue
        for path, m in root.named_modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            prefix = f"{label}.{path}" if path else label
            out += [(f"{prefix}.{n}", m, "param", n, root) for n, p in m._parameters.items() if p is not None]
            out += [(f"{prefix}.{n}", m, "buffer", n, root) for n, b in m._buffers.items() if b is not None]
    return out


def _slot_tensor(slot) -> torch.Tensor:
    _, m, kind, name, _ = slot
    return (m._parameters if kind == "param" else m._buffers)[name]


class MainWeights:
    """What `trainer.fsdp.meta_init` needs between building and sharding. On the main process, the full tensor of
    every parameter and buffer of the roles, each kept until it is sent; the others built theirs on the meta device.

    * :meth:`before_sharding` makes every process's architecture the main's: the same slots and shapes, else an
      error naming the first that differs; the main's dtypes, which a meta tensor takes for free;
    * :meth:`scatter`, after each `fully_shard` (`shard_roles(after_each=)`), makes the newly sharded parameters of
      the others real (their shards only) and sends each its rows of the main's full tensor, which the main then
      releases: no process holds more than one unit's tensors twice;
    * :meth:`finish` broadcasts what FSDP2 does not shard (buffers).

    Making a shard real uses FSDP2's own step after `to_empty` (`reset_sharded_param`, torch 2.13's private layout,
    as `FSDPModule._apply` does), module by module, so the units sharded before keep what they received."""

    def __init__(self, roots: list[tuple[str, nn.Module | None]], is_main: bool,
                 devices: dict[int, torch.device] | None = None):
        self.roots = [(label, root) for label, root in roots if root is not None]
        self.is_main = is_main
        self.slots = _slots(self.roots)
        # each slot's device: its first root's (what FSDP2 offloads lives on the CPU)
        self.devices = [(devices or {}).get(id(s[4]), torch.device("cpu")) for s in self.slots]
        self.kept = [_slot_tensor(s).detach() for s in self.slots] if is_main else None
        self.pending = list(range(len(self.slots)))  # not yet sharded and sent
        self.sent: set[int] = set()  # the shards sent (id), each once whatever slots hold it

    @classmethod
    def before_sharding(cls, roots: list[tuple[str, nn.Module | None]], is_main: bool,
                        devices: dict[int, torch.device]) -> "MainWeights":
        import torch.distributed as dist

        weights = cls(roots, is_main, devices)
        layout = [[(s[0], tuple(_slot_tensor(s).shape), str(_slot_tensor(s).dtype).removeprefix("torch."))
                   for s in weights.slots] if is_main else None]
        dist.broadcast_object_list(layout, src=0)
        if not is_main:
            weights._take_layout(layout[0])
        return weights

    def _take_layout(self, layout: list[tuple[str, tuple[int, ...], str]]) -> None:
        for slot, (qual, shape, dtype) in zip(self.slots, layout):
            t = _slot_tensor(slot)
            if slot[0] != qual or tuple(t.shape) != shape:
                raise RuntimeError(f"trainer.fsdp.meta_init: this process built {slot[0]} {tuple(t.shape)} on the "
                                   f"meta device where the main process has {qual} {shape}; set "
                                   "trainer.fsdp.meta_init=false")
            if str(t.dtype).removeprefix("torch.") != dtype:
                _, m, kind, name, _ = slot
                with torch.no_grad():
                    if kind == "param":
                        t.data = t.data.to(getattr(torch, dtype))
                    else:
                        m._buffers[name] = t.to(getattr(torch, dtype))
        if len(layout) != len(self.slots):
            raise RuntimeError(f"trainer.fsdp.meta_init: this process built {len(self.slots)} parameters and buffers "
                               f"on the meta device, the main process {len(layout)}; set trainer.fsdp.meta_init=false")

    def scatter(self, unit: nn.Module | None) -> None:
        """After `fully_shard(unit)`: every tensor it sharded gets its rows of the main's full tensor
        (`distribute_tensor` from the main), and the main releases the full tensor."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        sharded = [i for i in self.pending if isinstance(_slot_tensor(self.slots[i]), DTensor)]
        done = set(sharded)
        self.pending = [i for i in self.pending if i not in done]
        # a shard already sent through another slot (an adapter role re-reads its LoRA factors from the base)
        fresh = [i for i in sharded if id(_slot_tensor(self.slots[i])) not in self.sent]
        if not fresh:
            return
        if unit is None:
            raise RuntimeError(f"trainer.fsdp.meta_init: {self.slots[fresh[0]][0]} was sharded outside a unit; set "
                               "trainer.fsdp.meta_init=false")
        with torch.no_grad():
            if not self.is_main:  # their shards made real, each owner module's own tensors (its buffers follow)
                owners = {id(self.slots[i][1]): (self.slots[i][1], self.devices[i]) for i in fresh}
                for m, dev in owners.values():
                    m.to_empty(device=dev, recurse=False)
                for group in unit._get_fsdp_state()._fsdp_param_groups:
                    for fsdp_param in group.fsdp_params:
                        fsdp_param.reset_sharded_param()
            for i in fresh:
                t = _slot_tensor(self.slots[i])
                local = t.to_local()
                full = self.kept[i].to(local.device) if self.is_main else \
                    torch.empty(t.shape, dtype=t.dtype, device=local.device)
                mine = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=0).to_local()
                self.sent.add(id(t))
                if self.is_main:
                    self.kept[i] = None  # its shard is already this process's: sharded from the full tensor
                else:
                    local.copy_(mine)

    def finish(self) -> None:
        """After sharding: every tensor FSDP2 did not shard (buffers) is broadcast from the main."""
        import torch.distributed as dist

        self.scatter(None)  # slots sharded after the last unit: an adapter role's LoRA factors, re-read (sent)
        with torch.no_grad():
            for i in self.pending:
                _, m, kind, name, _ = self.slots[i]
                t = _slot_tensor(self.slots[i])
                if t.is_meta:
                    real = torch.empty_like(t, device=self.devices[i])
                    if kind == "param":
                        t.data = real
                    else:
                        m._buffers[name] = real
                    t = _slot_tensor(self.slots[i])
                full = self.kept[i].to(t.device) if self.is_main else t
                dist.broadcast(full, src=0)
                if self.is_main:
                    if full.data_ptr() != t.data_ptr():
                        t.copy_(full)
                    self.kept[i] = None
        self.pending = []
