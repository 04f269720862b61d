"""Loss math as free functions: return normaliser, actor/critic (lambda-returns: their
reference lives beside its Triton kernel in kernels/returns.py, re-exported here)."""

from __future__ import annotations

import torch

from dreamer_fast.kernels.returns import lambda_return_ref as lambda_return  # noqa: F401 (re-export)


def percentile_scale(returns: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rate: float,
                     quantiles: torch.Tensor, limit: float) -> torch.Tensor:
    """Update the EMA of the return percentiles in place, then return max(limit, hi - lo).

    lo, hi: 0-d float32 device tensors (start at 0, no debiasing). Updated before use.
    quantiles: (2,) float32 on the returns' device, [perclo, perchi] / 100, made once by the
    caller (a tensor built here from Python numbers would be a host-to-device copy inside the
    captured update, which a CUDA graph capture rejects).
    """
    flat = returns.detach().float().flatten()
    q = torch.quantile(flat, quantiles)
    lo.mul_(1.0 - rate).add_(rate * q[0])
    hi.mul_(1.0 - rate).add_(rate * q[1])
    return (hi - lo).clamp(min=limit)


def policy_loss(logp: torch.Tensor, ent: torch.Tensor, adv: torch.Tensor,
                weight: torch.Tensor, actent: float) -> torch.Tensor:
    """REINFORCE with entropy bonus: mean of sg(w) * -(logp * sg(adv) + actent * H), (N, H)."""
    return (weight.detach() * -(logp * adv.detach() + actent * ent)).mean()


def value_loss(loss_ret: torch.Tensor, loss_slow: torch.Tensor, weight: torch.Tensor,
               slowreg: float) -> torch.Tensor:
    """Critic loss: mean of weight * (CE to the return + slowreg * CE to the slow critic)."""
    return (weight.detach() * (loss_ret + slowreg * loss_slow)).mean()
