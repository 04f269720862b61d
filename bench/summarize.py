"""The latest truth of every bench, regenerated from the raw rows in bench/results/.

    python bench/summarize.py            # writes bench/results/summary-<bench>.md and
                                         # docs/benchmarks.md from the raw files
    python bench/summarize.py --fold     # also folds superseded learning runs into
                                         # bench/results/learning-history.jsonl

One table per bench, the latest row per (workload, mode, device, ...) key, each row with the
command that produces it and the commit it ran at. The raw files are append-only histories
(`<bench>-<device>.jsonl`; the learning suite's one JSON per run): nothing here measures.
tests/test_docs.py fails when a summary or the benchmarks page differs from what this script
writes, so they cannot drift from the rows.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DOCS = os.path.join(os.path.dirname(HERE), "docs", "benchmarks.md")


def rows(name: str) -> list[dict]:
    """Every row of bench/results/<name>-*.jsonl, oldest first."""
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, f"{name}-*.jsonl"))):
        with open(path) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return sorted(out, key=lambda r: r.get("time", ""))


def latest(items: list[dict], key) -> list[dict]:
    """The last row of each key(row), in order of first appearance."""
    kept: dict = {}
    for r in items:
        kept[key(r)] = r
    return list(kept.values())


def commit(r: dict) -> str:
    c = r.get("commit") or "-"
    return f"`{c[:7]}{'-dirty' if c.endswith('-dirty') else ''}`"


def table(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def device(r: dict) -> str:
    return r.get("device", "-").replace(" (x86_64, 2 cores)", ", 2 cores")


# ------------------------------------------------------------------------ one per bench

def learning() -> str:
    runs = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "learning-*.json"))):
        with open(path) as f:
            r = json.load(f)
        if r.get("bench") == "learning-suite":
            runs.append((os.path.basename(path)[:-5], r))
    runs.sort(key=lambda x: x[1].get("time", ""))
    solo = [x for x in runs if x[1].get("seeds", 1) == 1]
    packed = [x for x in runs if x[1].get("seeds", 1) > 1]
    body = []
    for name, r in latest(solo, lambda x: x[1]["task"]):
        reached, ev = r["reached"], r["eval"]
        body.append([r["task"], f"{r['target']:g} in {r['target_minutes']:g} min",
                     f"**{reached['minutes']:.1f} min**, {reached['steps']:,} steps" if reached
                     else "not reached",
                     f"{ev['mean']:.1f} +- {ev['std']:.1f}" if ev else "-",
                     f"`python bench/learning.py --tasks {r['task']}`", commit(r),
                     f"`{name}.json`"])
    return ("Each task from its plain command (`python run.py --env ID`; `--preset control` for "
            "an EnvPool DMC id), one seed, on the CPU; a run stops when the mean of its last "
            "10 training episodes reaches the target, then the final checkpoint is evaluated "
            "over 10 sampled episodes.\n\n"
            + table(["task", "target", "reached at", "eval", "command", "commit", "run file"],
                    body) + (packed_learning(packed) if packed else ""))


def packed_learning(runs: list) -> str:
    """The learning suite's packed runs (`--seeds N`): per seed and pooled."""
    body = []
    for name, r in latest(runs, lambda x: (x[1]["task"], x[1]["seeds"])):
        iqm = r.get("eval_iqm")
        finals = ", ".join("-" if f is None else f"{f:.0f}" for f in r["final_recent_means"])
        body.append([r["task"], str(r["seeds"]), f"{r['target']:g} in {r['target_minutes']:g} min",
                     f"{r['met']}/{r['seeds']}: " + ", ".join(
                         f"{x['minutes']:.1f}" if x else "not" for x in r["reached_per_seed"])
                     + " min", finals,
                     f"{iqm['iqm']:.1f} [{iqm['iqm_lo']:.1f}, {iqm['iqm_hi']:.1f}]" if iqm
                     else "-",
                     f"`python bench/learning.py --seeds {r['seeds']} --tasks {r['task']}`",
                     commit(r), f"`{name}.json`"])
    return ("\n\nPacked seeds (`--seeds N`: one process, one update for all seeds): per seed, "
            "when it met the target (wall-clock minutes of the packed run) and the mean of its "
            "last 10 training episodes at the stop; pooled, the IQM of the seeds' final "
            "evaluation means (10 sampled episodes each) with its 95% bootstrap interval.\n\n"
            + table(["task", "seeds", "target", "met at", "last 10 per seed", "eval IQM [95% CI]",
                     "command", "commit", "run file"], body))


