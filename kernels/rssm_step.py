"""Pointwise chains of the RSSM step: RMSNorm + SiLU after a projection, and the GRU gates.

The GEMMs stay in cuBLAS; these are the chains between them (DESIGN 3.6). Each public op has
a `<name>_ref` beside it with the identical signature: the plain-PyTorch math, used on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_silu_ref(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """SiLU(RMSNorm(x)) over the last axis: silu(x * scale / sqrt(mean(x^2) + eps)).

    x: (..., C) float32 or bfloat16; scale: (C,) float32. Math in float32; returns x.dtype.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * scale.float()
    return F.silu(y).to(x.dtype)


def gru_update_ref(gates: torch.Tensor, deter: torch.Tensor, blocks: int) -> torch.Tensor:
    """Block-GRU gate math and state update (SPEC 1.3 step 7).

    gates: (..., 3D), the BlockLinear output laid out per block as [reset, cand, update] of
    D/blocks each; deter: (..., D) the previous state. Returns the new state (..., D):
    r = sigmoid(r), c = tanh(r * c), u = sigmoid(u - 1), h = u * c + (1 - u) * deter.
    Math in float32; returns deter.dtype.
    """
    lead, D = deter.shape[:-1], deter.shape[-1]
    g = gates.float().reshape(*lead, blocks, 3, D // blocks)
    reset, cand, update = (g[..., i, :].reshape(*lead, D) for i in range(3))
    reset = torch.sigmoid(reset)
    cand = torch.tanh(reset * cand)
    update = torch.sigmoid(update - 1.0)
    return (update * cand + (1.0 - update) * deter.float()).to(deter.dtype)
