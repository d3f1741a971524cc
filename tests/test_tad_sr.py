"""TAD-SR against the math and the protocol: the time-aware score term on a Gaussian teacher is the closed-form
sigma-weighted regression onto the teacher's output (and exactly x_s - x_T under its weight), it vanishes when the
outputs agree whatever the teacher, and its surrogate's gradient is w g / D; the SR condition reaches the network
(changing the 4x4 input changes the output, a missing one is named); the SR teacher script trains on half B only;
the recipe trains only its student and refuses bad configs by name; the exported student's model-card code
reproduces the one-step output in a process that never imports distill."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import torch
from tiny import NO_DISTILL, subprocess_env

from distill.base.errors import ConfigError
from distill.data import digits
from distill.recipes.tad_sr import (
    TADSRConfig,
    build_sr_unet,
    downsample,
    export_student,
    karras_grid,
    low_res_condition,
    one_step,
    sample_minor_sigma,
    sample_sr,
    sr_denoiser,
    time_aware_score_gradient,
    time_aware_score_loss,
    time_aware_weight,
    train_tad_sr,
    upsample,
)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


class GaussianTeacher(torch.nn.Module):
    """The exact denoiser of data N(mu, s^2 I) at EDM noise sigma: D(x) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, mu: torch.Tensor, s: float):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, sigma, cond):
        k = (self.s**2 / (self.s**2 + sigma**2)).view(-1, 1, 1, 1)
        return self.mu + k * (x - self.mu)


def _tiny_sr(seed: int = 0):
    torch.manual_seed(seed)
    return sr_denoiser(build_sr_unet((8, 16)))


# ---------------------------------------------------------------------------------------------------------------
# The time-aware score term
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [0.5, 0.3])
def test_score_term_on_a_gaussian_teacher_is_the_closed_form(f64, s):
    """eps_T(x) = (x - D(x)) / sigma = sigma / (s^2 + sigma^2) (x - mu), so with the same eps
    g = sigma / (s^2 + sigma^2) (x_s - x_T), independent of eps and mu; under w(sigma) = (sigma^2 + 0.25) / sigma
    and s = sigma_data = 0.5, w g = x_s - x_T exactly at every sigma."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 1, 4, 4, generator=g)
    x_s, x_t, eps = (torch.randn(6, 1, 4, 4, generator=g) for _ in range(3))
    sigma = torch.tensor([0.01, 0.05, 0.1, 0.3, 1.0, 3.0])
    grad = time_aware_score_gradient(GaussianTeacher(mu, s), x_s, x_t, {}, sigma, eps)
    expected = (sigma / (s**2 + sigma**2)).view(-1, 1, 1, 1) * (x_s - x_t)
    torch.testing.assert_close(grad, expected)
    if s == 0.5:
        torch.testing.assert_close(time_aware_weight(sigma).view(-1, 1, 1, 1) * grad, x_s - x_t)


def test_score_term_vanishes_when_the_outputs_agree_whatever_the_teacher():
    """The same eps perturbs both outputs, so SDS's noise term cancels: x_s = x_T gives g = 0 for any teacher."""
    teacher = _tiny_sr()
    x = torch.randn(3, 1, 16, 16)
    cond = low_res_condition(torch.rand(3, 1, 16, 16) * 2 - 1)
    g = time_aware_score_gradient(teacher, x, x.clone(), cond, torch.tensor([0.05, 0.2, 0.5]), torch.randn_like(x))
    assert g.abs().max() == 0
    g = time_aware_score_gradient(teacher, x, x + 0.1, cond, torch.tensor([0.05, 0.2, 0.5]), torch.randn_like(x))
    assert g.abs().max() > 0


def test_score_surrogate_gradient_is_weight_times_g_over_pixels(f64):
    x = torch.randn(4, 1, 4, 4, requires_grad=True)
    gvec, w = torch.randn(4, 1, 4, 4), torch.rand(4) + 0.5
    time_aware_score_loss(x, gvec, w).sum().backward()
    torch.testing.assert_close(x.grad, w.view(-1, 1, 1, 1) * gvec / 16)


def test_minor_sigmas_are_log_uniform_in_range_and_bad_ranges_are_named():
    s = sample_minor_sigma(20000, (0.05, 0.5), torch.Generator().manual_seed(0))
    assert s.min() >= 0.05 and s.max() <= 0.5
    assert abs(torch.log(s).mean().item() - 0.5 * (np.log(0.05) + np.log(0.5))) < 0.02
    with pytest.raises(ValueError, match="sigma_range"):
        sample_minor_sigma(4, (0.5, 0.05))


# ---------------------------------------------------------------------------------------------------------------
# The SR condition and sampling
# ---------------------------------------------------------------------------------------------------------------


