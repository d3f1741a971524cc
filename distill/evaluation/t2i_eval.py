"""What the text-to-image evaluation scripts share (scripts/eval_fid.py, scripts/eval_clip.py, scripts/bench_speed.py):
prompts from a captions file, a pipeline folder loaded with plain diffusers (local files only, safety checker off),
seeded generation in batches (image i of the prompt list is drawn with seed + i, whatever the batch size), the
centre crop and resize that generated and real images both go through, and a labelled result table.

Nothing here downloads: pipelines and models are read from local folders only (`local_files_only=True`).
"""

from __future__ import annotations

import ast
import inspect
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class BadInput(Exception):
    """A file, folder or flag the user gave is unusable; the message names it (the scripts exit with it)."""


# -- prompts -----------------------------------------------------------------------------------------------------

def read_prompts(path: str | Path, count: int | None = None, subset_seed: int | None = None) -> list[str]:
    """The prompts of `path`: a text file (one prompt a line, blank lines skipped) or a COCO captions file
    (`captions_val2014.json`: the first caption of each image, images in ascending id). `count` keeps the first
    `count` (or, with `subset_seed`, a seeded random `count`, kept in file order); None keeps all."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BadInput(f"--prompts: {path} is not a file (one prompt a line, or a COCO captions .json)")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "annotations" not in data:
            raise BadInput(f"--prompts: {path} is JSON but not a COCO captions file (no 'annotations' list)")
        first: dict[int, tuple[int, str]] = {}
        for ann in data["annotations"]:
            key = (ann.get("id", 0), ann["caption"].strip())
            if ann["image_id"] not in first or key < first[ann["image_id"]]:
                first[ann["image_id"]] = key
        prompts = [first[i][1] for i in sorted(first)]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise BadInput(f"--prompts: {path} holds no prompts")
    if count is None:
        return prompts
    if count < 1 or count > len(prompts):
        raise BadInput(f"--num-prompts: asked for {count} prompts but {path} holds {len(prompts)}")
    if subset_seed is None:
        return prompts[:count]
    keep = sorted(random.Random(subset_seed).sample(range(len(prompts)), count))
    return [prompts[i] for i in keep]


# -- pipelines ---------------------------------------------------------------------------------------------------

def torch_dtype(name: str, device: str) -> torch.dtype:
    """`auto` is fp16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return DTYPES[name]