def throughput() -> str:
    items = [r for r in rows("throughput") if "p50" in r and r["p50"]]
    body = []
    for r in latest(items, lambda r: (device(r), r["workload"], r["mode"], r.get("dtype"),
                                      r.get("seeds"))):
        what = (f"{r['tflops']:.2f} TFLOP/s" if r["workload"] == "matmul-peak" else
                f"{r['p50']:.3f} s / update" if "updates_per_s" in r and
                r["workload"].startswith("learner") else
                f"{r['agent_steps_per_s']:,.0f} agent steps/s")
        if r["workload"] == "e2e-pong-64":
            what = (f"{r['updates_per_s']:.2f} updates/s, {r['agent_steps_per_s']:.1f} agent "
                    f"steps/s ({r.get('env', 'Pong-v5')})")
        if r.get("seeds"):  # packed seeds end to end: aggregates over the seeds
            what = (f"{r['seeds']} seed{'s' * (r['seeds'] > 1)}: {r['agent_steps_per_s']:,.1f} "
                    f"agent steps/s, {r['updates_per_s']:.2f} seed-updates/s in all"
                    + (f" ({r['vs_fewest_seeds']:.2f}x)" if r["seeds"] > 1 and
                       "vs_fewest_seeds" in r else ""))
        modes = "" if r["workload"] in ("matmul-peak", "env-pong-64") else f" --modes {r['mode']}"
        body.append([device(r), r["workload"], r["mode"], r.get("dtype", "-"), what,
                     f"`python bench/throughput.py --workloads {r['workload']}{modes}`",
                     commit(r)])
    return ("p50 after burn-in; learner workloads at B16 x T64, H15 unless named otherwise.\n\n"
            + table(["device", "workload", "mode", "dtype", "p50", "command", "commit"], body))


def kernel_count() -> str:
    body = []
    items = [{"precision": "float32", **r} for r in rows("kernel-count")]  # older rows: fp32
    for r in latest(items, lambda r: (r["workload"], r["mode"], r["precision"],
                                      r.get("seeds", 1))):
        target = f"<= {r['target']:,}" if r.get("target") and r["mode"] == "triton" else "-"
        seeds = r.get("seeds", 1)
        mode = r["mode"].removeprefix("packed-")
        body.append([r["workload"], r["mode"], seeds, r["precision"], f"{r['kernels']:,}",
                     f"{r['kernels'] / seeds:,.0f}", target,
                     f"`python bench/kernel_count.py --workloads {r['workload']} --modes "
                     f"{mode} --precision {r['precision']}"
                     + (f" --seeds {seeds}`" if seeds > 1 else "`"), commit(r)])
    return ("Kernels one update launches (B16 x T64, H15), counted on the CPU: every dispatched "
            "op that launches a kernel on a GPU, a Triton op once. packed-ref / packed-fused / "
            "packed-triton: one update of N seeds (agent/packed.py; each Triton op launches "
            "once for every seed, without the solo update's deferred weight gradients).\n\n"
            + table(["workload", "mode", "seeds", "precision", "kernels", "per seed", "target",
                     "command", "commit"], body))


def kernels() -> str:
    items = [r for r in rows("kernels") if r.get("mode") == "both" and "p50" in r]
    body = []
    for r in latest(items, lambda r: (device(r), r["size"], r["case"], r["impl"])):
        note = " (interpreted)" if r.get("interpreted") else ""
        body.append([device(r), r["size"], r["case"], r["impl"] + note,
                     f"{r['p50'] * 1e6:,.0f}",
                     f"`python bench/kernels.py --sizes {r['size']} --cases {r['case']} "
                     f"--impls {r['impl']} --modes both`", commit(r)])
    return ("Each fused op forward + backward at the learner's shapes, microseconds (p50). "
            "Interpreted Triton timings are a check that the bench runs, not speed.\n\n"
            + table(["device", "size", "case", "impl", "us", "command", "commit"], body))


