"""Train the bundled class-conditional digits *flow* teacher (rectified flow, Liu et al. 2022; Lipman et al. 2022).

Same network as the EDM digits teacher (`build_unet` of scripts/train_digits_teacher.py: a diffusers `UNet2DModel`,
16x16, one channel, 10 classes + 1 null class for classifier-free guidance), trained on the protocol's train half
(`digits_split("train")`, see docs/teacher.md) with the rectified-flow objective in diffusers' convention:

    x_s = (1 - s) x0 + s eps,   s ~ U(0, 1),   network fed 1000 s,   loss || F(x_s, s, y) - (eps - x0) ||^2

so the network predicts the flow velocity u = eps - x0 (prediction kind "flow") and the folder's `scheduler/` is a
stock `FlowMatchEulerDiscreteScheduler` (shift 1): `distill.models.denoiser.load_denoiser` reads it as a
`FlowProcess` teacher.

    python scripts/train_digits_flow_teacher.py --out distill/assets/digits_flow_teacher --steps 2500 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import EMAModel

from distill.data.digits import NUM_DIGIT_CLASSES, digits_split
from distill.models.denoiser import Denoiser
from distill.parametrization import FlowProcess, add_noise


def _edm_teacher_script():
    """scripts/train_digits_teacher.py as a module (the scripts folder is not a package)."""
    path = Path(__file__).resolve().parent / "train_digits_teacher.py"
    spec = importlib.util.spec_from_file_location("train_digits_teacher", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flow_loss(teacher: Denoiser, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rectified-flow (conditional flow matching) loss per sample: || u_theta(x_s, s) - (eps - x0) ||^2, s ~ U(0, 1)."""
    s = torch.rand(x0.shape[0])
    eps = torch.randn_like(x0)
    x_s = add_noise(teacher.process, x0, eps, s)
    u = teacher.raw(x_s, s, {"class_labels": labels})
    return (u - (eps - x0)).pow(2).flatten(1).mean(1)


def write_model_card(out: Path, args: argparse.Namespace, info: dict) -> None:
    """The teacher folder's README: what it is, how to load and sample it, and the command that trained it."""
    command = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    (out / "README.md").write_text(
        "# distill digits flow teacher\n\n"
        "A class-conditional rectified-flow velocity model (diffusers `UNet2DModel`, 16x16, 1 channel; the same\n"
        "architecture as `digits_teacher`) trained on the train half (half B, 898 images) of scikit-learn's digits\n"
        "by `scripts/train_digits_flow_teacher.py`. Classes 0-9; class 10 is the null class for classifier-free\n"
        "guidance (uncond + w (cond - uncond)).\n\n"
        "Convention: diffusers' flow matching, x_s = (1 - s) x0 + s eps, s in [0, 1], network fed 1000 s, output the\n"
        "velocity eps - x0. `scheduler/` is a stock `FlowMatchEulerDiscreteScheduler` (shift 1), so\n"
        "`distill.models.denoiser.load_denoiser(path)` loads it as a flow teacher (`builtin:digits_flow_teacher`).\n"
        "Sample it with `distill.models.sampling.sample(..., solver='ddim')` (Euler in s on the uniform grid).\n"
        "Not a `teacher.path` of `distill train`: a pixel flow UNet2DModel student has no stock pipeline to export\n"
        "to (ConsistencyModelPipeline needs EDM preconditioning), so configs naming it there are refused when loaded\n"
        "(distill/export/checks.py). MDT-dist distills it as `recipe.velocity_teacher`, the EDM digits teacher\n"
        "initialising the exported student (recipes/digits/mdt_dist_variants/flow_teacher.yaml).\n"
        "See docs/teacher.md (last section) for its FD-digits.\n\n"
        f"Trained with `python scripts/train_digits_flow_teacher.py {command}`\n"
        f"({info['train_seconds']:.0f} s wall on the training machine).\n\n"
        f"Training: {json.dumps(info)}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="distill/assets/digits_flow_teacher")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    images, labels = digits_split("train", args.resolution)
    teacher = Denoiser(_edm_teacher_script().build_unet(args.resolution), FlowProcess(), prediction="flow")
    teacher.model.train()
    ema = EMAModel(teacher.model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    opt = torch.optim.Adam(teacher.model.parameters(), lr=args.lr)
    # linear warm-up over 200 steps, then cosine decay to 10% (the EDM teacher's schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    )

    null_class = NUM_DIGIT_CLASSES
    start, running = time.time(), None
    for step in range(args.steps):
        idx = torch.randint(0, images.shape[0], (args.batch_size,))
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(y.shape) < args.label_dropout] = null_class
        loss = flow_loss(teacher, x0, y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(teacher.model.parameters())
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  {time.time() - start:.0f}s", flush=True)

    ema.copy_to(teacher.model.parameters())
    out = Path(args.out)
    teacher.model.save_pretrained(out / "unet", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(out / "scheduler")
    info = {**vars(args), "final_loss_ema": running, "train_seconds": round(time.time() - start, 1)}
    (out / "training_args.json").write_text(json.dumps(info, indent=2) + "\n")
    write_model_card(out, args, info)
    print(f"saved teacher to {out}")


if __name__ == "__main__":
    main()
