"""Captioned shapes: a text-to-image data set the project renders itself (no download), for the text teacher.

Each image is 24x24 RGB: one shape (circle, square, triangle) in one colour (red, green, blue, yellow) at one of
four positions (the quadrants), on a dark background, with the caption "a red circle at the top left". Size,
exact place, colour shade and background are jittered, so every caption has a distribution of images, not one.
Shapes are drawn with PIL at 4x and box-downsampled (anti-aliased edges).

Image i of a split is a pure function of (split, i): its caption is caption `i % 48` (every caption equally often
in any prefix of 48 k images) and its jitter comes from `numpy.random.default_rng([SEED, split id, i])`. The two
splits follow the digits protocol (distill/data/digits.py):

* "train" (4,800 images, 100 per caption): everything a generator learns from (the text teacher and its VAE), and
  the judge's classifier;
* "reference" (960 images, 20 per caption): only the judge's Frechet distance reads it.

Different seed streams make the splits disjoint (tests/test_shapes.py checks that no image repeats across them).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

RESOLUTION = 24
SUPERSAMPLE = 4
SEED = 20240917

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 45), "green": (45, 185, 70), "blue": (55, 90, 235), "yellow": (230, 210, 50)}
#: centre of each position, as a fraction of the image side (x, y), y downwards
POSITIONS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
             "bottom right": (0.73, 0.73)}
#: the attributes a caption names, in the order of an attribute row (shape, colour, position)
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(POSITIONS)}

#: every (shape, colour, position) index triple, in caption order
COMBINATIONS = tuple(itertools.product(range(len(SHAPES)), range(len(COLOURS)), range(len(POSITIONS))))
NUM_CAPTIONS = len(COMBINATIONS)  # 48

SPLITS = {"train": 4800, "reference": 960}
_SPLIT_IDS = {"train": 1, "reference": 2}

# Jitter (fractions of the image side unless stated)
CENTRE_JITTER = 0.05  # uniform +-, per axis
SIZE_RANGE = (0.15, 0.2)  # half-width of the shape's box
SHADE_JITTER = 25  # uniform +- per RGB channel, in 0..255
BACKGROUND_RANGE = (10, 50)  # grey level, 0..255


def caption(shape: int, colour: int, position: int) -> str:
    """The caption of an attribute triple: "a red circle at the top left"."""
    return f"a {ATTRIBUTES['colour'][colour]} {SHAPES[shape]} at the {ATTRIBUTES['position'][position]}"


CAPTIONS = tuple(caption(*c) for c in COMBINATIONS)


def attributes_of(captions: list[str]) -> torch.Tensor:
    """(N, 3) int64 attribute rows (shape, colour, position) of captions from CAPTIONS; others are an error."""
    index = {c: i for i, c in enumerate(CAPTIONS)}
    unknown = [c for c in captions if c not in index]
    if unknown:
        raise ValueError(f"not a shapes caption: {unknown[0]!r} (captions look like {CAPTIONS[0]!r})")
    return torch.tensor([COMBINATIONS[index[c]] for c in captions], dtype=torch.int64)


def render(shape: int, colour: int, position: int, rng: np.random.Generator) -> np.ndarray:
    """One (RESOLUTION, RESOLUTION, 3) uint8 image; the jitter is drawn from `rng`."""
    from PIL import Image, ImageDraw

    side = RESOLUTION * SUPERSAMPLE
    cx, cy = POSITIONS[ATTRIBUTES["position"][position]]
    cx, cy = (np.array([cx, cy]) + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2)) * side
    half = rng.uniform(*SIZE_RANGE) * side
    shade = np.array(COLOURS[ATTRIBUTES["colour"][colour]]) + rng.integers(-SHADE_JITTER, SHADE_JITTER + 1, 3)
    fill = tuple(int(v) for v in shade.clip(0, 255))
    grey = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    img = Image.new("RGB", (side, side), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    if SHAPES[shape] == "circle":
        draw.ellipse(box, fill=fill)
    elif SHAPES[shape] == "square":
        s = half * 0.9  # a square of the circle's area reads as bigger; keep the visible sizes alike
        draw.rectangle((round(cx - s), round(cy - s), round(cx + s), round(cy + s)), fill=fill)
    else:  # an upright equilateral-ish triangle in the same box
        draw.polygon([(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)], fill=fill)
    return np.asarray(img.resize((RESOLUTION, RESOLUTION), Image.BOX))


@functools.lru_cache(maxsize=4)
def _split(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.empty((count, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    attrs = torch.tensor([COMBINATIONS[i % NUM_CAPTIONS] for i in range(count)], dtype=torch.int64)
    for i in range(count):
        rng = np.random.default_rng([SEED, _SPLIT_IDS[split], i])
        images[i] = render(*attrs[i].tolist(), rng)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous(), attrs


def shapes_split(split: str, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images, attributes, captions) of the first `count` (default: all) images of a split: float32 images in
    [-1, 1] of shape (N, 3, 24, 24), (N, 3) int64 attribute rows (shape, colour, position), N captions."""
    if split not in SPLITS:
        raise ValueError(f"shapes split must be one of {list(SPLITS)}, got {split!r}")
    count = SPLITS[split] if count is None else count
    if not 0 < count <= SPLITS[split]:
        raise ValueError(f"the {split} split has {SPLITS[split]} images; asked for {count}")
    images, attrs = _split(split, count)
    return images.clone(), attrs.clone(), [caption(*a) for a in attrs.tolist()]
