"""What a run will cost here, estimated at start before anything has trained: its time
(`run_seconds`) and its host memory beside the replay (`update_memory`).

The update's work is counted from the built agent: multiply-adds of one observe step (the
encoder and decoder, convolutions at their real output sizes, the RSSM step, the reward and
continue heads) for each of the B x T trained positions, and of one imagined step (the RSSM
image step, actor, critic and slow critic) for each of the B x T x (H + 1) imagined states;
x 2 flops per multiply-add, x 3 for the backward pass. The device's speed is a short matmul
measurement. Small models are bound by per-op latency instead: a floor of one latency per
sequential step (T observe steps, H imagination steps, forward and backward).

This is a rough figure: on the 2-core CPU (python bench/learner.py, one thread) size300k at
B16 x T16 measured 0.27 s per update and is estimated at 0.22 s; size1m on Pong (B16 x T64)
measured about 13 s and is estimated at 8 s. The progress line's held rate replaces it once
updates run.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from dreamer_fast.config import Config

EFFICIENCY = 0.3
"""Fraction of the matmul rate an update reaches (small, varied shapes; norms; scans)."""
OP_LATENCY_S = {"cpu": 0.0003, "cuda": 0.0002}
"""Seconds per sequential step that do not shrink with size (op launches, Python)."""


def _macs(modules: list[nn.Module], inputs: dict | None = None, run=None) -> int:
    """Multiply-adds of one step through `modules`: Linear by weight size; convolutions by
    output size when `run` calls them on an example (hooks count every call)."""
    total = 0

    def hook(mod, args, out):
        nonlocal total
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            k = mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else \
                mod.weight.shape[1] * mod.weight[0, 0].numel()
            total += out.numel() * k // max(1, mod.groups)

    if run is not None:
        handles = [m.register_forward_hook(hook) for mod in modules for m in mod.modules()
                   if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        try:
            with torch.no_grad():
                run()
        except Exception:  # an example the module does not take: count weights only
            pass
        finally:
            for h in handles:
                h.remove()
    convs = {id(m) for mod in modules for m in mod.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))}
    for mod in modules:
        for m in mod.modules():
            if id(m) in convs or any(True for _ in m.children()):
                continue
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


def update_flops(agent) -> float:
    """Estimated flops of one update (module docstring)."""
    cfg, net = agent.cfg, agent.net
    B, T, H = cfg.batch_size, cfg.batch_length, cfg.imag_horizon
    dev = next(agent.parameters()).device
    example = {k: torch.zeros((1, 1, *shape), dtype=torch.from_numpy(np.zeros((), dtype)).dtype,
                              device=dev) for k, (shape, dtype) in agent.obs_space.items()}
    deter = torch.zeros((1, 1, net.deter), device=dev)
    stoch = torch.zeros((1, 1, net.stoch, net.classes), device=dev)
    observe = (_macs([agent.enc], run=lambda: agent.enc(example))
               + _macs([agent.dec], run=lambda: agent.dec(deter, stoch))
               + _macs([agent.dyn, agent.rew, agent.con]))
    imagine = _macs([agent.dyn, agent.pol, agent.val, agent.slowval])
    return 2 * 3 * (B * T * observe + B * T * (H + 1) * imagine)


def matmul_flops(device: torch.device, seconds: float = 0.2) -> float:
    """Measured float32 matmul flops/s of this device (one thread's share on CPU is what the
    learner gets: the caller has set torch's threads)."""
    n = 512 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    (a @ b).sum().item()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        c = a @ b
        count += 1
    c.sum().item()
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def update_seconds(agent, device: torch.device) -> float:
    cfg = agent.cfg
    compute = update_flops(agent) / (EFFICIENCY * matmul_flops(device))
    steps = 2 * (cfg.batch_length + cfg.imag_horizon) * 8  # ~8 sequential ops per step, fwd+bwd
    latency = steps * OP_LATENCY_S.get(device.type, OP_LATENCY_S["cuda"])
    return max(compute, latency)


def run_seconds(cfg, agent, device: torch.device, steps_done: int = 0) -> tuple[float, float]:
    """(estimated seconds per update, estimated seconds for the rest of the run)."""
    per_update = update_seconds(agent, device)
    updates = (cfg.steps - steps_done) * cfg.updates_per_step
    return per_update, per_update * updates


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
