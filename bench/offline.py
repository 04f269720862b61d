"""Offline learning check: train from a run's saved replay alone, then evaluate.

    python bench/offline.py --source LOGDIR [--env CartPole-v1] [--updates 0] [--via-minari]

LOGDIR is a finished run of this project (e.g. one of bench/learning.py's, under
/tmp/dreamer-learning): its replay is the dataset (what that agent collected while it
learned) and its checkpoint the agent the result is compared with. The bench evaluates
the collecting agent, trains a fresh agent with `run.py --offline` (the preset's defaults;
--updates 0 = dataset steps x train_ratio / (B x T)), evaluates it with the eval command
(same seed, same episodes), and appends one row to bench/results/offline-<device>.jsonl.
With --via-minari the replay is first exported with `python -m dreamer_fast.export` to a
scratch Minari store, and the agent trains from that Minari dataset instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import environment  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd: list[str], env=None, log=None) -> str:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    if log:
        with open(log, "a") as f:
            f.write(out)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return out


def evaluate(logdir: str, episodes: int, seed: int) -> dict:
    sh([sys.executable, "run.py", "--eval", "--logdir", logdir, "--episodes", str(episodes),
        "--seed", str(seed), "--videos", "0"])
    with open(os.path.join(logdir, "eval", "returns.json")) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="a finished run's logdir")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--updates", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--via-minari", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("--logroot", default=os.path.join(tempfile.gettempdir(),
                                                          "dreamer-offline"))
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = os.path.join(args.logroot, f"{args.env}-offline{args.tag}-{stamp}")
    os.makedirs(logdir, exist_ok=True)
    source_eval = evaluate(args.source, args.episodes, args.seed)
    env = dict(os.environ)
    source = args.source
    if args.via_minari:
        env["MINARI_DATASETS_PATH"] = os.path.join(logdir, "minari")
        source = f"bench/{args.env.lower()}-{stamp}-v0"
        sh([sys.executable, "-m", "dreamer_fast.export", "--logdir", args.source,
            "--minari", source], env=env)
    cmd = [sys.executable, "run.py", "--offline", source, "--env", args.env, "--logdir", logdir,
           "--log-every", "30", *(["--updates", str(args.updates)] if args.updates else []),
           *args.flags]
    start = time.time()
    out = sh(cmd, env=env, log=os.path.join(logdir, "bench-stdout.txt"))
    minutes = (time.time() - start) / 60
    line = next(ln for ln in out.splitlines() if "offline from" in ln)
    ours = evaluate(logdir, args.episodes, args.seed)
    import torch

    ckpt = torch.load(os.path.join(logdir, "checkpoint.pt"), weights_only=True)
    src = torch.load(os.path.join(args.source, "checkpoint.pt"), weights_only=True)
    row = {"bench": "offline", "env": args.env, "source": args.source,
           "via_minari": args.via_minari, "dataset": line.split("offline from ")[1].split(" | ")[0],
           "source_agent_steps": int(src["counters"]["steps"]),
           "source_agent_updates": int(src["counters"]["updates"]),
           "source_eval_mean": source_eval["mean"], "source_eval_std": source_eval["std"],
           "updates": int(ckpt["counters"]["updates"]), "train_minutes": round(minutes, 2),
           "eval_mean": ours["mean"], "eval_std": ours["std"], "eval_episodes": ours["episodes"],
           "eval_seed": args.seed, "command": " ".join(cmd[1:]), "flags": args.flags,
           **environment()}
    device = "cpu" if "cpu" in row["device"] else row["device"].split()[-1].lower()
    path = os.path.join(ROOT, "bench", "results", f"offline-{device}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
