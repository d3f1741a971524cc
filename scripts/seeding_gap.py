"""How far apart two calls of an exported 2-step student are when seeded with a generator of the call's own, and
with `generator=torch.manual_seed(0)` (docs/families.md, "Seeding"). Torch's global generator is disturbed before
each call, as other work would. The students are the tiny test teachers exported untrained (tests/tiny_pipelines.py):
the seeding is a property of the sampler, not of the weights.

    python scripts/seeding_gap.py            # prints one line per pipeline: max |difference| of images in [0, 1]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FAMILIES = ("flux", "sd3", "wan", "dit")


def main() -> None:
    from diffusers import DiffusionPipeline
    from tiny_pipelines import BUILDERS

    from distill.export.pipeline import export_pipeline
    from distill.models.denoiser import load_denoiser
    from distill.models.schedules import student_from_teacher

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    config = SimpleNamespace(recipe_name="seeding_gap", data=SimpleNamespace(num_frames=5))
    for family in FAMILIES:
        teacher = load_denoiser(BUILDERS[family](root / family), resolution=16)
        folder = export_pipeline(student_from_teacher(teacher), root / f"{family}-2", 2, config)
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        args = {"class_labels": [0, 1]} if family == "dit" else {"prompt": "a photo of a cat", "height": 16,
                                                                   "width": 16}
        if family == "wan":
            args["num_frames"] = 5
        guidance = 1.0 if family == "wan" else 0.0

        def images(generator, disturbed: int) -> np.ndarray:
            torch.manual_seed(disturbed)
            torch.randn(11)
            out = pipe(**args, num_inference_steps=2, guidance_scale=guidance, generator=generator(),
                       output_type="np")
            return np.asarray(out.frames if family == "wan" else out.images, dtype=np.float32)

        gaps = [np.abs(images(g, 1) - images(g, 2)).max()
                for g in (lambda: torch.Generator().manual_seed(0), lambda: torch.manual_seed(0))]
        print(f"{type(pipe).__name__:26s} torch.Generator().manual_seed(0): {gaps[0]:.3f}   "
              f"torch.manual_seed(0): {gaps[1]:.3f}")


if __name__ == "__main__":
    main()
