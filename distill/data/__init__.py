"""The data a run trains on: digits (`digits.py`), the 2-D toy (`toy.py`), prompts (`prompts.py`), captioned images
as latents (`images.py`) and teacher pair stores (`pairs.py`). A new data set is a module here and one entry in
:func:`make_dataset`."""

from __future__ import annotations

from distill.data.digits import DigitsDataset


def make_dataset(name: str, resolution: int, data_config=None, teacher=None, device=None):
    """The data set of `data.name`; "prompts" and "images" need the data section and the loaded teacher (its
    pipeline folder), and encode on `device` (default: the teacher network's)."""
    if name == "digits":
        return DigitsDataset(resolution)
    if name == "toy":  # 2-D points of the Gaussian mixture in distill/data/toy.py; `resolution` does not apply
        from distill.data.toy import ToyDataset

        return ToyDataset()
    if name == "prompts":
        from pathlib import Path

        from distill.base.paths import resolve_path
        from distill.data.prompts import PromptDataset

        src = teacher.source
        device = device or next(teacher.model.parameters()).device
        return PromptDataset(Path(src["folder"]), resolve_path(data_config.prompts), resolution,
                             Path(data_config.cache_dir).expanduser(), data_config.num_frames, teacher.prediction,
                             device)
    if name == "images":
        from pathlib import Path

        from distill.data.images import ImageDataset

        src = teacher.source
        device = device or next(teacher.model.parameters()).device
        return ImageDataset(Path(src["folder"]), Path(data_config.images).expanduser(), resolution,
                            Path(data_config.cache_dir).expanduser(), teacher.prediction, device)
    raise ValueError(f"data.name: unknown dataset {name!r}; available: ['digits', 'images', 'prompts', 'toy']")
