"""Packed seeds, side by side in one run: N seeds' learner updates as ONE vmapped update
(agent/packed.py) against N solo updates, and against one solo update of an N-times larger
batch (what batching alone can give).

    python bench/packed.py [--workloads learner-control-vec learner-size1m-vec] [--seeds 4]

Rows go to bench/results/packed-<device>.jsonl the moment each is measured: workload, mode
(solo-fused: today's CPU fast path; solo-ref: the reference ops the packed update runs;
packed-ref: the vmapped update of N seeds; batch-ref: one solo update of N x B sequences),
seeds, p20/p50/p80 seconds per call, and the aggregate seed-updates per second (N / p50 for
packed-ref and batch-ref, 1 / p50 for the solo modes). The learner alone: no envs, no actor,
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
    extra = LEARNER_AGENT.get(workload, {})
    return AgentConfig(batch_size=batch_size, kernels=kernels, precision="float32", **extra)


def measure(workload: str, seeds: int, iters: int, burnin: int) -> list[dict]:
    net, obs, act, _ = LEARNER[workload]
    base = agent_cfg(workload, "ref")
    B, L = base.batch_size, base.batch_length + 1
    batches = [make_batch(obs, act, net, B=B, L=L, seed=i) for i in range(seeds)]
    cases = {}
    for kernels in ("fused", "ref"):
        torch.manual_seed(0)
        solo = Agent(obs, act, net, agent_cfg(workload, kernels))
        cases[f"solo-{kernels}"] = (1, lambda a=solo: a.train_step(batches[0]))
    agents = []
    for i in range(seeds):
        torch.manual_seed(i)
        agents.append(Agent(obs, act, net, base))
    packed = PackedAgents(agents)
    stacked = {k: torch.stack([b[k] for b in batches]) for k in batches[0]}
    cases["packed-ref"] = (seeds, lambda: packed.train_step(stacked))
    big = Agent(obs, act, net, replace(base, batch_size=B * seeds))
    wide = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    cases["batch-ref"] = (seeds, lambda: big.train_step(wide))
    rows, env = [], environment()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"packed-{'cuda' if torch.cuda.is_available() else 'cpu'}.jsonl")
    for mode, (per_call, fn) in cases.items():
        times, warm_s = time_calls(fn, iters, burnin, "cpu")
        stats = percentiles(times)
        row = {"bench": "packed", "workload": workload, "mode": mode, "seeds": seeds,
               "batch": B * (seeds if mode == "batch-ref" else 1), "length": L - 1,
               **stats, "warm_s": warm_s, "seed_updates_per_s": per_call / stats["p50"],
               **env}
        append(path, [row])  # kept the moment it is measured
        rows.append(row)
        print(f"{workload} {mode:10s} seeds {seeds}: {stats['p50']:.3f} s/call, "
              f"{row['seed_updates_per_s']:.2f} seed-updates/s", flush=True)
    solo = next(r for r in rows if r["mode"] == "solo-fused")["seed_updates_per_s"]
    for r in rows:
        print(f"  {r['mode']:10s} {r['seed_updates_per_s'] / solo:.2f}x one solo fused seed")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[4])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--burnin", type=int, default=1)
    args = parser.parse_args()
    set_cpu_threads(torch.device("cpu"))  # as a run's learner: half the cores
    for workload in args.workloads:
        for seeds in args.seeds:
            measure(workload, seeds, args.iters, args.burnin)


if __name__ == "__main__":
    main()
