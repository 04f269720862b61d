"""Throughput suite: named workloads, modes side by side in one run.

    python bench/throughput.py                                  # default set for this device
    python bench/throughput.py --workloads learner-paper-s-img --modes eager compile
    python bench/throughput.py --price 2.5                      # $/GPU-hour for the cost column

Learner workloads report seconds per update (p20/p50/p80 after burn-in), updates/s,
replayed steps/s (B*T per update) and agent steps/s at the domain's train ratio, peak GPU
memory, and cost per 1M agent steps at --price dollars per device-hour. The policy and env
workloads report agent steps/s. Rows are appended to bench/results/throughput-<device>.jsonl
with device, versions and commit.

Modes: eager (reference ops), fused (eager with kernels/fused.py, the CPU fast path), compile (torch.compile of the loss, forward and backward),
graph (the whole update as one CUDA graph, reference ops), graph+triton (the graph with the
Triton kernels). Graph modes need CUDA; on a CPU they are recorded as skipped.
e2e-pong-64 runs `run.py` on Pong (atari100k preset, 64 envs) as a subprocess and reports the
agent steps/s and updates/s it sustains, and how busy that keeps the learner: e2e updates/s
divided by the same model's standalone updates/s (measured first, same mode).

Packed seeds, side by side in one run (`--seeds 1 4`, the default): e2e-seeds-control runs
`run.py --env CartPole-v1` (the control preset: size300k, B16 x T16) and e2e-seeds-size1m-vec
`run.py --env Pendulum-v1 --model size1m --agent.batch-length 64 --train-ratio 1024` (the
learner-size1m-vec workload's model, batch and ratio) with `--seeds N` for each N, and report
the aggregate agent steps/s and seed-updates/s (N x the run's per-seed rates, after the
prefill) and their ratio to one seed's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append, catch_sigint, environment, percentiles, time_calls  # noqa: E402
from dreamer_fast.run.weights import PolicyWeights  # noqa: E402
from dreamer_fast.agent.agent import Agent  # noqa: E402
from dreamer_fast.config import SIZES, AgentConfig, NetConfig  # noqa: E402
from dreamer_fast.run.graphs import GraphedPolicy, GraphedTrainStep  # noqa: E402
from dreamer_fast.run.device import keep_freed_memory  # noqa: E402
from dreamer_fast.data.synthetic import ActSpace, make_batch  # noqa: E402

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
    # the same with the official strided CNN (--net.strided): the 2023 ports' (sheeprl's) CNN
    "learner-paper-s-img-strided": (replace(PAPER_S, strided=True), IMAGE, ActSpace(True, 9),
                                    256.0),
    "learner-paper-s-vec": (PAPER_S, VECTOR, ActSpace(False, 6), 1024.0),
    # the control preset's learner (size300k, B16 x T16) on CartPole's spaces
    "learner-control-vec": (SIZES["size300k"], {"vector": ((4,), np.float32)}, ActSpace(True, 2),
                            64.0),
}
LEARNER_AGENT = {"learner-control-vec": dict(batch_length=16)}
"""Agent settings of a learner workload other than the default B16 x T64, H15."""
OTHER = ("matmul-peak", "policy-64envs", "env-pong-64", "e2e-pong-64")
SEEDS = {  # packed seeds end to end: name -> (run.py flags, agent steps per seed)
    "e2e-seeds-control": (["--env", "CartPole-v1"], 1_500),
    "e2e-seeds-size1m-vec": (["--env", "Pendulum-v1", "--model", "size1m",
                              "--agent.batch-length", "64", "--train-ratio", "1024"], 1_404),
}
MODES = ("eager", "fused", "compile", "graph", "graph+triton")
DEFAULTS = {"cpu": ["learner-paper-s-vec", "learner-paper-s-img", "learner-paper-s-img-strided",
                    "learner-size1m-vec",
                    "policy-64envs", "env-pong-64", "e2e-pong-64"],
            "cuda": ["matmul-peak", "learner-size12m-img", "learner-size200m-img", "learner-size1m-vec",
                     "policy-64envs", "env-pong-64", "e2e-pong-64"]}
# e2e: the model on each device (size12m on CPU would take minutes per update).
E2E_MODEL = {"cpu": "debug", "cuda": "size12m"}


def agent_cfg(mode: str, precision: str, **overrides) -> AgentConfig:
    """Kernels per mode: the references everywhere but fused (the CPU fast path, eager) and
    graph+triton."""
    kernels = {"graph+triton": "triton", "fused": "fused"}.get(mode, "ref")
    return AgentConfig(kernels=kernels, precision=precision, **overrides)


def update_flops(agent, batch) -> float:
    """FLOPs of one eager update (matmuls and convs, forward and backward), counted by the
    profiler; the update it runs is undone."""
    from torch.profiler import ProfilerActivity, profile

    from dreamer_fast.run.graphs import Snapshot, state_tensors

    snap = Snapshot(state_tensors(agent, agent.opt))
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        agent.train_step(batch)
    snap.restore()
    return float(sum(e.flops for e in prof.key_averages()))


def matmul_peak(device: str, precision: str) -> dict:
    """The device's dense GEMM rate at the learner's dtype (8192^3 on CUDA, 2048^3 on CPU):
    the denominator of 'fraction of matmul rate' for the learner rows."""
    n = 8192 if device.startswith("cuda") else 2048
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times, _ = time_calls(lambda: a @ b, 10 if device.startswith("cuda") else 3, 2, device)
    p = percentiles(times)
    return {"workload": "matmul-peak", "mode": str(dtype).split(".")[-1], **p, "size": n,
            "tflops": 2 * n ** 3 / p["p50"] / 1e12}


def learner(name: str, mode: str, iters: int, burnin: int, device: str, price: float,
            precision: str = "float32", spec=None, count_flops: bool = False,
            settings: dict | None = None) -> dict:
    """Seconds per update at B16 x T64, H15 (or the workload's LEARNER_AGENT settings, or
    `settings`; spec overrides the named (net, obs, act, ratio))."""
    net, obs, act, ratio = spec or LEARNER[name]
    torch.manual_seed(0)
    cfg = agent_cfg(mode, precision, **(settings or LEARNER_AGENT.get(name, {})))
    agent = Agent(obs, act, net, cfg, device=device)
    batch = {k: v.to(device) for k, v in make_batch(obs, act, net, cfg.batch_size,
                                                    cfg.batch_length + 1).items()}
    flops = update_flops(agent, batch) if count_flops else None  # eager, before any capture
    if mode == "compile":
        agent.loss = torch.compile(agent.loss)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step = GraphedTrainStep(agent, batch) if mode.startswith("graph") else agent.train_step
    capture_s = time.perf_counter() - start if mode.startswith("graph") else None
    times, warm_s = time_calls(lambda: step(batch), iters, burnin, device)
    bad = agent.nonfinite_losses()
    p = percentiles(times)
    updates = 1.0 / p["p50"]
    replayed = updates * cfg.batch_size * cfg.batch_length
    agent_steps = replayed / ratio
    return {"workload": name, "mode": mode, "train_ratio": ratio, **p,
            "warmup_s": warm_s if burnin else None, "capture_s": capture_s,
            "updates_per_s": updates,
            "replayed_per_s": replayed, "agent_steps_per_s": agent_steps,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30
            if device.startswith("cuda") else None,
            "usd_per_1m_agent_steps": price / 3600 * 1e6 / agent_steps if price else None,
            "params": sum(q.numel() for q in agent.trained_parameters()),
            "gflop_per_update": flops / 1e9 if flops else None,
            "achieved_tflops": flops / p["p50"] / 1e12 if flops else None,
            "nonfinite": bad}


def policy(mode: str, iters: int, burnin: int, device: str, precision: str) -> dict:
    """The actor's step for 64 envs at size12m on 64x64 images: host obs in, gather carries,
    encoder, RSSM observe step, actor sample, scatter carries, action back to the host."""
    from dreamer_fast.run.actor import policy_act

    torch.manual_seed(0)
    net, act = SIZES["size12m"], ActSpace(True, 18)
    agent = Agent(IMAGE, act, net, agent_cfg(mode, precision), device=device)
    copies = PolicyWeights(agent).copies
    if mode == "compile":
        copies[0].policy_step = torch.compile(copies[0].policy_step)
    carry = agent.initial_carry(64)
    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 256, (64, 3, 64, 64), dtype=np.uint8),
           "env_id": np.arange(64, dtype=np.int32), "is_first": np.zeros(64, bool),
           "is_last": np.zeros(64, bool)}
    if mode.startswith("graph"):
        graph = GraphedPolicy(copies, carry, {"image": ((3, 64, 64), torch.uint8)}, 64)
        step = lambda: graph(0, obs)[0].argmax(-1).cpu()  # noqa: E731
    else:
        step = lambda: policy_act(copies[0], carry, obs, ["image"], agent.device)[0].argmax(-1).cpu()  # noqa: E731
    times, warm_s = time_calls(step, iters, burnin, device)
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


def e2e_pong(mode: str, device: str, precision: str, steps: int, price: float,
             batch: tuple[int, int] = (16, 64), envs: int = 64, ratio: float = 256.0,
             log_every: int = 10, env: str = "auto") -> dict:
    """`run.py --env Pong-v5 --num-envs 64 --preset atari100k` until `steps` agent steps, in a
    subprocess with a temporary logdir; rates averaged over the log rows after the prefill.
    env 'auto': Pong with EnvPool, else bench/standin.py's StandInPong-v0 (same shapes; the
    row's `env` says which); 'pong' or 'standin' to choose."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    model = E2E_MODEL[kind]
    net = SIZES[model]
    # Pong under atari100k: 64x64 RGB, 6 actions, ratio 256. Standalone learner first.
    B, T = batch
    alone = learner("e2e", mode, 5 if kind == "cuda" else 3, 1, device, 0.0, precision,
                    spec=(net, IMAGE, ActSpace(True, 6), ratio),
                    settings=dict(batch_size=B, batch_length=T))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if env == "auto":
        try:
            import envpool  # noqa: F401
            env = "pong"
        except ImportError:
            env = "standin"
    if env == "pong":
        env_id, env_label = "Pong-v5", "Pong-v5 (EnvPool)"
    else:
        from bench import standin
        env_id, env_label = f"bench.standin:{standin.ID}", standin.LABEL
    with tempfile.TemporaryDirectory() as logdir:
        cmd = [sys.executable, os.path.join(root, "run.py"), "--env", env_id,
               "--num-envs", str(envs), "--preset", "atari100k", "--model", model,
               "--agent.batch-size", str(B), "--agent.batch-length", str(T),
               "--steps", str(steps), "--logdir", logdir, "--device", device,
               "--train-ratio", str(ratio), "--log-every", str(log_every),
               "--save-every", "100000", "--report-every", "100000",
               "--replay.capacity", str(steps + envs * 200),
               "--graphs", "on" if mode.startswith("graph") else "off",
               "--agent.kernels", agent_cfg(mode, precision).kernels,
               "--agent.precision", precision, *(["--compile"] if mode == "compile" else [])]
        start, cut = time.perf_counter(), False
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                    cwd=root)
            try:
                proc.wait()
            except KeyboardInterrupt:  # the stage's limit: run.py got SIGINT too and saves;
                cut = True             # the rates so far still make a row
                proc.wait(timeout=60)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"run.py exited {proc.returncode}: {err.read()[-500:]}")
        rows = [json.loads(line) for line in open(os.path.join(logdir, "metrics.jsonl"))]
    # Skip the prefill rows and the first row with updates (it straddles the prefill's end).
    rows = [r for r in rows if r.get("counts/updates", 0) > 0][1:]
    if not rows:
        raise RuntimeError("the run logged no row after the prefill; raise --e2e-steps")
    mean = lambda k: float(np.mean([r.get(k, 0.0) for r in rows]))  # noqa: E731
    updates = mean("throughput/updates_per_s")
    agent_steps = mean("throughput/steps_per_s")
    return {"workload": "e2e-pong-64", "mode": mode, "env": env_label, "model": model,
            "train_ratio": ratio, "update_mode": rows[-1].get("update_mode"),
            "steps": steps, "wall_s": wall, "log_rows": len(rows), "cut_short": cut,
            "updates_per_s": updates, "agent_steps_per_s": agent_steps,
            "replayed_per_s": updates * B * T, "batch": f"B{B}xT{T}", "envs": envs,
            "standalone_updates_per_s": alone["updates_per_s"],
            "learner_busy": updates / alone["updates_per_s"],
            "learner_train_frac": mean("time/learner/train_frac"),
            "learner_wait_frac": mean("wait/learner_wait_frac"),
            "actor_wait_frac": mean("wait/actor_wait_frac"),
            "usd_per_1m_agent_steps": price / 3600 * 1e6 / agent_steps if price else None,
            "p20": None, "p50": 1.0 / updates, "p80": None}


