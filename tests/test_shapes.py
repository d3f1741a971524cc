"""The text-to-image task's data and judge: captioned shapes are deterministic, the splits are disjoint, and the
shipped judge reads a caption's attributes from real images it never trained on (and only from them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.demo import shapes
from distill.demo.shapes import CAPTIONS, COMBINATIONS, NUM_CAPTIONS, SPLITS, attributes_of, caption, shapes_split
from distill.demo.shapes_judge import JUDGE_COUNT, SHAPES_JUDGE_DIR, ShapesJudge, shapes_features

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def judge() -> ShapesJudge:
    return ShapesJudge()


def _as_bytes(images: torch.Tensor) -> set[bytes]:
    """Each image as its exact uint8 bytes (the renderer's output before scaling to [-1, 1])."""
    u8 = ((images + 1.0) * 127.5).round().to(torch.uint8)
    return {bytes(im.numpy().tobytes()) for im in u8}


def test_images_are_a_pure_function_of_split_and_index():
    first, attrs, caps = shapes_split("reference", 96)
    shapes._split.cache_clear()  # render again, not from the cache
    again, attrs2, caps2 = shapes_split("reference", 96)
    assert torch.equal(first, again) and torch.equal(attrs, attrs2) and caps == caps2
    # a prefix of a split is the same images as the start of the whole split
    whole, _, _ = shapes_split("reference")
    assert torch.equal(whole[:96], first)
    assert first.shape == (96, 3, 24, 24) and first.dtype == torch.float32
    assert -1.0 <= float(first.min()) and float(first.max()) <= 1.0
    # the renderer itself: same generator state, same image; another seed, another image
    a = shapes.render(0, 0, 0, np.random.default_rng([1, 2, 3]))
    b = shapes.render(0, 0, 0, np.random.default_rng([1, 2, 3]))
    c = shapes.render(0, 0, 0, np.random.default_rng([1, 2, 4]))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_splits_are_disjoint_and_balanced():
    train, train_attrs, _ = shapes_split("train")
    reference, ref_attrs, ref_caps = shapes_split("reference")
    assert len(train) == SPLITS["train"] and len(reference) == SPLITS["reference"] == JUDGE_COUNT
    train_bytes, ref_bytes = _as_bytes(train), _as_bytes(reference)
    assert len(train_bytes) == len(train) and len(ref_bytes) == len(reference)  # no repeats within a split
    assert not train_bytes & ref_bytes  # and none across the splits
    counts = torch.bincount(torch.tensor([CAPTIONS.index(c) for c in ref_caps]), minlength=NUM_CAPTIONS)
    assert counts.tolist() == [JUDGE_COUNT // NUM_CAPTIONS] * NUM_CAPTIONS
    assert torch.equal(train_attrs[:JUDGE_COUNT], ref_attrs)  # the floor's captions are the reference's


def test_captions_and_attributes_round_trip():
    assert len(set(CAPTIONS)) == NUM_CAPTIONS == 48
    assert caption(0, 0, 0) == "a red circle at the top left"
    assert attributes_of(list(CAPTIONS)).tolist() == [list(c) for c in COMBINATIONS]
    with pytest.raises(ValueError, match="purple"):
        attributes_of(["a purple circle at the top left"])
    with pytest.raises(ValueError, match="split"):
        shapes_split("test")
    with pytest.raises(ValueError, match="960"):
        shapes_split("reference", 961)


def test_colour_and_position_are_where_the_caption_says():
    """The renderings themselves: the shape's pixels have the caption's colour and sit in its quadrant."""
    images, attrs, _ = shapes_split("reference", NUM_CAPTIONS)
    for image, (_, colour, position) in zip(images, attrs.tolist()):
        rgb = (image + 1) * 127.5
        background = rgb[:, 0, 0]
        mask = (rgb - background[:, None, None]).abs().sum(0) > 60
        ys, xs = mask.nonzero(as_tuple=True)
        cy, cx = ys.float().mean() / 24, xs.float().mean() / 24
        want_x, want_y = shapes.POSITIONS[shapes.ATTRIBUTES["position"][position]]
        assert abs(float(cx) - want_x) < 0.12 and abs(float(cy) - want_y) < 0.12
        mean = rgb[:, mask].mean(1)
        palette = torch.tensor(list(shapes.COLOURS.values()), dtype=torch.float32)
        assert int((palette - mean).norm(dim=1).argmin()) == colour  # the nearest named colour


def test_judge_reads_real_held_out_images(judge):
    reference, _, captions = shapes_split("reference")
    scores = judge.attribute_scores(reference, captions)
    assert scores["agreement"] >= 0.98 and min(scores["shape"], scores["colour"], scores["position"]) >= 0.98
    training = json.loads((SHAPES_JUDGE_DIR / "training.json").read_text())
    assert abs(scores["agreement"] - training["reference"]["agreement"]) < 0.01
    # Wrong captions for the same images: the judge must disagree (each caption names three attributes).
    shifted = captions[1:] + captions[:1]  # the next caption: another position, or another colour or shape
    assert judge.attribute_scores(reference, shifted)["agreement"] < 0.1
    noise = torch.rand(reference.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert judge.attribute_scores(noise, captions)["agreement"] < 0.2
    with pytest.raises(ValueError, match="captions"):
        judge.attribute_scores(reference, captions[:-1])


def test_eval_fid_feature_module_gives_the_judges_features(judge):
    # scripts/eval_fid.py --feature-module distill.demo.shapes_judge:shapes_features reads PNGs as uint8: the features
    # of the rounded images are the judge's features of the same rounded images, so its distance is FD-shapes.
    images = shapes_split("reference", 64)[0]
    as_uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    features = shapes_features()(as_uint8)
    assert features.shape == (64, 64)
    assert torch.allclose(features.double(), judge.features(as_uint8.float() / 127.5 - 1).double(), atol=1e-6)
    assert (features - judge.features(images)).abs().max() < 0.05 * features.abs().max()  # rounding moves it little
    with pytest.raises(ValueError, match=r"uint8 images \(N, 3, 24, 24\); got \(2, 3, 32, 32\).*--resolution 24"):
        shapes_features()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_fd_shapes_floor_and_ordering(judge):
    floor = judge.floor()
    assert 0.0 < floor < 1.0  # real against real
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    blurred = F.conv2d(F.pad(judge.held_out, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    noise = torch.rand(judge.held_out.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert judge(noise) > judge(blurred) > 2 * floor
    with pytest.raises(ValueError, match=r"\(960, 3, 24, 24\)"):
        judge(judge.held_out[:100])
    with pytest.raises(ValueError, match=r"\(960, 3, 24, 24\)"):
        judge(torch.zeros(960, 1, 24, 24))


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_text_teacher_training_reads_only_the_train_split(family, tmp_path, monkeypatch):
    """The digits protocol for the shapes: the teacher's script (VAE and network) never renders a reference image;
    its output is a stock pipeline that plain diffusers loads. The flow (sd3) teacher reuses the VP teacher's VAE
    and trains its transformer on the pipeline's 256 zero rows fed as one token (RepeatedLastToken): the script
    checks that this equals the stock call on all rows, and records the difference."""
    import importlib.util
    import json
    import sys

    from tiny import REPO

    from distill.base.paths import ASSETS

    real = shapes._split

    def train_only(split, count):
        assert split == "train", f"a training path read the {split} split"
        return real(split, count)

    monkeypatch.setattr(shapes, "_split", train_only)
    spec = importlib.util.spec_from_file_location("train_text_teacher", REPO / "scripts" / "train_text_teacher.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "teacher"
    family_args = ["--vae", str(ASSETS / "text_teacher")] if family == "sd3" else ["--vae-steps", "2"]
    monkeypatch.setattr(sys, "argv", ["train_text_teacher.py", "--family", family, "--out", str(out), *family_args,
                                      "--steps", "2", "--batch-size", "4", "--vae-batch-size", "4", "--threads", "0"])
    script.main()
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    if family == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
        assert pipe.transformer.config.patch_size == 2 and pipe.scheduler.config.shift == 1.0
        info = json.loads((out / "training_args.json").read_text())
        assert 0 <= info["repeated_token_max_error"] < 1e-5 < 1e-2 < info["single_token_max_difference"]
        assert pipe.vae.config.scaling_factor == pytest.approx(info["vae_scaling_factor"])
    else:
        pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.vae_scale_factor == 2 and (out / "prompts.txt").read_text().split("\n")[0] == CAPTIONS[0]
    with pytest.raises(AssertionError, match="reference"):
        shapes_split("reference", 1)