def test_the_low_res_image_reaches_the_network_and_a_missing_one_is_named():
    student = _tiny_sr()
    hr = torch.rand(2, 1, 16, 16) * 2 - 1
    noise = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        a = one_step(student, low_res_condition(hr), noise)
        b = one_step(student, low_res_condition(-hr), noise)
        c = one_step(student, low_res_condition(hr), noise)
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(a, c)
    with pytest.raises(ValueError, match="low_res"):
        one_step(student, {}, noise)
    with pytest.raises(ValueError, match="low_res"):
        one_step(student, {"low_res": torch.zeros(2, 1, 4, 4)}, noise)


def test_degradation_and_bad_inputs_are_named():
    hr = torch.arange(16.0).view(1, 1, 4, 4)
    lr = downsample(hr, 2)
    torch.testing.assert_close(lr, torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert torch.equal(downsample(upsample(lr, 2), 2), lr)  # nearest upsampling is a right inverse of pooling
    with pytest.raises(ValueError, match="divisible by 4"):
        downsample(torch.zeros(1, 1, 10, 10))
    with pytest.raises(ValueError, match="num_steps"):
        karras_grid(0)
    from diffusers import UNet2DModel

    with pytest.raises(ConfigError, match="in_channels"):
        sr_denoiser(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                norm_num_groups=8, layers_per_block=1))


def test_one_sampler_step_is_the_students_one_step():
    teacher = _tiny_sr()
    cond, noise = low_res_condition(torch.rand(2, 1, 16, 16)), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sample_sr(teacher, cond, noise, 1), one_step(teacher, cond, noise))


# ---------------------------------------------------------------------------------------------------------------
# The protocol, the recipe, the export
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def poisoned_half_a(monkeypatch):
    """scikit-learn's digits with every half-A image NaN."""
    bunch = sklearn.datasets.load_digits()
    half_a, _ = digits.split_halves(len(bunch.images), seed=digits.PROTOCOL_SPLIT_SEED)
    images = bunch.images.astype(np.float64).copy()
    images[half_a.numpy()] = np.nan
    poisoned = sklearn.utils.Bunch(**{**bunch, "images": images, "data": images.reshape(len(images), -1)})
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda *a, **k: poisoned)


def test_sr_teacher_script_trains_on_half_b_only(poisoned_half_a, tmp_path):
    assert torch.isnan(digits.digits_split("reference", 16)[0]).all()  # the poison is live
    spec = importlib.util.spec_from_file_location("train_digits_sr_teacher",
                                                  REPO / "scripts" / "train_digits_sr_teacher.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # 3 x 256 draws: with half A in the pool a NaN image would be drawn for certain.
    script.main(["--out", str(tmp_path / "t"), "--steps", "3", "--batch-size", "256", "--channels", "8,16"])
    info = json.loads((tmp_path / "t" / "training_args.json").read_text())
    assert np.isfinite(info["final_loss_ema"])
    assert (tmp_path / "t" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_recipe_trains_only_the_student_and_refuses_bad_configs(poisoned_half_a):
    teacher = _tiny_sr()
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    images, _ = digits.digits_split("train", 16)
    cfg = TADSRConfig(steps=2, batch_size=4, teacher_steps=2, gan_weight=0.1)
    student, rows = train_tad_sr(teacher, images[:8], cfg, log_every=0)
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in student.model.state_dict().items())
    assert all(np.isfinite(r["loss"]) and "disc_loss" in r and "score_grad_rms" in r for r in rows)
    for bad, name in [({"score_weight": -1.0}, "score_weight"), ({"sigma_range": (0.5, 0.1)}, "sigma_range"),
                      ({"teacher_steps": 0}, "teacher_steps"),
                      ({"regression_weight": 0.0, "score_weight": 0.0}, "every loss weight")]:
        with pytest.raises(ConfigError, match=name):
            TADSRConfig(**bad).check()


CARD_RUN = NO_DISTILL + r"""
import torch
code = open(sys.argv[1]).read()
code = code[code.index("```python") + len("```python"):]
code = code[:code.index("```")]
exec(code)  # defines super_resolve and loads `unet` from the folder with plain diffusers
data = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(super_resolve(unet, data["low_res"], data["noise"]), sys.argv[3])
"""


def test_model_card_code_reproduces_the_one_step_output_without_distill(tmp_path):
    student = _tiny_sr(seed=1)
    export_student(student, tmp_path / "student")
    hr = torch.rand(3, 1, 16, 16) * 2 - 1
    noise = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = one_step(student, low_res_condition(hr), noise)
    torch.save({"low_res": downsample(hr), "noise": noise}, tmp_path / "in.pt")
    (tmp_path / "run.py").write_text(CARD_RUN)
    done = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "student" / "README.md"),
                           str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=1e-6)
    assert re.search(r"^import distill|^from distill", (tmp_path / "student" / "README.md").read_text(), re.M) is None


def test_the_trainer_refuses_tad_sr_by_name():
    """tad_sr trains through scripts/train_tad_sr.py: as a config's recipe.name it is refused with the reason."""
    from distill.base.errors import ConfigError
    from distill.training.registry import recipe_module

    with pytest.raises(ConfigError, match="recipe.name: 'tad_sr' is not a trainer recipe"):
        recipe_module("tad_sr")
    assert callable(recipe_module("dmd2").build)
