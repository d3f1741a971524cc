"""One optimizer per trained network: AdamW over its trainable parameters and a learning-rate schedule."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from distill.config import OptimizerConfig


def make_optimizer(module: nn.Module, oc: OptimizerConfig) -> tuple[torch.optim.AdamW, LRScheduler]:
    """AdamW over `module`'s trainable parameters (frozen ones, e.g. a shared base under LoRA adapters, are left
    out) and diffusers' "constant_with_warmup" schedule: the learning rate of update k is lr * k / warmup_steps
    while k < warmup_steps, then lr. The schedule counts this network's updates and is checkpointed by the
    trainer."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay)
    return opt, get_scheduler("constant_with_warmup", opt, num_warmup_steps=oc.warmup_steps)
