"""Learning benchmark suite (not a test): each task from its plain `python run.py --env ID`.

    python bench/learning.py                                   # the three tasks below, in turn
    python bench/learning.py --tasks CartPole-v1 Acrobot-v1 CartpoleBalance-v1 MyEnv-v0
    python bench/learning.py --tasks CartPole-v1 --tag lr1e-3 --flags --agent.optim.lr 1e-3
    python bench/learning.py --seeds 4 --tasks CartPole-v1 Acrobot-v1 Pendulum-v1

One run at a time (the machine's cores are the learner's), each `python run.py --env ID` with
no flag beyond `--preset control` for an EnvPool DMC id (and `--flags`, for sweeps). A task
stops when the mean of its last 10 training episodes reaches the target, at its time limit, or
when the run ends its step budget (`--full`: never at the target). The final checkpoint is then
evaluated over 10 episodes. Per task it writes bench/results/learning-<task>[-<tag>].json
(return vs wall-clock minutes and vs agent steps, flags, environment record, evaluation) and a
.png of both curves; bench/results/summary-learning.md (bench/summarize.py) holds the latest
run per task.

Targets (2-core CPU, one seed): CartPole-v1 >= 475 within 10 minutes; Acrobot-v1 >= -100
within 20; CartpoleBalance-v1 >= 800 within 45 (the official DreamerV3 reaches 840 +- 91 at 100k
env steps on it: danijar/dreamerv3, scores of dmc_proprio); Pendulum-v1 >= -200 within 15
(Gymnasium's Pendulum has no reward threshold; -200 is the usual "solved" line, a swing-up
held upright).

`--seeds N` trains each task as one packed run (`run.py --seeds N`) and reports each seed
(reached the target or not, and when) and the seeds pooled: how many met the target, and the
interquartile mean (IQM) of the final evaluation's per-seed means with its 95% bootstrap
interval. It stops when every seed has met the target. A CPU trains N seeds' updates in about
N times one seed's time (bench/results/summary-packed.md), so the time limit is N times the
task's (`--minutes` sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import environment  # noqa: E402

WINDOW = 10
TARGETS = {"CartPole-v1": (475.0, 10.0), "Acrobot-v1": (-100.0, 20.0),
           "CartpoleBalance-v1": (800.0, 45.0), "Pendulum-v1": (-200.0, 15.0)}
"""Task -> (mean return of the last WINDOW training episodes, minutes)."""
DEFAULT_MINUTES = 30.0  # for a task without a target


def task_flags(task: str) -> list[str]:
    """The plain command's flags: the env id, plus `--preset control` for an EnvPool DMC id."""
    from dreamer_fast.envs import suite_of

    flags = ["--env", task]
    if suite_of(task) == "dmc":
        flags += ["--preset", "control"]
    return flags


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


def first_reached(curve: list[dict], target: float) -> dict | None:
    """The first log row at which the mean of the last WINDOW episodes reached the target."""
    for i in range(len(curve)):
        mean = recent_mean(curve[:i + 1])
        if mean is not None and mean >= target:
            return curve[i]
    return None


def metrics_files(logdir: str, seeds: int) -> list[str]:
    """The metrics.jsonl of each seed (a packed run writes one per seed<i>/ folder)."""
    if seeds == 1:
        return [os.path.join(logdir, "metrics.jsonl")]
    return [os.path.join(logdir, f"seed{i}", "metrics.jsonl") for i in range(seeds)]


