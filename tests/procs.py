"""Helpers for tests that drive run.py in a subprocess."""

import os
import subprocess
import sys
import time

import torch

from dreamer_fast.checks import ConfigError
from dreamer_fast.data.store import ReplayFileError

NOT_YET = (OSError, RuntimeError, EOFError, KeyError, ConfigError, ReplayFileError)
"""What reading a file the run has not written (or is writing) yet may raise."""


def wait_for(predicate, proc, timeout=150, poll=0.05):
    """Poll predicate() until true; fail with the run's output if it exits or times out."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}):\n{proc.stdout.read()}")
        try:
            if predicate():
                return
        except NOT_YET:
            pass
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"timed out:\n{proc.communicate()[0]}")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(args, logdir):
    """run.py with args and --logdir in a subprocess (stdout and stderr together)."""
    return subprocess.Popen([sys.executable, "run.py", *args, "--logdir", str(logdir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def run(args, logdir, timeout=240):
    """(exit code, output) of run.py with args and --logdir."""
    proc = start(args, logdir)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def load(logdir, name="checkpoint.pt"):
    return torch.load(os.path.join(logdir, name), weights_only=True)