def e2e_seeds(name: str, mode: str, device: str, seeds: int, steps: int | None,
              log_every: int) -> dict:
    """One `run.py ... --seeds N` of a SEEDS workload to its step budget (per seed), in a
    subprocess with a temporary logdir; aggregate rates averaged over the log rows after the
    prefill (N x the per-seed rates the pooled rows carry)."""
    flags, default_steps = SEEDS[name]
    steps = steps or default_steps
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as logdir:
        cmd = [sys.executable, os.path.join(root, "run.py"), *flags, "--seeds", str(seeds),
               "--steps", str(steps), "--logdir", logdir, "--device", device,
               "--log-every", str(log_every), "--save-every", "100000",
               "--report-every", "100000", "--agent.kernels", agent_cfg(mode, "float32").kernels]
        start = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=root)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"run.py exited {done.returncode}: {done.stderr[-500:]}")
        rows = [json.loads(line) for line in open(os.path.join(logdir, "metrics.jsonl"))]
    rows = [r for r in rows if r.get("counts/updates", 0) > 0][1:]
    if not rows:
        raise RuntimeError("the run logged no row after the prefill; raise --e2e-steps")
    mean = lambda k: float(np.mean([r.get(k, 0.0) for r in rows]))  # noqa: E731
    return {"workload": name, "mode": mode, "seeds": seeds, "steps": steps, "wall_s": wall,
            "log_rows": len(rows), "update_mode": rows[-1].get("update_mode"),
            "updates_per_s": seeds * mean("throughput/updates_per_s"),
            "agent_steps_per_s": seeds * mean("throughput/steps_per_s"),
            "per_seed_updates_per_s": mean("throughput/updates_per_s"),
            "p20": None, "p50": 1.0 / mean("throughput/updates_per_s"), "p80": None}