def train(cmd: list[str], logdir: str, minutes: float, target: float | None,
          full: bool, seeds: int = 1) -> tuple[list[list[dict]], float]:
    """Run cmd until every seed's recent mean reached the target (unless full), the time
    limit or its end; returns (each seed's curve, start time)."""
    log = open(os.path.join(logdir, "bench-stdout.txt"), "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < minutes * 60:
            time.sleep(5)
            means = [recent_mean(read_curve(path, t0)) for path in metrics_files(logdir, seeds)]
            if (not full and target is not None
                    and all(m is not None and m >= target for m in means)):
                break
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # saves a checkpoint, then exits
            proc.wait(timeout=300)
        log.close()
    return [read_curve(path, t0) for path in metrics_files(logdir, seeds)], t0


def plot(curves: list[list[dict]], target: float | None, title: str, path: str) -> None:
    """Return vs wall-clock and vs agent steps, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "minutes", "wall-clock minutes"),
                           (axes[1], "steps", "agent steps")):
        for i, curve in enumerate(curves):
            ax.plot([r[key] for r in curve], [r["return"] for r in curve], marker=".",
                    label=f"seed {i}" if len(curves) > 1 else None)
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", label=f"target {target:g}")
            ax.legend()
        ax.set(xlabel=label)
    axes[0].set(ylabel="training episode return (per log interval)")
    fig.suptitle(textwrap.fill(title, 130), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_row(r: dict) -> str:
    if r.get("seeds", 1) > 1:
        iqm = r["eval_iqm"]
        return (f"| {r['task']} ({r['seeds']} seeds) | {r['target']} | {r['met']}/{r['seeds']} "
                "met, at " + ", ".join(f"{x['minutes']:.1f}" if x else "-"
                                       for x in r["reached_per_seed"]) + " min | "
                + (f"IQM {iqm['iqm']:.1f} [{iqm['iqm_lo']:.1f}, {iqm['iqm_hi']:.1f}]"
                   if iqm else "-") + f" | `{r['commit'][:12]}` |")
    reached = r["reached"]
    ev = r["eval"]
    return (f"| {r['task']}{' (' + r['tag'] + ')' if r['tag'] else ''} | "
            f"{r['target'] if r['target'] is not None else '-'} in "
            f"{r['target_minutes']:g} min | "
            + (f"**{reached['minutes']:.1f} min**, {reached['steps']:,} steps"
               if reached else "not reached") + " | "
            + (f"{r['final_recent_mean']:.1f}" if r["final_recent_mean"] is not None else "-")
            + f" | {r['final_steps']:,} steps, {r['minutes']:.1f} min | "
            + (f"{ev['mean']:.1f} +- {ev['std']:.1f}" if ev else "-")
            + f" | `{r['commit'][:12]}` |")


def write_summary(out: str) -> None:
    """bench/results/summary-learning.md (and the other summaries, docs/benchmarks.md)."""
    from bench.summarize import render

    for path, text in render().items():
        with open(path, "w") as f:
            f.write(text)


def replot(out: str) -> None:
    for name in sorted(os.listdir(out)):
        if name.startswith("learning-") and name.endswith(".json"):
            with open(os.path.join(out, name)) as f:
                r = json.load(f)
            if r.get("bench") == "learning-suite":
                plot(r.get("curves", [r["curve"]]), r["target"], f"dreamer_fast: {r['command']}",
                     os.path.join(out, name[:-5] + ".png"))
    write_summary(out)


def run_task(task: str, args) -> dict:
    target, minutes = TARGETS.get(task, (None, DEFAULT_MINUTES))
    minutes = args.minutes or minutes * args.seeds
    packed = f"-seeds{args.seeds}" if args.seeds > 1 else ""
    name = (task.replace(":", "_").replace("/", "_") + packed
            + (f"-{args.tag}" if args.tag else ""))
    logdir = os.path.join(args.logroot, f"{name}-{int(time.time())}")
    os.makedirs(logdir, exist_ok=True)
    flags = task_flags(task) + (["--seeds", str(args.seeds)] if args.seeds > 1 else [])
    flags += list(args.flags)
    cmd = [sys.executable, "run.py", *flags, "--logdir", logdir]
    print(f"[{task}] {' '.join(cmd[1:])}", flush=True)
    curves, t0 = train(cmd, logdir, minutes, target, args.full, args.seeds)
    elapsed = (time.time() - t0) / 60
    subprocess.run([sys.executable, "run.py", "--eval", "--logdir", logdir, "--episodes",
                    str(WINDOW)], cwd=ROOT, check=False, stdout=subprocess.DEVNULL)
    eval_file = os.path.join(logdir, "eval", "returns.json")
    evaluation = None
    if os.path.exists(eval_file):
        with open(eval_file) as f:
            evaluation = json.load(f)
    reached = [first_reached(c, target) if target is not None else None for c in curves]
    result = {"bench": "learning-suite", "task": task, "tag": args.tag, "target": target,
              "target_minutes": minutes, "window": WINDOW, "seeds": args.seeds,
              "reached": reached[0], "final_recent_mean": recent_mean(curves[0]),
              "final_steps": curves[0][-1]["steps"] if curves[0] else 0, "minutes": elapsed,
              "command": "python " + " ".join(cmd[1:-2]), "curve": curves[0],
              "eval": evaluation, **environment()}
    if args.seeds > 1:
        from dreamer_fast.scores import summary

        finals = [recent_mean(c) for c in curves]
        means = [s["mean"] for s in (evaluation or {}).get("seeds", []) if s["mean"] is not None]
        result.update(reached_per_seed=reached, final_recent_means=finals,
                      curves=curves, met=sum(r is not None for r in reached),
                      eval_iqm=summary(means) if means else None)
    out = os.path.join(ROOT, "bench", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"learning-{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(curves, target, f"dreamer_fast: python {' '.join(cmd[1:-2])}",
         os.path.join(out, f"learning-{name}.png"))
    write_summary(out)
    print(f"[{task}] {summary_row(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TARGETS))
    parser.add_argument("--minutes", type=float, default=None,
                        help="time limit per task (default: the task's target time)")
    parser.add_argument("--full", action="store_true",
                        help="do not stop at the target (run to the time limit or budget)")
    parser.add_argument("--tag", default="", help="suffix of the result files (sweeps)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train each task as one packed run of N seeds (run.py --seeds N)")
    parser.add_argument("--logroot", default=os.path.join("/tmp", "dreamer-learning"))
    parser.add_argument("--replot", action="store_true",
                        help="redraw every learning-*.png and the summary from the JSON files")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="extra run.py flags (sweeps only; the suite runs without)")
    args = parser.parse_args()
    if args.replot:
        return replot(os.path.join(ROOT, "bench", "results"))
    for task in args.tasks:
        run_task(task, args)


if __name__ == "__main__":
    main()
