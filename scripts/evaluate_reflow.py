"""Straightness of flows and FD-digits of one-step students on the digits protocol, in one table.

    python scripts/evaluate_reflow.py --flow teacher=builtin:digits_teacher --flow 1-reflow=runs/reflow/pipeline \
        --student instaflow=runs/instaflow/pipeline [--teacher-steps 50]

Straightness: the mean squared deviation of a flow's 20-step Euler paths from their chords (recipes/reflow.py),
over 256 noises with labels 0..9, and the squared error of its one Euler step against its 20-step endpoint. A
folder in teacher format (the teacher, or a reflowed flow) is read as an EDM-preconditioned network. Students are
exported folders, sampled with plain diffusers at their default (one) step; the teacher row is DPM-Solver++(2M).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from distill.base.paths import resolve_path
from distill.models.denoiser import load_denoiser
from distill.evaluation.digits import student_images
from distill.evaluation.metrics import FDDigits
from distill.recipes.reflow import flow_straightness, sample_flow
from distill.models.sampling import sample


def named(text: str) -> tuple[str, str]:
    name, _, path = text.partition("=")
    if not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", type=named, action="append", default=[], help="NAME=teacher-format folder")
    ap.add_argument("--student", type=named, action="append", default=[], help="NAME=exported pipeline folder")
    ap.add_argument("--teacher", default="builtin:digits_teacher")
    ap.add_argument("--teacher-steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, dict] = {}

    g = torch.Generator().manual_seed(args.seed)
    noise, labels = torch.randn(256, 1, 16, 16, generator=g), torch.arange(256) % 10
    for name, path in args.flow:
        flow = load_denoiser(resolve_path(path), prediction="edm")
        cond = {"class_labels": labels}
        with torch.no_grad():
            s = flow_straightness(flow, cond, noise, 20)
            one, fine = sample_flow(flow, cond, noise, 1), sample_flow(flow, cond, noise, 20)
        rows[f"flow {name}"] = {"straightness": s, "one_step_mse_vs_20": float((one - fine).pow(2).mean()),
                                "parameters": sum(p.numel() for p in flow.model.parameters())}
        print(name, rows[f"flow {name}"], flush=True)

    judge = FDDigits(resolution=16)
    labels = torch.arange(judge.count) % 10
    teacher = load_denoiser(resolve_path(args.teacher), prediction="edm")
    t0 = time.perf_counter()
    noise = torch.randn((len(labels), 1, 16, 16), generator=torch.Generator().manual_seed(args.seed))
    images = sample(teacher, {"class_labels": labels}, noise, num_steps=args.teacher_steps)
    rows["floor (real half B)"] = {"fd_digits": judge.floor()}
    rows[f"teacher ({args.teacher_steps} steps, w=1)"] = {**judge.report(images, labels),
                                                          "seconds": time.perf_counter() - t0}
    for name, path in args.student:
        t0 = time.perf_counter()
        images = student_images(path, labels, args.seed)
        unet = json.loads((resolve_path(path) / "unet" / "config.json").read_text())
        from safetensors import safe_open

        with safe_open(str(resolve_path(path) / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            params = sum(int(torch.tensor(f.get_slice(k).get_shape()).prod()) for k in f.keys())
        rows[f"student {name} (1 step)"] = {**judge.report(images, labels), "seconds": time.perf_counter() - t0,
                                            "parameters": params, "block_out_channels": unet["block_out_channels"]}
    for name, r in rows.items():
        print(f"{name:40s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
