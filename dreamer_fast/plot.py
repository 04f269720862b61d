"""Learning curves from runs' metrics.jsonl: return vs agent steps and vs wall-clock.

    python -m dreamer_fast.plot LOGDIR [LOGDIR ...] [--out curves.png] [--key episode/return]

Runs of one name (`--name` at training, else the env id; `--group-by logdir` plots each run
alone), and the seeds of a packed run (`--seeds N`: its folder stands for its seed<i> folders),
are pooled: their mean on a common axis, with a 95% bootstrap interval of that mean
shaded (`--band minmax`: the min-max spread), and the IQM of the runs' values at their
common last step with its stratified bootstrap interval printed (Agarwal et al. 2021;
scores.py). Needs matplotlib
(`pip install matplotlib`). Imports nothing else of the package but scores.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from dreamer_fast.scores import mean_interval, summary


class PlotError(ValueError):
    """A bad input, with a one-line message."""


def load_run(logdir: str, key: str) -> dict:
    """{name, steps, minutes, values} of one run folder (rows of metrics.jsonl with `key`)."""
    path = os.path.join(logdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise PlotError(f"no metrics.jsonl in {logdir!r} (a run folder written by run.py)")
    rows, keys = [], set()
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            keys.update(row)
            if key in row and "step" in row and "time" in row:
                rows.append(row)
    if not rows:
        known = ", ".join(sorted(k for k in keys if "/" in k)[:12])
        raise PlotError(f"{path} has no {key!r} rows yet; keys there: {known or 'none'}")
    name = os.path.basename(os.path.abspath(logdir))
    config = os.path.join(logdir, "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            cfg = json.load(f)
        name = cfg.get("name") or cfg.get("env") or name
    t0 = rows[0]["time"]
    return {"logdir": logdir, "name": name, "steps": np.array([r["step"] for r in rows], float),
            "minutes": (np.array([r["time"] for r in rows]) - t0) / 60.0,
            "values": np.array([r[key] for r in rows], float)}


def expand(logdirs: list[str]) -> list[str]:
    """Run folders, a packed run's (trained with --seeds N) replaced by its seed<i> folders:
    N runs of one name, pooled like runs trained one by one."""
    out = []
    for logdir in logdirs:
        seeds = 1
        try:
            with open(os.path.join(logdir, "config.json")) as f:
                seeds = int(json.load(f).get("seeds", 1))
        except (OSError, ValueError):
            pass
        out += [os.path.join(logdir, f"seed{i}") for i in range(seeds)] if seeds > 1 else [logdir]
    return out


def pooled(runs: list[dict], axis: str, points: int = 200, band: str = "ci"):
    """(x, mean, lo, hi) of the runs on a common grid up to the shortest run's end; lo-hi is
    the 95% bootstrap interval of the mean (band 'ci') or the runs' min-max (band 'minmax')."""
    end = min(r[axis][-1] for r in runs)
    start = max(r[axis][0] for r in runs)
    x = np.linspace(start, end, points) if end > start else np.array([start])
    ys = np.stack([np.interp(x, r[axis], r["values"]) for r in runs])
    lo, hi = mean_interval(ys) if band == "ci" else (ys.min(0), ys.max(0))
    return x, ys.mean(0), lo, hi


def final_scores(runs: list[dict]) -> tuple[float, dict]:
    """(step, scores.summary of the runs' values there): the common end of the runs' step
    axes (the shortest run's last step), as the pooled curve ends, so a young run is never
    pooled with finished ones."""
    end = min(r["steps"][-1] for r in runs)
    return end, summary([float(np.interp(end, r["steps"], r["values"])) for r in runs])


def plot(runs: list[dict], key: str, out: str, group_by: str = "name",
         band: str = "ci") -> dict:
    """Draws the two panels to `out`; returns {group: number of runs}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["name"] if group_by == "name" else r["logdir"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (label, members), color in zip(groups.items(), plt.rcParams["axes.prop_cycle"]):
        color = color["color"]
        for ax, axis in zip(axes, ("steps", "minutes")):
            if len(members) == 1:
                r = members[0]
                ax.plot(r[axis], r["values"], color=color, label=label,
                        marker="o" if len(r["values"]) == 1 else None)  # one point: a dot
            else:
                x, mean, lo, hi = pooled(members, axis, band=band)
                what = "95% CI" if band == "ci" else "min-max"
                ax.plot(x, mean, color=color, label=f"{label} (mean of {len(members)}, {what})",
                        marker="o" if len(x) == 1 else None)
                ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
    axes[0].set_xlabel("agent steps")
    axes[1].set_xlabel("wall-clock minutes")
    for ax in axes:
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {k: len(v) for k, v in groups.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreamer_fast.plot",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("logdirs", nargs="+", help="run folders (with metrics.jsonl)")
    parser.add_argument("--out", default="curves.png", help="PNG to write (default curves.png)")
    parser.add_argument("--key", default="episode/return",
                        help="metric to plot (default episode/return; e.g. eval/return)")
    parser.add_argument("--group-by", choices=["name", "logdir"], default="name",
                        help="pool runs of one name (default) or plot each run alone")
    parser.add_argument("--band", choices=["ci", "minmax"], default="ci",
                        help="shade around a pooled mean: its 95%% bootstrap interval (default) "
                             "or the runs' min-max spread")
    args = parser.parse_args(argv)
    runs = []
    for logdir in expand(args.logdirs):  # a folder without the key is skipped, saying why
        try:
            runs.append(load_run(logdir, args.key))
        except PlotError as e:
            print(f"skipped {logdir}: {e}")
    if not runs:
        sys.exit(f"error: no run folder among the {len(args.logdirs)} given has {args.key!r} "
                 "rows (skipped above); nothing to plot")
    try:
        groups = plot(runs, args.key, args.out, args.group_by, args.band)
    except PlotError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: " + ", ".join(f"{k} ({n} run{'s' * (n > 1)})"
                                            for k, n in groups.items()))
    by_name: dict[str, list[dict]] = {}
    for r in runs:
        by_name.setdefault(r["name"], []).append(r)
    for name, members in by_name.items():
        if len(members) > 1 and args.group_by == "name":
            end, s = final_scores(members)
            print(f"{name}: {args.key} at step {end:,.0f} over {s['runs']} runs: IQM "
                  f"{s['iqm']:.1f} [{s['iqm_lo']:.1f}, {s['iqm_hi']:.1f}] (95% stratified "
                  f"bootstrap), mean {s['mean']:.1f}")


if __name__ == "__main__":
    main()
