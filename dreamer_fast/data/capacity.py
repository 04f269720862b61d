"""What one replayed step holds (`replay_spec`) and how many steps the replay gets
(`replay_capacity`: the official 5M, or what fits in the RAM the run leaves free, within the
run's needs), with the machine's free memory (`mem_available`)."""

from __future__ import annotations

import numpy as np
import torch

from dreamer_fast.checks import ConfigError


def replay_spec(env, net) -> dict:
    """What the ring stores per step: observations, action, reward, flags, latent."""
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
"""The official replay size in steps; the automatic capacity never exceeds it."""


def replay_capacity(spec: dict, requested: int, saved: int | None = None,
                    fraction: float = 0.75, reserve: int = 0, steps: int | None = None,
                    minimum: int = 0, ceiling: int | None = None, copies: int = 1) -> int:
    """The replay capacity in steps, printed with its memory (of `copies` replays of that
    capacity: one per packed seed).

    requested 0 (the default) means the official 5e6 steps, or as many as fit in `fraction`
    of the RAM left free after `reserve` bytes (the model's training memory, estimated by
    the caller), and never more than `steps` (the run's step budget) or `ceiling` (what the
    caller's device can use: a CPU run's steps), at least `minimum`. A resumed run keeps its
    saved capacity and only warns when it and the training memory exceed the available RAM.
    An explicit capacity that does not fit fails at once naming a value that does.
    """
    per_step = copies * sum(int(np.prod(shape, dtype=np.int64))
                            * torch.empty((), dtype=dtype).element_size()
                            for shape, dtype in spec.values())
    avail = mem_available()
    room = max(0.0, fraction * (avail - reserve))
    fits = int(room / per_step) // 1000 * 1000 if avail else SPEC_CAPACITY
    if requested:  # on a resume a different one is refused by the config check
        capacity = requested
    elif saved:
        capacity = saved
    else:
        capacity = min(SPEC_CAPACITY, fits, ceiling or SPEC_CAPACITY)
        if steps is not None:
            capacity = min(capacity, steps)
        capacity = max(capacity, minimum)
    need = per_step * capacity
    each = f" per seed x {copies} seeds" if copies > 1 else ""
    print(f"replay: {capacity:,} steps{each} x {per_step // copies:,} bytes = "
          f"{need / 2**30:.2f} GiB "
          f"(MemAvailable {avail / 2**30:.1f} GiB, {reserve / 2**30:.1f} GiB of it kept for "
          "training)", flush=True)
    if not requested and not saved and capacity < min(SPEC_CAPACITY, steps or SPEC_CAPACITY):
        why = (f"at most {ceiling:,} on this device" if ceiling and capacity == ceiling else
               f"the official {SPEC_CAPACITY:,} steps would need "
               f"{per_step * SPEC_CAPACITY / 2**30:.1f} GiB; using {capacity:,} that fit")
        print(f"replay: {why} (set --replay.capacity to choose)", flush=True)
    if saved and saved == capacity:  # a resume keeps its capacity: at most a warning
        if avail and need + reserve > avail:
            print(f"warning: the saved replay of {capacity:,} steps needs {need / 2**30:.1f} GiB "
                  f"and training {reserve / 2**30:.1f} GiB more, {(need + reserve) / 2**30:.1f} "
                  f"GiB of the {avail / 2**30:.1f} GiB available: memory may run out; free "
                  "some RAM if it does", flush=True)
    elif avail and need > room:
        if requested or fits < minimum:
            raise ConfigError(f"replay of {capacity:,} steps needs {need / 2**30:.1f} GiB but "
                              f"only {room / 2**30:.1f} GiB is free for it ({avail / 2**30:.1f} "
                              f"GiB available, {reserve / 2**30:.1f} GiB kept for training); "
                              f"use --replay.capacity {max(fits, 1000)} (or less) or a smaller "
                              "--model")
    return capacity
