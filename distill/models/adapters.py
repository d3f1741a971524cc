"""One base model in memory: the student and the fake score as LoRA adapters on the frozen teacher.

Score-distillation recipes hold three networks of the teacher's size (teacher, student, fake score). Here they
share one frozen base: the teacher is the base with every adapter off, the student and the fake score are named
peft LoRA adapters on it (SwiftBrush, arXiv 2312.05239 sec. 4, trains its fake score this way; the issue trackers
of DMD2 and FastVideo ask for it for memory).

Each role is an :class:`AdapterDenoiser`: the :class:`~distill.models.denoiser.Denoiser` call surface over the shared
network that switches the base to its adapter before every call. As an ``nn.Module`` it owns only its adapter's
LoRA parameters, never the base, so the trainer's pieces need no special case:

* optimizers, gradient clipping and the EMA see exactly one adapter's parameters (the EMA of the student is an
  EMA of its LoRA factors);
* under DDP each role is wrapped on its own; the frozen base is outside both wrappers (identical on every rank,
  as it is loaded from the same folder), so no parameter is shared between two DDP modules;
* checkpoints hold only the adapters (and heads);
* the export merges the student's adapter into a copy of the base (:meth:`AdapterDenoiser.merged`): the exported
  pipeline is the stock one, without peft; a latent family's export also writes the adapter alone in diffusers'
  LoRA format (:meth:`AdapterDenoiser.lora_weights`), for `pipe.load_lora_weights` on the teacher's pipeline.

peft's own adapter switching (``set_adapter``, ``enable_adapters``) also flips ``requires_grad`` of the adapter
weights; the trainer and recipes own those flags (``distill.training.nets.frozen``), so they are restored after every
switch.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from distill.base.batch import Condition
from distill.models.denoiser import Denoiser


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def add_lora_adapters(base: Denoiser, names: Sequence[str], rank: int, alpha: float | None = None,
                      targets: Sequence[str] | str | None = None) -> None:
    """Inject one LoRA adapter per name into `base`'s network (in place) and freeze the network itself.
    Adapters start as zero updates (peft: B = 0), so every role starts as the teacher. `targets` (peft module
    name suffixes, or one regex that peft full-matches) default to the family's `lora_targets` (each family names
    the modules of its own network class)."""
    from peft import LoraConfig, inject_adapter_in_model

    if not names:
        raise ValueError("add_lora_adapters needs at least one adapter name")
    existing = {a for _, layer in _tuner_layers(base.model) for a in layer.lora_A}
    if clash := sorted(set(names) & existing):
        raise ValueError(f"adapters {clash} already exist on this network")
    if targets is None:
        targets = base.family.lora_targets
    base.model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        target_modules=targets if isinstance(targets, str) else list(targets),
                        lora_dropout=0.0, init_lora_weights=True)
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        for name in names:
            inject_adapter_in_model(config, base.model, adapter_name=name)
    if not _tuner_layers(base.model):
        raise ValueError(f"no module of {type(base.model).__name__} matches the LoRA targets {targets!r}")
    for p in base.model.parameters():  # the roles decide what trains; nothing does until they say so
        p.requires_grad_(False)


def activate_adapter(model: nn.Module, name: str | None) -> None:
    """Route every LoRA layer of `model` through adapter `name` (None: all adapters off, the base network),
    leaving every parameter's requires_grad as it was."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for _, layer in _tuner_layers(model):
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)
    for p, flag in flags:
        p.requires_grad_(flag)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter `model`'s LoRA layers route through (None: adapters off), as :func:`activate_adapter` set it."""
    layers = _tuner_layers(model)
    if not layers:
        return None
    layer = layers[0][1]
    return None if layer.disable_adapters else layer.active_adapters[0]


def adapter_checkpointing(module: nn.Module, *args):
    """diffusers' gradient checkpointing call (`enable_gradient_checkpointing(gradient_checkpointing_func=)`) for a
    network with adapters: torch's non-reentrant checkpoint, whose recomputation in backward runs under the adapter
    active when the block ran forward, not the one active at backward time (the last role called). Without this the
    student's blocks are recomputed through the fake score's adapter and torch refuses the different computation."""
    import contextlib

    from torch.utils.checkpoint import checkpoint

    name = active_adapter(module)

    @contextlib.contextmanager
    def recompute_under_forward_adapter():
        now = active_adapter(module)
        activate_adapter(module, name)
        try:
            yield
        finally:
            activate_adapter(module, now)

    if not _tuner_layers(module):
        return checkpoint(module.__call__, *args, use_reentrant=False)
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), recompute_under_forward_adapter()))


