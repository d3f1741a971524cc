"""Inception FID of a text-to-image pipeline on the COCO protocol, through torchmetrics, offline.

    python scripts/eval_fid.py PIPELINE --prompts captions_val2014.json --num-prompts 30000 --prompt-seed 0 \\
        --reference coco_val2014/ --resolution 256 --inception-weights weights-inception-2015-12-05-6726825d.pth

The protocol (docs/evaluation.md): a fixed caption list (COCO-2014 val 30k, or COCO-2017 5k), image i drawn with
seed + i, the same centre crop and PIL resize (lanczos or bicubic) for generated and real images at a declared
resolution (256 for SD1.5-class models, 512 for SDXL-class), Inception-v3 pool features (2048), reference set size
stated, safety checker off. `--floor` adds the floor: the FID of a random half of the reference set against the
other half (the split drawn with seed 0 from `floor_halves`; not even against odd files, which would split a set
stored in class order by class; FID is biased by the sample count: compare figures only at the same counts).

What works, and what it needs:
- the stock Inception (`--inception-weights FILE`): torchmetrics' `NoTrainInceptionV3` ("inception-v3-compat", the
  TF FID network), which needs the `torch-fidelity` package, and torch-fidelity imports `torchvision`. The weights
  come only from FILE, the TF Inception converted by torch-fidelity (`weights-inception-2015-12-05-6726825d.pth`,
  fetched once by hand); nothing is downloaded, and a missing FILE is an error naming the flag.
  Without torch-fidelity and torchvision the stock network cannot be built: the script says so and stops.
- any other feature network (`--feature-module MODULE:FACTORY` or `path/to/file.py:FACTORY`): FACTORY() returns an
  nn.Module mapping uint8 images (N, 3, H, W) to features (N, D). This needs neither package; the tests use it
  with a tiny stand-in network. Its figure is a Frechet distance in those features, not Inception FID.
The Frechet statistics and distance are torchmetrics' `FrechetInceptionDistance` (float64 sums); features are
computed once per image and shared by the FID and the floor.

Resize conventions into Inception's 299 x 299 (`--resize`, printed with the result):
- tf (default): the network resizes with TF1-compatible bilinear, no antialias (torch-fidelity, the original TF FID);
- antialias: the network resizes with torch bilinear + antialias (torchmetrics' default);
- pil-bicubic: PIL bicubic to 299 before the network (clean-fid's resize; clean-fid feeds the resized image as
  floats, here it is rounded to uint8 first, because torchmetrics' Inception takes uint8).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from distill.evaluation.t2i_eval import (
    RESAMPLE,
    BadInput,
    add_source_args,
    center_crop_resize,
    describe_prompts,
    format_table,
    from_pil,
    image_files,
    load_rgb,
    prompts_from_args,
    run_script,
    script_parser,
    source_images,
    to_pil,
    write_json,
)

INCEPTION_SIZE = 299
RESIZE = {
    "tf": "TF1-compatible bilinear to 299 inside Inception, no antialias (torch-fidelity / original TF FID)",
    "antialias": "torch bilinear with antialias to 299 inside Inception (torchmetrics' default)",
    "pil-bicubic": "PIL bicubic to 299 before Inception, rounded to uint8 (clean-fid's resize, quantised)",
}


def inception_network(weights: Path, resize: str) -> nn.Module:
    """torchmetrics' TF-compatible Inception-v3 (pool3, 2048 features) with its weights read from `weights` only."""
    if not weights.is_file():
        raise BadInput(f"--inception-weights: {weights} is not a file (the converted TF Inception, "
                       "weights-inception-2015-12-05-6726825d.pth; nothing is downloaded)")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=str(weights), antialias=resize == "antialias")
    except ImportError as err:  # ModuleNotFoundError included: torch-fidelity, or the torchvision it imports
        raise BadInput(f"--inception-weights: torchmetrics' Inception needs torch-fidelity, which imports "
                       f"torchvision ({err}); install both for your torch, or pass --feature-module "
                       "MODULE:FACTORY (a feature network of your own)") from err


def feature_module(spec: str) -> nn.Module:
    """FACTORY() from `module.path:FACTORY` or `file.py:FACTORY`."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise BadInput(f"--feature-module: expected MODULE:FACTORY or FILE.py:FACTORY, got {spec!r}")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise BadInput(f"--feature-module: {path} is not a file")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    if not hasattr(module, name):
        raise BadInput(f"--feature-module: {where} has no {name!r}")
    network = getattr(module, name)()
    if not isinstance(network, nn.Module):
        raise BadInput(f"--feature-module: {spec}() returned a {type(network).__name__}, not an nn.Module")
    return network


class FeatureRows(nn.Module):
    """The identity on precomputed feature rows: FrechetInceptionDistance's `feature` network, so each image goes
    through the real network once and its features serve both the FID and the floor."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


class FrechetSets:
    """A FrechetInceptionDistance over feature rows (created at the first batch, when D is known)."""

    def __init__(self):
        self.metric = None
        self.counts = {True: 0, False: 0}

    def update(self, rows: torch.Tensor, real: bool) -> None:
        if self.metric is None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            self.metric = FrechetInceptionDistance(feature=FeatureRows(rows.shape[1]))
        self.metric.update(rows, real=real)
        self.counts[real] += len(rows)

    def compute(self) -> float:
        return float(self.metric.compute())


