"""Control transfer (Gandikota & Bau 2025, arXiv 2503.10637, "control distillation"): a LoRA trained on the base
teacher, applied unchanged to the distilled student, which shares the teacher's architecture and module names.

* :func:`train_lora`: a peft LoRA on the teacher's network (`adapters.add_lora_adapters`; the base weights stay
  frozen and untouched) fitted by plain denoising score matching (EDM's loss, Karras et al. 2022 eq. 2 with
  lambda(sigma) of Table 1) on a styled data set;
* :func:`apply_lora`: the LoRA's factors loaded into a copy of the student, every module matched by name and shape
  (an error names any module that is missing or differs);
* `AdapterDenoiser.merged()` fuses it (W + (alpha / r) B A) into a plain network: the stock pipeline export.

The digits style used by scripts/control_transfer.py is "thick strokes": :func:`dilate` (grey-level dilation with a
3x3 cross), measured by :func:`ink`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.models.adapters import AdapterDenoiser, add_lora_adapters
from distill.models.denoiser import Denoiser

# ---------------------------------------------------------------------------------------------------------------
# The style: thick strokes
# ---------------------------------------------------------------------------------------------------------------


def dilate(images: Tensor) -> Tensor:
    """Grey-level dilation of images in [-1, 1] (background -1) with the 3x3 cross: each pixel becomes the max of
    itself and its four neighbours, so every stroke grows by one pixel on each side."""
    p = F.pad(images, (1, 1, 1, 1), value=-1.0)
    h, w = images.shape[-2:]
    shifts = [p[..., 1:h + 1, 1:w + 1], p[..., :h, 1:w + 1], p[..., 2:, 1:w + 1], p[..., 1:h + 1, :w],
              p[..., 1:h + 1, 2:]]
    return torch.stack(shifts).amax(0)


def ink(images: Tensor) -> Tensor:
    """Per-image mean ink of images in [-1, 1]: the mean of (x + 1) / 2 over pixels (0 blank, 1 all ink)."""
    return ((images.clamp(-1, 1) + 1) / 2).flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------------------------
# Training a LoRA on the teacher
# ---------------------------------------------------------------------------------------------------------------


def dsm_loss(denoiser: torch.nn.Module, x0: Tensor, labels: Tensor, p_mean: float = -1.2, p_std: float = 1.2,
             generator: torch.Generator | None = None) -> Tensor:
    """EDM denoising score matching (Karras et al. 2022, eq. 2; ln sigma ~ N(p_mean, p_std^2), lambda(sigma) =
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 of Table 1), per sample."""
    sd = denoiser.process.sigma_data
    n = x0.shape[0]
    sigma = (torch.randn(n, generator=generator) * p_std + p_mean).exp().to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = x0 + sigma.view(-1, 1, 1, 1) * eps  # EDM: alpha = 1
    x0_hat = denoiser(x_t, sigma, {"class_labels": labels})
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    return weight * (x0_hat - x0).pow(2).flatten(1).mean(1)


def add_style_lora(teacher: Denoiser, rank: int = 4, alpha: float | None = None,
                   name: str = "style") -> AdapterDenoiser:
    """A zero-initialised LoRA adapter `name` on the teacher's network (its family's LoRA targets), as the trainable
    role; the teacher's own weights are frozen and stay as they are (`AdapterDenoiser(teacher, None)` is the
    teacher)."""
    add_lora_adapters(teacher, [name], rank=rank, alpha=alpha)
    return AdapterDenoiser(teacher, name)


def train_lora(teacher: Denoiser, images: Tensor, labels: Tensor, steps: int = 200, batch_size: int = 64,
               lr: float = 1e-3, rank: int = 4, null_class: int | None = None, label_dropout: float = 0.1,
               seed: int = 0, log_every: int = 0) -> tuple[AdapterDenoiser, list[float]]:
    """A style LoRA on `teacher` fitted to `images` (in [-1, 1]) and `labels` by :func:`dsm_loss`; labels are
    replaced by `null_class` with probability `label_dropout` (the teacher's own CFG training) when given.
    Returns the adapter role and the loss per step."""
    g = torch.Generator().manual_seed(seed)
    role = add_style_lora(teacher, rank=rank)
    opt = torch.optim.Adam(role.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        y = labels[idx].clone()
        if null_class is not None and label_dropout > 0:
            y[torch.rand(batch_size, generator=g) < label_dropout] = null_class
        loss = dsm_loss(role, images[idx], y, generator=g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"lora step {step + 1}/{steps}  loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
    return role, losses


# ---------------------------------------------------------------------------------------------------------------
# Moving it to the student
# ---------------------------------------------------------------------------------------------------------------


def check_targets(student: Denoiser, state: dict[str, Tensor], config: dict) -> None:
    """Every module the LoRA adapts exists in the student with the weight shape its factors expect; otherwise an
    error naming the module."""
    modules = dict(student.model.named_modules())
    for path in config["target_modules"]:
        module = modules.get(path)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(f"the LoRA adapts module {path!r}, which the student ({type(student.model).__name__}) "
                             "does not have: teacher and student architectures differ")
        a, b = state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"]
        w = module.weight
        if w.shape[0] != b.shape[0] or w.shape[1] != a.shape[1] or tuple(w.shape[2:]) != tuple(a.shape[2:]):
            raise ValueError(f"module {path!r} has weight {tuple(w.shape)} in the student but the LoRA's factors "
                             f"{tuple(a.shape)}, {tuple(b.shape)} do not fit it: teacher and student architectures "
                             "differ")


@torch.no_grad()
def apply_lora(student: Denoiser, state: dict[str, Tensor], config: dict, name: str = "style") -> AdapterDenoiser:
    """The LoRA (`AdapterDenoiser.lora_weights()` of the teacher's role: factors and {"r", "lora_alpha",
    "target_modules"}) on a copy of `student`, every factor loaded into the module of the same name; the student
    itself is left as it is."""
    from peft import set_peft_model_state_dict

    check_targets(student, state, config)
    twin = student.copy(trainable=False)
    add_lora_adapters(twin, [name], rank=config["r"], alpha=config["lora_alpha"], targets=config["target_modules"])
    adapted = {p for p, m in twin.model.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}
    if adapted != set(config["target_modules"]):
        extra = sorted(adapted - set(config["target_modules"]))
        raise ValueError(f"LoRA targets matched other student modules too: {extra[:5]}")
    result = set_peft_model_state_dict(twin.model, state, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA weights not loaded into the student: {result.unexpected_keys[:5]}")
    loaded = {k for k in twin.model.state_dict() if f".lora_A.{name}." in k or f".lora_B.{name}." in k}
    if len(loaded) != len(state):
        raise ValueError(f"{len(state)} LoRA tensors but {len(loaded)} LoRA weights in the student")
    return AdapterDenoiser(twin, name)
