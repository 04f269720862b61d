"""Machine resources of a run: device, CPU threads, free RAM and the replay size it allows."""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time

import numpy as np
import torch

from dreamer_fast import distributed as D
from dreamer_fast.config import Config, ConfigError


LARGE_ON_CPU = 2048
"""deter size (size12m and up) from which CPU training is too slow to be useful."""


def resolve(cfg: Config) -> Config:
    """Fill run-time defaults into a new Config: timestamped logdir, concrete device."""
    now = time.time()
    if cfg.logdir is None and D.world_size() > 1:  # one folder: rank 0's clock names it
        now = float(D.control_all_gather(torch.tensor([now], dtype=torch.float64))[0, 0])
    stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(now))
    logdir = cfg.logdir or os.path.join(
        "logdir", f"{cfg.env.replace(':', '_').replace('/', '_')}-{stamp}")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return dataclasses.replace(cfg, logdir=logdir, device=device)


def replay_spec(env, net) -> dict:
    """What the ring stores per step: observations, action, reward, flags, latent (SPEC 5.3)."""
    spec = {k: (shape, torch.from_numpy(np.zeros((), dtype)).dtype)
            for k, (shape, dtype) in env.obs_space.items()}
    spec.update(action=((env.act_space.size,), torch.float32), reward=((), torch.float32),
                is_first=((), torch.bool), is_last=((), torch.bool), is_terminal=((), torch.bool),
                deter=((net.deter,), torch.bfloat16), stoch=((net.stoch,), torch.int16))
    return spec


def mem_available() -> int:
    """Bytes of MemAvailable from /proc/meminfo (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


SPEC_CAPACITY = 5_000_000
"""The official replay size in steps (SPEC 5.2); the automatic capacity never exceeds it."""


def replay_capacity(spec: dict, requested: int, saved: int | None = None,
                    fraction: float = 0.75) -> int:
    """The replay capacity in steps, printed with its memory.

    requested 0 (the default) means SPEC's 5e6 steps, or as many as fit in `fraction` of the
    free RAM (the rest is for the model, the envs and the page cache; on CPU the update's
    activations live in RAM too, so pass less); a resumed run keeps its saved capacity. An
    explicit capacity that does not fit fails at once naming a value that does.
    """
    per_step = sum(int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
                   for shape, dtype in spec.values())
    avail = mem_available()
    fits = int(fraction * avail / per_step) // 1000 * 1000 if avail else SPEC_CAPACITY
    capacity = requested or saved or min(SPEC_CAPACITY, fits)
    need = per_step * capacity
    print(f"replay: {capacity:,} steps x {per_step:,} bytes = {need / 2**30:.2f} GiB "
          f"(MemAvailable {avail / 2**30:.1f} GiB)", flush=True)
    if not requested and not saved and capacity < SPEC_CAPACITY:
        print(f"replay: SPEC's {SPEC_CAPACITY:,} steps would need "
              f"{per_step * SPEC_CAPACITY / 2**30:.1f} GiB; using {capacity:,} that fit "
              "(set --replay.capacity to choose)", flush=True)
    if avail and need > fraction * avail:
        raise ConfigError(f"replay of {capacity:,} steps needs {need / 2**30:.1f} GiB but only "
                          f"{avail / 2**30:.1f} GiB is available; use --replay.capacity {fits} "
                          f"(or less)")
    return capacity


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE): they share its RAM and cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", D.world_size()))


def set_cpu_threads(device: torch.device) -> None:
    """On CPU give the actor and the learner half the cores each: both run parallel ops at
    once, and oversubscribed OpenMP teams thrash (a debug-size update took 3.2 s with 2
    threads per team vs 0.26 s with 1 on a busy 2-core VM). Split again between the
    processes of this machine."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (2 * local_world_size())))
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
    if torch.device(cfg.device).type == "cpu" and cfg.net.deter >= LARGE_ON_CPU:
        print(f"warning: training model {cfg.model} (deter {cfg.net.deter}) on the CPU will be "
              "very slow; use a smaller one, e.g. --model size1m (or --model debug)", flush=True)
