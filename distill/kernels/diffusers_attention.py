"""Route diffusers' attention through the fused JVP attention kernel without touching the models.

Every attention processor of the families we support ends in `torch.nn.functional.scaled_dot_product_attention`:
`AttnProcessor2_0` (UNet2DConditionModel, UNet2DModel attention blocks, DiT, PixArt) and `JointAttnProcessor2_0`
(SD3) call it directly; `FluxAttnProcessor` and `WanAttnProcessor` call `dispatch_attention_fn`, whose "native"
backend calls it. So one `torch.overrides.TorchFunctionMode` that intercepts that function covers them all, and
the models, their processors and their state dicts stay stock.

    from distill.kernels.diffusers_attention import jvp_attention, enable_jvp_attention

    with jvp_attention():                       # everything called inside
        out, tangent = torch.func.jvp(lambda x, t: unet(x, t, text).sample, (x, t), (dx_dt, ones))

    routing = enable_jvp_attention(transformer)  # or: every forward of this model, until routing.remove()

While the mode is active, an SDPA call whose query/key/value carry forward-mode tangents (`torch.func.jvp`,
`torch.autograd.forward_ad`) runs the fused kernel (O and tO in one pass). Calls without tangents go to PyTorch's
own SDPA unchanged (`primal="torch"`, the default: its fused flash kernels are the fastest forward + backward
there is) or to the kernel as well (`primal="kernel"`). The mode also pins diffusers' attention dispatcher to its
native backend for its duration, since other backends (flash-attn, sage, xformers) never reach SDPA.
Cost: a Python-level `__torch_function__` call per torch op while the mode is active.

`jvp_attention()` also enters `ContiguousGroupNorm`, a workaround for a PyTorch bug that is not about attention
but stops forward AD through UNet2DModel's attention blocks: the forward-AD formula of `group_norm` `view`s its
input, which fails when the input is not contiguous (AttnProcessor2_0 returns a transposed-then-reshaped tensor
and the residual add keeps that layout). It hands group_norm a contiguous copy of such inputs; values unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from distill.kernels import jvp_attention as _jvp

__all__ = ["ContiguousGroupNorm", "JVPAttentionMode", "JVPAttentionRouting", "enable_jvp_attention", "jvp_attention"]

logger = logging.getLogger(__name__)

_SDPA = F.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _has_tangent(*tensors: torch.Tensor) -> bool:
    return any(isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _autocast(*qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Query, key and value as autocast gives them to `F.scaled_dot_product_attention` (on its lower-precision list):
    all in the autocast dtype when autocast is on for their device. A torch function mode sees the call before
    autocast does, and networks with query/key norms (SD3.5, Flux, Wan) hand float32 queries and keys beside a bf16
    value under bf16 autocast."""
    device = qkv[0].device.type
    if not torch.is_autocast_enabled(device):
        return qkv
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in qkv)


class JVPAttentionMode(TorchFunctionMode):
    """Torch function mode sending `F.scaled_dot_product_attention` to `jvp_attention.scaled_dot_product_attention`.

    `backend`: kernel backend (see `jvp_attention.select_backend`; None = automatic). `primal`: "torch" keeps
    tangent-free calls on PyTorch's SDPA, "kernel" sends them to the kernel too. `routed` counts the calls that
    went to the kernel, `passed` those left to PyTorch.
    """

    def __init__(self, backend: str | None = None, primal: Literal["torch", "kernel"] = "torch") -> None:
        super().__init__()
        if primal not in ("torch", "kernel"):
            raise ValueError(f"primal must be 'torch' or 'kernel', got {primal!r}")
        self.backend = backend
        self.primal = primal
        self.routed = 0
        self.passed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA or _jvp.sdpa_bypassed():
            return func(*args, **kwargs)
        bound = dict(zip(_SDPA_PARAMS, args))
        bound.update(kwargs)
        unknown = set(bound) - set(_SDPA_PARAMS)
        if unknown:
            raise TypeError(f"scaled_dot_product_attention got unexpected arguments {sorted(unknown)}")
        opts = {**_SDPA_DEFAULTS, **bound}
        tangents = _has_tangent(opts["query"], opts["key"], opts["value"])
        if not tangents and (self.primal == "torch" or opts["dropout_p"] != 0.0):
            self.passed += 1
            return func(*args, **kwargs)
        if opts["dropout_p"] != 0.0:
            raise ValueError(f"jvp attention cannot differentiate through attention dropout "
                             f"(dropout_p={opts['dropout_p']}); put the model in eval() or set the dropout to 0")
        self.routed += 1
        opts["query"], opts["key"], opts["value"] = _autocast(opts["query"], opts["key"], opts["value"])
        return _jvp.scaled_dot_product_attention(**opts, backend=self.backend)


