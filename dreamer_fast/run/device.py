"""The machine a process trains on: CPU threads, the memory allocator, a CPU-size warning."""

from __future__ import annotations

import ctypes
import os

import torch

from dreamer_fast.config import Config
from dreamer_fast.machine import LARGE_DETER
from dreamer_fast.run import distributed as D


def set_cpu_threads(device: torch.device) -> None:
    """On CPU give the actor and the learner half the cores each: both run parallel ops at
    once, and oversubscribed OpenMP teams thrash (a debug-size update took 3.2 s with 2
    threads per team vs 0.26 s with 1 on a busy 2-core VM). Split again between the
    processes of this machine."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (2 * D.local_world_size())))
        keep_freed_memory()


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed blocks for reuse instead of handing them back to the OS.

    By default every tensor over ~32 MB is a fresh mmap and is unmapped on free, so each of
    the learner's big activations pays a page fault per 4 KB on first touch: at paper-S a CPU
    update took 200-680K faults and 1-3 s of system time (measured with getrusage). Raising
    the mmap and trim thresholds keeps that memory in the heap. CPU only (CUDA memory has its
    own caching allocator); a no-op where there is no glibc. Returns whether it applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 1 << 40))
    except (OSError, AttributeError):
        return False


def warn_large_on_cpu(cfg: Config) -> None:
    if torch.device(cfg.device).type == "cpu" and cfg.net.deter >= LARGE_DETER:
        print(f"warning: training model {cfg.model} (deter {cfg.net.deter}) on the CPU will be "
              "very slow; use a smaller one, e.g. --model size1m (or --model debug)", flush=True)
