"""Flash attention with a fused forward-mode JVP (Triton), for sCM / rCM training.

Contract
--------
Given Q (B, H, Lq, Dqk), K (B, Hkv, Lk, Dqk), V (B, Hkv, Lk, Dv) and tangents tQ, tK, tV of the same shapes
(any of them may be absent, i.e. zero), one pass over the keys computes

    S  = c Q K^T (+ additive mask, or -inf where a boolean mask is False / above the causal diagonal)
    P  = softmax(S)                       O  = P V
    tS = c (tQ K^T + Q tK^T)
    tO = (P * tS) V - rowsum(P * tS) * O + P tV                     (docs/jvp_attention.md, PAPERS.md)
    LSE = log sum_j exp(S_ij)             (natural log, float32, (B, H, Lq))

with an online softmax: per query row the kernel keeps the running max m, l = sum p, rsum = sum p * tS and the
fp32 accumulators acc = sum p V and tacc = sum p tV + sum (p * tS) V (the A + B of the paper note); at the end
O = acc / l and tO = tacc / l - (rsum / l) O.  That is six matrix products per key block instead of two, so the
floor is about 3x a flash forward; memory is linear in the sequence length (nothing of size Lq x Lk is stored).

Supported: float32 / float16 / bfloat16 inputs with float32 accumulation (bf16/fp16 operands go to tl.dot as is,
the probabilities are rounded to V's dtype before the P V products, as in flash attention; float32 runs the
compiled kernel with tf32 dots when `torch.backends.cuda.matmul.allow_tf32` is set and the PyTorch path otherwise,
because Triton 3.9's LLVM aborts on this kernel's IEEE fp32 dots; the interpreter uses exact fp32 dots); any
head dim (padded inside the kernel to the next power of two >= 16 with masks, so 40, 80, 160 work) and a value
head dim that may differ from the query one; any sequence lengths >= 1 including odd ones and Lq != Lk;
grouped-query attention (`enable_gqa`); a boolean or additive attention mask broadcastable to (B, H, Lq, Lk) as
`F.scaled_dot_product_attention` accepts; causal masking aligned top-left like PyTorch's `is_causal`; a softmax
scale.  Fully masked rows give O = tO = 0 (as
PyTorch's SDPA does) and LSE = -inf.  A primal-only launch (no tangents) uses the same kernel with constexpr flags.
No dropout.  Float64 inputs, and CPU tensors when the interpreter is not requested, take the plain PyTorch path.

Backends (`select_backend`): CUDA tensors -> compiled Triton (autotuned); `TRITON_INTERPRET=1` -> the same kernel
under Triton's CPU interpreter (CI); otherwise -> `_torch_attention_jvp`, explicit formulas, O(Lq Lk) memory.
Force one with `backend=` or the environment variable `DISTILL_JVP_ATTENTION_BACKEND` (triton|interpret|torch).
Under the interpreter bf16 operands are upcast to fp32 before `tl.dot` (the interpreter's bf16 dot is wrong).

Backward: gradients of O w.r.t. Q, K, V recompute attention with PyTorch's SDPA (flash / efficient on GPU, so
memory stays linear) and call autograd on it.  The tangent output is not differentiable (sCM / rCM stop its
gradient).  Nested forward AD (jvp of jvp) is not supported.

Measured: accuracy under TRITON_INTERPRET=1 on CPU against the float64 reference in
`jvp_attention_reference.py` (see docs/jvp_attention.md).  Compiled offline for sm_90a with Triton 3.9 (no GPU:
every dtype / mask / causal / tangent variant compiles to a cubin; register spills per config noted at the
autotune table).  GPU speed and memory: not measured yet; run `python scripts/bench_jvp_attention.py` on a GPU
(docs/jvp_attention_benchmark.md).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

try:  # Triton is optional: without it everything runs on the PyTorch path.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = [
    "Backend",
    "JVPAttentionFunction",
    "attention_jvp",
    "scaled_dot_product_attention",
    "select_backend",
]

logger = logging.getLogger(__name__)

Backend = Literal["triton", "interpret", "torch"]
_BACKENDS = ("triton", "interpret", "torch")
_BACKEND_ENV = "DISTILL_JVP_ATTENTION_BACKEND"
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# Block sizes used under the interpreter (no autotuning there: every config would be interpreted).
_INTERPRET_BLOCK_M = 32
_INTERPRET_BLOCK_N = 32


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------

if _HAS_TRITON:

    # Only builtins and `tl.reduce` with the standard combine functions are used below: `tl.sum`, `tl.max`,
    # `tl.zeros` are themselves jitted, compiled-or-interpreted as decided when triton was imported, which would
    # tie the interpreter to TRITON_INTERPRET being set before the first `import triton`. This way the kernel
    # runs under the interpreter whenever it is asked for (the interpreter maps these combine functions to numpy).
    @triton.jit
    def _jvp_attn_fwd_kernel(
        Q, K, V, TQ, TK, TV, Mask, O, TO, LSE,
        stride_qb, stride_qh, stride_qm,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_tqb, stride_tqh, stride_tqm,
        stride_tkb, stride_tkh, stride_tkn,
        stride_tvb, stride_tvh, stride_tvn,
        stride_mb, stride_mh, stride_mm, stride_mn,
        stride_ob, stride_oh, stride_om,
        stride_tob, stride_toh, stride_tom,
        H, KV_GROUP, Lq, Lk, D_QK, D_V,
        sm_scale,
        LQ_BUCKET, LK_BUCKET,  # autotuning keys only (powers of two of Lq, Lk)
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_DQK: tl.constexpr,
        BLOCK_DV: tl.constexpr,
        HAS_TQ: tl.constexpr,
        HAS_TK: tl.constexpr,
        HAS_TV: tl.constexpr,
        HAS_TANGENT: tl.constexpr,
        MASK_KIND: tl.constexpr,  # 0: none, 1: boolean (keep where != 0), 2: additive float
        IS_CAUSAL: tl.constexpr,
        UPCAST: tl.constexpr,  # interpreter: run every dot in fp32
        DOT_PRECISION: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        off_bh = tl.program_id(1)
        off_b = (off_bh // H).to(tl.int64)
        off_h = (off_bh % H).to(tl.int64)
        off_hk = off_h // KV_GROUP

        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_dk = tl.arange(0, BLOCK_DQK)
        offs_dv = tl.arange(0, BLOCK_DV)
        m_valid = offs_m < Lq
        dk_valid = offs_dk < D_QK
        dv_valid = offs_dv < D_V
        q_mask = m_valid[:, None] & dk_valid[None, :]

        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_dk[None, :],
                    mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        if HAS_TQ:
            tq = tl.load(TQ + off_b * stride_tqb + off_h * stride_tqh + offs_m[:, None] * stride_tqm
                         + offs_dk[None, :], mask=q_mask, other=0.0)
            if UPCAST:
                tq = tq.to(tl.float32)

        k_base = K + off_b * stride_kb + off_hk * stride_kh
        v_base = V + off_b * stride_vb + off_hk * stride_vh
        tk_base = TK + off_b * stride_tkb + off_hk * stride_tkh
        tv_base = TV + off_b * stride_tvb + off_hk * stride_tvh
        mask_base = Mask + off_b * stride_mb + off_h * stride_mh

        # exp2 with log2(e) folded into the scale: p = 2^(s - m) = e^(S - M) with s = S log2(e).
        qk_scale = sm_scale * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        r_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)  # rsum = sum p * tS
        acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)  # sum p V
        tacc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)  # sum p tV + sum (p * tS) V

        hi = Lk
        if IS_CAUSAL:  # top-left aligned: key j is visible from query i iff j <= i
            hi = tl.minimum(Lk, (start_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            n_valid = offs_n < Lk
            kv_mask_k = n_valid[:, None] & dk_valid[None, :]
            kv_mask_v = n_valid[:, None] & dv_valid[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_dk[None, :], mask=kv_mask_k, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            keep = n_valid[None, :] & m_valid[:, None]
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            if MASK_KIND == 1:
                mk = tl.load(mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                             mask=m_valid[:, None] & n_valid[None, :], other=0)
                keep = keep & (mk != 0)
            if MASK_KIND == 2:
                madd = tl.load(mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                               mask=m_valid[:, None] & n_valid[None, :], other=0.0)
                s = s + madd.to(tl.float32) * 1.4426950408889634
            s = tl.where(keep, s, float("-inf"))

            # Online softmax: rescale everything accumulated so far by alpha = e^(m_old - m_new).
            m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: avoid -inf - -inf
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)

            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], mask=kv_mask_v, other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)

            if HAS_TANGENT:
                tacc = tacc * alpha[:, None]
                if HAS_TV:  # A += P tV
                    tv = tl.load(tv_base + offs_n[:, None] * stride_tvn + offs_dv[None, :], mask=kv_mask_v,
                                 other=0.0)
                    if UPCAST:
                        tv = tv.to(tl.float32)
                    tacc = tl.dot(p.to(tv.dtype), tv, tacc, input_precision=DOT_PRECISION)
                if HAS_TQ or HAS_TK:
                    # tS / c = tQ K^T + Q tK^T
                    ts = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
                    if HAS_TQ:
                        ts = tl.dot(tq, tl.trans(k), ts, input_precision=DOT_PRECISION)
                    if HAS_TK:
                        tk = tl.load(tk_base + offs_n[:, None] * stride_tkn + offs_dk[None, :], mask=kv_mask_k,
                                     other=0.0)
                        if UPCAST:
                            tk = tk.to(tl.float32)
                        ts = tl.dot(q, tl.trans(tk), ts, input_precision=DOT_PRECISION)
                    pts = p * (ts * sm_scale)
                    r_i = r_i * alpha + tl.reduce(pts, 1, tl.standard._sum_combine)
                    tacc = tl.dot(pts.to(v.dtype), v, tacc, input_precision=DOT_PRECISION)  # B += (P*tS) V
            m_i = m_new

        # Epilogue. l = 0 only for fully masked rows: O = tO = 0 there, LSE = -inf.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        inv_l = 1.0 / l_safe
        o = acc * inv_l[:, None]
        o_mask = m_valid[:, None] & dv_valid[None, :]
        tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
                 o.to(O.dtype.element_ty), mask=o_mask)
        if HAS_TANGENT:
            to = tacc * inv_l[:, None] - (r_i * inv_l)[:, None] * o  # tO = (A + B)/l - (rsum/l) O
            tl.store(TO + off_b * stride_tob + off_h * stride_toh + offs_m[:, None] * stride_tom + offs_dv[None, :],
                     to.to(TO.dtype.element_ty), mask=o_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + off_bh.to(tl.int64) * Lq + offs_m, lse, mask=m_valid)


# ----------------------------------------------------------------------------------------------------------------
# Autotune configs (compiled GPU path only; the interpreter runs one fixed config)
# ----------------------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). Chosen from an offline sm_90a compile (Triton 3.9 -> ptxas, no GPU
# needed) of the full-tangent bf16 kernel: at head dim 128, 128x64/8 warps spills 168 bytes and 128x32/8 warps
# 44 bytes, 64x64/4 warps 760 bytes; 128x64/4 warps (4.7 KB) and 64x128/8 warps (1.5 KB) were dropped. At head
# dim 64, 128x64/8 warps does not spill. Speed is still unmeasured: the autotuner picks among these on the GPU.
_GPU_CONFIGS_16BIT = [
    (128, 64, 8, 3),
    (128, 64, 8, 2),
    (128, 32, 8, 3),
    (64, 64, 4, 3),
    (64, 64, 4, 2),
    (64, 32, 4, 3),
]
# Head dims padded to 256 (e.g. 160) and float32 (tf32 dots): one config that compiles and fits shared memory.
_GPU_CONFIGS_SMALL = [(64, 32, 4, 2)]
_GPU_CONFIGS = _GPU_CONFIGS_16BIT + [c for c in _GPU_CONFIGS_SMALL if c not in _GPU_CONFIGS_16BIT]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs meant for this dtype / head dim (see the tables above)."""
    meta = {**named_args, **kwargs}
    d = max(meta.get("BLOCK_DQK", 64), meta.get("BLOCK_DV", 64))
    q = meta.get("Q")
    wide = d >= 256 or (q is not None and q.dtype == torch.float32)
    allowed = _GPU_CONFIGS_SMALL if wide else _GPU_CONFIGS_16BIT
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
    if not wide and meta.get("Lq", 1 << 30) <= 64:  # short queries: more programs beat bigger tiles
        kept = [c for c in kept if c.kwargs["BLOCK_M"] <= 64] or kept
    return kept or configs[-1:]


