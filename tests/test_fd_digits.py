"""FD-digits and its classifier: shipped weights, closed-form agreement, protocol guards, sanity ordering."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from distill.data.digits import load_digits
from distill.demo.digits_judge import (
    DIGITS_CLASSIFIER_DIR,
    PROTOCOL_COUNT,
    DigitsFeatureNet,
    FDDigits,
    fd_digits,
    load_digits_classifier,
)
from distill.evaluation.metrics import check_images

# Held-out accuracy of the shipped classifier is 0.9972 (358/359); this leaves room for BLAS differences only.
MIN_TEST_ACCURACY = 0.99


@pytest.fixture(scope="module")
def judge() -> FDDigits:
    return FDDigits(resolution=16)


def _blur(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).view(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)


def test_shipped_classifier_accuracy_on_held_out_split():
    model = load_digits_classifier()
    training = json.loads((DIGITS_CLASSIFIER_DIR / "training.json").read_text())
    test_idx = torch.tensor(training["test_indices"])
    images, labels = load_digits(16)
    with torch.no_grad():
        accuracy = (model(images[test_idx]).argmax(-1) == labels[test_idx]).float().mean().item()
    assert len(test_idx) == 359
    assert accuracy >= MIN_TEST_ACCURACY
    assert abs(accuracy - training["test_accuracy"]) < 0.01


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_digits_classifier(tmp_path)
    shutil.copytree(DIGITS_CLASSIFIER_DIR, tmp_path / "bad", dirs_exist_ok=True)
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_digits_classifier(tmp_path / "bad")
    shutil.copy(DIGITS_CLASSIFIER_DIR / "model.safetensors", tmp_path / "bad" / "model.safetensors")
    (tmp_path / "bad" / "config.json").write_text('{"num_features": 32}')  # valid JSON, wrong shapes
    with pytest.raises(ValueError, match="config.json"):
        load_digits_classifier(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_digits_classifier(tmp_path / "bad")


def test_torchmetrics_reads_num_features_without_probing():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = DigitsFeatureNet()
    fid = FrechetInceptionDistance(feature=net)  # no dummy uint8 forward: it would raise in check_images
    assert fid.real_features_sum.shape == (net.num_features,)
    with pytest.raises(ValueError, match="uint8"):
        net(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    net.train()
    assert not net.training and not net.classifier.training


def test_fd_of_a_set_against_itself_is_zero(judge):
    assert abs(fd_digits(judge.reference, judge.reference, feature_net=judge.feature_net)) < 1e-6


def test_floor_and_ordering(judge):
    floor = judge.floor()
    g = torch.Generator().manual_seed(0)
    noise = judge(torch.randn(judge.held_out.shape, generator=g))
    shifted_blurred = judge(F.pad(_blur(judge.held_out), (1, 0, 1, 0), value=-1.0)[:, :, :16, :16])
    blurred = judge(_blur(judge.held_out))
    assert 0.0 < floor < 3.0  # measured 1.47 with the shipped classifier
    # The cached reference statistics survive reset(): a second call and the plain function agree.
    assert judge(judge.held_out) == pytest.approx(floor, rel=1e-9)
    assert fd_digits(judge.held_out, judge.reference, feature_net=judge.feature_net) == pytest.approx(floor, rel=1e-9)
    assert noise > 4 * shifted_blurred
    assert shifted_blurred > blurred > 2 * floor


def test_matches_closed_form_frechet_distance(judge):
    images, _ = load_digits(16)
    a, b = images[:700], _blur(images[700:1300])
    with torch.no_grad():
        fa = judge.feature_net(a).numpy()
        fb = judge.feature_net(b).numpy()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    s_a, s_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2.0 * covmean))
    got = fd_digits(b, a, feature_net=judge.feature_net)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_protocol_count_and_shape_are_enforced(judge):
    assert judge.count == PROTOCOL_COUNT == 898
    with pytest.raises(ValueError, match=r"\(898, 1, 16, 16\).*\(100, 1, 16, 16\)"):
        judge(judge.held_out[:100])
    with pytest.raises(ValueError, match=r"\(898, 1, 32, 32\)"):
        judge(torch.zeros(898, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(898, 3, 16, 16\)"):
        judge(torch.zeros(898, 3, 16, 16))
    with pytest.raises(ValueError, match="uint8"):
        judge(torch.zeros(898, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="resolution"):
        FDDigits(resolution=32)
    with pytest.raises(ValueError):
        check_images(torch.full((4, 1, 16, 16), float("nan")))


def test_accuracy_on_real_and_noise(judge):
    images, labels = load_digits(16)
    score = judge.accuracy(images[:300], labels[:300])
    assert score.accuracy > 0.98 and score.confidence > 0.8
    noise = judge.accuracy(torch.rand(300, 1, 16, 16) * 2 - 1, labels[:300])
    assert noise.accuracy < 0.5
    with pytest.raises(ValueError, match=r"\(300,\)"):
        judge.accuracy(images[:300], labels[:299])


# ---------------------------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019)
# ---------------------------------------------------------------------------------------------------------------


def test_knn_radii_and_precision_recall_by_hand():
    from distill.evaluation.metrics import knn_radii, precision_recall

    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    # k = 1: nearest neighbours at distance 1, 1, 1, 1, 7.
    assert knn_radii(real, k=1).tolist() == [1.0, 1.0, 1.0, 1.0, 7.0]
    fake = torch.tensor([[0.5], [2.5], [20.0], [1.5]])
    # fake radii (k=1): 1.0, 1.0, 17.5, 1.0. Precision: 0.5, 2.5, 1.5 lie in the real balls; 20 does not (10 + 7 = 17).
    # Recall: real 0, 1, 2, 3 lie within 1 of a fake point; 10 lies within 17.5 of 20.
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(3 / 4) and r == pytest.approx(5 / 5)
    p, r = precision_recall(real, torch.tensor([[0.0], [0.0], [0.5]]), k=1)
    # A collapsed generator: every sample is faithful, but only real points 0 and 1 are covered (radii 0, 0, 0.5).
    assert p == 1.0 and r == pytest.approx(2 / 5)


def test_precision_recall_identical_sets_and_with_k_too_large():
    from distill.evaluation.metrics import precision_recall

    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(x[:3], x, k=3)


def test_judge_precision_recall_separates_collapse_from_noise(judge):
    real = judge.held_out
    p_floor, r_floor = judge.floor_precision_recall()
    assert 0.85 < p_floor <= 1 and 0.85 < r_floor <= 1
    # Mode collapse: one image per class repeated -> faithful (high precision) but almost no recall.
    labels = torch.arange(len(real)) % 10
    _, all_labels = data_train_labels()
    firsts = torch.stack([real[(all_labels == c).nonzero()[0, 0]] for c in range(10)])
    collapsed = firsts[labels]
    p, r = judge.precision_recall(collapsed)
    assert p > 0.8 and r < 0.05
    # Heavy noise: neither faithful nor covering.
    noisy = (real + torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    p_noise, r_noise = judge.precision_recall(noisy)
    assert p_noise < 0.5 * p_floor and r_noise < r_floor
    report = judge.report(real, labels=torch.as_tensor(all_labels))
    assert report["fd_digits"] == pytest.approx(judge.floor()) and report["accuracy"] > 0.99
    assert (report["precision"], report["recall"]) == (p_floor, r_floor)


def data_train_labels():
    from distill.data.digits import digits_split

    return digits_split("train", 16)