def prepare(img, resolution: int, resample: str, resize: str) -> torch.Tensor:
    """Both sets alike: centre crop + PIL resize to `resolution`; then, for pil-bicubic, PIL bicubic to 299."""
    img = center_crop_resize(img, resolution, resample)
    if resize == "pil-bicubic":
        img = img.resize((INCEPTION_SIZE, INCEPTION_SIZE), RESAMPLE["bicubic"])
    return from_pil(img)


def main(argv: list[str] | None = None) -> int:
    ap = script_parser(__doc__)
    add_source_args(ap, "evaluate")
    ap.add_argument("--reference", required=True, metavar="DIR", help="folder of real images (e.g. COCO val2014)")
    ap.add_argument("--num-reference", type=int, metavar="N", help="the first N reference images by name (default all)")
    ap.add_argument("--resolution", type=int, default=256,
                    help="both sets are centre-cropped and resized to this (256: SD1.5-class, 512: SDXL-class)")
    ap.add_argument("--resample", choices=sorted(RESAMPLE), default="lanczos", help="PIL filter of that resize")
    net = ap.add_mutually_exclusive_group(required=True)
    net.add_argument("--inception-weights", metavar="FILE", help="local Inception weights (torch-fidelity's .pth)")
    net.add_argument("--feature-module", metavar="MODULE:FACTORY", help="a feature network of your own instead")
    ap.add_argument("--resize", choices=sorted(RESIZE), default="tf", help="resize convention into Inception")
    ap.add_argument("--floor", action="store_true", help="also a random half of the reference against the other half")
    return run_script(run, ap.parse_args(argv))


#: the seed of the floor's random halving of the reference set
FLOOR_SEED = 0


def floor_halves(count: int, seed: int = FLOOR_SEED) -> torch.Tensor:
    """(count,) bool: True for the reference images of the floor's first half (count // 2 of them, a seeded random
    choice), False for the rest."""
    first = torch.zeros(count, dtype=torch.bool)
    first[torch.randperm(count, generator=torch.Generator().manual_seed(seed))[: count // 2]] = True
    return first


def run(args) -> int:
    prompts = prompts_from_args(args)
    references = image_files(args.reference, "--reference", args.num_reference)
    if args.floor and len(references) < 4:
        raise BadInput(f"--floor: needs at least 4 reference images, {args.reference} gives {len(references)}")
    if args.feature_module:
        network = feature_module(args.feature_module)
        features = f"custom feature network {args.feature_module}"
    else:
        network = inception_network(Path(args.inception_weights).expanduser(), args.resize)
        features = f"Inception-v3 pool3 (2048, TF-compatible), weights {args.inception_weights}"
    network = network.to(args.device).eval()

    @torch.no_grad()
    def rows(images: torch.Tensor) -> torch.Tensor:
        return network(images.to(args.device)).float().cpu().reshape(len(images), -1)

    batches, described = source_images(args, prompts)  # checked (and the pipeline loaded) before any feature pass
    fid, floor = FrechetSets(), FrechetSets()
    first_half = floor_halves(len(references))
    for start in range(0, len(references), args.batch_size):
        batch = references[start:start + args.batch_size]
        feats = rows(torch.stack([prepare(load_rgb(f), args.resolution, args.resample, args.resize) for f in batch]))
        fid.update(feats, real=True)
        if args.floor:
            half = first_half[start:start + len(batch)]
            for real in (True, False):
                if (half == real).any():
                    floor.update(feats[half == real], real=real)
    for _, images in batches:
        fid.update(rows(torch.stack([prepare(to_pil(img), args.resolution, args.resample, args.resize)
                                     for img in images])), real=False)

    resize = RESIZE[args.resize] if not args.feature_module or args.resize == "pil-bicubic" else (
        f"none beyond the crop (the feature module gets {args.resolution} px uint8)")
    result = {
        "metric": "FID" if not args.feature_module else "Frechet distance in custom features (not Inception FID)",
        "features": features, "resize into the network": resize,
        "both sets": f"centre crop + PIL {args.resample} to {args.resolution}x{args.resolution}",
        "reference": f"{fid.counts[True]} images from {args.reference}",
        "prompts": describe_prompts(args, prompts), **described,
        "fid": fid.compute(), "generated": fid.counts[False], "reference_count": fid.counts[True],
    }
    table = [{"name": "generated vs reference", "fid": result["fid"], "a": fid.counts[False], "b": fid.counts[True]}]
    if args.floor:
        result["floor"] = floor.compute()
        result["floor_counts"] = [floor.counts[True], floor.counts[False]]
        table.append({"name": f"floor: reference half vs half (seed {FLOOR_SEED})", "fid": result["floor"], "a": floor.counts[False],
                      "b": floor.counts[True]})
    for key in ("metric", "features", "resize into the network", "both sets", "reference", "prompts", "images",
                "call", "seeds", "device", "dtype"):
        if key in result:
            print(f"{key + ':':<25}{result[key]}")
    print(format_table(table, [("fid", "FD (custom features)" if args.feature_module else "FID", ".3f"),
                               ("a", "images", "d"), ("b", "reference", "d")]))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