_KERNELS: dict[str, object] = {}


def _kernel(interpret: bool):
    """The kernel as a compiled (autotuned) or interpreted function, built from the same Python source.

    `triton.jit` decides interpreted-or-compiled when this module is imported (from TRITON_INTERPRET); building
    both from `.fn` lets the backend be chosen per call instead.
    """
    key = "interpret" if interpret else "triton"
    if key not in _KERNELS:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        fn = _jvp_attn_fwd_kernel.fn
        if interpret:
            _KERNELS[key] = InterpretedFunction(fn)
        else:
            if not isinstance(_jvp_attn_fwd_kernel, JITFunction):
                raise RuntimeError("the compiled Triton backend is unavailable: triton was imported with "
                                   "TRITON_INTERPRET=1; unset it before the first `import triton`")
            jit = _jvp_attn_fwd_kernel
            configs = [
                triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in _GPU_CONFIGS
            ]
            _KERNELS[key] = triton.autotune(
                configs=configs,
                key=["LQ_BUCKET", "LK_BUCKET", "BLOCK_DQK", "BLOCK_DV", "HAS_TQ", "HAS_TK", "HAS_TV",
                     "MASK_KIND", "IS_CAUSAL"],
                prune_configs_by={"early_config_prune": _prune_configs},
            )(jit)
    return _KERNELS[key]


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.warning(msg)