def main() -> None:
    catch_sigint()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=[*LEARNER, *OTHER, *SEEDS])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 4],
                        help="the e2e-seeds-* workloads: a run per --seeds N, side by side")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--precision", default=None, choices=["float32", "bfloat16"],
                        help="matmul/conv precision; default float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=None,
                        help="count each learner's FLOPs per update with the profiler (default: "
                             "on with CUDA); with matmul-peak it gives the fraction of peak")
    parser.add_argument("--e2e-steps", type=int, default=None,
                        help="agent steps of the e2e run (default: 5600 on CPU, 30000 on CUDA; the prefill is 5184)")
    parser.add_argument("--e2e-batch", type=int, nargs=2, default=(16, 64), metavar=("B", "T"),
                        help="the e2e run's batch size and length (small: rehearsals)")
    parser.add_argument("--e2e-envs", type=int, default=64, help="the e2e run's envs")
    parser.add_argument("--e2e-ratio", type=float, default=256.0,
                        help="the e2e run's train ratio (atari100k's 256 by default)")
    parser.add_argument("--e2e-env", default="auto", choices=("auto", "pong", "standin"),
                        help="the e2e run's env: auto = Pong with EnvPool, else the stand-in")
    parser.add_argument("--e2e-log-every", type=int, default=10,
                        help="the e2e run's log interval, seconds (rates come from its rows)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--burnin", type=int, default=1)
    parser.add_argument("--price", type=float, default=0.0, help="$ per device-hour")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    if kind == "cpu":
        keep_freed_memory()  # as run.py does on CPU (dreamer_fast.run.device.set_cpu_threads)
    precision = args.precision or ("bfloat16" if kind == "cuda" else "float32")
    e2e_steps = args.e2e_steps or (30_000 if kind == "cuda" else 5_600)
    flops = kind == "cuda" if args.flops is None else args.flops
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  commit {env['commit']}")
    tag = "cpu" if kind == "cpu" else env["device"].replace(" ", "-").lower()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"throughput-{tag}.jsonl")
    peak, written = None, 0
    for name in args.workloads or DEFAULTS[kind]:
        fixed = {"env-pong-64": ["envpool"], "matmul-peak": ["gemm"]}
        runs = ([(m, n) for m in fixed.get(name, args.modes) for n in args.seeds]
                if name in SEEDS else [(m, None) for m in fixed.get(name, args.modes)])
        base = None
        for mode, seeds in runs:
            try:
                row = (measure_seeds(name, mode, args, kind, seeds) if seeds else
                       measure(name, mode, args, kind, precision, e2e_steps, flops, peak))
                if seeds and "updates_per_s" in row:
                    base = row if seeds == min(args.seeds) else base
                    if base is not None:
                        row["vs_fewest_seeds"] = row["agent_steps_per_s"] / base[
                            "agent_steps_per_s"]
            except KeyboardInterrupt:  # SIGINT (a stage's time limit): the rows so far stay
                row = {"workload": name, "mode": mode, "error": "interrupted (SIGINT)"}
                _record(out, env, name, precision, args.price, row)
                print(f"interrupted: {written} rows appended to {os.path.relpath(out)}")
                sys.exit(130)
            if name == "matmul-peak" and "tflops" in row:
                peak = row["tflops"]
            _record(out, env, name, precision, args.price, row)
            written += 1
    print(f"appended {written} rows to {os.path.relpath(out)}")


