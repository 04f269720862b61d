"""Data parallel over torch.distributed: one process per device under torchrun.

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

# The collectives of the learning math live with the agent (it imports nothing of the run);
# re-exported so the system has one module to call.
from dreamer_fast.agent.parallel import (GradReducer, all_gather, broadcast_,  # noqa: F401
                                         is_initialized, world_size)


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


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE): they share its RAM and cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def is_main() -> bool:
    """Rank 0: the one process that logs, reports and writes the shared checkpoint files."""
    return rank() == 0


def device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


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