def learner() -> str:
    body = [[device(r), r["workload"], r.get("kernels", "ref"), f"{r['params']:,}",
             f"{r['p50']:.3f}", f"`python bench/learner.py --workloads {r['workload']}`",
             commit(r)] for r in latest(rows("learner"), lambda r: (device(r), r["workload"]))]
    return ("The eager learner update alone (an older, simpler bench than throughput).\n\n"
            + table(["device", "workload", "kernels", "params", "p50 s / update", "command",
                     "commit"], body))


def peer() -> str:
    body = [[device(r), r["peer"], r["workload"].split(" (")[0], f"{r['p50']:.2f} s / update",
             f"`{r['command']}`", r.get("time", "-")[:10]] for r in
            latest(rows("peer"), lambda r: (r["peer"], r["workload"]))]
    return ("A peer measured on the same machine, in the same session as our rows "
            "(`../shared/peer-bench`, not part of this repository).\n\n"
            + table(["device", "peer", "workload", "p50", "command", "date"], body))


def cnn() -> str:
    body = [[device(r), r["cnn"], f"{r['conv_gflop']:,.1f}", f"{r['p50']:.2f}",
             "`python bench/cnn.py`" + (" `--peer sheeprl`" if "sheeprl" in r["cnn"] else ""),
             commit(r)] for r in latest(rows("cnn"), lambda r: r["cnn"])]
    return ("The image encoder and decoder alone, forward and backward over one update's 1,024 "
            "images.\n\n" + table(["device", "CNN", "conv GFLOP", "p50 s", "command", "commit"],
                                  body))


def offline() -> str:
    body = [[r["env"], "Minari" if r.get("via_minari") else "replay folder", f"{r['updates']:,}",
             f"{r['eval_mean']:.1f} +- {r['eval_std']:.1f}",
             f"`python bench/offline.py --source RUN{' --via-minari' if r.get('via_minari') else ''}"
             f" --updates {r['updates']}`", commit(r)]
            for r in latest(rows("offline"), lambda r: (r["env"], r.get("via_minari")))]
    return ("A fresh agent trained on a learning-suite run's replay alone, then evaluated over "
            "20 episodes.\n\n" + table(["env", "source", "updates", "eval", "command", "commit"],
                                       body))


def saves() -> str:
    body = [[r["kind"], f"{r['capacity']:,}", f"{r['stored']:,}", f"{r['pause_s']:.3f}",
             f"{r['bytes_since_last_save'] / 1e6:,.1f}", "`python bench/saves.py`", commit(r)]
            for r in latest(rows("saves"), lambda r: (r["kind"], r["stored"]))]
    return ("What a save costs the run: the actor's pause and the bytes written since the last "
            "save.\n\n" + table(["save", "capacity", "steps stored", "pause s", "MB written",
                                 "command", "commit"], body))


def eval_gap() -> str:
    body = []
    for r in latest(rows("eval-gap"), lambda r: r["env"]):
        for p in r["phases"]:
            body.append([r["env"], f"{p['steps'][0]:,}-{p['steps'][1]:,}", p["pairs"],
                         f"{p['train_mean']:.1f}", f"{p['eval_mean']:.1f}",
                         f"{p['mean_abs_diff']:.1f}", "`python bench/eval_gap.py RUN`",
                         commit(r)])
    return ("Periodic evaluations (10 episodes, the weights of the moment) against the training "
            "episodes of the same log tick, per third of a run (`--eval-every 30`).\n\n"
            + table(["env", "steps", "pairs", "training mean", "eval mean", "mean |difference|",
                     "command", "commit"], body))


def fastpath() -> str:
    items = rows("fastpath")
    if not items:
        return "No rows yet: the check runs on CUDA (`bash bench/gpu_session.sh`)."
    body = []
    for r in latest(items, lambda r: (device(r), r["workload"])):
        if "error" in r:
            body.append([device(r), r["workload"], "error", r["error"][:80], "-", commit(r)])
            continue
        checks = "; ".join(f"{k}: " + (c["failure"] or f"{c['loss_rtol']:.1e} / "
                                                       f"{c['delta_cos']:.4f}")
                           for k, c in r["checks"].items())
        body.append([device(r), r["workload"], r["mode"], checks,
                     f"`python bench/fastpath.py --workloads {r['workload']}`", commit(r)])
    return ("The run's start check: each rung's update against the eager reference (loss "
            "relative difference / parameter deltas' cosine).\n\n"
            + table(["device", "workload", "chosen", "checks", "command", "commit"], body))


