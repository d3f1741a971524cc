"""The Denoiser interface over a tiny diffusers UNet2DModel, checked against direct calls of the network."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, DDPMScheduler, UNet2DModel
from tiny import tiny_unet

from distill.families import family_for
from distill.models.denoiser import Denoiser, load_denoiser
from distill.parametrization import EDMProcess, VPProcess

NUM_CLASS_EMBEDS = 11  # 10 classes + the null class (last row)
TOL = {"rtol": 1e-9, "atol": 1e-9}  # conversions of one raw output, float64 throughout
# Against a hand-written network call: processes compute c_in and c_noise in float32 (c_noise = 250 log sigma
# carries ~1e-4 absolute rounding), so a float64 network's output agrees to ~1e-6.
NET_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _tiny_unet(num_class_embeds: int | None = NUM_CLASS_EMBEDS) -> UNet2DModel:
    return tiny_unet(num_class_embeds, attention=False).eval().double()


def _inputs(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t = 3 * torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    # Noise levels exact in float32: processes hand back float32 alpha and sigma.
    sigma = torch.tensor([0.0625, 0.5, 3.0, 40.0], dtype=torch.float64)[:n]
    cond = {"class_labels": torch.tensor([0, 4, 7, 9])[:n]}
    return x_t, sigma, cond


def _edm_network_output(model, x_t, sigma, labels, sigma_data=0.5):
    """The raw EDM network output, written out by hand: F(c_in x, c_noise) with c_noise = 250 log sigma."""
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return model(x_t * c_in[:, None, None, None], 250 * torch.log(sigma), class_labels=labels).sample


def _edm_x0(raw, x_t, sigma, sigma_data=0.5):
    s = sigma[:, None, None, None]
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    return c_skip * x_t + c_out * raw


@torch.no_grad()
def test_edm_predictions_are_consistent():
    model = _tiny_unet()
    den = Denoiser(model, EDMProcess(), "edm")
    x_t, sigma, cond = _inputs()
    raw = _edm_network_output(model, x_t, sigma, cond["class_labels"])
    torch.testing.assert_close(den.raw(x_t, sigma, cond), raw, **NET_TOL)

    x0 = den(x_t, sigma, cond, want="x0")
    eps = den(x_t, sigma, cond, want="epsilon")
    v = den(x_t, sigma, cond, want="v")
    s = sigma[:, None, None, None]
    torch.testing.assert_close(x0, _edm_x0(raw, x_t, sigma), **NET_TOL)
    # alpha = 1: x_t = x0 + sigma eps, v = eps - sigma x0.
    torch.testing.assert_close(x0 + s * eps, x_t, **TOL)
    torch.testing.assert_close(v, eps - s * x0, **TOL)
    torch.testing.assert_close(den(x_t, sigma, cond, want="edm"), den.raw(x_t, sigma, cond), **TOL)
    torch.testing.assert_close(x0, _edm_x0(den.raw(x_t, sigma, cond), x_t, sigma), **TOL)


@torch.no_grad()
def test_guidance():
    model = _tiny_unet()
    den = Denoiser(model, EDMProcess(), "edm")
    x_t, sigma, cond = _inputs()
    null = {"class_labels": torch.full_like(cond["class_labels"], NUM_CLASS_EMBEDS - 1)}

    # w = 1 is the plain conditional model.
    raw_c = _edm_network_output(model, x_t, sigma, cond["class_labels"])
    raw_u = _edm_network_output(model, x_t, sigma, null["class_labels"])
    unguided = den(x_t, sigma, cond, want="x0", guidance_scale=1.0)
    torch.testing.assert_close(unguided, _edm_x0(raw_c, x_t, sigma), **NET_TOL)
    torch.testing.assert_close(unguided, den(x_t, sigma, cond, want="x0"), **TOL)

    for w in (0.0, 2.0, 4.5):
        expected = _edm_x0(raw_u + w * (raw_c - raw_u), x_t, sigma)
        torch.testing.assert_close(den(x_t, sigma, cond, want="x0", guidance_scale=w), expected, **NET_TOL)
        # Combining raw outputs equals combining any prediction kind (conversions are affine in the raw output).
        e_c = den(x_t, sigma, cond, want="epsilon")
        e_u = den(x_t, sigma, null, want="epsilon")
        guided = den(x_t, sigma, cond, want="epsilon", guidance_scale=w)
        torch.testing.assert_close(guided, e_u + w * (e_c - e_u), **TOL)
    assert not torch.allclose(raw_c, raw_u, atol=1e-4)  # the null class really is a different input

    with pytest.raises(ValueError, match="num_class_embeds"):
        Denoiser(_tiny_unet(None), EDMProcess(), "edm")(x_t, sigma, {}, guidance_scale=2.0)


@torch.no_grad()
def test_with_features_returns_mid_block_output():
    model = _tiny_unet()
    den = Denoiser(model, EDMProcess(), "edm")
    x_t, sigma, cond = _inputs()
    seen = []
    handle = model.mid_block.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        pred, feats = den.with_features(x_t, sigma, cond, want="epsilon")
    finally:
        handle.remove()
    torch.testing.assert_close(feats, seen[0], rtol=0, atol=0)
    assert feats.shape[:2] == (4, den.family.feature_channels(model)) and den.family.feature_channels(model) == 16
    assert feats.shape[2:] == (4, 4)
    torch.testing.assert_close(pred, den(x_t, sigma, cond, want="epsilon"), **TOL)
    assert not model.mid_block._forward_hooks  # the adapter removed its own hook


def test_time_shape_is_checked():
    den = Denoiser(_tiny_unet(), EDMProcess(), "edm")
    x_t, sigma, cond = _inputs()
    with pytest.raises(ValueError, match="t must have shape"):
        den(x_t, sigma[:2], cond)


def test_copy_is_independent():
    den = Denoiser(_tiny_unet(), EDMProcess(), "edm")
    twin = den.copy(trainable=True)
    assert all(p.requires_grad for p in twin.model.parameters()) and twin.model.training
    frozen = den.copy(trainable=False)
    assert not any(p.requires_grad for p in frozen.model.parameters()) and not frozen.model.training
    with torch.no_grad():
        next(twin.model.parameters()).add_(1.0)
    assert not torch.equal(next(twin.model.parameters()), next(den.model.parameters()))


# ---------------------------------------------------------------------------------------------------------------
# Loading from a diffusers folder
# ---------------------------------------------------------------------------------------------------------------


def _save_teacher(root, scheduler) -> UNet2DModel:
    model = _tiny_unet()
    model.save_pretrained(root / "unet")
    scheduler.save_pretrained(root / "scheduler")
    return model


@torch.no_grad()
def test_load_denoiser_vp(tmp_path):
    model = _save_teacher(tmp_path, DDPMScheduler(prediction_type="v_prediction"))
    den = load_denoiser(tmp_path, dtype=torch.float64)
    assert isinstance(den.process, VPProcess) and den.prediction == "v"
    assert isinstance(den.model, UNet2DModel) and not any(p.requires_grad for p in den.model.parameters())
    x_t, _, cond = _inputs()
    t = torch.tensor([10, 200, 500, 999])
    v = model(x_t, t, class_labels=cond["class_labels"]).sample
    torch.testing.assert_close(den(x_t, t, cond, want="v"), v, **TOL)
    ac = DDPMScheduler().alphas_cumprod[t][:, None, None, None].double()
    torch.testing.assert_close(den(x_t, t, cond, want="x0"), ac.sqrt() * x_t - (1 - ac).sqrt() * v, **NET_TOL)


def test_load_denoiser_cm_scheduler_and_override(tmp_path):
    _save_teacher(tmp_path, CMStochasticIterativeScheduler(sigma_max=40.0))
    den = load_denoiser(tmp_path)
    assert isinstance(den.process, EDMProcess) and den.prediction == "cm"
    assert den.process.sigma_max == 40.0 and den.process.sigma_data == 0.5
    assert load_denoiser(tmp_path, prediction="edm").prediction == "edm"


def test_load_denoiser_errors_name_what_is_missing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_denoiser(missing)

    root = tmp_path / "teacher"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_denoiser(root)

    DDPMScheduler().save_pretrained(root / "scheduler")
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        load_denoiser(root)

    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "NoSuchModel2D"}))
    with pytest.raises(ValueError, match="NoSuchModel2D"):
        load_denoiser(root)


def test_family_lookup_names_unsupported_class():
    assert family_for(_tiny_unet()).feature_channels(_tiny_unet()) == 16
    with pytest.raises(ValueError, match="Linear"):
        family_for(torch.nn.Linear(2, 2))
