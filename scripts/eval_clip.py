"""CLIP score of a text-to-image pipeline through torchmetrics, with a CLIP model from a local folder.

    python scripts/eval_clip.py PIPELINE --prompts captions_val2014.json --num-prompts 30000 --prompt-seed 0 \\
        --clip-model clip-vit-large-patch14/ [--prefix "A photo depicts "]

The CLIP folder is a transformers `CLIPModel` + `CLIPProcessor` saved with `save_pretrained` (e.g. a local copy of
openai/clip-vit-large-patch14 for ViT-L/14, or laion/CLIP-ViT-g-14-laion2B-s12B-b42K for ViT-g/14, the two the
paper tables use); it is read with `local_files_only=True`, nothing is downloaded. The architecture is read from
its config and printed (ViT-L/14, ViT-g/14, ...), so a figure always says which CLIP it is.

Two numbers, labelled: torchmetrics' `CLIPScore`, 100 x the mean cosine between image and caption embeddings
(clipped at 0 after averaging, as torchmetrics 1.9 does), and the mean cosine itself (that / 100), the 0.29-ish
form the papers report. The images go through the CLIP processor's own resize and centre crop; `--prefix` is put
before each caption for CLIP only (the pipeline gets the caption as it is).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from distill.evaluation.t2i_eval import (
    BadInput,
    add_source_args,
    describe_prompts,
    format_table,
    prompts_from_args,
    run_script,
    script_parser,
    source_images,
    write_json,
)

#: (vision width, vision layers, patch) -> the name papers use
CLIP_ARCHITECTURES = {(768, 12, 32): "ViT-B/32", (768, 12, 16): "ViT-B/16", (1024, 24, 14): "ViT-L/14",
                      (1280, 32, 14): "ViT-H/14", (1408, 40, 14): "ViT-g/14", (1664, 48, 14): "ViT-bigG/14"}


def clip_architecture(config) -> str:
    """'ViT-L/14 (224 px)' from a CLIPConfig, or the numbers of an unnamed one."""
    vision = config.vision_config
    key = (vision.hidden_size, vision.num_hidden_layers, vision.patch_size)
    name = CLIP_ARCHITECTURES.get(key, f"unnamed CLIP (width {key[0]}, {key[1]} layers, patch {key[2]})")
    return f"{name} ({vision.image_size} px)"


class ProjectedFeatures(nn.Module):
    """The CLIPModel surface torchmetrics' CLIPScore calls, returning the projected embeddings as tensors:
    transformers 5 returns them as the `pooler_output` of a model output, which torchmetrics 1.9 cannot divide."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class TruncatingProcessor:
    """The CLIP processor with captions truncated by the tokenizer (keeping the end token CLIP pools at), where
    torchmetrics would cut the token ids after the fact."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, *args, **kwargs):
        if kwargs.get("text") is not None:
            kwargs.setdefault("truncation", True)
        return self.processor(*args, **kwargs)


def load_clip(folder: str | Path):
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise BadInput(f"--clip-model: {folder} is not a saved CLIPModel folder (no config.json)")
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    try:
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except OSError as err:
        raise BadInput(f"--clip-model: {folder} has no CLIPProcessor files (tokenizer and image processor: save "
                       f"them with CLIPProcessor.save_pretrained): {err}") from err
    return model, processor


def main(argv: list[str] | None = None) -> int:
    ap = script_parser(__doc__)
    add_source_args(ap, "score")
    ap.add_argument("--clip-model", required=True, metavar="DIR", help="local CLIPModel + CLIPProcessor folder")
    ap.add_argument("--prefix", default="", help='put before every caption for CLIP, e.g. "A photo depicts "')
    return run_script(run, ap.parse_args(argv))


def run(args) -> int:
    from torchmetrics.multimodal import CLIPScore

    prompts = prompts_from_args(args)
    model, processor = load_clip(args.clip_model)
    model = ProjectedFeatures(model).to(args.device)
    metric = CLIPScore(model_name_or_path=lambda: (model, TruncatingProcessor(processor)))
    batches, described = source_images(args, prompts)
    with torch.no_grad():
        for start, images in batches:
            metric.update(images.to(args.device), [args.prefix + p for p in prompts[start:start + len(images)]])
    score = float(metric.compute())
    result = {
        "metric": "CLIP score (torchmetrics CLIPScore: 100 x mean cosine, clipped at 0)",
        "clip": f"{clip_architecture(model.config)} from {args.clip_model}",
        "caption prefix": repr(args.prefix), "prompts": describe_prompts(args, prompts), **described,
        "clip_score": score, "mean_cosine": score / 100, "count": int(metric.n_samples),
    }
    for key in ("metric", "clip", "caption prefix", "prompts", "images", "call", "seeds", "device", "dtype"):
        if key in result:
            print(f"{key + ':':<17}{result[key]}")
    print(format_table([{"name": "generated", **result}], [("clip_score", "CLIP score (100 x cos)", ".3f"),
                                                           ("mean_cosine", "mean cosine", ".4f"),
                                                           ("count", "images", "d")]))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
