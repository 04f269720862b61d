"""run.py as a 2-process data-parallel world on CPU (gloo), each rank a subprocess with
torchrun's env vars: training on both ranks, rank-0-only logs, per-rank replays, identical
replicas, a SIGTERM to one rank stopping and saving both, SIGKILL of the whole process group
and resume, a finished run launched by torchrun itself, and a resume with the wrong world size.

Every wait has a deadline, so a hang fails the test instead of blocking CI."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
# debug preset (CartPole): 4 envs per rank, B4 x T16; warm-up 4 * 17 + 64 = 132 steps a rank.
ARGS = ["--env", "CartPole-v1", "--preset", "debug", "--train-ratio", "16", "--seed", "1",
        "--log-every", "1", "--save-every", "2", "--report-every", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    # One torch thread a rank: the machine's cores are shared (set_cpu_threads agrees).
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


class World:
    """WORLD ranks of run.py in one process group (rank 0 leads it), like torchrun starts them."""

    def __init__(self, args, logdir):
        port = str(free_port())
        self.procs = []
        for rank in range(WORLD):
            group = self.procs[0].pid if rank else 0  # 0: a new group that rank 0 leads
            self.procs.append(subprocess.Popen(
                [sys.executable, "run.py", *args, "--logdir", str(logdir)], cwd=ROOT,
                env=env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                        LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, process_group=group))

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def killpg(self, sig) -> None:
        os.killpg(self.procs[0].pid, sig)

    def wait(self, timeout: float) -> list[str]:
        """Both outputs once both exit; kills the group and fails after `timeout` s."""
        try:
            outs = []
            deadline = time.monotonic() + timeout
            for p in self.procs:
                outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            return outs
        except subprocess.TimeoutExpired:
            self.killpg(signal.SIGKILL)
            raise AssertionError("ranks still running (hang?):\n" + "\n".join(
                f"--- rank {r}\n{p.communicate()[0]}" for r, p in enumerate(self.procs)))

    def wait_for(self, predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                self.killpg(signal.SIGKILL)
                raise AssertionError("a rank exited early:\n" + "\n".join(self.wait(30)))
            try:
                if predicate():
                    return
            except (OSError, RuntimeError, EOFError, KeyError):  # file not written yet
                pass
            time.sleep(0.5)
        self.killpg(signal.SIGKILL)
        raise AssertionError("timed out:\n" + "\n".join(self.wait(30)))


def load(logdir, name="checkpoint.pt"):
    return torch.load(os.path.join(logdir, name), weights_only=True)


def save_point(logdir, rank, save_id=None) -> tuple[dict, np.ndarray]:
    """(meta, per-stream counts) of rank's replay save point (default: the checkpoint's)."""
    save_id = load(logdir)["save_id"] if save_id is None else save_id
    with np.load(os.path.join(logdir, f"replay-rank{rank}", f"save-{save_id:06d}.npz")) as d:
        return json.loads(str(d["meta"])), d["count"]


def replay_steps(logdir, rank) -> int:
    return int(save_point(logdir, rank)[1].sum())


def checksums(out: str) -> dict[int, int]:
    return {int(r): int(c) for r, c in
            re.findall(r"\[rank (\d)\] [\d,]+ agent steps, [\d,]+ updates, parameter checksum "
                       r"(\d+)", out)}


def resumed(out: str) -> dict[int, tuple[int, int]]:
    """{rank: (agent steps, updates)} from the resume lines."""
    return {int(r): (int(s.replace(",", "")), int(u.replace(",", ""))) for r, s, u in
            re.findall(r"\[rank (\d)\] resumed from .*?: ([\d,]+) agent steps, ([\d,]+) updates",
                       out)}


def test_two_ranks_sigterm_sigkill_resume_finish_and_world_size(tmp_path):
    from dreamer_fast.run.replicas import param_checksum

    logdir = tmp_path / "dp"
    args = [*ARGS, "--steps", "100000"]

    # 1. Both ranks train and save; SIGTERM to rank 1 alone stops and saves both.
    world = World(args, logdir)
    world.wait_for(lambda: load(logdir)["counters"]["updates"] > 0
                   and replay_steps(logdir, 1) > 0, 150)
    world.procs[1].send_signal(signal.SIGTERM)
    out0, out1 = world.wait(90)
    assert [p.returncode for p in world.procs] == [0, 0], out0 + out1
    assert "stop requested on rank(s) 1 (SIGTERM or Ctrl-C): saving" in out0, out0
    assert "2 processes x 4 envs | batch 4 per process = 8 global" in out0, out0
    assert "logdir:" not in out1 and not re.search(r"^step [\d,]+/", out1, re.M)  # rank 0 logs
    ckpt = load(logdir)
    assert ckpt["world_size"] == 2 and ckpt["counters"]["updates"] > 0
    files = set(os.listdir(logdir))
    assert {"checkpoint.pt", "replay-rank0", "replay-rank1", "metrics.jsonl",
            "config.json"} <= files and "replay" not in files
    assert len([f for f in files if f.startswith("events.out.tfevents")]) == 1
    assert not [f for f in files if ".tmp" in f]
    # Replicas identical, and equal to the saved agent.
    sums = checksums(out0 + out1)
    assert sums.keys() == {0, 1} and sums[0] == sums[1] == param_checksum(ckpt["agent"]), sums
    assert "replicas identical" in out0
    steps = [replay_steps(logdir, r) for r in range(WORLD)]
    limiters = [save_point(logdir, r)[0]["limiter"] for r in range(WORLD)]
    assert {save_point(logdir, r)[0]["run_id"] for r in range(WORLD)} == {ckpt["run_id"]}
    assert all(s > 0 for s in steps) and all(lim["replayed"] > 0 for lim in limiters)
    # Logged steps are summed over ranks.
    rows = [r for r in map(json.loads, open(logdir / "metrics.jsonl")) if "counts/steps" in r]
    assert rows[-1]["counts/steps"] == sum(steps) and "loss/dyn" in rows[-1]
    assert any("episode/return" in r for r in rows)

    # 2. The same command resumes both ranks; then SIGKILL of the whole group mid-run.
    world = World(args, logdir)
    updates = ckpt["counters"]["updates"]
    # Every rank's save point is written before rank 0 publishes the checkpoint naming it.
    world.wait_for(lambda: load(logdir)["counters"]["updates"] > updates + 5, 150)
    world.killpg(signal.SIGKILL)
    out0, out1 = world.wait(30)
    assert resumed(out0) == {0: (steps[0], updates)}, out0
    assert resumed(out1) == {1: (steps[1], updates)}, out1
    ckpt = load(logdir)
    steps2 = [replay_steps(logdir, r) for r in range(WORLD)]
    assert ckpt["counters"]["updates"] > updates and all(b > a for a, b in zip(steps, steps2))

    # 3. torchrun itself relaunches it with a budget it reaches: resume, finish, agree.
    total = sum(steps2) + 300
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "run.py", *ARGS,
         "--steps", str(total), "--logdir", str(logdir)],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, out
    assert resumed(out) == {r: (steps2[r], ckpt["counters"]["updates"]) for r in range(WORLD)}
    final = load(logdir)
    sums = checksums(out)
    assert sums.keys() == {0, 1} and sums[0] == sums[1] == param_checksum(final["agent"]), out
    assert final["counters"]["updates"] > ckpt["counters"]["updates"]
    assert final["counters"]["steps"] >= total
    assert all(replay_steps(logdir, r) >= total // WORLD for r in range(WORLD))

    # 4. One process cannot resume a 2-process run: the error names both world sizes.
    proc = subprocess.run([sys.executable, "run.py", *args, "--logdir", str(logdir)], cwd=ROOT,
                          env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "saved with world size 2" in proc.stdout and "world size 1" in proc.stdout, proc.stdout
