"""The CPU fast path: PyTorch ops with hand-written backwards (no Triton, no compiler).

Autograd through the references stores and re-reads every intermediate of a pointwise chain;
on a CPU these chains are memory-bound, and at paper-S they cost more than the GEMMs. Here
each op saves only what its backward needs and the backward runs in few passes, in place
where it can. Same signatures as the references (`kernels/*_ref`); tests/test_kernels.py
checks values and gradients against them. `get_ops("fused")`; `--agent.kernels auto` picks it
on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


class _RmsSilu(torch.autograd.Function):
    """y = x * r * scale with r = 1/sqrt(mean(x^2) + eps); out = silu(y).

    Backward, with a = silu'(y) * g * scale and xhat = x * r:
    dscale = sum_rows(silu'(y) * g * xhat); dx = r * (a - xhat * mean(a * xhat)).
    Saves xhat, r (one value per row) and y.
    """

    @staticmethod
    def forward(ctx, x, scale, eps):
        xf = _upcast(x)
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_()
                        .div_(xf.shape[-1]).add_(eps))
        sf = _upcast(scale)
        xhat = xf * r
        y = xhat * sf
        ctx.save_for_backward(xhat, r, sf, y)
        ctx.dtypes = (x.dtype, scale.dtype)
        return F.silu(y).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xhat, r, sf, y = ctx.saved_tensors
        gy = torch.ops.aten.silu_backward(_upcast(grad), y)
        lead = tuple(range(gy.dim() - 1))
        dscale = (gy * xhat).sum(lead) if ctx.needs_input_grad[1] else None
        a = gy.mul_(sf)
        m = torch.linalg.vecdot(a, xhat).unsqueeze_(-1).div_(-xhat.shape[-1])
        dx = a.addcmul_(xhat, m).mul_(r)
        return (dx.to(ctx.dtypes[0]),
                dscale.to(ctx.dtypes[1]) if dscale is not None else None, None)


def rms_silu_fused(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """SiLU(RMSNorm(x)) over the last axis (as kernels.rssm_step.rms_silu_ref)."""
    return _RmsSilu.apply(x, scale, eps)
