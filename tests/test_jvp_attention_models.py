"""Whole-model tests: tiny random diffusers models of each family, JVP through `jvp_attention()` (Triton kernel
under the interpreter) against `torch.func.jvp` of the same model on PyTorch's MATH SDPA backend."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from distill.kernels import jvp_attention as J
from distill.kernels.diffusers_attention import ContiguousGroupNorm, enable_jvp_attention, jvp_attention

diffusers = pytest.importorskip("diffusers")

BACKEND = "interpret" if J._HAS_TRITON else "torch"


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """Run the Triton kernel under the CPU interpreter (undone after each test)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


B = 2


def _unet_cond(g):
    m = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    text = torch.randn(B, 5, 16, generator=g)  # 5 text tokens: cross-attention with an odd Lk
    return m, torch.randn(B, 4, 8, 8, generator=g), 1000.0, lambda x, t: m(x, t, encoder_hidden_states=text).sample


def _unet2d(g):
    m = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8)
    return m, torch.randn(B, 3, 8, 8, generator=g), 1000.0, lambda x, t: m(x, t).sample


def _dit(g):
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    labels = torch.tensor([1, 3])
    return m, torch.randn(B, 4, 8, 8, generator=g), 1000.0, lambda x, t: m(x, timestep=t, class_labels=labels).sample


def _pixart(g):
    m = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,
                                           caption_channels=12)
    text = torch.randn(B, 5, 12, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # key padding mask on the cross-attention

    def fn(x, t):
        return m(x, encoder_hidden_states=text, encoder_attention_mask=text_mask, timestep=t,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return m, torch.randn(B, 4, 8, 8, generator=g), 1000.0, fn


def _sd3(g):
    m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)
    text, pooled = torch.randn(B, 5, 16, generator=g), torch.randn(B, 8, generator=g)

    def fn(x, t):
        return m(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
    return m, torch.randn(B, 4, 8, 8, generator=g), 1000.0, fn


def _flux(g):
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    text, pooled = torch.randn(B, 5, 16, generator=g), torch.randn(B, 8, generator=g)
    img_ids, txt_ids = torch.randn(12, 3, generator=g), torch.zeros(5, 3)

    def fn(x, t):
        return m(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                 img_ids=img_ids, txt_ids=txt_ids).sample
    return m, torch.randn(B, 12, 16, generator=g), 1.0, fn


def _wan(g):
    m = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16,
                                        num_layers=1, rope_max_seq_len=32)
    text = torch.randn(B, 5, 16, generator=g)
    return m, torch.randn(B, 4, 2, 8, 8, generator=g), 1000.0, lambda x, t: m(x, timestep=t,
                                                                              encoder_hidden_states=text).sample


FAMILIES = {"unet2d_condition": _unet_cond, "unet2d": _unet2d, "dit": _dit, "pixart": _pixart, "sd3": _sd3,
            "flux": _flux, "wan": _wan}


class CountSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def rel_err(x, ref):
    return ((x - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_jvp_matches_math_backend(family):
    torch.manual_seed(0)
    model, x, t_max, fn = FAMILIES[family](torch.Generator().manual_seed(0))
    model.eval()
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.3, 0.7]) * t_max
    tx, tt = torch.randn(x.shape, generator=g), torch.ones_like(t)  # d/ds of (x(s), t(s)) along an ODE-like path

    with torch.no_grad():
        plain = fn(x, t)
    # PyTorch's own forward AD: only the MATH SDPA backend has a rule. ContiguousGroupNorm works around the
    # group_norm JVP bug (see diffusers_attention.py) that would otherwise stop the reference on UNet2DModel.
    with CountSDPA() as count, ContiguousGroupNorm(), sdpa_kernel(SDPBackend.MATH):
        ref, ref_t = torch.func.jvp(fn, (x, t), (tx, tt))
    with jvp_attention(backend=BACKEND) as mode:
        out, out_t = torch.func.jvp(fn, (x, t), (tx, tt))

    assert count.calls > 0 and mode.routed == count.calls and mode.passed == 0
    assert ref_t.abs().max() > 0
    assert rel_err(out, plain) < 1e-5  # primal unchanged
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out_t, ref_t) < 1e-5


