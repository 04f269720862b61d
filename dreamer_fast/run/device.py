"""The machine a process trains on: CPU threads, the memory allocator, a CPU-size warning."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from dreamer_fast.config import LARGE_DETER, Config
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


def update_memory(cfg: Config, spec: dict) -> int:
    """Estimated bytes of host memory the run needs beside its replay: on a CPU device the
    learner's update (activations kept for the backward pass, parameters, gradients and the
    optimizer's two moments) plus the policy and the process itself; with a GPU the update
    lives in GPU memory and only the process and pinned staging batches count.

    Activations are counted per trained position (B x T of them) as floats: the observe
    step, every imagined step (H + 1 states: the GRU block step, its norms and gates, the
    prior, actor, critic and slow critic MLPs) and, for image keys, the encoder and decoder
    feature maps (stages of 2d, 3d, 4d, 4d channels at 1/2 .. 1/16 of the image side),
    times 2 for what autograd keeps beside them. Calibrated on Pong (size1m, 64 envs, B16 x
    T64): the estimate is 3.2 GB, the measured peak RSS beyond the replay ~4 GB (2-core CPU).
    """
    net, agent = cfg.net, cfg.agent
    B, T, H = agent.batch_size, agent.batch_length, agent.imag_horizon
    latent = net.stoch * net.classes
    mlps = net.actor_layers + 2 * net.critic_layers + net.prior_layers + net.rew_layers + \
        net.con_layers
    state = 12 * net.deter + 6 * net.hidden + 4 * latent + 4 * mlps * net.units
    image = 0
    for key, (shape, _) in spec.items():
        if len(shape) == 3:
            side, d = shape[-1], net.depth
            image += sum(6 * (side // 2 ** (i + 1)) ** 2 * c
                         for i, c in enumerate((2 * d, 3 * d, 4 * d, 4 * d)))
            image *= 2  # encoder and decoder
            image += 4 * int(np.prod(shape))  # the reconstruction and its loss
    floats = B * T * ((H + 2) * state + image) * 2
    base = 1 << 30  # the interpreter, torch, the envs' buffers
    if torch.device(cfg.device).type != "cpu":
        staging = 2 * B * (T + 1) * sum(int(np.prod(s)) * 4 for s, _ in spec.values())
        return base + staging
    params = (net.deter ** 2 // net.blocks * 3 + 40 * net.units ** 2 + latent * net.deter * 4)
    return base + 4 * floats + 4 * 5 * params