def packed() -> str:
    body = []
    for r in latest(rows("packed"), lambda r: (device(r), r["workload"], r["seeds"], r["mode"])):
        solo = next((o for o in reversed(rows("packed"))  # the latest solo row before r
                     if o["mode"] in ("solo-fused", "solo-triton")
                     and o["workload"] == r["workload"] and o["seeds"] == r["seeds"]
                     and o["time"] <= r["time"] and o["commit"] == r["commit"]
                     and device(o) == device(r)), None)
        ratio = f"{r['seed_updates_per_s'] / solo['seed_updates_per_s']:.2f}x" if solo else "-"
        body.append([device(r), r["workload"], r["seeds"], r["mode"],
                     f"{r['batch']}x{r['length']}", f"{r['p50']:.3f}",
                     f"{r['seed_updates_per_s']:.2f}", ratio,
                     f"`python bench/packed.py --workloads {r['workload']} --seeds {r['seeds']}`",
                     commit(r)])
    return ("N seeds' learner updates as one vmapped update (packed-ref, packed-fused, "
            "packed-triton) "
            "against one seed's "
            "solo update (solo-fused / solo-triton: the device's fast kernels, eager; "
            "solo-ref: the reference ops the packed update runs) and one solo update of N "
            "times the batch (batch-ref: what batching alone gives). Aggregate seed-updates "
            "per second, and its ratio to the solo fast kernels.\n\n"
            + table(["device", "workload", "seeds", "mode", "batch", "s / call",
                     "seed-updates/s", "vs solo fast", "command", "commit"], body))


BENCHES = {"learning": ("Learning", learning), "throughput": ("Throughput", throughput),
           "kernel-count": ("Kernels per update", kernel_count),
           "kernels": ("Kernels against their references", kernels),
           "learner": ("The learner update alone", learner),
           "peer": ("Peer on the same machine", peer), "cnn": ("The CNN alone", cnn),
           "offline": ("Offline training", offline), "saves": ("Saves", saves),
           "eval-gap": ("Evaluation against training returns", eval_gap),
           "fastpath": ("The start's fast-path check", fastpath),
           "packed": ("Packed seeds: one update for N seeds", packed)}

PAGE_HEAD = """# Benchmarks

The latest figures only, one table per area, each row with the command that produced it and
the commit it ran at. Generated by `python bench/summarize.py` from the raw rows in
`bench/results/` (append-only; the git history keeps every earlier run). Speed is compared
side by side in one run, never asserted by a test; the machine is named in each row.

GPU figures: none yet. No GPU has been lent to this project; `bash bench/gpu_session.sh`
(see [GPU session](gpu.md)) measures them all in one call.
"""


def render() -> dict[str, str]:
    """{path: text} of every summary file and the benchmarks page."""
    out, page = {}, [PAGE_HEAD]
    for name, (title, make) in BENCHES.items():
        body = make()
        out[os.path.join(RESULTS, f"summary-{name}.md")] = (
            f"# {title}\n\nGenerated by `python bench/summarize.py`; do not edit.\n\n{body}\n")
        page.append(f"## {title}\n\n{body}\n")
    out[DOCS] = "\n".join(page)
    return out


def fold() -> list[str]:
    """Move every learning run but each task's latest into learning-history.jsonl (with its
    file name); remove their files (git keeps them)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "learning-*.json"))):
        with open(path) as f:
            runs.append((path, json.load(f)))
    keep = {id(r) for _, r in latest(sorted(runs, key=lambda x: x[1].get("time", "")),
                                      lambda x: x[1].get("task", x[0]))}
    moved = []
    with open(os.path.join(RESULTS, "learning-history.jsonl"), "a") as history:
        for path, r in runs:
            if id(r) in keep:
                continue
            history.write(json.dumps({"file": os.path.basename(path), **r}) + "\n")
            for p in (path, path[:-5] + ".png"):
                if os.path.exists(p):
                    os.remove(p)
            moved.append(os.path.basename(path))
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fold", action="store_true",
                        help="fold superseded learning runs into learning-history.jsonl")
    args = parser.parse_args()
    if args.fold:
        print(f"folded {len(fold())} learning runs into learning-history.jsonl")
    for path, text in render().items():
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
