"""The agent's side of data parallelism: plain torch.distributed.

What the learning math itself needs when it runs as one replica of several: one flat gradient
buffer averaged by a single all-reduce, the return batch all-gathered for the percentiles, and
the start-up broadcast of rank 0's state. Every helper is the identity without a process group
(world size 1). Joining the group, ranks and the run loop's control messages belong to the
system: dreamer_fast/run/distributed.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


@torch.no_grad()
def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite tensors in place with rank src's values (start-up only: one call per tensor)."""
    if world_size() == 1:
        return
    for t in tensors:
        if t.dtype == torch.bool:  # gloo has no bool reduction type; round-trip through uint8
            tmp = t.to(torch.uint8)
            dist.broadcast(tmp, src)
            t.copy_(tmp.bool())
        else:
            dist.broadcast(t, src)


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0 in rank order (N, ...) -> (world * N, ...).

    Identity at world size 1. Not differentiable (used on stopped returns only).
    """
    world = world_size()
    if world == 1:
        return x
    x = x.detach().contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x)
    return out


# torch 2.13 renamed all_gather_into_tensor (deprecated there); same collective on older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class GradReducer:
    """One contiguous gradient buffer whose views are the parameters' .grad tensors.

    Backward accumulates straight into the buffer (autograd adds in place into an existing
    .grad), so averaging every gradient is one collective on one tensor with no copies.
    Zero it with `zero_()`, never by setting .grad to None, or the views are lost.
    """

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        assert len(dtypes) == 1 and len(devices) == 1, (
            f"one flat buffer needs one dtype and device, got {dtypes} on {devices}")
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=dtypes.pop(),
                                  device=devices.pop())
        offset = 0
        for p in self.params:
            p.grad = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def zero_(self) -> None:
        """Zero every gradient (one fill of the buffer); the .grad views stay attached."""
        self.buffer.zero_()

    def all_reduce(self) -> None:
        """Average the gradients over all ranks: exactly one all-reduce, no host sync."""
        world = world_size()
        if world == 1:
            return
        if dist.get_backend() == "nccl":
            dist.all_reduce(self.buffer, op=dist.ReduceOp.AVG)
        else:  # gloo has no AVG
            dist.all_reduce(self.buffer, op=dist.ReduceOp.SUM)
            self.buffer.div_(world)

    def attached(self) -> bool:
        """Whether every .grad is still a view into the buffer (a cheap host-side check)."""
        start, end = self.buffer.data_ptr(), self.buffer.data_ptr() + self.buffer.nbytes
        return all(p.grad is not None and start <= p.grad.data_ptr() < end for p in self.params)
