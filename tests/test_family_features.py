"""GAN-head features of the patch-transformer families: the image tokens after the middle block, on the patch
grid, from the same forward pass as the raw output."""

from __future__ import annotations

import pytest
import torch


def _sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4)
    return model, {"encoder_hidden_states": torch.randn(2, 3, 16), "pooled_projections": torch.randn(2, 8)}


def _pixart():
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                     attention_head_dim=8, num_attention_heads=2, cross_attention_dim=16,
                                     caption_channels=12, norm_type="ada_norm_single", use_additional_conditions=False)
    return model, {"encoder_hidden_states": torch.randn(2, 3, 12)}


@pytest.mark.parametrize("build", [_sd3, _pixart], ids=["sd3", "pixart"])
def test_features_come_from_the_same_pass_on_the_patch_grid(build):
    from distill.families import family_for

    torch.manual_seed(0)
    model, cond = build()
    family = family_for(model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 200.0])
    with torch.no_grad():
        out, feats = family.call_with_features(model, x, t, cond)
        plain = family.call(model, x, t, cond)
    assert torch.equal(out, plain)
    assert feats.shape == (2, family.feature_channels(model), 4, 4)
    # The features depend on the input (they are the middle block's tokens, not a constant).
    with torch.no_grad():
        _, other = family.call_with_features(model, x + 1.0, t, cond)
    assert not torch.allclose(feats, other)
