"""Helpers for tests that drive run.py in a subprocess."""

import time

from dreamer_fast.config import ConfigError
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