def select_backend(device: torch.device | str, dtype: torch.dtype = torch.float32,
                   backend: str | None = None) -> str:
    """Pick the implementation: explicit `backend` > $DISTILL_JVP_ATTENTION_BACKEND > automatic.

    Automatic: TRITON_INTERPRET=1 -> "interpret"; CUDA tensor with Triton -> "triton"; else "torch".
    Float64 always runs on "torch" (the kernel accumulates in fp32). The first use of each non-GPU choice is logged.
    """
    requested = backend or os.environ.get(_BACKEND_ENV, "") or None
    if requested is not None and requested not in _BACKENDS and requested != "auto":
        raise ValueError(f"backend must be one of {_BACKENDS} or 'auto', got {requested!r}")
    if requested == "auto":
        requested = None
    device = torch.device(device)
    if dtype == torch.float64:
        if requested not in (None, "torch"):
            _log_once(f"jvp attention: float64 is not supported by the Triton kernel; using the PyTorch path "
                      f"instead of {requested!r}")
        return "torch"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"jvp attention supports float32/float16/bfloat16/float64 inputs, got {dtype}")
    if requested is not None:
        if requested != "torch" and not _HAS_TRITON:
            raise RuntimeError(f"backend {requested!r} needs triton, which is not installed")
        if requested == "triton" and device.type != "cuda":
            raise ValueError(f"backend 'triton' needs CUDA tensors, got device {device}")
        if requested == "triton" and dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
            raise ValueError("backend 'triton' runs float32 with tf32 dots only: set "
                             "torch.backends.cuda.matmul.allow_tf32 = True, or use backend='torch'")
        choice = requested
    elif _HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False"):
        choice = "interpret"
    elif _HAS_TRITON and device.type == "cuda":
        choice = "triton"
        if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
            # Triton 3.9's LLVM asserts (aborting the process) on this kernel's IEEE fp32 dots for most tile
            # shapes, so float32 runs the kernel only with tf32 dots, as PyTorch's matmuls do when allowed.
            _log_once("jvp attention: float32 on CUDA uses the PyTorch path unless "
                      "torch.backends.cuda.matmul.allow_tf32 is True (then: Triton with tf32 dots)")
            choice = "torch"
    else:
        choice = "torch"
    if choice != "triton":
        _log_once(f"jvp attention: using the {choice!r} backend on {device.type} "
                  f"({'Triton interpreter, slow' if choice == 'interpret' else 'plain PyTorch math, O(L^2) memory'})")
    return choice


