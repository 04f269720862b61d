"""The summary of a bench/gpu_session.sh run: at most 60 lines, what a remote call shows.

    python bench/session_summary.py OUTDIR

One line per stage (exit code, seconds, limit; a test stage's pytest tally), then one line per
result row of the stage files in OUTDIR (kernel timings folded to one line per case), the
rest counted. Reads OUTDIR/stages.tsv (written by the script) and OUTDIR/*.jsonl.
"""

from __future__ import annotations

import glob
import json
import os
import sys

MAX_LINES = 60


def stage_lines(out: str) -> list[str]:
    path = os.path.join(out, "stages.tsv")
    if not os.path.exists(path):
        return ["no stage ran (stages.tsv missing)"]
    lines = []
    for row in open(path):
        name, rc, secs, limit, note = (row.rstrip("\n").split("\t") + [""] * 5)[:5]
        state = {"0": "ok", "124": "TIMED OUT", "130": "cut (SIGINT)", "skip": "skipped"}.get(
            rc, f"FAILED rc {rc}")
        lines.append(f"stage {name:<14} {state:<13} {secs:>4}s of {limit:>4}s {note}".rstrip())
    return lines


def row_line(row: dict) -> str | None:
    bench = row.get("bench", "?")
    what = row.get("workload") or row.get("case") or "?"
    if "error" in row:
        return f"{bench:<11} {what:<24} {row.get('mode', ''):<12} error: {row['error'][:70]}"
    if "skipped" in row:
        return None
    if bench == "throughput":
        if what == "matmul-peak":
            return f"{bench:<11} {what:<24} {row['mode']:<12} {row['tflops']:.1f} TFLOP/s"
        if "updates_per_s" in row:
            extra = f" learner busy {row['learner_busy']:.0%}" if "learner_busy" in row else ""
            env = " [stand-in env]" if "stand-in" in str(row.get("env", "")) else ""
            return (f"{bench:<11} {what:<24} {row['mode']:<12} p50 {row['p50']:.4f}s "
                    f"{row['updates_per_s']:.2f} upd/s {row['agent_steps_per_s']:.0f} "
                    f"agent/s{extra}{env}")
        return (f"{bench:<11} {what:<24} {row['mode']:<12} p50 {row['p50']:.5f}s "
                f"{row.get('agent_steps_per_s', 0):.0f} agent/s")
    if bench == "fastpath":
        checks = " ".join(f"{r}:" + ("fail" if c.get("failure") else
                                     f"{c['loss_rtol']:.0e}/{c['delta_cos']:.3f}")
                          for r, c in row.get("checks", {}).items())
        return f"{bench:<11} {what:<24} -> {row['mode']:<12} {row['seconds']:.0f}s {checks}"
    if bench == "packed":
        return (f"{bench:<11} {what:<24} {row['mode']:<12} x{row['seeds']:<3} p50 "
                f"{row['p50']:.4f}s {row['seed_updates_per_s']:.2f} seed-upd/s")
    if "kernels" in row and "phases" in row:
        return f"kernelcount {what:<24} {row['mode']:<12} {row['kernels']:,} kernels"
    return None


def kernel_lines(rows: list[dict]) -> list[str]:
    """Kernel timings: one line per (size, case), the fwd+bwd p50 of each impl in us."""
    cases: dict = {}
    for r in rows:
        if r.get("mode") == "both":
            key = (r["size"], r["case"])
            cases.setdefault(key, {})[r["impl"]] = ("err" if "error" in r else
                                                   f"{r['p50'] * 1e6:.0f}")
    return [f"kernels     {size:<9} {case:<22} " + " ".join(f"{i} {v}" for i, v in impls.items())
            for (size, case), impls in cases.items()]


def main() -> None:
    out = sys.argv[1]
    lines = stage_lines(out)
    rest = []
    for path in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
        rows = [json.loads(line) for line in open(path) if line.strip()]
        if any(r.get("bench") == "kernels" for r in rows):
            rest += kernel_lines(rows)
            continue
        rest += [line for line in map(row_line, rows) if line]
    room = MAX_LINES - len(lines) - 1
    if len(rest) > room:
        rest = rest[:room - 1] + [f"... {len(rest) - room + 1} more rows in {out}/*.jsonl"]
    print("\n".join(lines + ["results:"] + rest))


if __name__ == "__main__":
    main()
