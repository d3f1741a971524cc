"""Train the FD-digits judge: a small CNN classifier on scikit-learn digits at 16x16.

    python scripts/train_digits_classifier.py            # writes distill/assets/digits_classifier/

A stratified 20% of the 1,797 digits is held out (fixed by --seed) and never trained on; the shipped weights are
the ones whose held-out accuracy is reported. Light augmentation (small shifts, scale and rotation jitter,
pixel noise, occasional blur) helps the classifier read generated images, which are never as clean as the data.
Writes model.safetensors, config.json (the DigitsClassifier constructor arguments) and training.json (seed,
held-out indices, accuracy, wall time).
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

from distill.data.digits import NUM_DIGIT_CLASSES, load_digits
from distill.demo.digits_judge import DIGITS_CLASSIFIER_DIR, DigitsClassifier
from distill.models.classifier import CONFIG_NAME, WEIGHTS_NAME


def stratified_split(
    labels: torch.Tensor, test_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices with `test_fraction` of every class in test."""
    train, test = [], []
    for c in range(NUM_DIGIT_CLASSES):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = round(test_fraction * len(idx))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random affine (scale 0.9-1.1, rotation +-10 deg, shift +-1.5 px), blur with p=0.2, noise std up to 0.1."""
    n, _, r, _ = x.shape
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    scale = 0.9 + 0.2 * u(n)
    angle = math.radians(10.0) * (2 * u(n) - 1)
    shift = (1.5 * 2 / r) * (2 * u(n, 2) - 1)  # pixels -> normalised [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample x + 1 so the zero padding outside the image is background (-1 after shifting back).
    x = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    blur = u(n) < 0.2
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16.0).view(1, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kernel)
    x = x + 0.1 * u(n, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def evaluate(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return float((model(images).argmax(-1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DIGITS_CLASSIFIER_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument(
        "--threads", type=int, default=1, help="1 is fastest for this tiny net and keeps runs bit-identical"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(args.seed)

    resolution = 16
    images, labels = load_digits(resolution)
    train_idx, test_idx = stratified_split(labels, args.test_fraction, generator)
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = images[test_idx], labels[test_idx]

    config = {
        "resolution": resolution,
        "channels": [16, 32],
        "num_features": 64,
        "num_classes": NUM_DIGIT_CLASSES,
        "dropout": 0.2,
    }
    model = DigitsClassifier(**{**config, "channels": tuple(config["channels"])})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.1
    )

    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            batch = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[batch], generator)), y_train[batch], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            test_acc = evaluate(model, x_test, y_test)
            print(f"epoch {epoch + 1:3d}  loss {total / len(x_train):.4f}  test acc {test_acc:.4f}")

    model.eval()
    test_accuracy = evaluate(model, x_test, y_test)
    train_accuracy = evaluate(model, x_train, y_train)
    wall = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / WEIGHTS_NAME))
    (args.out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    training = {
        "command": (
            "python scripts/train_digits_classifier.py"
            f" --seed {args.seed} --epochs {args.epochs} --batch-size {args.batch_size} --lr {args.lr}"
            f" --test-fraction {args.test_fraction} --threads {args.threads}"
        ),
        "data": f"sklearn digits, resolution {resolution}, stratified hold-out",
        "seed": args.seed,
        "num_train": len(train_idx),
        "num_test": len(test_idx),
        "train_accuracy": round(train_accuracy, 4),
        "test_accuracy": round(test_accuracy, 4),
        "wall_seconds": round(wall, 1),
        "torch": torch.__version__,
        "test_indices": test_idx.tolist(),
    }
    (args.out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    print(f"train acc {train_accuracy:.4f}  test acc {test_accuracy:.4f} ({len(test_idx)} held out)", end="")
    print(f"  {wall:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
