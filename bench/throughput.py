"""Throughput suite (issue 5, DESIGN 4): named workloads, modes side by side in one run.

    python bench/throughput.py                                  # default set for this device
    python bench/throughput.py --workloads learner-paper-s-img --modes eager compile
    python bench/throughput.py --price 2.5                      # $/GPU-hour for the cost column

Learner workloads report seconds per update (p20/p50/p80 after burn-in), updates/s,
replayed steps/s (B*T per update) and agent steps/s at the domain's train ratio, peak GPU
memory, and cost per 1M agent steps at --price dollars per device-hour. The policy and env
workloads report agent steps/s. Rows are appended to bench/results/throughput-<device>.jsonl
with device, versions and commit. Modes: eager, compile (torch.compile of the loss, forward
and backward); CUDA-graph modes are added with the graphed learner.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append, environment, percentiles, time_calls  # noqa: E402
from dreamer_fast.agent import Agent  # noqa: E402
from dreamer_fast.config import SIZES, AgentConfig, NetConfig  # noqa: E402
from dreamer_fast.synthetic import ActSpace, make_batch  # noqa: E402

IMAGE = {"image": ((3, 64, 64), np.uint8)}
VECTOR = {"vector": ((24,), np.float32)}
# The 2023 paper's size S in our architecture (issue 5): the CPU comparison with peers.
PAPER_S = NetConfig(deter=512, hidden=512, classes=32, depth=32, units=512)

LEARNER = {
    # name: (net, obs space, action space, train ratio of the domain it stands for)
    "learner-size12m-img": (SIZES["size12m"], IMAGE, ActSpace(True, 18), 256.0),
    "learner-size200m-img": (SIZES["size200m"], IMAGE, ActSpace(True, 18), 256.0),
    "learner-size1m-vec": (SIZES["size1m"], VECTOR, ActSpace(False, 6), 1024.0),
    "learner-paper-s-img": (PAPER_S, IMAGE, ActSpace(True, 9), 256.0),
    "learner-paper-s-vec": (PAPER_S, VECTOR, ActSpace(False, 6), 1024.0),
}
OTHER = ("policy-64envs", "env-pong-64")
DEFAULTS = {"cpu": ["learner-paper-s-vec", "learner-paper-s-img", "learner-size1m-vec",
                    "policy-64envs", "env-pong-64"],
            "cuda": ["learner-size12m-img", "learner-size200m-img", "learner-size1m-vec",
                     "policy-64envs", "env-pong-64"]}


def learner(name: str, mode: str, iters: int, burnin: int, device: str, price: float) -> dict:
    """Seconds per train_step at B16 x T64, H15 (fp32)."""
    net, obs, act, ratio = LEARNER[name]
    torch.manual_seed(0)
    cfg = AgentConfig()
    agent = Agent(obs, act, net, cfg, device=device)
    if mode == "compile":
        agent.loss = torch.compile(agent.loss)
    batch = {k: v.to(device) for k, v in make_batch(obs, act, net, cfg.batch_size,
                                                    cfg.batch_length + 1).items()}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, warm_s = time_calls(lambda: agent.train_step(batch), iters, burnin, device)
    bad = agent.nonfinite_losses()
    p = percentiles(times)
    updates = 1.0 / p["p50"]
    replayed = updates * cfg.batch_size * cfg.batch_length
    agent_steps = replayed / ratio
    return {"workload": name, "mode": mode, "train_ratio": ratio, **p,
            "warmup_s": warm_s if burnin else None, "updates_per_s": updates,
            "replayed_per_s": replayed, "agent_steps_per_s": agent_steps,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30
            if device.startswith("cuda") else None,
            "usd_per_1m_agent_steps": price / 3600 * 1e6 / agent_steps if price else None,
            "params": sum(q.numel() for q in agent.trained_parameters()),
            "nonfinite": bad}


def policy(mode: str, iters: int, burnin: int, device: str) -> dict:
    """Batched policy_step for 64 envs at size12m on 64x64 images (the actor's hot path)."""
    torch.manual_seed(0)
    net, act = SIZES["size12m"], ActSpace(True, 18)
    agent = Agent(IMAGE, act, net, AgentConfig(), device=device)
    step = agent.policy_step if mode == "eager" else torch.compile(agent.policy_step)
    carry = agent.initial_carry(64)
    obs = {"image": torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8, device=device),
           "is_first": torch.zeros(64, dtype=torch.bool, device=device)}
    times, warm_s = time_calls(lambda: step(carry, obs), iters, burnin, device)
    p = percentiles(times)
    return {"workload": "policy-64envs", "warmup_s": warm_s, "mode": mode, **p, "agent_steps_per_s": 64 / p["p50"]}


def env_pong(iters: int, burnin: int) -> dict:
    """EnvPool Pong, 64 envs, random actions, 64x64 RGB (no agent): the env ceiling."""
    from dreamer_fast.config import EnvConfig
    from dreamer_fast.envs import make_env

    env = make_env("Pong-v5", 64, EnvConfig(image_size=64, sticky=0.0,
                                            full_action_space=False))
    env.start()
    rng = np.random.default_rng(0)
    times = []
    for i in range(burnin + iters):
        start = time.perf_counter()
        step = env.recv()
        env.send(rng.integers(0, env.act_space.size, len(step["env_id"])), step["env_id"])
        if i >= burnin:
            times.append(time.perf_counter() - start)
    env.close()
    p = percentiles(times)
    return {"workload": "env-pong-64", "mode": "envpool", **p,
            "agent_steps_per_s": env.batch_size / p["p50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=[*LEARNER, *OTHER])
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"],
                        choices=["eager", "compile"])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--burnin", type=int, default=1)
    parser.add_argument("--price", type=float, default=0.0, help="$ per device-hour")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  commit {env['commit']}")
    rows = []
    for name in args.workloads or DEFAULTS[kind]:
        for mode in (["envpool"] if name == "env-pong-64" else args.modes):
            try:
                if name in LEARNER:
                    row = learner(name, mode, args.iters, args.burnin, args.device, args.price)
                elif name == "policy-64envs":
                    row = policy(mode, max(args.iters, 20), args.burnin + 2, args.device)
                else:
                    row = env_pong(200, 20)
            except Exception as e:  # keep the other rows; record why this one failed
                row = {"workload": name, "mode": mode, "error": f"{type(e).__name__}: {e}"}
            rows.append({**env, "bench": "throughput", "batch": "B16xT64", "horizon": 15,
                         "dtype": "float32", "price_usd_per_hour": args.price, **row})
            _print(rows[-1])
    tag = "cpu" if kind == "cpu" else env["device"].replace(" ", "-").lower()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"throughput-{tag}.jsonl")
    append(out, rows)
    print(f"appended {len(rows)} rows to {os.path.relpath(out)}")


def _print(row: dict) -> None:
    if "error" in row:
        print(f"{row['workload']:<22} {row['mode']:<8} error: {row['error'][:100]}")
        return
    extra = (f" {row['updates_per_s']:8.3f} upd/s {row['agent_steps_per_s']:9.2f} agent/s"
             if "updates_per_s" in row else f" {row['agent_steps_per_s']:9.1f} agent steps/s")
    print(f"{row['workload']:<22} {row['mode']:<8} p50 {row['p50']:9.4f} s "
          f"(p20 {row['p20']:.4f}, p80 {row['p80']:.4f}){extra}", flush=True)


if __name__ == "__main__":
    main()
