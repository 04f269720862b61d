"""Heads on feat = concat(h, flatten(z)): reward, continue, actor, critic."""

from __future__ import annotations

import torch
from torch import nn

from dreamer_fast.agent.dists import BoundedNormal, OneHotCategorical
from dreamer_fast.agent.nets import MLP, Linear


class TwohotHead(nn.Module):
    """MLP -> Linear(bins) logits of a symexp twohot distribution (reward and critic).

    The output layer starts at exactly zero (outscale 0), so the mean starts at exactly 0.
    """

    def __init__(self, inp: int, units: int, layers: int, bins: int, ops):
        super().__init__()
        self.mlp = MLP(inp, units, layers, ops)
        self.out = Linear(self.mlp.out_size, bins, outscale=0.0)
        self.ops = ops

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(feat))

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return self.ops.twohot_mean(logits)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ops.twohot_loss(logits, target)


class ContinueHead(nn.Module):
    """MLP -> one logit of a Bernoulli; its target already carries the discount."""

    def __init__(self, inp: int, units: int, layers: int, ops):
        super().__init__()
        self.mlp = MLP(inp, units, layers, ops)
        self.out = Linear(self.mlp.out_size, 1)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(feat))[..., 0]


class Actor(nn.Module):
    """Policy: categorical with unimix (discrete) or bounded normal (continuous); outscale 0.01."""

    def __init__(self, inp: int, units: int, layers: int, act_size: int, discrete: bool,
                 unimix: float, minstd: float, maxstd: float, ops):
        super().__init__()
        self.mlp = MLP(inp, units, layers, ops)
        self.ops = ops
        self.discrete, self.unimix, self.minstd, self.maxstd = discrete, unimix, minstd, maxstd
        self.mean = Linear(self.mlp.out_size, act_size, outscale=0.01)
        if not discrete:
            self.std = Linear(self.mlp.out_size, act_size, outscale=0.01)

    def forward(self, feat: torch.Tensor):
        """feat (*lead, F) -> a distribution with sample/mode/log_prob/entropy over (*lead)."""
        x = self.mlp(feat)
        if self.discrete:
            return OneHotCategorical(self.mean(x), self.unimix)
        return BoundedNormal(self.mean(x), self.std(x), self.minstd, self.maxstd)

    @torch.no_grad()
    def sample(self, feat: torch.Tensor) -> torch.Tensor:
        """A sample of forward(feat), without gradient (the imagination rollout). A discrete
        policy samples through the latent sampler's one-launch inverse-CDF op: the same
        unimix categorical, as a one-hot in the logits' dtype."""
        if not self.discrete:
            return self(feat).sample()
        logits = self.mean(self.mlp(feat))[..., None, :]
        noise = torch.rand(logits.shape[:-1], device=logits.device)
        return self.ops.latent_sample(logits, self.unimix, noise)[..., 0, :]