def measure(name: str, mode: str, args, kind: str, precision: str, e2e_steps: int,
            flops: bool, peak: float | None) -> dict:
    """One row: the workload in the mode, or why it was skipped or failed."""
    if mode.startswith("graph") and kind != "cuda":
        return {"workload": name, "mode": mode, "skipped": "CUDA graphs need a GPU"}
    if mode == "compile" and name == "e2e-pong-64" and kind != "cuda":
        return {"workload": name, "mode": mode, "skipped": "compile e2e: CUDA only"}
    try:
        if name in LEARNER:
            row = learner(name, mode, args.iters, args.burnin, args.device, args.price,
                          precision, count_flops=flops)
            if row.get("achieved_tflops") and peak:
                row["fraction_of_matmul_peak"] = row["achieved_tflops"] / peak
            return row
        if name == "matmul-peak":
            return matmul_peak(args.device, precision)
        if name == "policy-64envs":
            return policy(mode, max(args.iters, 20), args.burnin + 2, args.device, precision)
        if name == "e2e-pong-64":
            return e2e_pong(mode, args.device, precision, e2e_steps, args.price,
                            tuple(args.e2e_batch), args.e2e_envs, args.e2e_ratio,
                            args.e2e_log_every, args.e2e_env)
        return env_pong(200, 20)
    except Exception as e:  # keep the other rows; record why this one failed
        return {"workload": name, "mode": mode, "error": f"{type(e).__name__}: {e}"}


