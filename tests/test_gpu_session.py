"""The one-call GPU session (bench/gpu_session.sh) rehearsed on the CPU, so it cannot rot
between the rare sessions that have a GPU: every stage runs with tiny settings, the summary
and the files come back as a remote call needs them, and rows survive a stage cut short."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("preflight", "tests", "fastpath", "learners", "kcount", "packed", "policy", "kernels",
          "size200m", "e2e")


def test_rehearsal_runs_every_stage_and_returns_what_a_remote_call_can_carry(tmp_path):
    out = tmp_path / "session"
    env = dict(os.environ, PYTHON=sys.executable, DREAMER_FAST_COMMIT="")
    start = time.monotonic()
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "--rehearse", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) <= 60 and proc.stdout.rstrip().endswith(summary[-1])
    stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
    assert [s[0] for s in stages] == list(STAGES)
    assert all(s[1] == "0" for s in stages), stages
    assert "2 passed" in stages[1][4]  # the test stage's tally
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).is_file() for f in files), files
    log = (out / "session.log").read_text()
    assert all(f" {name} (limit " in log for name in STAGES[1:])
    rows = {f: [json.loads(line) for line in (out / f).read_text().splitlines()]
            for f in files if f.endswith(".jsonl")}
    assert {f.split("-cpu")[0] for f in rows} == {"fastpath", "throughput", "kernel-count",
                                                  "kernels", "packed"}
    commits = {r["commit"] for rs in rows.values() for r in rs}
    assert len(commits) == 1 and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commits.pop())
    fast = rows["fastpath-cpu-rehearsal.jsonl"][0]
    assert fast["mode"] == "graph+triton" and fast["checks"]["graph+triton"]["failure"] is None
    e2e = [r for r in rows["throughput-cpu-rehearsal.jsonl"] if r["workload"] == "e2e-pong-64"]
    assert e2e and "stand-in" in e2e[0]["env"] and e2e[0]["update_mode"] == "eager+fused"
    assert e2e[0]["updates_per_s"] > 0
    # One line per result row in the summary, after one per stage.
    assert sum(line.startswith("stage ") for line in summary) == len(STAGES)
    assert any(line.startswith("throughput  e2e-pong-64") for line in summary)
    assert any(re.match(r"packed +learner-control-vec +packed-ref +x2 +p50", line)
               for line in summary)
    assert took < 180, f"the rehearsal took {took:.0f}s (budget 110s plus start-up)"


def test_rows_measured_before_a_sigint_are_kept(tmp_path):
    """A stage cut by its limit gets SIGINT: the rows measured so far are in the file, and
    the one in progress is recorded as interrupted (exit 130)."""
    out = tmp_path / "rows.jsonl"
    proc = subprocess.Popen([sys.executable, "bench/throughput.py", "--workloads",
                             "matmul-peak", "learner-paper-s-img", "--modes", "eager",
                             "--iters", "50", "--burnin", "0", "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["workload"] for r in rows] == ["matmul-peak", "learner-paper-s-img"]
    assert "tflops" in rows[0] and rows[1]["error"] == "interrupted (SIGINT)"