def _normalize_mask(attn_mask: torch.Tensor | None, b: int, h: int, lq: int,
                    lk: int) -> tuple[torch.Tensor | None, int]:
    """Broadcast the mask to (B, H, Lq, Lk) (a stride-0 view) and return (mask, MASK_KIND)."""
    if attn_mask is None:
        return None, 0
    try:
        torch.broadcast_shapes(attn_mask.shape, (b, h, lq, lk))
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                         f"(batch, heads, Lq, Lk) = {(b, h, lq, lk)}") from None
    mask = attn_mask.expand(b, h, lq, lk)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1
    if not mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool or floating point, got {mask.dtype}")
    return mask, 2


def _check_inputs(q, k, v, tq, tk, tv, enable_gqa: bool, attn_mask=None, is_causal: bool = False) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"query, key, value must be 4-D (batch, heads, seq, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: query {q.shape[0]}, key {k.shape[0]}, value {v.shape[0]}")
    if k.shape[-1] != d:
        raise ValueError(f"query and key head dims differ: {d} vs {k.shape[-1]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} must share heads and sequence length")
    if k.shape[1] != h:
        if not enable_gqa:
            raise ValueError(f"query has {h} heads but key/value have {k.shape[1]}; pass enable_gqa=True")
        if h % k.shape[1] != 0:
            raise ValueError(f"enable_gqa needs query heads ({h}) divisible by key/value heads ({k.shape[1]})")
    if k.shape[2] == 0:
        raise ValueError("key/value sequence length must be >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key, value dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t, ref in (("tangent of query", tq, q), ("tangent of key", tk, k), ("tangent of value", tv, v)):
        if t is not None and t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
    if attn_mask is not None:
        _normalize_mask(attn_mask, b, h, q.shape[2], k.shape[2])  # raises on a shape or dtype it cannot use
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as F.scaled_dot_product_attention)")


