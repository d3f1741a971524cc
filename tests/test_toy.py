"""The 2-D toy with known truth: the mixture's exact density and score against numerical integrals and
derivatives, the shipped toy teacher against the exact denoiser, and the toy metrics on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from distill.data.toy import GaussianMixture, ring, toy_mixture
from distill.demo.toy_metrics import mode_assignment, toy_report

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.4])
def test_density_integrates_to_one(sigma):
    m = toy_mixture(torch.float64)
    grid = torch.linspace(-2.5, 2.5, 801, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    p = m.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1), sigma).exp()
    cell = (grid[1] - grid[0]) ** 2
    assert float(p.sum() * cell) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("sigma", [0.0, 0.03, 0.3, 2.0])
def test_score_is_the_gradient_of_the_log_density(sigma):
    """Central differences of log p_sigma against the closed-form score."""
    m = toy_mixture(torch.float64)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.6
    h = 1e-5
    numeric = torch.stack([(m.log_prob(x + h * e, sigma) - m.log_prob(x - h * e, sigma)) / (2 * h)
                           for e in torch.eye(2, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(m.score(x, sigma), numeric, rtol=1e-5, atol=1e-5)


def test_denoiser_of_one_gaussian_is_the_closed_form():
    """Tweedie on a single Gaussian: E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    mu, s, sigma = torch.tensor([[0.3, -0.2]], dtype=torch.float64), 0.4, 0.7
    m = GaussianMixture(mu, torch.tensor([s], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    x = torch.randn(16, 2, dtype=torch.float64)
    torch.testing.assert_close(m.denoise(x, sigma), mu + s**2 / (s**2 + sigma**2) * (x - mu))


def test_noised_density_matches_noised_samples():
    """log p_sigma is the density of x0 + sigma eps: its mean log-likelihood on such samples is maximal at sigma."""
    m = toy_mixture(torch.float64)
    x0, _ = m.sample(20000, torch.Generator().manual_seed(1))
    x = x0 + 0.2 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ll = {s: float(m.log_prob(x, s).mean()) for s in (0.15, 0.2, 0.25)}
    assert ll[0.2] > ll[0.15] and ll[0.2] > ll[0.25]


def test_shipped_toy_teacher_is_close_to_the_exact_denoiser():
    from distill.base.paths import resolve_path
    from distill.families.toy import ToyFamily
    from distill.models.denoiser import load_denoiser

    teacher = load_denoiser(resolve_path("builtin:toy_teacher"), prediction="edm")
    assert isinstance(teacher.family, ToyFamily)
    m = toy_mixture()
    x0, _ = m.sample(2000, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for sigma in (0.05, 0.3, 1.5):
            x = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
            s = torch.full((len(x),), sigma)
            pred = teacher(x, s, {"class_labels": torch.zeros(len(x), dtype=torch.int64)})
            rms = (pred - m.denoise(x, s)).pow(2).mean().sqrt()
            assert rms < 0.03, (sigma, float(rms))
            # the unconditional (null class) output is the same data distribution
            null = teacher(x, s, {"class_labels": torch.ones(len(x), dtype=torch.int64)})
            assert (null - m.denoise(x, s)).pow(2).mean().sqrt() < 0.05


def test_toy_dataset_through_the_config():
    from distill.data import make_dataset
    from distill.training.preflight import load_config

    cfg = load_config("toy/dmd2.yaml")
    data = make_dataset(cfg.data.name, cfg.data.resolution)
    batch = data.sample(5, torch.Generator().manual_seed(0))
    assert batch.images.shape == (5, 2) and torch.equal(batch.cond["class_labels"], torch.zeros(5, dtype=torch.int64))


def test_metrics_of_true_samples_and_of_a_dropped_mode():
    m = toy_mixture(torch.float64)
    x, comp = m.sample(4000, torch.Generator().manual_seed(5))
    true = toy_report(m, x, seed=1)
    assert true["modes_covered"] == 8 and true["on_mode"] > 0.98
    assert true["precision"] > 0.9 and true["recall"] > 0.9
    assert true["mode_weight_kl"] < 0.01
    assert true["nll"] == pytest.approx(true["nll_true_samples"], abs=0.1)
    assert torch.equal(mode_assignment(m, m.means), torch.arange(8))
    # drop the two lightest modes (6 and 7): the reverse-KL failure the table must show
    kept = x[comp < 6]
    dropped = toy_report(m, kept, seed=1)
    assert dropped["modes_covered"] == 6 and dropped["recall"] < 0.93 and dropped["precision"] > 0.9
    assert dropped["mode_weight_kl"] > 0.1
    # samples between the modes: low precision, high NLL
    off = ring(8, 0.7, 0.05, dtype=torch.float64).means @ torch.tensor([[math.cos(0.39), -math.sin(0.39)],
                                                                         [math.sin(0.39), math.cos(0.39)]],
                                                                        dtype=torch.float64)
    between = toy_report(m, off.repeat(50, 1) + 0.01 * torch.randn(400, 2, dtype=torch.float64), seed=1)
    assert between["on_mode"] == 0 and between["precision"] < 0.1 and between["nll"] > true["nll"] + 10


def test_metrics_refuse_bad_samples():
    m = toy_mixture()
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        toy_report(m, torch.zeros(10, 3))
    with pytest.raises(ValueError, match="non-finite"):
        toy_report(m, torch.full((10, 2), float("nan")))


def test_toy_script_runs_every_toy_config(tmp_path, capsys):
    """scripts/toy_recipes.py trains every recipes/toy/*.yaml (2 updates here) and writes a PNG and a table row each."""
    import importlib.util
    import json

    from tiny import REPO

    spec = importlib.util.spec_from_file_location("toy_recipes", REPO / "scripts" / "toy_recipes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    names = sorted(script.toy_configs())
    assert {"dmd2", "phased_dmd"} <= set(names)
    assert script.main(["--budget", "2", "--samples", "200", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "toy" / "results.json").read_text())
    assert [r["recipe"] for r in rows] == ["true mixture", "teacher", *names]
    assert rows[1]["modes_covered"] == 8 and rows[1]["on_mode"] > 0.9  # the teacher's own samples
    table = (tmp_path / "toy_recipes.md").read_text()
    assert script.main(["--budget", "2", "--samples", "200", "--out", str(tmp_path)]) == 0  # resumed: no training
    assert json.loads((tmp_path / "toy" / "results.json").read_text()) == rows
    assert capsys.readouterr().out.count("measured before, skipped") == len(names)
    for name in names:
        assert (tmp_path / "toy" / f"{name}.png").stat().st_size > 0 and f"| {name} |" in table
    # every recipe that has a toy config under any name (f-distill: one per divergence) counts as covered
    missing = table.split("without a toy config: ")[1].split(".")[0].split(", ")
    assert "fdistill" not in missing and "dmd2" not in missing
    assert "f-distill by divergence" in table and "reverse_kl:" in table and "forward_kl:" in table
