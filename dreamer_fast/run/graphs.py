"""CUDA graphs for the learner update and the actor's policy step.

    GraphedTrainStep(agent, example)   agent.train_step as ONE graph: observe scan, imagination
                                       scan, every loss, the backward, the gradient all-reduce,
                                       AGC+LaProp, the slow-critic EMA and the latent outputs
    GraphedPolicy(weights, carry, ...) policy_core for the fixed env batch, one graph per copy
                                       of the double-buffered policy weights

Both follow the same recipe: static input buffers; warm-up iterations on a side stream (they
also finish Triton's first compilations and any lazy allocation) with the model state saved
before and restored after, so warming up trains nothing; capture; then each call copies the new
inputs into the static buffers and replays. Outputs are static too: a caller must consume them
(or copy them, on the same stream) before the next call, as the learner and actor do.

What makes the captured update correct on every replay (checked on CPU by tests/test_graphs.py,
because only a GPU can capture): everything that changes between updates is a device tensor
(the lr warm-up, the step count, the return-normaliser EMA, the non-finite flags), no host sync
happens inside (no .item(), no tensor-valued `if`), and the sampling noise comes from
torch.rand / exponential_, whose Philox offsets a graph advances on each replay.
Capture happens before the actor thread starts, so no uncaptured CUDA work runs
in the process meanwhile.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from dreamer_fast.checks import ConfigError

WARMUP = 3


def state_tensors(module: torch.nn.Module, opt=None) -> list[torch.Tensor]:
    """Every tensor an update mutates in place: parameters, buffers, optimizer state."""
    out = [*module.parameters(), *module.buffers()]
    if opt is not None:
        out += [opt.count, opt.lr, *opt.nu, *opt.mu]
    return out


class Snapshot:
    """Copies of tensors, restorable in place (their addresses, which a graph holds, stay)."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        with torch.no_grad():
            self.saved = [t.detach().clone() for t in tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for t, s in zip(self.tensors, self.saved):
                t.copy_(s)
        self.saved = []


def warm_up(fn: Callable, args: tuple, state: list[torch.Tensor], iters: int = WARMUP):
    """Run fn(*args) `iters` times (on a side stream on CUDA), then restore `state`.

    Warm-up makes autotuning, lazy allocations and first-call work happen outside the capture,
    and leaves the model exactly as it was: the warm-up updates are undone.
    """
    snap = Snapshot(state)
    cuda = any(t.is_cuda for t in state)
    stream = torch.cuda.Stream() if cuda else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for _ in range(iters):
            out = fn(*args)
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
    snap.restore()
    return out


def _copy_into(static: dict[str, torch.Tensor], values: dict) -> None:
    for k, dst in static.items():
        src = values[k]
        if not isinstance(src, torch.Tensor):
            src = torch.as_tensor(src)
        if src.shape != dst.shape:
            raise ValueError(f"graphed input {k!r} has shape {tuple(src.shape)}; the graph was "
                             f"captured for {tuple(dst.shape)}")
        dst.copy_(src, non_blocking=True)


def update_fn(agent) -> Callable:
    """The callable GraphedTrainStep captures: batch -> (metrics, latents). The capture-safety
    tests run exactly this (tests/test_graphs.py)."""
    return agent.train_step


def policy_inputs(obs_spec: dict, n: int, device) -> dict[str, torch.Tensor]:
    """GraphedPolicy's static inputs for n envs: the observation keys (obs_spec: {key:
    (shape, torch dtype)}), env_id (int64), is_first and is_last (bool)."""
    static = {k: torch.zeros((n, *shape), dtype=dtype, device=device)
              for k, (shape, dtype) in obs_spec.items()}
    static["env_id"] = torch.arange(n, dtype=torch.int64, device=device)
    static["is_first"] = torch.ones(n, dtype=torch.bool, device=device)
    static["is_last"] = torch.zeros(n, dtype=torch.bool, device=device)
    return static


def policy_fn(policy, carry: dict, static: dict, keys: list, greedy: bool) -> Callable:
    """The callable GraphedPolicy captures for one policy copy: () -> (action, latent), reading
    the static inputs and updating the carries in place. The capture-safety tests run it."""
    from dreamer_fast.run.actor import policy_core

    return lambda: policy_core(policy, carry, static, keys, greedy)


class GraphedTrainStep:
    """agent.train_step captured as one CUDA graph over static batch buffers.

    example: a batch of the shapes and dtypes every later batch has (its values only feed the
    warm-up, whose effects are undone). Call with a batch (host or device) -> (metrics,
    latents), static device tensors overwritten by the next call.
    """

    def __init__(self, agent, example: dict[str, torch.Tensor], warmup: int = WARMUP):
        if agent.device.type != "cuda":
            raise ConfigError("CUDA graphs need a CUDA device; use graphs='off' on "
                              f"{agent.device.type}")
        self.agent = agent
        agent.autocast_cache = False  # cached casts would be freed/stale across replays
        self.static = {k: v.to(agent.device).clone() for k, v in example.items()}
        fn = update_fn(agent)
        warm_up(fn, (self.static,), state_tensors(agent, agent.opt), warmup)
        agent.zero_grad()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: library threads (NCCL's watchdog polls its events) may touch CUDA
        # meanwhile; our own threads have not started.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = fn(self.static)
        self.replays = 0

    def __call__(self, batch: dict[str, torch.Tensor]):
        _copy_into(self.static, batch)
        self.graph.replay()
        self.replays += 1
        return self.outputs


class GraphedPolicy:
    """The actor's policy step (`actor.policy_core`) for a fixed batch of n envs, one graph
    per copy of the double-buffered policy weights (each graph reads its copy's parameters).

    carry: the actor's per-env carries {k: (num_envs, ...)} (updated in place by the graph).
    obs_spec: {key: (shape, torch dtype)} of the observation keys (as in the ring's spec). Call
    with (copy index, obs dict of numpy arrays incl. env_id, is_first, is_last) -> (action,
    latent), static tensors.
    """

    def __init__(self, copies: list, carry: dict[str, torch.Tensor], obs_spec: dict, n: int,
                 greedy: bool = False, warmup: int = WARMUP):
        device = copies[0].device
        if device.type != "cuda":
            raise ConfigError("CUDA graphs need a CUDA device; use graphs='off' on "
                              f"{device.type}")
        self.n = n
        self.static = policy_inputs(obs_spec, n, device)
        keys = list(obs_spec)
        self.graphs, self.outputs = [], []
        for policy in copies:
            policy.autocast_cache = False
            fn = policy_fn(policy, carry, self.static, keys, greedy)
            warm_up(fn, (), [*carry.values()], warmup)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.outputs.append(fn())
            self.graphs.append(graph)
        self.replays = 0

    def __call__(self, index: int, obs: dict):
        _copy_into(self.static, obs)
        self.graphs[index].replay()
        self.replays += 1
        return self.outputs[index]


def compile_steps(agent, policies: list) -> None:
    """torch.compile the loss (AOTAutograd traces its backward too) and each policy copy's
    step; the optimizer stays eager (its foreach ops are already few kernels). Compilation
    happens on the first calls (the graph warm-up, when graphs are on)."""
    agent.defer = False  # its stash in backward is a Python side effect compile cannot trace
    agent.loss = torch.compile(agent.loss)
    for policy in policies:
        policy.policy_step = torch.compile(policy.policy_step)
