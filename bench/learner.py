"""Time the eager learner update (train_step) on named, fixed workloads.

    python bench/learner.py                     # all workloads
    python bench/learner.py --workloads debug size1m-vec --iters 5

Prints a table and appends JSON lines (device, versions, commit, p20/p50/p80 seconds per
update after burn-in) to bench/results/learner-<device>.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append, environment, percentiles, time_calls  # noqa: E402
from dreamer_fast.agent.agent import Agent  # noqa: E402
from dreamer_fast.config import SIZES, AgentConfig  # noqa: E402
from dreamer_fast.data.synthetic import ActSpace, make_batch  # noqa: E402

IMAGE = {"image": ((3, 64, 64), np.uint8)}
WORKLOADS = {
    # name: (size, obs space, act space, batch, length, horizon)
    "debug": ("debug", {"vector": ((7,), np.float32)}, ActSpace(True, 3), 4, 16, 5),
    # the control preset's model on CartPole's spaces, at three batch sizes (one sequence length)
    "size300k-B8": ("size300k", {"vector": ((4,), np.float32)}, ActSpace(True, 2), 8, 16, 15),
    "size300k-B16": ("size300k", {"vector": ((4,), np.float32)}, ActSpace(True, 2), 16, 16, 15),
    "size300k-B32": ("size300k", {"vector": ((4,), np.float32)}, ActSpace(True, 2), 32, 16, 15),
    "size300k-B64": ("size300k", {"vector": ((4,), np.float32)}, ActSpace(True, 2), 64, 16, 15),
    "size1m-vec": ("size1m", {"vector": ((24,), np.float32)}, ActSpace(False, 6), 16, 64, 15),
    "size12m-img": ("size12m", IMAGE, ActSpace(True, 18), 16, 64, 15),
    "size200m-img": ("size200m", IMAGE, ActSpace(True, 18), 16, 64, 15),
}


def run(name: str, iters: int, burnin: int, device: str) -> dict:
    size, obs, act, B, T, H = WORKLOADS[name]
    torch.manual_seed(0)
    cfg = AgentConfig(batch_size=B, batch_length=T, imag_horizon=H)
    agent = Agent(obs, act, SIZES[size], cfg, device=device)
    batch = {k: v.to(device) for k, v in make_batch(obs, act, SIZES[size], B, T + 1).items()}
    times, _ = time_calls(lambda: agent.train_step(batch), iters, burnin, device)
    assert not agent.nonfinite_losses()
    return {"bench": "learner", "workload": name, "mode": "eager", "size": size,
            "B": B, "T": T, "H": H, "kernels": agent.ops.impl, "dtype": "float32",
            "params": sum(p.numel() for p in agent.trained_parameters()),
            **percentiles(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["debug", "size1m-vec", "size12m-img"],
                        choices=list(WORKLOADS))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--burnin", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="results file (default per device)")
    args = parser.parse_args()
    env = environment()
    rows = []
    print(f"device: {env['device']}  torch {env['torch']}  commit {env['commit']}")
    print(f"{'workload':<14} {'params':>11} {'p20 s':>8} {'p50 s':>8} {'p80 s':>8} {'upd/s':>7}")
    for name in args.workloads:
        row = {**env, **run(name, args.iters, args.burnin, args.device)}
        rows.append(row)
        print(f"{name:<14} {row['params']:>11,} {row['p20']:>8.3f} {row['p50']:>8.3f} "
              f"{row['p80']:>8.3f} {1 / row['p50']:>7.2f}")
    tag = "cpu" if args.device == "cpu" else env["device"].replace(" ", "-").lower()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"learner-{tag}.jsonl")
    append(out, rows)
    print(f"appended {len(rows)} rows to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