def load_pipeline(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers pipeline from a local folder, with no safety checker (the FID protocol keeps it off) and no
    progress bar. Components the folder was saved without (model_index.json entry [null, null]: SD3 without T5)
    are passed as None, as from_pretrained requires."""
    from diffusers import DiffusionPipeline

    folder = Path(folder).expanduser()
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise BadInput(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    extra = {k: None for k, v in index.items() if k == "safety_checker" or v == [None, None]}
    if dtype != torch.float32:  # float32 is the default; diffusers renames torch_dtype in recent versions
        extra["torch_dtype"] = dtype
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class CallSettings:
    """How a pipeline is called: steps, guidance scale and image size (None: the pipeline's own default), and
    where each value came from, for the result table."""

    steps: int
    guidance_scale: float | None
    size: int | None
    source: str
    extra: dict = field(default_factory=dict)  # the export's other call arguments (PixArt: use_resolution_binning)

    def kwargs(self) -> dict:
        out = {**self.extra, "num_inference_steps": self.steps}
        if self.guidance_scale is not None:
            out["guidance_scale"] = self.guidance_scale
        if self.size is not None:
            out["height"] = out["width"] = self.size
        return out

    def describe(self) -> str:
        guidance = "pipeline default" if self.guidance_scale is None else f"{self.guidance_scale:g}"
        size = "pipeline default" if self.size is None else f"{self.size}x{self.size}"
        return f"{self.steps} steps, guidance_scale {guidance}, {size} ({self.source})"


def student_meta(folder: str | Path) -> dict:
    """The `distill.json` a distill export writes beside its pipeline ({} for any other folder)."""
    meta = Path(folder).expanduser() / "distill.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


#: arguments of an export's stated call that the CallSettings fields, the prompts or the batch carry
_CALL_FIELDS = ("prompt", "class_labels", "batch_size", "num_inference_steps", "guidance_scale", "height", "width")


def exported_call(folder: str | Path) -> dict:
    """The keyword arguments of the call a distill export states in its `distill.json` (the model card's call, e.g.
    `pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0, height=512, width=512,
    use_resolution_binning=False)`), as Python values; {} for a folder without one."""
    call = student_meta(folder).get("call", "")
    if not call:
        return {}
    try:
        node = ast.parse(call.strip(), mode="eval").body
        if not isinstance(node, ast.Call):
            raise ValueError("not a call")
        # `generator=` says how the stated call is seeded (distill.json's `seeding`), not how to sample: skipped
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg not in (None, "generator")}
    except (SyntaxError, ValueError) as err:
        raise BadInput(f"{Path(folder) / 'distill.json'}: its 'call' is not a pipeline call with literal arguments "
                       f"({err}): {call!r}") from None


def exported_guidance(folder: str | Path) -> float | None:
    """The guidance_scale of the call a distill export states (guidance off, at the pipeline's value for off)."""
    value = exported_call(folder).get("guidance_scale")
    return None if value is None else float(value)


def exported_extra(folder: str | Path) -> dict:
    """The export's call arguments beyond prompt, steps, guidance and size, which every call of the student must
    repeat to sample what was trained (PixArt's `use_resolution_binning=False`: binning would resize to the
    nearest aspect-ratio bin)."""
    return {k: v for k, v in exported_call(folder).items() if k not in _CALL_FIELDS}


def trained_steps(folder: str | Path) -> int | None:
    """The step count a distill export was trained for (its `distill.json`), None for any other folder."""
    steps = student_meta(folder).get("num_inference_steps")
    return None if steps is None else int(steps)


def _signature_default(pipe, name: str):
    param = inspect.signature(pipe.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def call_settings(pipe, folder: str | Path, steps: int | None = None, guidance_scale: float | None = None,
                  size: int | None = None) -> CallSettings:
    """Flags first, then the distill export's own call (its `distill.json`: trained steps, guidance off, trained
    resolution), then the pipeline's defaults."""
    meta = student_meta(folder)
    sources = []
    if steps is None and "num_inference_steps" in meta:
        steps = int(meta["num_inference_steps"])
        sources.append("steps from distill.json")
    if guidance_scale is None and exported_guidance(folder) is not None:
        guidance_scale = exported_guidance(folder)
        sources.append("guidance from distill.json")
    if size is None and meta.get("resolution"):
        size = int(meta["resolution"])
        sources.append("size from distill.json")
    if steps is None:
        steps = _signature_default(pipe, "num_inference_steps")
        if steps is None:
            raise BadInput(f"{folder}: the pipeline has no default num_inference_steps; pass --steps")
        sources.append("steps: pipeline default")
    if guidance_scale is None:
        guidance_scale = _signature_default(pipe, "guidance_scale")
        sources.append("guidance: pipeline default")
    extra = exported_extra(folder)
    if extra:
        sources.append("also " + ", ".join(f"{k}={v!r}" for k, v in extra.items()) + " from distill.json")
    return CallSettings(int(steps), guidance_scale, size, "; ".join(sources) or "flags", extra)


def generate(pipe, prompts: Sequence[str], settings: CallSettings, seed: int,
             batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the first prompt, uint8 images (N, 3, H, W)) per batch. Image i's initial noise is drawn with its
    own CPU generator seeded `seed + i`, so it does not depend on the batch size or the device. A pipeline that
    re-noises from torch's global generator (a k >= 2 SD3, Flux, Wan or DiT export: distill.json's `seeding`) draws
    that from the global generator, seeded `seed + start` before each batch: reproducible at the same batch size."""
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start:start + batch_size])
        torch.manual_seed(seed + start)
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(batch))]
        out = pipe(batch, generator=generators, output_type="np", **settings.kwargs())
        yield start, uint8_images(out.images)


def uint8_images(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) floats in [0, 1] (a pipeline's "np" output) -> (N, 3, H, W) uint8, rounded as PNG saving does."""
    arr = (np.asarray(images, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def script_parser(doc: str):
    """An argparse parser whose --help begins with the script's docstring, as written."""
    import argparse

    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def run_script(run, args) -> int:
    """run(args), with a BadInput ending the script as one `error: ...` line (exit status 1)."""
    try:
        return run(args)
    except BadInput as err:
        raise SystemExit(f"error: {err}") from None


def add_source_args(ap, what: str) -> None:
    """The flags eval_fid.py and eval_clip.py share: where the images come from and how they are drawn."""
    ap.add_argument("source", help=f"a diffusers pipeline folder to {what}, or a folder of images written by "
                                   "--save-images (000000.png, ... in prompt order; then nothing is generated)")
    add_prompt_args(ap)
    add_call_args(ap)
    ap.add_argument("--save-images", metavar="DIR", help="also write the generated images as DIR/000000.png, ...")
    add_device_args(ap)


def add_prompt_args(ap) -> None:
    ap.add_argument("--prompts", required=True, metavar="FILE",
                    help="one prompt a line, or a COCO captions .json (first caption of each image)")
    ap.add_argument("--num-prompts", type=int, metavar="N", help="the first N prompts (default: all)")
    ap.add_argument("--prompt-seed", type=int, metavar="S",
                    help="with --num-prompts: a random N of the file drawn with seed S instead of the first N")
    ap.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (default 16)")


def add_call_args(ap) -> None:
    ap.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i (default 0)")
    ap.add_argument("--steps", type=int, help="num_inference_steps (default: distill.json, else the pipeline's)")
    ap.add_argument("--guidance-scale", type=float,
                    help="guidance_scale (default: distill.json's, i.e. off for a distilled student, else the "
                         "pipeline's default)")
    ap.add_argument("--image-size", type=int, metavar="PX",
                    help="generate PX x PX images (default: distill.json's resolution, else the pipeline's)")


def add_device_args(ap) -> None:
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp16 on CUDA, fp32 otherwise")
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON")


def source_images(args, prompts: Sequence[str]) -> tuple[Iterator[tuple[int, torch.Tensor]], dict]:
    """Batches (index of the first image, uint8 (N, 3, H, W)) for `prompts` from `args.source`, and what they are
    (for the table): generated by the pipeline there, or read back from a folder that --save-images wrote."""
    source = Path(args.source).expanduser()
    if args.batch_size < 1:
        raise BadInput(f"--batch-size: must be at least 1, got {args.batch_size}")
    if not (source / "model_index.json").is_file():
        files = image_files(source, "source", len(prompts))

        def read_back():
            for start in range(0, len(files), args.batch_size):
                yield start, torch.stack([from_pil(load_rgb(f)) for f in files[start:start + args.batch_size]])

        return read_back(), {"images": f"{len(files)} images read from {source}"}
    pipe = load_pipeline(source, args.device, torch_dtype(args.dtype, args.device))
    settings = call_settings(pipe, source, args.steps, args.guidance_scale, args.image_size)
    save_to = Path(args.save_images).expanduser() if args.save_images else None

    def generated():
        for start, images in generate(pipe, prompts, settings, args.seed, args.batch_size):
            if save_to is not None:
                save_pngs(save_to, start, images)
            yield start, images

    described = {"images": f"{len(prompts)} generated by {type(pipe).__name__} from {source}",
                 "call": settings.describe(),
                 "seeds": f"image i: seed {args.seed} + i (a global re-noising: seed {args.seed} + the batch's "
                          f"first index, batch size {args.batch_size})",
                 "dtype": str(torch_dtype(args.dtype, args.device)).replace("torch.", ""), "device": args.device}
    return generated(), described


def prompts_from_args(args) -> list[str]:
    """--prompts, --num-prompts, --prompt-seed."""
    if args.prompt_seed is not None and args.num_prompts is None:
        raise BadInput("--prompt-seed: draws a random --num-prompts N; give --num-prompts too")
    return read_prompts(args.prompts, args.num_prompts, args.prompt_seed)


def describe_prompts(args, prompts: Sequence[str]) -> str:
    if args.num_prompts is None:
        which = "all"
    elif args.prompt_seed is None:
        which = f"the first {len(prompts)}"
    else:
        which = f"{len(prompts)} drawn with seed {args.prompt_seed}"
    return f"{which} of {args.prompts} ({len(prompts)})"


# -- image files -------------------------------------------------------------------------------------------------

def save_pngs(folder: Path, start: int, images: torch.Tensor) -> None:
    """Image `start + j` as `<folder>/<start + j:06d>.png` (the order of the prompts file)."""
    folder.mkdir(parents=True, exist_ok=True)
    for j, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{start + j:06d}.png")


def image_files(folder: str | Path, flag: str, count: int | None = None) -> list[Path]:
    """The image files of `folder` sorted by name, the first `count` of them (None: all)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BadInput(f"{flag}: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInput(f"{flag}: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if count is not None:
        if count > len(files):
            raise BadInput(f"{flag}: asked for {count} images but {folder} holds {len(files)}")
        files = files[:count]
    return files


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def center_crop_resize(img: Image.Image, size: int, resample: str = "lanczos") -> Image.Image:
    """The centred square of side min(width, height), resized to size x size with PIL (`lanczos` or `bicubic`)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), RESAMPLE[resample])


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) uint8 -> PIL RGB."""
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) uint8."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


# -- results -----------------------------------------------------------------------------------------------------

def format_table(rows: list[dict], columns: list[tuple[str, str, str]], label: str = "") -> str:
    """A text table: one line per row, first the row's `name`, then `columns` as (key, header, format spec);
    a missing or None value prints as '-'."""
    width = max([len(label)] + [len(str(r["name"])) for r in rows]) + 2
    cells = [[format(r[k], spec) if r.get(k) is not None else "-" for k, _, spec in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) + 2 for i, (_, h, _) in enumerate(columns)]
    lines = [label.ljust(width) + "".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))]
    for r, c in zip(rows, cells):
        lines.append(str(r["name"]).ljust(width) + "".join(v.rjust(w) for v, w in zip(c, widths)))
    return "\n".join(lines)


def write_json(path: str | Path | None, result: dict) -> None:
    if path is not None:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