def _launch_triton(q, k, v, tq, tk, tv, attn_mask, is_causal: bool, scale: float, interpret: bool,
                   out: torch.Tensor | None = None, tangent_out: torch.Tensor | None = None,
                   lse_out: torch.Tensor | None = None):
    """Run the kernel. Returns (O, tO or None, LSE). `out` / `tangent_out` / `lse_out` may be preallocated."""
    b, h, lq, dqk = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    has_tangent = tq is not None or tk is not None or tv is not None
    o = out if out is not None else torch.empty((b, h, lq, dv), device=q.device, dtype=q.dtype)
    to = None
    if has_tangent:
        to = tangent_out if tangent_out is not None else torch.empty_like(o)
    lse = lse_out if lse_out is not None else torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    if lq == 0 or b * h == 0:
        return o, to, lse
    assert lse.is_contiguous()

    def last_dim_unit(t):  # the kernel indexes the head dim with stride 1
        return t if t is None or t.stride(-1) == 1 else t.contiguous()

    q, k, v, tq, tk, tv = map(last_dim_unit, (q, k, v, tq, tk, tv))
    for t in (o, to):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("output buffers must have unit stride in the head dim")
    mask, mask_kind = _normalize_mask(attn_mask, b, h, lq, lk)

    def strides3(t):
        return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)

    # Under the interpreter bf16 is emulated badly: its tl.dot on bf16 is wrong and its fp32 -> bf16 store
    # truncates instead of rounding to nearest. So interpret bf16 as fp32 operands and round the outputs in torch.
    upcast = interpret and q.dtype == torch.bfloat16
    o_k = torch.empty(o.shape, device=o.device, dtype=torch.float32) if upcast else o
    to_k = None if to is None else (torch.empty(to.shape, device=to.device, dtype=torch.float32) if upcast else to)
    dummy = q
    args = (
        q, k, v,
        tq if tq is not None else dummy, tk if tk is not None else dummy, tv if tv is not None else dummy,
        mask if mask is not None else dummy, o_k, to_k if to_k is not None else o_k, lse,
        *strides3(q), *strides3(k), *strides3(v), *strides3(tq), *strides3(tk), *strides3(tv),
        *(mask.stride() if mask is not None else (0, 0, 0, 0)),
        *strides3(o_k), *strides3(to_k),
        h, h // hkv, lq, lk, dqk, dv,
        float(scale),
        triton.next_power_of_2(lq), triton.next_power_of_2(lk),
    )
    meta = dict(
        BLOCK_DQK=max(16, triton.next_power_of_2(dqk)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None, HAS_TANGENT=has_tangent,
        MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal), UPCAST=upcast,
        # GPU: fp16/bf16 dots ignore it; fp32 reaches the compiled kernel only with tf32 allowed (select_backend).
        DOT_PRECISION="ieee" if interpret else "tf32",
    )
    kernel = _kernel(interpret)
    if interpret:
        grid = (triton.cdiv(lq, _INTERPRET_BLOCK_M), b * h)
        kernel[grid](*args, BLOCK_M=_INTERPRET_BLOCK_M, BLOCK_N=_INTERPRET_BLOCK_N, **meta)
    else:
        with torch.cuda.device(q.device):
            kernel[lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * h)](*args, **meta)
    if upcast:
        o.copy_(o_k)
        if to is not None:
            to.copy_(to_k)
    return o, to, lse


