"""Kernels per learner update, per mode: what a CUDA graph of the update would replay.

    python bench/kernel_count.py                                   # size1m-vec, size12m-img
    python bench/kernel_count.py --workloads size1m-vec --modes ref triton --top 15

At DreamerV3's small and mid sizes a graphed update is bound by its number of kernels (each
costs the GPU a few microseconds however small), not by FLOPs, so this is the number to cut.
One `train_step` at B16 x T64, H15 (after one warm-up update, so lazily built state exists),
counted on the CPU, under bfloat16 autocast by default (`--precision`: what a GPU runs, so the
dtype casts it launches count too):

  * eager modes (`ref`, `fused`, `triton`): every aten op dispatched during the update
    (forward, backward, optimizer), through a TorchDispatchMode, except ops that launch no
    kernel on a GPU: views and other aliasing ops (`OpOverload.is_view`, plus detach, alias,
    as_strided, the `_unsafe_view` family), shape/metadata queries and bare allocations
    (empty, empty_like, empty_strided). A Triton op (`dreamer_fast::*`, a custom op here)
    counts once per call, its backward op too (each launches one kernel; a few launch two,
    not counted). `triton` runs the kernels in the interpreter (TRITON_INTERPRET=1): the
    count, not the speed, is the point.
  * phases: each op is charged to the part of the update running when it was dispatched:
    observe (the encoder and the posterior scan), world (decoder, heads, world-model
    losses), imagine (the H-step rollout), actor-critic (returns and losses on imagined
    trajectories, replay value loss), backward, optimizer (LaProp + AGC + slow critic).

  * packed seeds (`--seeds N`, N > 1): one update of N agents by agent/packed.py
    (torch.func.vmap over the mode's ops; a Triton op counts once per launch of its vmap rule:
    once for all seeds when it folds them into its rows, N times when it has a per-seed
    parameter); the row's `kernels` is the whole update's, `per_seed` that over N. Not split
    into phases.

Rows (device, versions, commit, workload, mode, seeds, total, per phase, the most frequent
ops) are appended to bench/results/kernel-count-<device>.jsonl; docs/benchmarks.md shows the
table.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

if not torch.cuda.is_available():  # before kernels import triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append, environment  # noqa: E402
from bench.throughput import IMAGE, VECTOR  # noqa: E402
from dreamer_fast.agent import losses as agent_losses  # noqa: E402
from dreamer_fast.agent.agent import Agent  # noqa: E402
from dreamer_fast.config import SIZES, AgentConfig  # noqa: E402
from dreamer_fast.data.synthetic import ActSpace, make_batch  # noqa: E402

WORKLOADS = {
    "size1m-vec": (SIZES["size1m"], VECTOR, ActSpace(False, 6)),
    "size12m-img": (SIZES["size12m"], IMAGE, ActSpace(True, 18)),
}
MODES = ("ref", "fused", "triton")
TARGETS = {"size1m-vec": 2500, "size12m-img": 3000}
"""Kernels per update the graph + Triton path is to reach (the issue's targets)."""

NO_KERNEL = {"detach", "alias", "as_strided", "_unsafe_view", "lift_fresh", "empty",
             "empty_like", "empty_strided", "sym_size", "sym_stride", "sym_numel",
             "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type",
             "set_", "_reshape_alias", "view_as_real", "view_as_complex", "unsqueeze_",
             "squeeze_", "t_", "transpose_", "as_strided_"}


def launches_kernel(func) -> bool:
    """Whether an aten/custom op launches a kernel on a GPU (the module docstring's rule)."""
    name = func.overloadpacket.__name__
    if name in NO_KERNEL or getattr(func, "is_view", False):
        return False
    return True


class KernelCount(TorchDispatchMode):
    """Counts the ops that launch kernels, by name and by the phase set from outside."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.phases: collections.Counter = collections.Counter()
        self.pairs: collections.Counter = collections.Counter()  # (phase, op)
        self.phase = "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            ns = func.namespace
            name = func.overloadpacket.__name__
            op = name if ns == "aten" else f"{ns}::{name}"
            self.ops[op] += 1
            self.phases[self.phase] += 1
            self.pairs[(self.phase, op)] += 1
        return func(*args, **(kwargs or {}))


def _phased(counter: KernelCount, phase: str, fn):
    def wrapped(*args, **kwargs):
        previous, counter.phase = counter.phase, phase
        try:
            return fn(*args, **kwargs)
        finally:
            counter.phase = previous
    return wrapped


LOSS_PHASES = {"world_losses": "world", "imag_loss": "actor-critic",
               "repl_loss": "actor-critic"}
"""The loss functions of agent/losses.py and the phase each is charged to."""


def instrument(agent: Agent, counter: KernelCount) -> dict:
    """Charge the agent's parts to phases (instance attributes shadow the methods; the loss
    functions are wrapped in their module). Returns the functions to put back."""
    agent.enc.forward = _phased(counter, "observe", agent.enc.forward)
    agent.dyn.observe = _phased(counter, "observe", agent.dyn.observe)
    agent.imagine = _phased(counter, "imagine", agent.imagine)
    agent.opt.step = _phased(counter, "optimizer", agent.opt.step)
    originals = {name: getattr(agent_losses, name) for name in LOSS_PHASES}
    for name, phase in LOSS_PHASES.items():
        setattr(agent_losses, name, _phased(counter, phase, originals[name]))
    loss_backward = torch.Tensor.backward

    def backward(tensor, *args, **kwargs):
        previous, counter.phase = counter.phase, "backward"
        try:
            return loss_backward(tensor, *args, **kwargs)
        finally:
            counter.phase = previous
    counter.backward = backward
    return originals


def count(workload: str, mode: str, device: str = "cpu", precision: str = "bfloat16") -> dict:
    net, obs, act = WORKLOADS[workload]
    torch.manual_seed(0)
    cfg = AgentConfig(kernels=mode, precision=precision)
    agent = Agent(obs, act, net, cfg, device=device)
    batch = {k: v.to(device) for k, v in make_batch(obs, act, net, cfg.batch_size,
                                                    cfg.batch_length + 1).items()}
    agent.train_step(batch)  # warm-up: optimizer state, lazily built buffers
    counter = KernelCount()
    losses = instrument(agent, counter)
    original = torch.Tensor.backward
    torch.Tensor.backward = counter.backward
    try:
        with counter:
            counter.phase = "other"
            agent.train_step(batch)
    finally:
        torch.Tensor.backward = original
        for name, fn in losses.items():
            setattr(agent_losses, name, fn)
    total = sum(counter.ops.values())
    return {"bench": "kernel-count", "workload": workload, "mode": mode, "kernels": total,
            "precision": precision,
            "B": cfg.batch_size, "T": cfg.batch_length, "H": cfg.imag_horizon,
            "phases": dict(counter.phases.most_common()),
            "top_ops": dict(counter.ops.most_common(25)),
            "top_by_phase": {ph: {op: n for (p, op), n in counter.pairs.most_common() if p == ph}
                             for ph in counter.phases},
            "target": TARGETS.get(workload), "interpreted": mode == "triton" and not
            torch.cuda.is_available()}


def count_packed(workload: str, mode: str, seeds: int, device: str = "cpu",
                 precision: str = "bfloat16") -> dict:
    """count() of one packed update of `seeds` agents."""
    from dreamer_fast.agent.packed import PackedAgents

    net, obs, act = WORKLOADS[workload]
    cfg = AgentConfig(kernels=mode, precision=precision)
    agents = []
    for i in range(seeds):
        torch.manual_seed(i)
        agents.append(Agent(obs, act, net, cfg, device=device))
    packed = PackedAgents(agents)
    batches = [make_batch(obs, act, net, cfg.batch_size, cfg.batch_length + 1, seed=i)
               for i in range(seeds)]
    batch = {k: torch.stack([b[k] for b in batches]).to(device) for k in batches[0]}
    packed.train_step(batch)  # warm-up, as count()
    counter = KernelCount()
    with counter:
        counter.phase = "packed"
        packed.train_step(batch)
    total = sum(counter.ops.values())
    return {"bench": "kernel-count", "workload": workload, "mode": f"packed-{mode}",
            "seeds": seeds,
            "kernels": total, "per_seed": total / seeds, "precision": precision,
            "B": cfg.batch_size, "T": cfg.batch_length, "H": cfg.imag_horizon,
            "phases": dict(counter.phases), "top_ops": dict(counter.ops.most_common(25)),
            "top_by_phase": {}, "target": None,
            "interpreted": mode == "triton" and not torch.cuda.is_available()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bfloat16", choices=("bfloat16", "float32"),
                        help="autocast dtype of matmuls/convs (bfloat16: what a GPU runs by "
                        "default, casts included; CPU autocast runs it here)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="N > 1: count one packed update of N seeds")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--by-phase", action="store_true", help="print each phase's top ops")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--out", default=None, help="results file (default per device)")
    args = parser.parse_args()
    env = environment()
    kind = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().split()[-1].lower()
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"kernel-count-{kind}.jsonl")
    for workload in args.workloads:
        for mode in args.modes:
            row = {**env, **(count_packed(workload, mode, args.seeds, args.device,
                                          args.precision)
                             if args.seeds > 1 else
                             count(workload, mode, args.device, args.precision))}
            phases = ", ".join(f"{k} {v:,}" for k, v in row["phases"].items())
            top = ", ".join(f"{k} {v:,}" for k, v in list(row["top_ops"].items())[:args.top])
            print(f"{workload:<12} {mode:<7} {args.precision:<8} {row['kernels']:>7,} kernels"
                  f" | {phases}\n"
                  f"{'':21}top: {top}", flush=True)
            if args.by_phase:
                for ph, ops in row["top_by_phase"].items():
                    print(f"{'':21}{ph}: " + ", ".join(f"{k} {v:,}" for k, v in
                                                       list(ops.items())[:args.top]))
            if not args.no_record:
                append(path, [row])


if __name__ == "__main__":
    main()
