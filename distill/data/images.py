"""Captioned images as the teacher pipeline's own latents (`data.name: images`): the data samples that sCM, rCM,
LCM and the GAN heads of DMD2, f-distill and Decoupled DMD need on latent families.

`data.images` is a folder of images with `metadata.jsonl`, one JSON object per line with `file_name` (relative to
the folder) and `text` (the caption), the layout of Hugging Face's imagefolder. It is read once: each image is
resized so that its shorter side is data.resolution (bicubic) and centre-cropped to a square (the crop of
diffusers' text-to-image training examples), scaled to [-1, 1] and encoded by the pipeline's VAE (the mean of its
posterior, so the cache does not depend on a seed), then normalised as the pipeline un-normalises before decoding:
(z - shift_factor) * scaling_factor (shift 0 for SD, SDXL, PixArt and DiT; SD3 and Flux: their VAE config's). Those
are the latents the pipeline's network was trained on and samples. The captions become conditions exactly like
data.prompts (`distill.data.prompts.PromptDataset`: the pipeline's own text encoders, cached); DiT's captions are class
indices. Latents are cached in data.cache_dir, keyed by the VAE (config, weight sizes and times), the files (names,
sizes, times) and the resolution.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.data.prompts import PromptDataset
from distill.families.target import teacher_target

METADATA = "metadata.jsonl"


def read_metadata(images_dir: Path, key: str = "data.images") -> tuple[list[Path], list[str]]:
    """(image files, captions) of `images_dir/metadata.jsonl`; a bad line or a missing file is a named error."""
    from distill.base.errors import ConfigError

    meta = images_dir / METADATA
    if not meta.is_file():
        raise ConfigError(f"{key}: {str(images_dir)!r} has no {METADATA} (one JSON object per line with file_name "
                          "and text)")
    files, captions = [], []
    for number, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}: {str(meta)!r} line {number} is not JSON ({e})") from None
        if not (isinstance(entry, dict) and isinstance(entry.get("file_name"), str)
                and isinstance(entry.get("text"), str)):
            raise ConfigError(f"{key}: {str(meta)!r} line {number} needs string keys file_name and text, got {line!r}")
        path = images_dir / entry["file_name"]
        if not path.is_file():
            raise ConfigError(f"{key}: {str(meta)!r} line {number} names {str(path)!r}, which is not a file")
        files.append(path)
        captions.append(entry["text"])
    if not files:
        raise ConfigError(f"{key}: {str(meta)!r} lists no image")
    return files, captions


def check_image_data(teacher_folder: Path, images_dir: Path, prediction: str | None, key: str = "data.images") -> None:
    """Refuse, when the config is loaded, image data a teacher cannot be trained on: a pixel-space teacher (its
    data sets are digits and toy), a video family, or a malformed folder."""
    from distill.base.errors import ConfigError

    target, _, _ = teacher_target(teacher_folder, prediction)
    if target is None:
        raise ConfigError(f"{key}: data.name: images encodes images with a latent pipeline's VAE; this teacher is a "
                          "pixel-space network (use data.name: digits)")
    if target.video:
        raise ConfigError(f"{key}: {target.pipeline} is a video pipeline; data.name: images holds still images")
    read_metadata(images_dir, key)


def load_image(path: Path, resolution: int) -> Tensor:
    """(3, resolution, resolution) in [-1, 1]: shorter side resized to `resolution` (bicubic), centre crop."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


def vae_normalisation(vae_config: dict) -> tuple[float, float]:
    """(shift_factor, scaling_factor) with latents = (z - shift) * scale, as the pipelines invert before decoding."""
    return float(vae_config.get("shift_factor") or 0.0), float(vae_config.get("scaling_factor", 1.0))


@torch.no_grad()
def encode_images(folder: Path, files: list[Path], resolution: int, device: torch.device,
                  batch_size: int = 8) -> Tensor:
    """The pipeline's normalised latents of `files` (N, C, h, w): VAE posterior means, then (z - shift) * scale."""
    import diffusers

    config = json.loads((folder / "vae" / "config.json").read_text())
    vae = getattr(diffusers, config["_class_name"]).from_pretrained(folder / "vae", torch_dtype=torch.float32)
    vae.to(device).eval()
    shift, scale = vae_normalisation(config)
    out = []
    for start in range(0, len(files), batch_size):
        pixels = torch.stack([load_image(f, resolution) for f in files[start:start + batch_size]]).to(device)
        z = vae.encode(pixels).latent_dist.mean
        out.append(((z - shift) * scale).float().cpu())
    return torch.cat(out)


def cached_latents(folder: Path, files: list[Path], resolution: int, cache_dir: Path, device: torch.device) -> Tensor:
    """:func:`encode_images`, read from `cache_dir` when computed before for the same VAE, files and resolution."""
    from safetensors.torch import load_file, save_file

    h = hashlib.sha256()
    vae_dir = folder / "vae"
    h.update((vae_dir / "config.json").read_bytes())
    for weights in sorted(vae_dir.glob("*.safetensors")):
        h.update(f"{weights.name}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode())
    for f in files:
        h.update(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    h.update(str(resolution).encode())
    file = cache_dir / f"latents-{h.hexdigest()[:20]}.safetensors"
    if file.is_file():
        return load_file(file)["latents"]
    latents = encode_images(folder, files, resolution, device)
    if not torch.isfinite(latents).all():
        raise FloatingPointError(f"data.images: the VAE of {str(folder)!r} gave non-finite latents")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".tmp-{os.getpid()}-{file.name}")  # one per process: a shared cache never mixes writers
    save_file({"latents": latents.contiguous()}, tmp)
    tmp.replace(file)
    return latents


class ImageDataset(PromptDataset):
    """Captioned images as (latents, conditions): PromptDataset's conditions of the captions plus each image's
    latents; `sample` returns both."""

    def __init__(self, folder: Path, images_dir: Path, resolution: int, cache_dir: Path,
                 prediction: str | None = None, device: torch.device | str = "cpu"):
        files, captions = read_metadata(images_dir)
        super().__init__(folder, captions, resolution, cache_dir, 1, prediction, device)
        self.latents = cached_latents(folder, files, resolution, cache_dir, torch.device(device))
        if tuple(self.latents.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"data.images: the VAE gives latents of shape {tuple(self.latents.shape[1:])}, the "
                             f"pipeline samples {tuple(self.image_shape)} at resolution {resolution}")

    def sample(self, batch_size: int, generator: torch.Generator):
        from distill.base.batch import Batch

        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return Batch(self.latents[idx], {k: v[idx] for k, v in self.cond.items()})
