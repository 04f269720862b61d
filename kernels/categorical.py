"""Categorical latent ops (SPEC 1.3, 2.1): unimix, straight-through sampling, KL free bits.

Each public op has a `<name>_ref` with the identical signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unimix_logprobs(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """log((1 - unimix) * softmax(logits) + unimix / K) over the last axis, in float32."""
    probs = torch.softmax(logits.float(), -1)
    if unimix > 0:
        probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return torch.log(probs)


def latent_sample_ref(logits: torch.Tensor, unimix: float, noise: torch.Tensor) -> torch.Tensor:
    """Straight-through one-hot sample of unimix categoricals by inverse CDF.

    logits: (..., S, K); noise: (..., S) uniform in [0, 1) (from torch.rand, which a CUDA graph
    redraws on every replay). The class is the first k with cumsum(probs)_k > noise. Returns
    (..., S, K) float32 equal to the one-hot sample in value, with the gradient of the unimix
    probabilities (z = onehot + probs - sg(probs)).
    """
    probs = unimix_logprobs(logits, unimix).exp()
    cdf = probs.detach().cumsum(-1)
    index = (cdf <= noise[..., None].float()).sum(-1).clamp(max=logits.shape[-1] - 1)
    onehot = F.one_hot(index, logits.shape[-1]).float()
    return onehot + (probs - probs.detach())


def kl_free_ref(post: torch.Tensor, prior: torch.Tensor, unimix: float,
                free: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The dyn and rep losses: max(free, sum_groups KL(q || p)) of unimix categoricals.

    post, prior: (..., S, K) logits. Returns (dyn, rep), each (...) float32 with equal values;
    dyn's gradient reaches only `prior` (posterior stopped), rep's only `post` (prior stopped).
    """
    def kl(q_logits, p_logits):
        q = unimix_logprobs(q_logits, unimix)
        p = unimix_logprobs(p_logits, unimix)
        return (q.exp() * (q - p)).sum((-2, -1))

    dyn = kl(post.detach(), prior).clamp(min=free)
    rep = kl(post, prior.detach()).clamp(min=free)
    return dyn, rep
