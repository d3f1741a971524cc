"""Train the text-to-image judge: a small CNN classifier of a caption's attributes (shape, colour, position) on the
train split of the captioned shapes (distill/demo/shapes.py).

    python scripts/train_shapes_judge.py            # writes distill/assets/shapes_judge/

It never sees the reference split: its agreement there (real images it was not trained on) is what it reports
and what tests/test_shapes.py checks. Light augmentation (one-pixel shifts, blur, pixel noise, shade jitter)
helps it read generated images, which are never as clean as the renderings. Writes model.safetensors,
config.json (the ShapesClassifier constructor arguments) and training.json (command, accuracies, wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from distill.demo.shapes import shapes_split
from distill.demo.shapes_judge import SHAPES_JUDGE_DIR, ShapesClassifier, ShapesJudge, attribute_loss
from distill.models.classifier import CONFIG_NAME, WEIGHTS_NAME


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift by up to one pixel (edge replicated), blur with p = 0.3, per-channel shade +-0.1, noise std up to 0.1."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")[:, :, 1 + dy: 1 + dy + x.shape[2], 1 + dx: 1 + dx + x.shape[3]]
    blur = u(n) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16.0).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = x + 0.1 * (2 * u(n, 3, 1, 1) - 1)
    x = x + 0.1 * u(n, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(-1.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHAPES_JUDGE_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="1 keeps runs bit-identical")
    args = parser.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(args.seed)
    x_train, a_train, _ = shapes_split("train")

    config = {"resolution": x_train.shape[-1], "channels": [16, 32], "num_features": 64, "dropout": 0.2}
    model = ShapesClassifier(**{**config, "channels": tuple(config["channels"])})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                    total_steps=args.epochs * steps_per_epoch, pct_start=0.1)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            batch = perm[i: i + args.batch_size]
            loss = attribute_loss(model(augment(x_train[batch], generator)), a_train[batch], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        print(f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}  {time.perf_counter() - start:.0f}s", flush=True)

    model.eval()
    judge = ShapesJudge(model)
    reference, _, ref_captions = shapes_split("reference")
    held_out = judge.attribute_scores(reference, ref_captions)
    train = judge.attribute_scores(x_train, shapes_split("train")[2])
    wall = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / WEIGHTS_NAME))
    (args.out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    training = {
        "command": (f"python scripts/train_shapes_judge.py --seed {args.seed} --epochs {args.epochs} "
                    f"--batch-size {args.batch_size} --lr {args.lr} --threads {args.threads}"),
        "data": "distill.demo.shapes train split (4,800 images); scored on the reference split (960), never trained on",
        "train": {k: round(v, 4) for k, v in train.items()},
        "reference": {k: round(v, 4) for k, v in held_out.items()},
        "fd_shapes_floor": round(judge.floor(), 4),
        "wall_seconds": round(wall, 1),
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    print(f"train {training['train']}\nreference {training['reference']}\nFD-shapes floor "
          f"{training['fd_shapes_floor']}  {wall:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
