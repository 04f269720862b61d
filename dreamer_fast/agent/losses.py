"""Loss math as free functions: lambda-returns, return normaliser, actor/critic."""

from __future__ import annotations

import torch


def lambda_return(last: torch.Tensor, term: torch.Tensor, rew: torch.Tensor,
                  boot: torch.Tensor, disc: float, lam: float) -> torch.Tensor:
    """Lambda-returns of trajectories (N, L) -> (N, L - 1).

    R_{L-1} = boot_{L-1};
    R_t = rew_{t+1} + disc (1 - term_{t+1}) [(1 - lam_{t+1}) boot_{t+1} + lam_{t+1} R_{t+1}]
    with lam_{t+1} = lam (1 - last_{t+1}). Rewards at t+1 are received on arriving at t+1.
    """
    live = (1.0 - term[:, 1:].float()) * disc
    cont = (1.0 - last[:, 1:].float()) * lam
    interm = rew[:, 1:] + (1.0 - cont) * live * boot[:, 1:]
    rets = [boot[:, -1]]
    for t in reversed(range(live.shape[1])):
        rets.append(interm[:, t] + live[:, t] * cont[:, t] * rets[-1])
    return torch.stack(rets[::-1][:-1], 1)


def percentile_scale(returns: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rate: float,
                     perclo: float, perchi: float, limit: float) -> torch.Tensor:
    """Update the EMA of the return percentiles in place, then return max(limit, hi - lo).

    lo, hi: 0-d float32 device tensors (start at 0, no debiasing). Updated before use.
    """
    flat = returns.detach().float().flatten()
    q = torch.quantile(flat, torch.tensor([perclo / 100, perchi / 100], device=flat.device))
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
