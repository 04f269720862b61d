"""The clocks a run is scheduled by, built once for online and offline training (`clocks`),
and the named wall-clock sections each thread reports (`Timer`)."""

from __future__ import annotations

import collections
import threading
import time

class Every:
    """A wall-clock clock: true once every `seconds` (not at the start)."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.time()

    def __call__(self) -> bool:
        now = time.time()
        if now - self.last >= self.seconds:
            self.last = now
            return True
        return False


class ProgressClock:
    """When the progress line is due: every second on a terminal (it redraws in place);
    otherwise every EARLY_S during the replay's prefill and the first EARLY_S * 2 seconds of
    updates, then every log_every. A run that logs every 120 s (the official cadence) shows
    its first lines, and its first updates' rates, within seconds, never looking hung."""

    EARLY_S = 15.0

    def __init__(self, tty: bool, log_every: float):
        self.every = Every(1.0 if tty else min(log_every, self.EARLY_S))
        self.later, self.tty = log_every, tty
        self.first_update: float | None = None

    def __call__(self, updates: int) -> bool:
        if not self.tty and updates and self.first_update is None:
            self.first_update = time.time()
        if (not self.tty and self.first_update is not None
                and time.time() - self.first_update > 2 * self.EARLY_S):
            self.every.seconds = self.later
        return self.every()


def clocks(cfg, tty: bool) -> dict:
    """The run loop's clocks: progress (ProgressClock), log, report, save and eval (Every)."""
    return {"progress": ProgressClock(tty, cfg.log_every), "log": Every(cfg.log_every),
            "report": Every(cfg.report_every), "save": Every(cfg.save_every),
            "eval": Every(cfg.eval_every)}


class Timer:
    """Named wall-clock sections (env, policy, replay, train); one Timer per thread, read from
    any thread. `read` counts the open section up to now, so the share of an interval that
    each section took is at most 1 even when a section spans the interval's edges."""

    def __init__(self):
        self.total: dict[str, float] = collections.defaultdict(float)
        self._open: tuple[str, float] | None = None
        self._lock = threading.Lock()

    def section(self, name: str):
        return _Section(self, name)

    def read(self) -> dict[str, float]:
        """Seconds spent in each section so far, the open one up to now."""
        with self._lock:
            out = dict(self.total)
            if self._open is not None:
                name, start = self._open
                out[name] = out.get(name, 0.0) + time.perf_counter() - start
        return out


class _Section:
    def __init__(self, timer: Timer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        with self.timer._lock:
            self.timer._open = (self.name, time.perf_counter())

    def __exit__(self, *exc):
        timer = self.timer
        with timer._lock:
            _, start = timer._open
            timer.total[self.name] += time.perf_counter() - start
            timer._open = None
