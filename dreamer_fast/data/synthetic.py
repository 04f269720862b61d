"""Synthetic spaces and replay batches: the learner input contract, for tests and benches."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dreamer_fast.envs.base import ActSpace

__all__ = ["ActSpace", "IMAGE", "VECTOR", "make_batch"]


IMAGE = {"image": ((3, 64, 64), np.uint8)}
VECTOR = {"vector": ((7,), np.float32)}


def make_batch(obs_space: dict, act: ActSpace, net, B: int = 2, L: int = 9,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Random (B, L) windows with every key the learner stores, valid ranges only."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for key, (shape, dtype) in obs_space.items():
        if np.dtype(dtype) == np.uint8 and len(shape) == 2:  # categorical one-hots (G, K)
            index = torch.randint(0, shape[1], (B, L, shape[0]), generator=g)
            batch[key] = F.one_hot(index, shape[1]).to(torch.uint8)
        elif np.dtype(dtype) == np.uint8:
            batch[key] = torch.randint(0, 256, (B, L, *shape), dtype=torch.uint8, generator=g)
        else:
            batch[key] = torch.randn(B, L, *shape, generator=g)
    if act.discrete:
        index = torch.randint(0, act.size, (B, L), generator=g)
        batch["action"] = F.one_hot(index, act.size).float()
    else:
        batch["action"] = torch.randn(B, L, act.size, generator=g)
    batch["reward"] = torch.randn(B, L, generator=g)
    batch["is_first"] = torch.rand(B, L, generator=g) < 0.1
    batch["is_last"] = torch.rand(B, L, generator=g) < 0.1
    batch["is_terminal"] = batch["is_last"] & (torch.rand(B, L, generator=g) < 0.5)
    batch["deter"] = torch.randn(B, L, net.deter, generator=g).bfloat16()
    batch["stoch"] = torch.randint(0, net.classes, (B, L, net.stoch), generator=g,
                                   dtype=torch.int16)
    return batch
