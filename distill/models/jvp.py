"""The one place JVP recipes take a Jacobian-vector product of a wrapped network.

sCM and rCM (Lu & Song 2024, arXiv 2410.11081, sec. 4; Zheng et al. 2025, arXiv 2510.08431) train on the total
time derivative of the stop-gradient student along the PF-ODE, d F^-(x_t, t)/dt = dF/dx dx_t/dt + dF/dt, which
is one forward-mode JVP with tangents (dx_t/dt, 1). Recipes (and later model families) call :func:`jvp` and
nothing else; no recipe touches the attention kernel.

Methods:

* ``"exact"``: `torch.func.jvp` through the whole wrapped model (a `Denoiser`, its conversions, the diffusers
  network) inside `distill.kernels.diffusers_attention.jvp_attention()`, so every attention call that carries
  tangents runs the fused JVP kernel (PyTorch's fused SDPA has no forward-AD rule). No autograd graph is built:
  the target is a stop-gradient quantity.
* ``"finite_difference"``: the central difference (fn(p + eps v) - fn(p - eps v)) / (2 eps) and the primal
  fn(p): three forward passes, O(eps^2) error, for comparison and for networks forward AD cannot reach.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

JVPMethod = Literal["exact", "finite_difference"]
JVP_METHODS: tuple[str, ...] = ("exact", "finite_difference")


def jvp(
    fn: Callable[..., Tensor],
    primals: Sequence[Tensor],
    tangents: Sequence[Tensor],
    method: JVPMethod = "exact",
    eps: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """(fn(*primals), d/de fn(*(p + e v)) at e = 0) for tangents v, without gradients.

    Args:
        fn: a function of tensors returning one tensor (e.g. ``lambda x, t: student(x, t, cond)``).
        primals, tangents: matching tensors (same shapes and dtypes).
        method: "exact" (forward AD with attention through the JVP kernel) or "finite_difference" (central).
        eps: the finite-difference step (ignored by "exact"); in the primals' own units.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    for i, (p, v) in enumerate(zip(primals, tangents)):
        if p.shape != v.shape:
            raise ValueError(f"jvp: tangent {i} has shape {tuple(v.shape)}, its primal {tuple(p.shape)}")
    if method == "exact":
        from distill.kernels.diffusers_attention import jvp_attention

        with torch.no_grad(), jvp_attention():
            out, tangent_out = torch.func.jvp(fn, primals, tangents)
        return out, tangent_out
    if method == "finite_difference":
        if not eps > 0:
            raise ValueError(f"jvp: finite-difference eps must be > 0, got {eps}")
        with torch.no_grad():
            out = fn(*primals)
            plus = fn(*(p + eps * v for p, v in zip(primals, tangents)))
            minus = fn(*(p - eps * v for p, v in zip(primals, tangents)))
        return out, (plus - minus) / (2 * eps)
    raise ValueError(f"jvp: unknown method {method!r}; expected one of {JVP_METHODS}")
