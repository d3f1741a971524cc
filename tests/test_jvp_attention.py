"""Tests for the fused attention + JVP kernel against the float64 reference (kernels/jvp_attention_reference.py).

The Triton kernel runs under Triton's CPU interpreter: each test sets TRITON_INTERPRET=1 (a fixture, undone
afterwards, so other test modules are not affected) and most also name the backend. The kernel avoids Triton's
jitted standard-library helpers, so the interpreter works even when triton was imported before the variable was
set (other test modules import diffusers, which imports triton, at collection time).
"""

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from distill.kernels import jvp_attention as J
from distill.kernels.jvp_attention_reference import attention_reference, jvp_closed_form, jvp_reference, math_path_jvp


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


BACKENDS = ["interpret", "torch"] if J._HAS_TRITON else ["torch"]
# Norm-wise relative error bounds per dtype (the output is rounded to the dtype: bf16 has 8 bits of mantissa).
REL_TOL = {torch.float32: 2e-6, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(b, h, lq, lk, d, dv=None, hkv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = hkv or h
    dv = dv or d
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=g).to(dtype)
    tq, tk, tv = (torch.randn(x.shape, generator=g).to(dtype) for x in (q, k, v))
    return q, k, v, tq, tk, tv


@pytest.fixture
def small_blocks(monkeypatch):
    """Interpreter tiles of 16 so that short test sequences still span several query and key blocks."""
    monkeypatch.setattr(J, "_INTERPRET_BLOCK_M", 16)
    monkeypatch.setattr(J, "_INTERPRET_BLOCK_N", 16)


# (batch, heads, Lq, Lk, head_dim): sequence length 1, odd lengths, cross-attention, real head dims.
SHAPES = [
    (1, 1, 1, 1, 64),
    (2, 3, 1, 37, 40),
    (1, 2, 33, 33, 80),
    (2, 1, 17, 50, 128),
    (1, 2, 45, 7, 64),
    (1, 1, 20, 24, 160),
    (1, 2, 9, 5, 8),  # head dim below 16 is padded too
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_float64_reference(shape, dtype, backend, small_blocks):
    b, h, lq, lk, d = shape
    q, k, v, tq, tk, tv = make_inputs(b, h, lq, lk, d, dtype=dtype)
    o, to, lse = J.attention_jvp(q, k, v, tq, tk, tv, backend=backend)
    ro, rto = jvp_reference(q, k, v, tq, tk, tv)
    assert o.dtype == dtype and to.dtype == dtype and o.shape == ro.shape
    assert rel_err(o, ro) < REL_TOL[dtype]
    assert rel_err(to, rto) < REL_TOL[dtype]
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_closed_form_equals_autodiff_reference():
    q, k, v, tq, tk, tv = make_inputs(2, 2, 13, 21, 24)
    mask = torch.rand(2, 1, 13, 21, generator=torch.Generator().manual_seed(1)) > 0.3
    for kwargs in ({}, {"attn_mask": mask}, {"is_causal": True}):
        o1, t1 = jvp_reference(q, k, v, tq, tk, tv, **kwargs)
        o2, t2 = jvp_closed_form(q, k, v, tq, tk, tv, **kwargs)
        torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(t1, t2, rtol=1e-12, atol=1e-12)


def _masks(b, h, lq, lk):
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([lk, max(1, lk // 3)])[:b]
    key_padding = (torch.arange(lk)[None, :] < lengths[:, None]).view(b, 1, 1, lk)
    full_bool = torch.rand(b, h, lq, lk, generator=g) > 0.4
    full_bool[..., 0] = True  # keep every row non-empty here; empty rows are tested separately
    additive = torch.randn(b, 1, lq, lk, generator=g) * 2.0
    additive_pad = torch.zeros(b, 1, 1, lk).masked_fill(~key_padding, float("-inf"))
    two_d = torch.rand(lq, lk, generator=g) > 0.5
    two_d[:, 0] = True
    return {"key_padding_bool": key_padding, "full_bool": full_bool, "additive": additive,
            "additive_key_padding": additive_pad, "bool_2d": two_d}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_name", ["key_padding_bool", "full_bool", "additive", "additive_key_padding", "bool_2d"])
def test_attention_masks(mask_name, backend, small_blocks):
    b, h, lq, lk, d = 2, 2, 19, 35, 40
    q, k, v, tq, tk, tv = make_inputs(b, h, lq, lk, d)
    mask = _masks(b, h, lq, lk)[mask_name]
    o, to, _ = J.attention_jvp(q, k, v, tq, tk, tv, attn_mask=mask, backend=backend)
    ro, rto = jvp_reference(q, k, v, tq, tk, tv, attn_mask=mask)
    assert rel_err(o, ro) < 2e-6 and rel_err(to, rto) < 2e-6
    # Same mask through PyTorch's own SDPA gives the same primal.
    torch.testing.assert_close(o, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq,lk", [(21, 21), (12, 40), (40, 12), (1, 9)])
def test_causal(lq, lk, backend, small_blocks):
    q, k, v, tq, tk, tv = make_inputs(1, 2, lq, lk, 64)
    o, to, _ = J.attention_jvp(q, k, v, tq, tk, tv, is_causal=True, backend=backend)
    ro, rto = jvp_reference(q, k, v, tq, tk, tv, is_causal=True)
    assert rel_err(o, ro) < 2e-6 and rel_err(to, rto) < 2e-6
    torch.testing.assert_close(o, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero(backend, small_blocks):
    q, k, v, tq, tk, tv = make_inputs(1, 1, 20, 18, 32)
    mask = torch.ones(1, 1, 20, 18, dtype=torch.bool)
    mask[..., 3, :] = False
    mask[..., 17, :] = False
    o, to, lse = J.attention_jvp(q, k, v, tq, tk, tv, attn_mask=mask, backend=backend)
    assert torch.isfinite(o).all() and torch.isfinite(to).all()
    assert (o[..., [3, 17], :] == 0).all() and (to[..., [3, 17], :] == 0).all()
    assert torch.isneginf(lse[..., [3, 17]]).all()
    ro, rto = jvp_reference(q, k, v, tq, tk, tv, attn_mask=mask)
    assert rel_err(o, ro) < 2e-6 and rel_err(to, rto) < 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_scale_and_value_head_dim(backend, small_blocks):
    q, k, v, tq, tk, tv = make_inputs(2, 4, 23, 29, 40, dv=24, hkv=2)
    o, to, _ = J.attention_jvp(q, k, v, tq, tk, tv, scale=0.3, enable_gqa=True, backend=backend)
    ro, rto = jvp_reference(q, k, v, tq, tk, tv, scale=0.3, enable_gqa=True)
    assert o.shape == (2, 4, 23, 24)
    assert rel_err(o, ro) < 2e-6 and rel_err(to, rto) < 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["q", "k", "v", "qk", "none"])
def test_partial_tangents(which, backend, small_blocks):
    q, k, v, tq, tk, tv = make_inputs(1, 2, 18, 33, 40)
    tq, tk, tv = (t if name in which else None for t, name in zip((tq, tk, tv), "qkv"))
    o, to, _ = J.attention_jvp(q, k, v, tq, tk, tv, backend=backend)
    ro, rto = jvp_reference(q, k, v, tq, tk, tv)
    assert rel_err(o, ro) < 2e-6
    if which == "none":
        assert to is None
    else:
        assert rel_err(to, rto) < 2e-6


@pytest.mark.skipif(not J._HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["plain", "causal", "mask"])
def test_every_output_element_written(dtype, case, small_blocks):
    """Outputs start as NaN; a tile or tail the kernel forgets to store would leave NaN behind."""
    b, h, lq, lk, d = 2, 3, 35, 19, 80
    q, k, v, tq, tk, tv = make_inputs(b, h, lq, lk, d, dtype=dtype)
    mask = _masks(b, h, lq, lk)["key_padding_bool"] if case == "mask" else None
    o = torch.full((b, h, lq, d), float("nan"), dtype=dtype)
    to = torch.full_like(o, float("nan"))
    lse = torch.full((b, h, lq), float("nan"))
    J._launch_triton(q, k, v, tq, tk, tv, mask, case == "causal", 1 / math.sqrt(d), interpret=True,
                     out=o, tangent_out=to, lse_out=lse)
    assert not o.isnan().any() and not to.isnan().any() and not lse.isnan().any()
    ro, rto = jvp_reference(q, k, v, tq, tk, tv, attn_mask=mask, is_causal=case == "causal")
    assert rel_err(o, ro) < REL_TOL[dtype] and rel_err(to, rto) < REL_TOL[dtype]


@pytest.mark.skipif(not J._HAS_TRITON, reason="needs triton")
def test_non_contiguous_inputs(small_blocks):
    """diffusers hands SDPA (B, L, H, D) tensors permuted to (B, H, L, D)."""
    q, k, v, tq, tk, tv = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make_inputs(2, 3, 21, 26, 40))
    assert not q.is_contiguous()
    o, to, _ = J.attention_jvp(q, k, v, tq, tk, tv, backend="interpret")
    ro, rto = jvp_reference(q, k, v, tq, tk, tv)
    assert rel_err(o, ro) < 2e-6 and rel_err(to, rto) < 2e-6


# ---------------------------------------------------------------------------------------------------------------
# autograd.Function: forward AD (torch.func.jvp and forward_ad duals) and backward
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def launches(monkeypatch):
    """Count the attention passes and how many tangents each one carried."""
    calls: list[int] = []
    original = J._attention_forward

    def spy(q, k, v, tq, tk, tv, *rest):
        calls.append(sum(t is not None for t in (tq, tk, tv)))
        return original(q, k, v, tq, tk, tv, *rest)

    monkeypatch.setattr(J, "_attention_forward", spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_jvp_is_one_fused_pass(backend, launches):
    q, k, v, tq, tk, tv = make_inputs(2, 2, 11, 14, 40)
    mask = _masks(2, 2, 11, 14)["key_padding_bool"]
    fn = lambda a, b_, c: J.scaled_dot_product_attention(a, b_, c, attn_mask=mask, backend=backend)  # noqa: E731
    o, to = torch.func.jvp(fn, (q, k, v), (tq, tk, tv))
    ro, rto = jvp_reference(q, k, v, tq, tk, tv, attn_mask=mask)
    assert rel_err(o, ro) < 2e-6 and rel_err(to, rto) < 2e-6
    assert launches == [3]  # O and tO from a single pass


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_dual_tensors(backend, launches):
    q, k, v, tq, tk, tv = make_inputs(1, 2, 10, 10, 64)
    with fwAD.dual_level():
        out = J.scaled_dot_product_attention(fwAD.make_dual(q, tq), k, fwAD.make_dual(v, tv), is_causal=True,
                                             backend=backend)
        o, to = fwAD.unpack_dual(out)
    ro, rto = jvp_reference(q, k, v, tq, None, tv, is_causal=True)
    assert rel_err(o, ro) < 2e-6 and rel_err(to, rto) < 2e-6
    assert launches == [2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_function_without_fused_tangents_falls_back_to_second_pass(backend, launches):
    q, k, v, tq, tk, tv = make_inputs(1, 2, 10, 12, 16)

    def fn(a, b_, c):
        return J.JVPAttentionFunction.apply(a, b_, c, None, None, None, None, False, 0.25, False, backend)[0]

    with fwAD.dual_level():
        out = fn(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))
        to = fwAD.unpack_dual(out).tangent
    _, rto = jvp_reference(q, k, v, tq, tk, tv)
    assert rel_err(to, rto) < 2e-6
    assert launches == [0, 3]
    _, to2 = torch.func.jvp(fn, (q, k, v), (tq, tk, tv))
    assert rel_err(to2, rto) < 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "mask", "causal", "gqa"])
def test_backward_matches_reference(backend, case):
    hkv = 1 if case == "gqa" else 2
    q, k, v, *_ = make_inputs(2, 2, 13, 17, 40, hkv=hkv)
    kwargs = {"attn_mask": _masks(2, 2, 13, 17)["additive_key_padding"]} if case == "mask" else {}
    kwargs.update({"is_causal": True} if case == "causal" else {})
    kwargs.update({"enable_gqa": True} if case == "gqa" else {})
    grad_out = torch.randn(2, 2, 13, 40, generator=torch.Generator().manual_seed(5))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    J.scaled_dot_product_attention(*leaves, backend=backend, **kwargs).backward(grad_out)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    attention_reference(*ref, **kwargs).backward(grad_out.double())
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) < 1e-5


def test_backward_only_for_inputs_that_need_it():
    q, k, v, *_ = make_inputs(1, 1, 5, 6, 16)
    q.requires_grad_()
    J.scaled_dot_product_attention(q, k, v, backend="torch").sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None


# ---------------------------------------------------------------------------------------------------------------
# Accuracy against PyTorch's own math-path JVP, argument errors, backend choice
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not J._HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_no_worse_than_twice_pytorch_math_path(dtype):
    """The acceptance bar: kernel error vs float64 at most 2x that of torch.func.jvp on SDPA's MATH backend."""
    q, k, v, tq, tk, tv = make_inputs(2, 2, 64, 64, 64, dtype=dtype, seed=11)
    o, to, _ = J.attention_jvp(q, k, v, tq, tk, tv, backend="interpret")
    mo, mto = math_path_jvp(q, k, v, tq, tk, tv)
    ro, rto = jvp_reference(q, k, v, tq, tk, tv)
    assert rel_err(o, ro) <= 2 * rel_err(mo, ro) + 1e-7
    assert rel_err(to, rto) <= 2 * rel_err(mto, rto) + 1e-7


def test_argument_errors():
    q, k, v, *_ = make_inputs(1, 2, 4, 5, 16)
    with pytest.raises(ValueError, match="head dims differ"):
        J.scaled_dot_product_attention(q, k[..., :8], v, backend="torch")
    with pytest.raises(ValueError, match="dropout"):
        J.scaled_dot_product_attention(q, k, v, dropout_p=0.1, backend="torch")
    with pytest.raises(ValueError, match="enable_gqa"):
        J.scaled_dot_product_attention(q, k[:, :1], v[:, :1], backend="torch")
    with pytest.raises(ValueError, match="does not broadcast"):
        J.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(1, 1, 4, 7, dtype=torch.bool), backend="torch")
    with pytest.raises(ValueError, match="not both"):
        J.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="4-D"):
        J.scaled_dot_product_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="backend must be one of"):
        J.select_backend("cpu", torch.float32, "cuda")


