"""Heads on feat = concat(h, flatten(z)): reward, continue, actor, critic."""

from __future__ import annotations

import torch
from torch import nn

from dreamer_fast.agent.dists import BoundedNormal, OneHotCategorical
from dreamer_fast.agent import deferred
from dreamer_fast.agent.nets import MLP, Linear, compute_dtype


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
    def sample(self, feat: torch.Tensor, noise: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """A sample of forward(feat) without gradient (the imagination rollout), with the
        given noise (N, A) standard normal (continuous) or (N, 1) uniform (discrete); returns
        (action, the RSSM's input for it in feat's matmul dtype: rssm.RSSM.action_input).

        Continuous: the two output layers as one matmul (inside a deferral scope) and the
        bounded normal's sample and scaling in one op (`ops.action_sample`). Discrete: the
        latent sampler's one-launch inverse-CDF op: the same unimix categorical, as a one-hot
        in the logits' dtype."""
        return self.sample_hidden(self.mlp(feat), noise)

    @torch.no_grad()
    def sample_hidden(self, x: torch.Tensor, noise: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """sample() from the MLP's output x."""
        dtype = compute_dtype(x)
        if self.discrete:
            action = self.ops.latent_sample(self.mean(x)[..., None, :], self.unimix,
                                            noise)[..., 0, :]
            return action, action.to(dtype)
        mean, std = self._mean_std(x)
        return self.ops.action_sample(mean, std, noise, self.minstd, self.maxstd, dtype)

    def _mean_std(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The continuous policy's two output layers; inside a deferral scope one matmul of the
        weights concatenated once per scope (the same dot products)."""
        scope = deferred.current()
        if scope is None:
            return self.mean(x), self.std(x)
        dtype, size = compute_dtype(x), self.mean.out_features

        def joined(name):
            return scope.cached((self, name, dtype), lambda: torch.cat(
                [getattr(self.mean, name), getattr(self.std, name)]).detach().to(dtype))
        y = torch.nn.functional.linear(x.to(dtype), joined("weight"), joined("bias"))
        return y[..., :size], y[..., size:]
