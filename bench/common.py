"""Shared bench plumbing: environment record (device, versions, commit) and percentiles."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import numpy as np
import torch


def environment() -> dict:
    """Device, versions and git commit, recorded with every result row. The commit is
    DREAMER_FAST_COMMIT when set (a copy of the tree without .git, e.g. on a remote GPU
    machine: bench/gpu_session.sh sets it), else git's."""
    commit, dirty = os.environ.get("DREAMER_FAST_COMMIT", ""), False
    if not commit:
        commit, dirty = git_commit()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None, "threads": torch.get_num_threads(),
        "commit": commit + ("-dirty" if dirty else ""),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def git_commit() -> tuple[str, bool]:
    """(HEAD's hash or 'unknown', whether tracked files other than bench/results differ
    from it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=here).stdout.strip()
        # The result files themselves do not make the code dirty (rows append to them).
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no",
                                     "--", ":/", ":(exclude,top)bench/results"],
                                    capture_output=True, text=True, cwd=here).stdout.strip())
    except OSError:
        return "unknown", False
    return commit or "unknown", dirty and bool(commit)


def time_calls(fn, iters: int, burnin: int, device: str) -> tuple[list[float], float]:
    """Seconds of each of `iters` calls of fn() after `burnin` untimed ones (synchronised on
    CUDA), and the seconds the burn-in took (compile/autotune time shows up there)."""
    times, start_all, warm_s = [], time.perf_counter(), 0.0
    for i in range(burnin + iters):
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= burnin:
            times.append(time.perf_counter() - start)
        elif i == burnin - 1:
            warm_s = time.perf_counter() - start_all
    return times, warm_s


def percentiles(times: list[float]) -> dict:
    p20, p50, p80 = np.percentile(np.asarray(times), [20, 50, 80])
    return {"p20": float(p20), "p50": float(p50), "p80": float(p80), "n": len(times)}


def append(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def catch_sigint() -> None:
    """SIGINT raises KeyboardInterrupt here even when this process started with it ignored
    (a background job of a non-interactive shell, or a child of one): the benches keep their
    rows on a stage's SIGINT only if it reaches them."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
