"""Packed seeds, side by side in one run: N seeds' learner updates as ONE vmapped update
(agent/packed.py) against N solo updates, and against one solo update of an N-times larger
batch (what batching alone can give).

    python bench/packed.py [--workloads learner-control-vec learner-size1m-vec] [--seeds 4 16]

Rows go to bench/results/packed-<device>.jsonl (or --out) the moment each is measured:
workload, mode (solo-fused on a CPU, solo-triton on CUDA: one seed's eager update on the
device's fast kernels; solo-ref: the reference ops; packed-ref and packed-fused on a CPU,
packed-fused and packed-triton on CUDA: the vmapped update of N seeds on those ops; batch-ref:
one solo update of N x B sequences),
seeds, p20/p50/p80 seconds per call, and the aggregate seed-updates per second (N / p50 for
the packed modes and batch-ref, 1 / p50 for the solo modes). The learner alone: no envs, no actor,
with the learner's CPU threads of a run (half the cores: run/device.set_cpu_threads).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append, environment, percentiles, time_calls  # noqa: E402
from bench.throughput import LEARNER, LEARNER_AGENT  # noqa: E402
from dreamer_fast.agent.agent import Agent  # noqa: E402
from dreamer_fast.agent.packed import PackedAgents  # noqa: E402
from dreamer_fast.config import AgentConfig  # noqa: E402
from dreamer_fast.data.synthetic import make_batch  # noqa: E402
from dreamer_fast.run.device import set_cpu_threads  # noqa: E402

WORKLOADS = ("learner-control-vec", "learner-size1m-vec")


def agent_cfg(workload: str, kernels: str, batch_size: int = 16) -> AgentConfig:
    """The workload's agent settings, float32 (the packed update's precision) everywhere."""
    extra = LEARNER_AGENT.get(workload, {})
    return AgentConfig(batch_size=batch_size, kernels=kernels, precision="float32", **extra)


def measure(workload: str, seeds: int, iters: int, burnin: int, device: str = "cpu",
            path: str | None = None) -> list[dict]:
    net, obs, act, _ = LEARNER[workload]
    base = agent_cfg(workload, "ref")
    B, L = base.batch_size, base.batch_length + 1
    batches = [{k: v.to(device) for k, v in make_batch(obs, act, net, B=B, L=L, seed=i).items()}
               for i in range(seeds)]
    fast = "triton" if device.startswith("cuda") else "fused"
    cases = {}
    for kernels in (fast, "ref"):
        torch.manual_seed(0)
        solo = Agent(obs, act, net, agent_cfg(workload, kernels), device)
        cases[f"solo-{kernels}"] = (1, lambda a=solo: a.train_step(batches[0]))
    stacked = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
    for kernels in ("fused", "triton") if device.startswith("cuda") else ("ref", "fused"):
        agents = []
        for i in range(seeds):
            torch.manual_seed(i)
            agents.append(Agent(obs, act, net, agent_cfg(workload, kernels), device))
        packed = PackedAgents(agents)
        cases[f"packed-{kernels}"] = (seeds, lambda p=packed: p.train_step(stacked))
    big = Agent(obs, act, net, replace(base, batch_size=B * seeds), device)
    wide = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    cases["batch-ref"] = (seeds, lambda: big.train_step(wide))
    rows, env = [], environment()
    kind = ("cpu" if device == "cpu" else torch.cuda.get_device_name().split()[-1].lower())
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"packed-{kind}.jsonl")
    for mode, (per_call, fn) in cases.items():
        times, warm_s = time_calls(fn, iters, burnin, device)
        stats = percentiles(times)
        row = {"bench": "packed", "workload": workload, "mode": mode, "seeds": seeds,
               "batch": B * (seeds if mode == "batch-ref" else 1), "length": L - 1,
               **stats, "warm_s": warm_s, "seed_updates_per_s": per_call / stats["p50"],
               **env}
        append(path, [row])  # kept the moment it is measured
        rows.append(row)
        print(f"{workload} {mode:10s} seeds {seeds}: {stats['p50']:.3f} s/call, "
              f"{row['seed_updates_per_s']:.2f} seed-updates/s", flush=True)
    solo = next(r for r in rows if r["mode"] == f"solo-{fast}")["seed_updates_per_s"]
    for r in rows:
        print(f"  {r['mode']:11s} {r['seed_updates_per_s'] / solo:.2f}x one solo {fast} seed")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[4])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--burnin", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="results file (default per device)")
    args = parser.parse_args()
    set_cpu_threads(torch.device(args.device))  # on a CPU, as a run's learner: half the cores
    for workload in args.workloads:
        for seeds in args.seeds:
            measure(workload, seeds, args.iters, args.burnin, args.device, args.out)


if __name__ == "__main__":
    main()