def _expand_kv(t: torch.Tensor | None, group: int) -> torch.Tensor | None:
    return t if t is None or group == 1 else t.repeat_interleave(group, dim=1)


def _torch_attention_jvp(q, k, v, tq, tk, tv, attn_mask, is_causal: bool, scale: float):
    """Plain PyTorch math attention and its JVP, written out (no autograd): the CPU / float64 fallback.

    Computes in float32 (float64 for float64 inputs) and returns (O, tO or None, LSE) in the input dtype.
    """
    group = q.shape[1] // k.shape[1]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = (x.to(ct) for x in (q, _expand_kv(k, group), _expand_kv(v, group)))
    s = scale * qf @ kf.transpose(-1, -2)  # S = c Q K^T
    lq, lk = q.shape[2], k.shape[2]
    keep = None
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            s = s + attn_mask.to(ct)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    denom_safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    p = e / denom_safe  # P = softmax(S); rows with nothing visible stay 0
    o = p @ vf
    lse = torch.where(denom[..., 0] == 0, torch.full_like(denom[..., 0], float("-inf")),
                      (m + denom_safe.log())[..., 0])
    to = None
    if tq is not None or tk is not None or tv is not None:
        ts = torch.zeros_like(s)
        if tq is not None:
            ts = ts + tq.to(ct) @ kf.transpose(-1, -2)
        if tk is not None:
            ts = ts + qf @ _expand_kv(tk, group).to(ct).transpose(-1, -2)
        pts = p * (scale * ts)  # P * tS
        to = pts @ vf - pts.sum(-1, keepdim=True) * o  # (P*tS) V - rowsum(P*tS) O
        if tv is not None:
            to = to + p @ _expand_kv(tv, group).to(ct)  # + P tV
        to = to.to(q.dtype)
    return o.to(q.dtype), to, lse.float()


def _attention_forward(q, k, v, tq, tk, tv, attn_mask, is_causal: bool, scale: float, backend: str):
    if backend == "torch":
        return _torch_attention_jvp(q, k, v, tq, tk, tv, attn_mask, is_causal, scale)
    return _launch_triton(q, k, v, tq, tk, tv, attn_mask, is_causal, scale, interpret=backend == "interpret")


def attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor | None = None,
    tk: torch.Tensor | None = None,
    tv: torch.Tensor | None = None,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Attention output, its tangent and the log-sum-exp in one pass; no autograd. Layout (B, H, L, D).

    Returns (O, tO, LSE); tO is None when no tangent is given. Missing tangents count as zero.
    """
    _check_inputs(q, k, v, tq, tk, tv, enable_gqa, attn_mask, is_causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    chosen = select_backend(q.device, q.dtype, backend)
    return _attention_forward(q, k, v, tq, tk, tv, attn_mask, is_causal, scale, chosen)


# ----------------------------------------------------------------------------------------------------------------
# autograd.Function: backward of O through PyTorch's SDPA; forward AD fused into the forward kernel
# ----------------------------------------------------------------------------------------------------------------

_bypass = threading.local()  # set while our backward calls F.sdpa, so an active routing mode lets it through


def sdpa_bypassed() -> bool:
    """True while this module calls PyTorch's SDPA itself (routing modes must not intercept it then)."""
    return getattr(_bypass, "active", False)


