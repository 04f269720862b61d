"""Training returns against evaluations of the same weights, from a run with periodic eval.

    python run.py --env CartPole-v1 --steps 60000 --eval-every 30 --eval-episodes 10 \\
        --log-every 30 --logdir RUN
    python bench/eval_gap.py RUN [--out bench/results/eval-gap-cpu.jsonl]

Each periodic evaluation (10 episodes, sampled actions, envs of its own, the weights of the
moment it was triggered) is paired with the training episodes logged at the same log tick (their
interval mean). Per phase of the run (thirds of its steps) it reports the mean of both and
their mean absolute difference: a systematic gap (an eval bug, a different env or carry) shows
as a difference of the means; a policy that changes faster than the training window shows as
a large absolute difference with equal means. Appends one row (with the environment record).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append, environment  # noqa: E402


def pairs(logdir: str) -> np.ndarray:
    """(step, training interval mean, eval mean) for each eval with a training row within 200
    steps."""
    train, evals = {}, {}
    for line in open(os.path.join(logdir, "metrics.jsonl")):
        row = json.loads(line)
        if "eval/return" in row:
            evals[row["step"]] = row["eval/return"]
        if "episode/return" in row:
            train[row["step"]] = row["episode/return"]
    out = []
    for step, value in evals.items():
        near = min(train, key=lambda t: abs(t - step), default=None)
        if near is not None and abs(near - step) < 200:
            out.append((step, train[near], value))
    return np.array(out, float).reshape(-1, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "eval-gap-cpu.jsonl"))
    args = parser.parse_args()
    p = pairs(args.logdir)
    if not len(p):
        sys.exit(f"error: {args.logdir} has no periodic evaluations (run with --eval-every)")
    edges = np.linspace(0, p[:, 0].max() + 1, 4)
    phases = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (p[:, 0] >= lo) & (p[:, 0] < hi)
        if m.any():
            phases.append({"steps": [int(lo), int(hi)], "pairs": int(m.sum()),
                           "train_mean": float(p[m, 1].mean()), "eval_mean": float(p[m, 2].mean()),
                           "mean_abs_diff": float(np.abs(p[m, 1] - p[m, 2]).mean())})
            print(f"steps {int(lo):>7,}-{int(hi):<7,} {int(m.sum()):>3} pairs: training "
                  f"{p[m, 1].mean():7.1f}, eval {p[m, 2].mean():7.1f}, mean |difference| "
                  f"{np.abs(p[m, 1] - p[m, 2]).mean():6.1f}")
    config = json.load(open(os.path.join(args.logdir, "config.json")))
    row = {**environment(), "bench": "eval-gap", "env": config["env"],
           "preset": config["preset"], "steps": int(p[:, 0].max()), "phases": phases,
           "train_mean": float(p[:, 1].mean()), "eval_mean": float(p[:, 2].mean()),
           "pairs": p.tolist()}
    append(args.out, [row])
    print(f"all {len(p)} pairs: training {p[:, 1].mean():.1f}, eval {p[:, 2].mean():.1f}")


if __name__ == "__main__":
    main()
