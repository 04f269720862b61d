"""Symexp twohot heads (SPEC 1.5): the loss against raw targets and the symmetric expectation.

Bins are symexp(linspace(-20, 20, K)) built from the negative half and its mirror, so they are
exactly symmetric with a bin at 0. Targets are interpolated in raw space; beyond the ends all
mass goes to the end bin. Each public op has a `<name>_ref` with the identical signature.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _bins_cpu(num_bins: int) -> torch.Tensor:
    half = torch.linspace(-20.0, 0.0, (num_bins + 1) // 2, dtype=torch.float64)
    half = torch.sign(half) * torch.expm1(half.abs())
    return torch.cat([half, -half[:-1].flip(0)]).float()


_BINS: dict[tuple[int, torch.device], torch.Tensor] = {}


def symexp_bins(num_bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The K bin locations (float32), cached per device."""
    key = (num_bins, torch.device(device))
    if key not in _BINS:
        _BINS[key] = _bins_cpu(num_bins).to(device)
    return _BINS[key]


def twohot_loss_ref(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a symexp-twohot head against raw targets.

    logits: (..., K) float32/bfloat16; target: (...) raw value (no symlog). Returns (...) float32
    loss = -sum_i w_i * log_softmax(logits)_i with the two-hot weights w of the target.
    """
    K = logits.shape[-1]
    bins = symexp_bins(K, logits.device)
    target = target.float()
    below = (bins <= target[..., None]).sum(-1) - 1
    above = K - (bins > target[..., None]).sum(-1)
    below, above = below.clamp(0, K - 1), above.clamp(0, K - 1)
    equal = below == above
    dist_below = torch.where(equal, 1.0, (bins[below] - target).abs())
    dist_above = torch.where(equal, 1.0, (bins[above] - target).abs())
    total = dist_below + dist_above
    logp = torch.log_softmax(logits.float(), -1)
    lp_below = logp.gather(-1, below[..., None])[..., 0]
    lp_above = logp.gather(-1, above[..., None])[..., 0]
    return -(dist_above / total * lp_below + dist_below / total * lp_above)


def twohot_mean_ref(logits: torch.Tensor) -> torch.Tensor:
    """Expected raw value sum_i softmax(logits)_i * bins_i, summed symmetrically.

    The negative half is paired with the positive half before summing and the middle bin is
    added separately, so uniform probabilities (a zero-initialised head) give exactly 0.
    logits: (..., K). Returns (...) float32.
    """
    K = logits.shape[-1]
    m = (K - 1) // 2
    bins = symexp_bins(K, logits.device)
    probs = torch.softmax(logits.float(), -1)
    pairs = (probs[..., :m] * bins[:m]).flip(-1) + probs[..., m + 1:] * bins[m + 1:]
    return probs[..., m] * bins[m] + pairs.sum(-1)
