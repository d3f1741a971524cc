"""`distill.models.jvp.jvp` through a wrapped digits-style UNet (with attention): the routed exact JVP equals PyTorch's
MATH-path JVP and a central finite difference; the primal is the plain forward."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_unet
from torch.nn.attention import SDPBackend, sdpa_kernel

from distill.kernels.diffusers_attention import ContiguousGroupNorm
from distill.models.denoiser import Denoiser
from distill.models.jvp import jvp
from distill.parametrization import EDMProcess

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """The routed attention runs the Triton kernel under the CPU interpreter (when triton is installed)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _student(dtype=torch.float32) -> Denoiser:
    unet = tiny_unet()
    with torch.no_grad():  # a random init has near-zero output layers; make the map non-trivial
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return Denoiser(unet.to(dtype), EDMProcess(), "cm").eval()


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=dtype)
    sigma = torch.tensor([0.3, 1.5, 7.0], dtype=dtype)
    dx = torch.randn(3, 1, 8, 8, generator=g, dtype=dtype)
    dsigma = torch.tensor([0.2, 1.0, -0.5], dtype=dtype)
    cond = {"class_labels": torch.tensor([1, 4, 10])}
    return (x, sigma), (dx, dsigma), cond


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def test_exact_jvp_routes_attention_and_matches_the_math_path():
    from distill.kernels.diffusers_attention import JVPAttentionMode

    student = _student()
    primals, tangents, cond = _inputs(torch.float32)
    fn = lambda x, s: student(x, s, cond)  # noqa: E731
    routed = []
    original = JVPAttentionMode.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        out = original(self, func, types, args, kwargs)
        routed.append(self.routed)
        return out

    JVPAttentionMode.__torch_function__ = counting
    try:
        out, tangent = jvp(fn, primals, tangents)
    finally:
        JVPAttentionMode.__torch_function__ = original
    assert max(routed) >= 3  # down, mid and up attention blocks ran the kernel
    assert not tangent.requires_grad and not out.requires_grad
    with sdpa_kernel(SDPBackend.MATH), ContiguousGroupNorm():
        ref_out, ref_tangent = torch.func.jvp(fn, primals, tangents)
    torch.testing.assert_close(out, fn(*primals).detach(), atol=1e-6, rtol=1e-5)
    assert _rel(out, ref_out) < 1e-5
    assert _rel(tangent, ref_tangent) < 1e-5
    assert tangent.abs().mean() > 1e-3


def test_exact_jvp_matches_central_finite_difference_float64():
    """In float64 along x (diffusers embeds the timestep in float32, so a time tangent is checked coarser)."""
    student = _student(torch.float64)
    (x, sigma), (dx, dsigma), cond = _inputs(torch.float64)
    fn = lambda x, s: student(x, s, cond)  # noqa: E731
    along_x = ((x, sigma), (dx, torch.zeros_like(dsigma)))
    _, exact = jvp(fn, *along_x, method="exact")
    out, fd = jvp(fn, *along_x, method="finite_difference", eps=1e-5)
    assert _rel(fd, exact) < 1e-7
    torch.testing.assert_close(out, fn(x, sigma))
    # The central difference is second order: halving eps quarters its error.
    _, fd_coarse = jvp(fn, *along_x, method="finite_difference", eps=0.2)
    _, fd_half = jvp(fn, *along_x, method="finite_difference", eps=0.1)
    ratio = _rel(fd_coarse, exact) / _rel(fd_half, exact)
    assert 3.0 < ratio < 5.0, ratio
    # Along (x, sigma) together: the time tangent goes through c_in, c_skip, c_out and c_noise = 250 log sigma,
    # whose sinusoidal embedding turns 833 radians per unit sigma at sigma = 0.3, so the difference needs a small
    # eps and is limited by the float32 embedding (measured: rel. error 6e-3 at eps 1e-3, 3e-4 at 1e-4).
    _, exact = jvp(fn, (x, sigma), (dx, dsigma), method="exact")
    _, fd = jvp(fn, (x, sigma), (dx, dsigma), method="finite_difference", eps=1e-4)
    assert _rel(fd, exact) < 2e-3


def test_bad_arguments_are_named():
    fn = lambda x: x * 2  # noqa: E731
    with pytest.raises(ValueError, match="tangent 0 has shape"):
        jvp(fn, (torch.ones(2),), (torch.ones(3),))
    with pytest.raises(ValueError, match="unknown method"):
        jvp(fn, (torch.ones(2),), (torch.ones(2),), method="reverse")
    with pytest.raises(ValueError, match="eps must be > 0"):
        jvp(fn, (torch.ones(2),), (torch.ones(2),), method="finite_difference", eps=0.0)