def measure_seeds(name: str, mode: str, args, kind: str, seeds: int) -> dict:
    """One e2e-seeds row, or why it was skipped or failed."""
    if mode not in ("eager", "fused"):
        return {"workload": name, "mode": mode, "seeds": seeds,
                "skipped": "packed seeds run eager (reference or fused ops)"}
    try:
        return e2e_seeds(name, mode, args.device, seeds, args.e2e_steps, args.e2e_log_every)
    except Exception as e:  # keep the other rows; record why this one failed
        return {"workload": name, "mode": mode, "seeds": seeds,
                "error": f"{type(e).__name__}: {e}"}


def _record(out: str, env: dict, name: str, precision: str, price: float, row: dict) -> None:
    """Append one row the moment it is measured (a run cut short keeps the rows so far)."""
    batch = f"B16xT{LEARNER_AGENT.get(name, {}).get('batch_length', 64)}"
    row = {**env, "bench": "throughput", "batch": batch, "horizon": 15, "dtype": precision,
           "price_usd_per_hour": price, **row}
    append(out, [row])
    _print(row)


def _print(row: dict) -> None:
    if "error" in row or "skipped" in row:
        what = f"error: {row['error'][:300]}" if "error" in row else f"skipped: {row['skipped']}"
        print(f"{row['workload']:<22} {row['mode']:<12} {what}")
        return
    if row["workload"] == "matmul-peak":
        print(f"{'matmul-peak':<22} {row['mode']:<12} p50 {row['p50']:9.4f} s "
              f"{row['tflops']:8.2f} TFLOP/s ({row['size']}^3)", flush=True)
        return
    if row["workload"] in SEEDS:
        print(f"{row['workload']:<22} {row['mode']:<7} {row['seeds']:>2} seeds "
              f"{row['updates_per_s']:8.3f} seed-updates/s {row['agent_steps_per_s']:8.1f} "
              f"agent/s in all ({row.get('vs_fewest_seeds', 1.0):.2f}x the fewest seeds')",
              flush=True)
        return
    if row["workload"] == "e2e-pong-64":
        print(f"{row['workload']:<22} {row['mode']:<12} {row['updates_per_s']:8.3f} upd/s "
              f"{row['agent_steps_per_s']:9.1f} agent/s  learner busy "
              f"{row['learner_busy']:.0%} of standalone {row['standalone_updates_per_s']:.3f} "
              f"upd/s ({row['model']})", flush=True)
        return
    extra = (f" {row['updates_per_s']:8.3f} upd/s {row['agent_steps_per_s']:9.2f} agent/s"
             if "updates_per_s" in row else f" {row['agent_steps_per_s']:9.1f} agent steps/s")
    if row.get("achieved_tflops"):
        extra += f" {row['achieved_tflops']:.3f} TFLOP/s"
        if row.get("fraction_of_matmul_peak"):
            extra += f" ({row['fraction_of_matmul_peak']:.0%} of matmul peak)"
    print(f"{row['workload']:<22} {row['mode']:<12} p50 {row['p50']:9.4f} s "
          f"(p20 {row['p20']:.4f}, p80 {row['p80']:.4f}){extra}", flush=True)


if __name__ == "__main__":
    main()