class AdapterDenoiser(nn.Module):
    """One role on a shared base: the Denoiser interface with adapter `adapter` on (None: the base alone).

    Its parameters are the adapter's LoRA factors only (trainable unless `adapter` is None, which has none);
    the base network is held, not owned, so `.to()`, `state_dict()`, optimizers and DDP never see it.
    """

    def __init__(self, base: Denoiser, adapter: str | None, prediction: str | None = None):
        super().__init__()
        inner = Denoiser(base.model, base.process, prediction or base.prediction, base.family)
        inner.source = getattr(base, "source", None)  # where the base came from (latent families' export)
        self.__dict__["_inner"] = inner  # not registered: the base stays outside this module
        self.adapter = adapter
        self.lora = nn.ParameterDict()
        if adapter is not None:
            self.rebind()
            if not len(self.lora):
                raise ValueError(f"no LoRA adapter named {adapter!r} on this network (add_lora_adapters first)")
            self.lora.requires_grad_(True)

    def rebind(self) -> None:
        """(Re)collect this adapter's LoRA parameters from the base network: after FSDP2 sharded the base
        (distill.training.parallel), its modules hold new parameter objects."""
        if self.adapter is None:
            return
        marker = f".{self.adapter}."
        flags = {k: p.requires_grad for k, p in self.lora.items()}
        for pname, p in self.model.named_parameters():
            if ".lora_" in pname and marker in pname:
                key = pname.replace(".", "__")
                self.lora[key] = p
                if key in flags:
                    p.requires_grad_(flags[key])

    # -- the Denoiser surface ----------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._inner.model

    @property
    def process(self):
        return self._inner.process

    @property
    def prediction(self) -> str:
        return self._inner.prediction

    @property
    def family(self):
        return self._inner.family

    @property
    def source(self) -> dict | None:
        return self._inner.source

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition, want: str = "x0", guidance_scale: float = 1.0) -> Tensor:
        activate_adapter(self.model, self.adapter)
        return self._inner(x_t, t, cond, want=want, guidance_scale=guidance_scale)

    def raw(self, x_t: Tensor, t: Tensor, cond: Condition) -> Tensor:
        activate_adapter(self.model, self.adapter)
        return self._inner.raw(x_t, t, cond)

    def with_features(self, x_t: Tensor, t: Tensor, cond: Condition, want: str = "x0") -> tuple[Tensor, Tensor]:
        activate_adapter(self.model, self.adapter)
        return self._inner.with_features(x_t, t, cond, want=want)

    def convert(self, raw: Tensor, x_t: Tensor, t: Tensor, want: str) -> Tensor:
        return self._inner.convert(raw, x_t, t, want)

    def to_native(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self._inner.to_native(x0, x_t, t)

    # -- export ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def lora_weights(self) -> tuple[dict[str, Tensor], dict]:
        """(factors, LoRA config) of this adapter: peft's own state dict of it, `<module path>.lora_A.weight` /
        `.lora_B.weight` without the adapter's name (what diffusers' `save_lora_weights` prefixes with `unet.` or
        `transformer.` and `load_lora_weights` reads back), and {"r", "lora_alpha", "target_modules"} with the exact
        module paths, so the loader rebuilds the same layers at the same scale alpha / r (one rank and alpha for
        every layer: add_lora_adapters)."""
        from peft import get_peft_model_state_dict

        if self.adapter is None:
            raise ValueError("the base network (adapter None) has no LoRA weights")
        state = {k: v.cpu() for k, v in get_peft_model_state_dict(self.model, adapter_name=self.adapter).items()}
        config = self.model.peft_config[self.adapter]
        paths = [k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")]
        return state, {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": paths}

    @torch.no_grad()
    def merged(self) -> Denoiser:
        """A plain Denoiser over a fresh copy of the network with this adapter merged in (W + scale B A) and
        no peft layers: what the export writes."""
        model = self.model
        deltas = {}
        if self.adapter is not None:
            for path, layer in _tuner_layers(model):
                if self.adapter in layer.lora_A:
                    deltas[f"{path}.weight"] = layer.get_delta_weight(self.adapter)
        state = {}
        for key, value in model.state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            state[key] = value + deltas[key] if key in deltas else value.clone()
        plain = type(model).from_config(model.config)
        plain.load_state_dict(state, strict=True)
        plain.to(next(model.parameters()).device).eval().requires_grad_(False)
        merged = Denoiser(plain, self.process, self.prediction, self.family)
        merged.source = self.source
        return merged