class JVPAttentionFunction(torch.autograd.Function):
    """O = attention(q, k, v) with a forward-mode rule and a backward for q, k, v.

    Inputs: q, k, v, tq, tk, tv, attn_mask, is_causal, scale, enable_gqa, backend. Outputs (O, tO, LSE); tO and LSE
    are not differentiable. When the caller passes the tangents tq/tk/tv of q/k/v (as `scaled_dot_product_attention`
    does after `forward_ad.unpack_dual`), the forward computes O and tO in one kernel pass and `jvp` just returns
    tO. Called without them, `jvp` runs a second pass with the tangents autograd hands it.
    """

    @staticmethod
    def forward(q, k, v, tq, tk, tv, attn_mask, is_causal, scale, enable_gqa, backend):
        o, to, lse = _attention_forward(q, k, v, tq, tk, tv, attn_mask, is_causal, scale, backend)
        if to is None:
            to = o.new_empty(0)
        return o, to, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, attn_mask, is_causal, scale, enable_gqa, backend = inputs
        _, to, lse = output
        ctx.mark_non_differentiable(to, lse)
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.save_for_forward(q, k, v, attn_mask)
        ctx.fused_tangent = to if (tq is not None or tk is not None or tv is not None) else None
        ctx.options = (is_causal, scale, enable_gqa, backend)

    @staticmethod
    def jvp(ctx, gq, gk, gv, *unused):
        if ctx.fused_tangent is not None:  # computed in the same pass as O
            to, ctx.fused_tangent = ctx.fused_tangent, None  # do not keep it alive until backward
            return to, None, None
        q, k, v, attn_mask = ctx.saved_tensors
        is_causal, scale, _, backend = ctx.options
        if any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (gq, gk, gv)):
            # torch.func hands this staticmethod wrapped tangents, which have no storage for a kernel to read.
            _log_once("jvp attention: JVPAttentionFunction used without its fused tangents under torch.func; "
                      "the tangent falls back to the PyTorch formulas (call scaled_dot_product_attention instead)")
            backend = "torch"
        _, to, _ = _attention_forward(q, k, v, gq, gk, gv, attn_mask, is_causal, scale, backend)
        return to, None, None

    @staticmethod
    def backward(ctx, grad_o, grad_to, grad_lse):
        q, k, v, attn_mask = ctx.saved_tensors
        is_causal, scale, enable_gqa, backend = ctx.options
        needs = ctx.needs_input_grad[:3]
        if not any(needs):
            return (None,) * 11
        with torch.enable_grad():
            qd, kd, vd = (x.detach().requires_grad_(n) for x, n in zip((q, k, v), needs))
            if backend == "torch":  # autograd through the explicit formulas
                o = _torch_attention_jvp(qd, kd, vd, None, None, None, attn_mask, is_causal, scale)[0]
            else:  # recompute with PyTorch's fused SDPA (flash / memory-efficient on GPU: linear memory)
                _bypass.active = True
                try:
                    o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=attn_mask, is_causal=is_causal,
                                                       scale=scale, enable_gqa=enable_gqa)
                finally:
                    _bypass.active = False
            inputs = [x for x, n in zip((qd, kd, vd), needs) if n]
            grads = iter(torch.autograd.grad(o, inputs, grad_o))
        dq, dk, dv = (next(grads) if n else None for n in needs)
        return (dq, dk, dv) + (None,) * 8


# ----------------------------------------------------------------------------------------------------------------
# Public alias: drop-in for F.scaled_dot_product_attention
# ----------------------------------------------------------------------------------------------------------------

def _tangent(t: torch.Tensor) -> torch.Tensor | None:
    tangent = fwAD.unpack_dual(t).tangent
    if tangent is not None and fwAD.unpack_dual(tangent).tangent is not None:
        raise NotImplementedError("nested forward-mode AD (a jvp of a jvp) through jvp attention is not supported")
    return tangent


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention` that supports forward-mode AD.

    Works with `torch.func.jvp` and `torch.autograd.forward_ad` (the kernel computes O and its tangent in one
    pass) and with backward (gradients for query/key/value). `dropout_p` must be 0; `backend` as in
    `select_backend`.
    """
    if dropout_p != 0.0:
        raise ValueError(f"jvp attention does not support dropout (dropout_p={dropout_p}); use dropout_p=0.0")
    tq, tk, tv = _tangent(query), _tangent(key), _tangent(value)
    _check_inputs(query, key, value, tq, tk, tv, enable_gqa, attn_mask, is_causal)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    chosen = select_backend(query.device, query.dtype, backend)
    o, _, _ = JVPAttentionFunction.apply(query, key, value, tq, tk, tv, attn_mask, bool(is_causal), scale,
                                         bool(enable_gqa), chosen)
    return o
