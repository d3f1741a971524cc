"""Sample grids: tiling, atomic writes and row labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distill.base.imaging import save_grid


def test_row_labels_add_a_text_column_and_must_match_the_rows(tmp_path):
    images = -torch.ones(20, 1, 8, 8)  # black tiles
    plain = Image.open(save_grid(images, tmp_path / "plain.png", nrow=10, scale=2))
    labelled = Image.open(save_grid(images, tmp_path / "labelled.png", nrow=10, scale=2,
                                    row_labels=["teacher", "student"]))
    assert labelled.height == plain.height and labelled.width > plain.width
    margin = np.asarray(labelled)[:, : labelled.width - plain.width]
    assert (margin < 128).any()  # text was drawn on the white margin
    assert np.array_equal(np.asarray(labelled)[:, labelled.width - plain.width:], np.asarray(plain))
    with pytest.raises(ValueError, match="row_labels: expected 2"):
        save_grid(images, tmp_path / "bad.png", nrow=10, row_labels=["only one"])
    assert not list(tmp_path.glob(".*.tmp"))


def test_row_label_margin_is_white_for_colour_grids(tmp_path):
    images = -torch.ones(4, 3, 8, 8)  # black RGB tiles
    labelled = np.asarray(Image.open(save_grid(images, tmp_path / "rgb.png", nrow=2, scale=2,
                                               row_labels=["teacher", "student"])))
    margin = labelled[:, :6]  # left of the text (drawn from x = 8)
    assert labelled.ndim == 3 and (margin == 255).all()  # white, not (255, 0, 0)
