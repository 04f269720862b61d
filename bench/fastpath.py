"""The fast-path check of a run's start (dreamer_fast/run/fastpath.py) on the learner
workloads: which rung of graph+triton -> graph -> eager passes, how close each rung's update
came to the eager reference, and how long capture and check took.

    python bench/fastpath.py                                   # size1m-vec, size12m-img
    python bench/fastpath.py --workloads learner-size200m-img --out results.jsonl

Needs CUDA (graphs); on a CPU (bench/gpu_session.sh --rehearse) it checks the Triton kernels
in the interpreter against the references through the same code, with an eager stand-in for
the graph, so the script is exercised: those rows say `graph: stand-in`.
Rows (device, versions, commit, workload, rung chosen, per-rung loss_rtol / delta_cos /
failure, seconds) are appended as measured to bench/results/fastpath-<device>.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # before kernels import triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append, catch_sigint, environment  # noqa: E402
from bench.throughput import LEARNER, LEARNER_AGENT  # noqa: E402
from dreamer_fast.agent.agent import Agent  # noqa: E402
from dreamer_fast.config import SIZES, AgentConfig  # noqa: E402
from dreamer_fast.data.synthetic import make_batch  # noqa: E402
from dreamer_fast.run import fastpath  # noqa: E402

WORKLOADS = {**LEARNER, "learner-debug-img": (SIZES["debug"], *LEARNER["learner-size12m-img"][1:])}


class EagerStandIn:
    """The rung's update run eagerly: a CPU cannot capture (rehearsal only)."""

    def __init__(self, agent, example):
        self.agent = agent

    def __call__(self, batch):
        return self.agent.train_step(batch)


def run(name: str, device: str, precision: str, batch_length: int | None) -> dict:
    net, obs, act, _ = WORKLOADS[name]
    settings = dict(LEARNER_AGENT.get(name, {}))
    if batch_length:
        settings["batch_length"] = batch_length
    cfg = AgentConfig(kernels="triton", precision=precision, **settings)
    torch.manual_seed(0)
    agent = Agent(obs, act, net, cfg, device=device)
    example = {k: torch.zeros_like(v).to(device) for k, v in
               make_batch(obs, act, net, cfg.batch_size, cfg.batch_length + 1).items()}
    lines = []
    start = time.perf_counter()
    build = fastpath.GraphedTrainStep if device.startswith("cuda") else EagerStandIn
    update = fastpath.choose(agent, example, "graph+triton",
                             fastpath.synthetic_batch(agent, example), build=build,
                             say=lines.append)
    return {"bench": "fastpath", "workload": name, "precision": precision,
            "batch": f"B{cfg.batch_size}xT{cfg.batch_length}",
            "graph": "captured" if build is not EagerStandIn else "stand-in (eager, no CUDA)",
            "mode": update.mode, "checks": update.checks, "lines": lines,
            "seconds": time.perf_counter() - start,
            "tolerance": fastpath.TOLERANCE[precision]}


def main() -> None:
    catch_sigint()
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        default=["learner-size1m-vec", "learner-size12m-img"])
    parser.add_argument("--precision", default="bfloat16" if cuda else "float32",
                        choices=["float32", "bfloat16"])
    parser.add_argument("--batch-length", type=int, default=None,
                        help="T of the windows (default the workload's; small for rehearsals)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    env = environment()
    tag = "cpu" if not cuda else env["device"].replace(" ", "-").lower()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"fastpath-{tag}.jsonl")
    print(f"device: {env['device']}  torch {env['torch']}  commit {env['commit']}")
    for name in args.workloads:
        try:
            row = run(name, "cuda" if cuda else "cpu", args.precision, args.batch_length)
        except KeyboardInterrupt:
            append(out, [{**env, "bench": "fastpath", "workload": name,
                          "error": "interrupted (SIGINT)"}])
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 (record it, go on)
            row = {"bench": "fastpath", "workload": name,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        append(out, [{**env, **row}])
        if "error" in row:
            print(f"{name:<24} error: {row['error']}", flush=True)
            continue
        checks = "; ".join(f"{rung} " + (c["failure"] or f"loss_rtol {c['loss_rtol']:.1e} "
                                                       f"delta_cos {c['delta_cos']:.4f}")
                           for rung, c in row["checks"].items())
        print(f"{name:<24} {row['precision']:<8} -> {row['mode']:<12} {row['seconds']:6.1f} s"
              f" | {checks}", flush=True)


if __name__ == "__main__":
    main()