class ContiguousGroupNorm(TorchFunctionMode):
    """Give `F.group_norm` a contiguous input when it carries a forward-mode tangent.

    PyTorch's group_norm JVP reshapes its input with `view`, which raises "view size is not compatible with input
    tensor's size and stride" for non-contiguous inputs (torch 2.13; compare pytorch/pytorch#186414 on
    native_group_norm's contiguity assumptions). Numerically a no-op.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            if not x.is_contiguous() and _has_tangent(x):
                args = (x.contiguous(),) + tuple(args[1:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def _native_diffusers_dispatch() -> Iterator[None]:
    """Pin diffusers' attention dispatcher to its native (SDPA) backend, if diffusers is installed."""
    try:
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _AttentionBackendRegistry,
            attention_backend,
        )
    except ImportError:  # pragma: no cover - diffusers is a dependency, but the kernel does not need it
        yield
        return
    if _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName.NATIVE:
        yield
        return
    with attention_backend(AttentionBackendName.NATIVE):
        yield


@contextlib.contextmanager
def jvp_attention(backend: str | None = None, primal: Literal["torch", "kernel"] = "torch",
                  contiguous_group_norm: bool = True) -> Iterator[JVPAttentionMode]:
    """Within this context every `F.scaled_dot_product_attention` call with tangents runs the fused JVP kernel.

    Yields the `JVPAttentionMode`, whose `routed` / `passed` counters show what happened. `contiguous_group_norm`
    also enters `ContiguousGroupNorm` (see there).
    """
    mode = JVPAttentionMode(backend=backend, primal=primal)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_native_diffusers_dispatch())
        if contiguous_group_norm:
            stack.enter_context(ContiguousGroupNorm())
        stack.enter_context(mode)
        yield mode


def _processors_bypassing_sdpa(model: torch.nn.Module) -> list[str]:
    """Names of attention modules whose processor does not end in F.scaled_dot_product_attention."""
    bad = []
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None:
            continue
        pname = type(processor).__name__
        backend = getattr(processor, "_attention_backend", None)
        backend = getattr(backend, "value", backend)
        if "XFormers" in pname or "FlashAttn" in pname or "NPU" in pname or "XLA" in pname:
            bad.append(f"{name or '<root>'} ({pname})")
        elif backend is not None and backend != "native":
            bad.append(f"{name or '<root>'} ({pname}, attention backend {backend!r})")
    return bad


class JVPAttentionRouting:
    """Handle returned by `enable_jvp_attention`; `remove()` restores the model's stock behaviour."""

    def __init__(self, model: torch.nn.Module, backend: str | None, primal: str) -> None:
        self._stacks: list[contextlib.ExitStack] = []
        self.modes: list[JVPAttentionMode] = []  # one per forward call, most recent last (for inspection)
        self.backend, self.primal = backend, primal
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),
        ]

    def _enter(self, module, args):
        stack = contextlib.ExitStack()
        self.modes.append(stack.enter_context(jvp_attention(self.backend, self.primal)))
        del self.modes[:-8]
        self._stacks.append(stack)

    def _exit(self, module, args, output):
        if self._stacks:
            self._stacks.pop().close()

    @property
    def routed(self) -> int:
        """Kernel calls made during the most recent forward."""
        return self.modes[-1].routed if self.modes else 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        while self._stacks:
            self._stacks.pop().close()


def enable_jvp_attention(model: torch.nn.Module, backend: str | None = None,
                         primal: Literal["torch", "kernel"] = "torch") -> JVPAttentionRouting:
    """Run every forward of `model` inside `jvp_attention(backend, primal)`; returns a handle with `remove()`.

    The model is not modified (two forward hooks). Raises ValueError naming the modules whose attention processor
    would bypass SDPA (xformers, flash-attn processors, a non-native `set_attention_backend`).
    """
    bad = _processors_bypassing_sdpa(model)
    if bad:
        raise ValueError("these attention processors do not call F.scaled_dot_product_attention, so jvp attention "
                         "cannot reach them; call model.set_attn_processor(AttnProcessor2_0()) / "
                         "model.reset_attention_backend() first: " + ", ".join(bad[:8])
                         + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))
    if "always_call" not in inspect.signature(model.register_forward_hook).parameters:  # pragma: no cover
        raise RuntimeError("enable_jvp_attention needs torch >= 2.2 (forward hooks with always_call)")
    return JVPAttentionRouting(model, backend, primal)
