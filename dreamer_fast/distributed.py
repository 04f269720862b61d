"""Data parallel over torch.distributed: one process per device under torchrun (DESIGN 3.10).

Every rank is a full actor-learner with its own envs and replay; only gradients (one
all-reduce of a flat buffer per update) and the return percentiles (one all-gather) cross
ranks. Nothing here syncs the host, so both collectives can sit inside a CUDA graph on NCCL.
Every helper also works without an initialised process group (world size 1, rank 0).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


_control = None  # the gloo group of the run loop's control messages (control_all_gather)


def init(backend: str | None = None, timeout_s: float = 600.0) -> bool:
    """Join the process group named by torchrun's env vars; False (no-op) when WORLD_SIZE <= 1.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Backend: nccl when CUDA is
    available (and binds this process to cuda:LOCAL_RANK first), else gloo. Collectives that
    wait longer than timeout_s raise instead of hanging.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return is_initialized()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    global _control
    _control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def destroy() -> None:
    """Leave the process group (no-op when not initialised)."""
    global _control
    if is_initialized():
        dist.destroy_process_group()
    _control = None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that logs, reports and writes the shared checkpoint files."""
    return rank() == 0


def device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


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


def control_all_gather(x: torch.Tensor) -> torch.Tensor:
    """A small CPU tensor (K,) from every rank -> (world, K) in rank order, on its own group.

    For the run loop's main thread (stop/save/log flags, counters). The learner threads issue
    the gradient all-reduce on the default group at any moment, and one group's collectives
    must be issued in the same order on every rank, which two threads sharing it cannot
    promise. A second gloo group has its own connections and sequence numbers, so control
    messages never interleave with the learner's collectives (gloo even when training on NCCL).
    """
    if world_size() == 1:
        return x[None]
    x = x.detach().cpu().contiguous()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x, group=_control)
    return torch.stack(out)


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
