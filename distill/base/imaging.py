"""Image grids with PIL (no torchvision)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid(images: torch.Tensor, nrow: int = 8, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image, `nrow` per row, upscaled by `scale` (nearest)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    canvas = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode="L" if c == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def label_rows(img: Image.Image, labels: list[str], nrows: int, margin: int = 8) -> Image.Image:
    """`img` with a white column on its left holding one text label per grid row (PIL's built-in font)."""
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    width = max(int(draw.textlength(label, font=font)) for label in labels) + 2 * margin
    out = Image.new(img.mode, (img.width + width, img.height), "white")  # 255 would be red in RGB
    out.paste(img, (width, 0))
    draw = ImageDraw.Draw(out)
    row_h = img.height / nrows
    for r, label in enumerate(labels):
        draw.text((margin, int((r + 0.5) * row_h) - 5), label, fill="black", font=font)
    return out


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 4,
              row_labels: list[str] | None = None) -> Path:
    """Write a grid PNG atomically (temporary file + rename); `row_labels` (one per grid row) go on the left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img = grid(images, nrow=nrow, scale=scale)
    if row_labels is not None:
        nrows = (len(images) + nrow - 1) // nrow
        if len(row_labels) != nrows:
            raise ValueError(f"row_labels: expected {nrows} labels (one per grid row), got {len(row_labels)}")
        img = label_rows(img, row_labels, nrows)
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
