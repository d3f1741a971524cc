"""Prompt embeddings, computed once by the pipeline's own text encoders and cached on disk (`data.name: prompts`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from distill.base.batch import Batch, Condition
from distill.families.target import Target, teacher_target

logger = logging.getLogger("distill")


def read_prompts(path: Path) -> list[str]:
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"data.prompts: {str(path)!r} holds no prompt (one per line)")
    return prompts


def cached_embeddings(folder: Path, target: Target, prompts: list[str], resolution: int, cache_dir: Path,
                      device: torch.device) -> tuple[Condition, Condition]:
    """(conditions of `prompts`, condition of the empty prompt), from `cache_dir` when computed before.

    The cache key hashes the text components' configs and weights' sizes, the prompts and the resolution."""
    from safetensors.torch import save_file

    h = hashlib.sha256()
    for part in ("model_index.json", "text_encoder/config.json", "text_encoder_2/config.json",
                 "text_encoder_3/config.json", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json"):
        p = folder / part
        h.update(part.encode() + (p.read_bytes() if p.is_file() else b"-"))
    for weights in sorted(folder.glob("text_encoder*/*.safetensors")):
        h.update(f"{weights.relative_to(folder)}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode())
    h.update(json.dumps([target.pipeline, resolution, prompts]).encode())
    file = cache_dir / f"prompts-{h.hexdigest()[:20]}.safetensors"
    if file.is_file():
        flat = mapped_safetensors(file)
        logger.info("prompt embeddings: read %d prompts from %s", len(prompts), file)
    else:
        pipe = None if target.class_conditional else target.load_text_pipeline(folder).to(device)
        cond = target.encode(pipe, prompts, resolution, device)
        null = {} if target.class_conditional else target.encode(pipe, [""], resolution, device)
        flat = {f"cond.{k}": v.detach().cpu().contiguous() for k, v in cond.items()}
        flat.update({f"null.{k}": v.detach().cpu().contiguous() for k, v in null.items()})
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".tmp-{os.getpid()}-{file.name}")  # one per process: a shared cache never mixes writers
        save_file(flat, tmp)
        tmp.replace(file)
        logger.info("prompt embeddings: encoded %d prompts with the pipeline's text encoders into %s", len(prompts),
                    file)
        flat = mapped_safetensors(file)  # the encoded copies are freed: every process reads the one file
    cond = {k[5:]: v for k, v in flat.items() if k.startswith("cond.")}
    null = {k[5:]: v for k, v in flat.items() if k.startswith("null.")}
    return cond, null


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def mapped_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a memory map of it (no copy): the processes of a machine share
    the pages the OS caches, instead of each holding every prompt's embeddings (about 8 MB a prompt for Flux).
    Copy-on-write, so the views are writable and the file is never changed."""
    import mmap

    with open(file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    (n,) = torch.frombuffer(mapped, dtype=torch.int64, count=1).tolist()  # the header's length (little endian)
    header = json.loads(bytes(mapped[8:8 + n]))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{str(file)!r}: tensor {name!r} has dtype {info['dtype']}, not one this cache writes")
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        t = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + n + begin) if count else \
            torch.empty(0, dtype=dtype)
        out[name] = t.view(info["shape"])
    return out


class PromptDataset:
    """Prompts (or DiT class indices) as cached conditions; image-free (DMD2 needs no real images without GAN).

    `image_shape` is the latent shape the pipeline samples at `resolution`; `null_condition` the empty prompt."""

    latent = True  # its samples are VAE latents: the trainer's pixel sample grids do not apply

    def __init__(self, folder: Path, prompts_file: Path | list[str], resolution: int, cache_dir: Path,
                 num_frames: int = 1, prediction: str | None = None, device: torch.device | str = "cpu"):
        target, net, _ = teacher_target(folder, prediction)
        if target is None:
            raise ValueError("data.name: prompts needs a latent text- or class-conditioned teacher, not a pixel "
                             "UNet2DModel")
        self.target = target
        self.prompts = list(prompts_file) if isinstance(prompts_file, list) else read_prompts(prompts_file)
        target.check_prompts(self.prompts, net)
        self.image_shape = target.latent_shape(folder, net, resolution, num_frames)
        self.cond, self.null_condition = cached_embeddings(folder, target, self.prompts, resolution, cache_dir,
                                                           torch.device(device))
        self.cond.update(target.micro_conditions(net, resolution, len(self.prompts)))

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, batch_size: int, generator: torch.Generator):

        idx = torch.randint(0, len(self), (batch_size,), generator=generator)
        return Batch(None, {k: v[idx] for k, v in self.cond.items()})

    def grid_condition(self, n: int) -> Condition:
        idx = torch.arange(n) % len(self)
        return {k: v[idx] for k, v in self.cond.items()}