def test_backend_selection(monkeypatch):
    monkeypatch.delenv(J._BACKEND_ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert J.select_backend("cpu") == "torch"
    assert J.select_backend("cpu", torch.float64, "interpret") == "torch"
    monkeypatch.setenv(J._BACKEND_ENV, "torch")
    assert J.select_backend("cuda") == "torch"
    if J._HAS_TRITON:
        monkeypatch.delenv(J._BACKEND_ENV)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert J.select_backend("cpu") == "interpret"
        assert J.select_backend("cuda") == "interpret"
        with pytest.raises(ValueError, match="CUDA"):
            J.select_backend("cpu", torch.float32, "triton")


def test_float64_runs_on_torch_path():
    q, k, v, tq, tk, tv = make_inputs(1, 2, 7, 9, 16, dtype=torch.float64)
    o, to, _ = J.attention_jvp(q, k, v, tq, tk, tv)
    ro, rto = jvp_reference(q, k, v, tq, tk, tv)
    torch.testing.assert_close(o, ro, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(to, rto, rtol=1e-12, atol=1e-12)


def test_benchmark_script_cpu_smoke(tmp_path, capsys):
    """The benchmark imports the same reference and runs end to end on CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_jvp_attention.py"
    spec = importlib.util.spec_from_file_location("bench_jvp_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.md"
    bench.main(["--cpu-smoke", "--seqs", "33", "--head-dims", "40", "--out", str(out)])
    text = out.read_text()
    assert "| 40 | 33 |" in text and "kernel" in text and "math-jvp" in text
    errors = [float(line.split("|")[-2]) for line in text.splitlines() if "| kernel |" in line]
    assert errors and all(e < 1e-5 for e in errors)


@pytest.mark.parametrize("variant", ["bf16_full_tangent", "fp16_bool_mask_causal_tq_only"])
def test_compiles_for_hopper_without_a_gpu(variant):
    """Triton's real compiler (not the interpreter) accepts the kernel: TTIR -> PTX -> cubin for sm_90a, offline."""
    from triton.runtime.jit import JITFunction

    if not isinstance(J._jvp_attn_fwd_kernel, JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: no compiled kernels in this process")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no offline compiler API")
    import triton

    half = "bf16" if variant.startswith("bf16") else "fp16"
    mask_kind = 1 if "bool_mask" in variant else 0
    tangents = (True, False, False) if "tq_only" in variant else (True, True, True)
    consts = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_DQK=128, BLOCK_DV=128, HAS_TQ=tangents[0], HAS_TK=tangents[1],
                  HAS_TV=tangents[2], HAS_TANGENT=True, MASK_KIND=mask_kind, IS_CAUSAL="causal" in variant,
                  UPCAST=False, DOT_PRECISION="tf32")
    pointer_types = {"Mask": "u8" if mask_kind else half, "LSE": "fp32"}
    signature = {}
    for name in J._jvp_attn_fwd_kernel.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "TQ", "TK", "TV", "Mask", "O", "TO", "LSE"):
            signature[name] = "*" + pointer_types.get(name, half)
        else:
            signature[name] = "fp32" if name == "sm_scale" else "i32"
    try:
        compiled = triton.compile(ASTSource(J._jvp_attn_fwd_kernel, signature, consts),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    except (RuntimeError, FileNotFoundError) as e:  # no NVIDIA toolchain in this triton build
        if "ptxas" in str(e) or "backend" in str(e).lower():
            pytest.skip(f"no NVIDIA toolchain: {e}")
        raise
    assert "wgmma" in compiled.asm["ptx"]  # Hopper tensor-core matmuls, not a scalar fallback
    assert 0 < compiled.metadata.shared <= 227 * 1024
