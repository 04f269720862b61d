"""The losses of one update as free functions (the official dreamerv3 code's `imag_loss` and
`repl_loss`, agent.py): the world model's (`world_losses`), the actor's and critic's on
imagined trajectories (`imag_loss`), the critic's on the replayed sequence (`repl_loss`), and
their weighted total (`total_loss`); with the return normaliser and the REINFORCE and value
terms they share. Lambda-returns: the reference lives beside its Triton kernel in
kernels/returns.py (re-exported here). `agent`: the Agent whose modules and settings they use.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from dreamer_fast.agent import parallel
from dreamer_fast.config import AgentConfig

from dreamer_fast.kernels.returns import lambda_return_ref as lambda_return  # noqa: F401 (re-export)

LOSSES = tuple(f.name for f in dataclasses.fields(AgentConfig().loss))
"""The named loss terms, in the order of their scales (config.LossScales)."""


def percentile_scale(returns: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rate: float,
                     quantiles: torch.Tensor, limit: float) -> torch.Tensor:
    """Update the EMA of the return percentiles in place, then return max(limit, hi - lo).

    lo, hi: 0-d float32 device tensors (start at 0, no debiasing). Updated before use.
    quantiles: (2,) float32 on the returns' device, [perclo, perchi] / 100, made once by the
    caller (a tensor built here from Python numbers would be a host-to-device copy inside the
    captured update, which a CUDA graph capture rejects).
    """
    flat = returns.detach().float().flatten()
    q = quantile(flat, quantiles)
    lo.mul_(1.0 - rate).add_(rate * q[0])
    hi.mul_(1.0 - rate).add_(rate * q[1])
    return (hi - lo).clamp(min=limit)


def quantile(flat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """torch.quantile(flat, q) (linear interpolation). Under torch.func transforms (packed
    seeds' vmap) the same computation out of place: torch.quantile's in-place lerp_ has no
    batching rule and would run once per seed."""
    if not torch._C._are_functorch_transforms_active():
        return torch.quantile(flat, q)
    ranks = q * (flat.numel() - 1)  # torch.quantile's steps, as ATen takes them
    below = ranks.long()
    ordered = flat.sort().values
    value = torch.lerp(ordered[below], ordered[ranks.ceil().long()], ranks - below)
    return torch.where(flat.isnan().any(), flat.new_full((), float("nan")), value)


def policy_loss(logp: torch.Tensor, ent: torch.Tensor, adv: torch.Tensor,
                weight: torch.Tensor, actent: float) -> torch.Tensor:
    """REINFORCE with entropy bonus: mean of sg(w) * -(logp * sg(adv) + actent * H), (N, H)."""
    return (weight.detach() * -(logp * adv.detach() + actent * ent)).mean()


def value_loss(loss_ret: torch.Tensor, loss_slow: torch.Tensor, weight: torch.Tensor,
               slowreg: float) -> torch.Tensor:
    """Critic loss: mean of weight * (CE to the return + slowreg * CE to the slow critic)."""
    return (weight.detach() * (loss_ret + slowreg * loss_slow)).mean()


def world_losses(agent, batch, obs, deters, stochs, post, feat):
    """Per-step world-model losses (rec per key, rew, con, dyn, rep), averaged."""
    n, cfg = agent.net, agent.cfg
    dyn, rep = agent.ops.kl_free(post, agent.dyn.prior_logits(deters), n.unimix,
                                cfg.free_nats)
    recs = agent.dec.loss(agent.dec(deters, stochs), obs)
    rew = agent.rew.loss(agent.rew(feat), batch["reward"][:, 1:])
    con_target = (~batch["is_terminal"][:, 1:]).float() * cfg.discount
    con = F.binary_cross_entropy_with_logits(agent.con(feat), con_target, reduction="none")
    metrics = {f"loss/rec/{k}": v.mean().detach() for k, v in recs.items()}
    losses = {"rec": sum(v.mean() for v in recs.values()), "rew": rew.mean(),
              "con": con.mean(), "dyn": dyn.mean(), "rep": rep.mean()}
    return losses, metrics


def imag_loss(agent, feat, logp, ent, metrics):
    """Actor and critic losses on imagined trajectories.

    Returns (policy loss, value loss, lambda-return R_0 of every start (N,)).
    """
    cfg = agent.cfg
    with torch.no_grad():
        rew = agent.rew.mean(agent.rew(feat))
        con = torch.sigmoid(agent.con(feat))
        slowval = agent.slowval.mean(agent.slowval(feat))
    val_logits = agent.val(feat)
    val = agent.val.mean(val_logits).detach()
    weight = torch.cumprod(con, 1)[:, :-1]
    ret = agent.ops.lambda_return(torch.zeros_like(con), 1.0 - con, rew, val, 1.0, cfg.lam)
    # Data parallel: percentiles of the global batch, so every rank normalises alike.
    all_ret = parallel.all_gather(ret) if agent.reducer is not None else ret
    scale = percentile_scale(all_ret, agent.retnorm_lo, agent.retnorm_hi, cfg.retnorm_rate,
                               agent.retnorm_q, cfg.retnorm_limit)
    adv = (ret - val[:, :-1]) / scale
    policy = policy_loss(logp, ent, adv, weight, cfg.actent)
    value = value_loss(agent.val.loss(val_logits[:, :-1], ret),
                         agent.val.loss(val_logits[:, :-1], slowval[:, :-1]), weight,
                         cfg.slowreg)
    metrics.update({"imag/ret": ret.mean(), "imag/adv": adv.abs().mean(),
                    "imag/ent": ent.mean().detach(), "imag/val": val.mean(),
                    "imag/rew": rew.mean(), "imag/con": con.mean(),
                    "retnorm/lo": agent.retnorm_lo.clone(), "retnorm/hi": agent.retnorm_hi.clone()})
    return policy, value, ret[:, 0]


def repl_loss(agent, batch, feat, boot):
    """Critic loss on the replayed sequence, bootstrapped by imagined returns."""
    cfg = agent.cfg
    last, term = batch["is_last"][:, 1:], batch["is_terminal"][:, 1:]
    ret = agent.ops.lambda_return(last, term, batch["reward"][:, 1:], boot.detach(),
                                 cfg.discount, cfg.lam)
    logits = agent.val(feat)[:, :-1]
    with torch.no_grad():
        slowval = agent.slowval.mean(agent.slowval(feat[:, :-1]))
    weight = (~last[:, :-1]).float()
    return value_loss(agent.val.loss(logits, ret), agent.val.loss(logits, slowval), weight,
                        cfg.slowreg)


def total_loss(agent, losses, metrics):
    """Weighted sum of the named losses; flags non-finite ones without a host sync."""
    assert tuple(losses) == LOSSES, f"loss keys {tuple(losses)} != loss scales {LOSSES}"
    stacked = torch.stack([losses[k] for k in LOSSES])
    with torch.no_grad():
        agent.nonfinite |= ~torch.isfinite(stacked.detach())
    metrics.update({f"loss/{k}": v.detach() for k, v in zip(LOSSES, stacked)})
    # One multiply and one sum (2 kernels each way, not 2 per loss); each loss's gradient
    # is its scale exactly, as with the sum of the scaled terms.
    return (stacked * agent.loss_scales.to(stacked.dtype)).sum()
