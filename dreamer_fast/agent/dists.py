"""Distributions and transforms: symlog/symexp, the actor's action distributions."""

from __future__ import annotations

import math

import torch


def one_hot(index: torch.Tensor, classes: int, dtype=torch.float32) -> torch.Tensor:
    """F.one_hot without its host sync: on CPU F.one_hot reads index.min()/max() back to
    validate them (.item()), which a graph-captured or sync-free step must not do."""
    return (index[..., None] == torch.arange(classes, device=index.device)).to(dtype)


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * ln(1 + |x|)."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * (exp(|x|) - 1), the inverse of symlog."""
    return torch.sign(x) * torch.expm1(x.abs())


class OneHotCategorical:
    """Categorical over the last axis with a uniform mixture; actions are one-hot vectors."""

    def __init__(self, logits: torch.Tensor, unimix: float = 0.0):
        probs = torch.softmax(logits.float(), -1)
        if unimix > 0:
            probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
        self.probs = probs
        self.logprobs = torch.log(probs)

    def sample(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A one-hot sample (no gradient). noise: (*lead, 1) uniform draws to sample with by
        inverse CDF, the first class whose cumulative probability exceeds it (the rollout's
        pre-drawn noise, as the latent sampler takes it); default an exponential race."""
        if noise is not None:
            probs = self.probs.detach()
            index = (probs.cumsum(-1) <= noise).sum(-1).clamp(max=probs.shape[-1] - 1)
            return one_hot(index, probs.shape[-1])
        # argmax(p / E), E ~ Exp(1), is a sample from p (exponential race). Unlike
        # torch.multinomial it has no device-side validity check and is graph-capturable.
        probs = self.probs.detach()
        index = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
        return one_hot(index, self.probs.shape[-1])

    def mode(self) -> torch.Tensor:
        return one_hot(self.probs.argmax(-1), self.probs.shape[-1])

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        return (action * self.logprobs).sum(-1)

    def entropy(self) -> torch.Tensor:
        return -(self.probs * self.logprobs).sum(-1)


class BoundedNormal:
    """Independent normal per action dim: mean tanh(m), std in (minstd, maxstd).

    Samples are not squashed; log-prob and entropy are summed over action dims.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, minstd: float, maxstd: float):
        self.mean = torch.tanh(mean.float())
        self.std = (maxstd - minstd) * torch.sigmoid(std.float() + 2.0) + minstd

    def sample(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise (noise: standard normal draws, default drawn here)."""
        noise = torch.randn_like(self.mean) if noise is None else noise
        return (self.mean + self.std * noise).detach()

    def mode(self) -> torch.Tensor:
        return self.mean

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        z = (action - self.mean) / self.std
        return (-0.5 * z.square() - torch.log(self.std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> torch.Tensor:
        return (0.5 + 0.5 * math.log(2 * math.pi) + torch.log(self.std)).sum(-1)