def test_enable_jvp_attention_hooks_and_remove():
    model, x, _, fn = _dit(torch.Generator().manual_seed(0))
    model.eval()
    t = torch.tensor([300.0, 700.0])
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    routing = enable_jvp_attention(model, backend=BACKEND)
    try:
        _, got = torch.func.jvp(fn, (x, t), (tx, tt))
        assert routing.routed == 1
        with torch.no_grad():
            fn(x, t)  # no tangents: left to PyTorch's SDPA
        assert routing.routed == 0 and routing.modes[-1].passed == 1
    finally:
        routing.remove()
    with sdpa_kernel(SDPBackend.MATH):
        _, want = torch.func.jvp(fn, (x, t), (tx, tt))
    assert rel_err(got, want) < 1e-5
    with CountSDPA() as count:  # after remove() nothing intercepts SDPA any more
        with torch.no_grad():
            fn(x, t)
    assert count.calls == 1 and routing.routed == 0


def test_training_step_primal_kernel_backward_matches():
    """primal="kernel": the forward runs the kernel too, and gradients come from PyTorch's attention backward."""
    model, x, _, fn = _sd3(torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 700.0])
    with jvp_attention(backend=BACKEND, primal="kernel") as mode:
        fn(x, t).square().mean().backward()
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert mode.routed == 1
    model.zero_grad()
    with sdpa_kernel(SDPBackend.MATH):
        fn(x, t).square().mean().backward()
    want = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bypassing_processor_is_reported():
    model, *_ = _dit(torch.Generator().manual_seed(0))

    class XFormersAttnProcessor(diffusers.models.attention_processor.AttnProcessor2_0):
        pass

    model.transformer_blocks[0].attn1.set_processor(XFormersAttnProcessor())
    with pytest.raises(ValueError, match="transformer_blocks.0.attn1"):
        enable_jvp_attention(model)


def test_dropout_with_tangents_raises():
    q = torch.randn(1, 2, 4, 8)
    with jvp_attention(backend="torch"):
        with pytest.raises(ValueError, match="dropout"):
            torch.func.jvp(lambda a: torch.nn.functional.scaled_dot_product_attention(a, a, a, dropout_p=0.5),
                           (q,), (torch.ones_like(q),))
        # without tangents dropout is left to PyTorch
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert out.shape == q.shape


def test_mixed_dtypes_under_autocast_are_cast_as_sdpa_casts_them():
    """Query/key norms (SD3.5, Flux, Wan) give float32 queries and keys beside a bf16 value under bf16 autocast;
    PyTorch's SDPA takes them all in bf16 there, and so does the routed JVP attention: the same primal as SDPA, and
    the same primal and tangent as with the three cast by hand."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    v = torch.randn(1, 2, 6, 8, generator=g).bfloat16()
    tangents = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = sdpa(q, k, v)
        with jvp_attention(backend="torch"):
            out, tangent = torch.func.jvp(sdpa, (q, k, v), tangents)
    with torch.autocast("cpu", dtype=torch.bfloat16), jvp_attention(backend="torch"):
        by_hand = torch.func.jvp(sdpa, tuple(t.bfloat16() for t in (q, k, v)), tuple(t.bfloat16() for t in tangents))
    assert out.dtype == tangent.dtype == torch.bfloat16
    torch.testing.assert_close(out, by_hand[0], rtol=0, atol=0)
    torch.testing.assert_close(tangent, by_hand[1], rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(TypeError, match="query, key, value dtypes differ"):  # without autocast, as SDPA refuses
        with jvp_attention(backend="torch"):
            torch.func.jvp(sdpa, (q, k, v), tangents)
