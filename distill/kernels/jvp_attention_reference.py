"""Float64 references for `jvp_attention.py`, shared by the tests and the benchmark.

`attention_reference` is plain math attention (S = c Q K^T + mask, P = softmax(S), O = P V); its JVP is taken two
ways: `jvp_reference` differentiates it with `torch.func.jvp`, `jvp_closed_form` evaluates
tO = (P * tS) V - rowsum(P * tS) * O + P tV with tS = c (tQ K^T + Q tK^T). Both run in float64 by default.
"""

from __future__ import annotations

import math

import torch


def _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    if enable_gqa and k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    keep = None
    if is_causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    additive = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            additive = attn_mask
    return k, v, scale, keep, additive


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Math attention in `dtype`; rows where every key is masked give 0 (as PyTorch's SDPA)."""
    q, k, v = (x.to(dtype) for x in (q, k, v))
    k, v, scale, keep, additive = _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    return _masked_softmax(q, k, scale, keep, additive) @ v


def _masked_softmax(q, k, scale, keep, additive) -> torch.Tensor:
    """P = softmax(c Q K^T + mask); rows where every key is masked are 0."""
    s = scale * q @ k.transpose(-1, -2)
    if additive is not None:
        s = s + additive.to(s.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    visible = torch.isfinite(s).any(-1, keepdim=True)
    return torch.softmax(s.masked_fill(~visible, 0.0), dim=-1) * visible


def jvp_reference(q, k, v, tq, tk, tv, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                  dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, tO) by `torch.func.jvp` of `attention_reference` in `dtype`; None tangents count as zero."""
    prim = tuple(x.to(dtype) for x in (q, k, v))
    tans = tuple(torch.zeros_like(p) if t is None else t.to(dtype) for p, t in zip(prim, (tq, tk, tv)))
    return torch.func.jvp(
        lambda a, b, c: attention_reference(a, b, c, attn_mask, is_causal, scale, enable_gqa, dtype), prim, tans
    )


def jvp_closed_form(q, k, v, tq, tk, tv, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, tO) from tO = (P * tS) V - rowsum(P * tS) O + P tV, tS = c (tQ K^T + Q tK^T), in `dtype`."""
    q, k, v = (x.to(dtype) for x in (q, k, v))
    tq, tk, tv = (torch.zeros_like(p) if t is None else t.to(dtype) for p, t in zip((q, k, v), (tq, tk, tv)))
    k2, v2, scale, keep, additive = _prepare(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    tk2, tv2, *_ = _prepare(q, tk, tv, None, False, scale, enable_gqa)
    p = _masked_softmax(q, k2, scale, keep, additive)
    o = p @ v2
    ts = scale * (tq @ k2.transpose(-1, -2) + q @ tk2.transpose(-1, -2))
    pts = p * ts
    to = pts @ v2 - pts.sum(-1, keepdim=True) * o + p @ tv2
    return o, to


def math_path_jvp(q, k, v, tq, tk, tv, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """PyTorch's own answer in the inputs' dtype: `torch.func.jvp` of SDPA on the MATH backend.

    This is what the kernel replaces; its error against the float64 reference is the bar the kernel is held to.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tans = tuple(torch.zeros_like(p) if t is None else t for p, t in zip((q, k, v), (tq, tk, tv)))
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(
            lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
                a, b, c, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa),
            (q, k, v), tans,
        )
