"""Learning benchmark (not a test): DreamerV3 on CartPole-v1 on the CPU, return vs wall-clock.

    python bench/learning.py                 # 30 minutes at most, stops early on the target
    python bench/learning.py --minutes 10 --logdir /tmp/cartpole

Target: mean training-episode return >= 450 (over the last 10 episodes) within 30 minutes of
CPU wall-clock on a 2-core machine. Runs `run.py` in a subprocess with the settings below,
reads its metrics.jsonl, then evaluates the final checkpoint (10 sampled episodes). Writes
bench/results/learning-cartpole.json (curve, settings, environment record) and a PNG plot.

Settings, chosen for a learner that does ~4 updates/s on one busy CPU core:
  * model: deter 128, hidden 64, units 64, 16 latents x 8 classes, 4 GRU blocks (~0.3 s per
    B16xT32 update on one core vs 0.46 s for size1m; CartPole's 4-d state needs no more).
  * batch 16 x 32, imagination horizon 15; train_ratio 128 (1 update per 4 agent steps), so
    30 minutes give ~7k updates over ~25k agent steps, the range where DreamerV3 solves it.
  * lr 3e-4 with 100 warm-up updates: 4e-5 is tuned for size200m; small nets learn faster
    with a larger step, and AGC (0.3) keeps updates bounded.
  * 4 envs (episodes last up to 500 steps; more envs only dilute the online queue).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import environment  # noqa: E402

TARGET, WINDOW = 450.0, 10
FLAGS = ["--env", "CartPole-v1", "--preset", "debug", "--num-envs", "4", "--steps", "200000",
         "--train-ratio", "128", "--net.deter", "128", "--net.hidden", "64", "--net.units", "64",
         "--net.stoch", "16", "--net.classes", "8", "--net.blocks", "4",
         "--agent.batch-size", "16", "--agent.batch-length", "32", "--agent.imag-horizon", "15",
         "--agent.optim.lr", "3e-4", "--agent.optim.warmup", "100",
         "--replay.capacity", "200000", "--log-every", "15", "--save-every", "300",
         "--report-every", "600"]


def read_curve(path: str, t0: float) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if "episode/return" in row:
                    rows.append({"minutes": (row["time"] - t0) / 60, "steps": row["step"],
                                 "return": row["episode/return"],
                                 "episodes": row["episode/count"],
                                 "updates": row.get("counts/updates", 0)})
    return rows


def recent_mean(curve: list[dict]) -> float | None:
    """Mean return of (about) the last WINDOW episodes, from per-interval means and counts."""
    total = count = 0.0
    for row in reversed(curve):
        total += row["return"] * row["episodes"]
        count += row["episodes"]
        if count >= WINDOW:
            return total / count
    return None


def train(logdir: str, minutes: float) -> tuple[list[dict], float | None, float]:
    proc = subprocess.Popen([sys.executable, "run.py", *FLAGS, "--logdir", logdir], cwd=ROOT)
    t0, reached = time.time(), None
    try:
        while proc.poll() is None and time.time() - t0 < minutes * 60:
            time.sleep(10)
            curve = read_curve(os.path.join(logdir, "metrics.jsonl"), t0)
            mean = recent_mean(curve)
            if mean is not None and mean >= TARGET:
                reached = (time.time() - t0) / 60
                break
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # saves a checkpoint, then exits
            proc.wait(timeout=300)
    return read_curve(os.path.join(logdir, "metrics.jsonl"), t0), reached, t0


def plot(curve: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["minutes"] for r in curve], [r["return"] for r in curve], marker=".")
    ax.axhline(TARGET, color="gray", linestyle="--", label=f"target {TARGET:g}")
    ax.set(xlabel="wall-clock minutes (CPU)", ylabel="training episode return",
           title="dreamer_fast on CartPole-v1 (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--logdir", default=f"/tmp/learning-cartpole-{int(time.time())}")
    args = parser.parse_args()
    curve, reached, _ = train(args.logdir, args.minutes)
    subprocess.run([sys.executable, "run.py", "--eval", "--logdir", args.logdir,
                    "--episodes", "10"], cwd=ROOT, check=False)
    eval_file = os.path.join(args.logdir, "eval", "returns.json")
    evaluation = json.load(open(eval_file)) if os.path.exists(eval_file) else None
    result = {"bench": "learning-cartpole", "target": TARGET, "window": WINDOW,
              "target_met": reached is not None, "minutes_to_target": reached,
              "final_recent_mean": recent_mean(curve), "flags": FLAGS, "curve": curve,
              "eval": evaluation, **environment()}
    out = os.path.join(ROOT, "bench", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "learning-cartpole.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(curve, os.path.join(out, "learning-cartpole.png"))
    print(f"target {'met' if reached else 'NOT met'}: "
          f"{'%.1f min' % reached if reached else ''} final mean {result['final_recent_mean']}")


if __name__ == "__main__":
    main()
