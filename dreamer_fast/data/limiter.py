"""Samples-per-insert rate limiter between the actor and the learner.

Keeps replayed steps R (batch_steps per update) at train_ratio r times the agent steps I
inserted after warm-up, blocking whichever side runs ahead. With m = min_inserts,
B = batch_steps, tol = tolerance and the lag e = R - r * (I - m):

- warm-up (I < m): the actor never blocks; the learner waits.
- learner: may run one more update iff I >= m and e + B <= tol (R + B <= r*(I - m) + tol).
- actor: may insert n more steps iff I < m or e >= -tol (r*(I - m) - R <= tol), checked
  before the insert, so one insert can overshoot by r*n.

Hence after warm-up -(tol + r*n_max) <= e <= tol at all times, where n_max is the largest
insert (e.g. num_envs steps per actor step); at the end of a run the learner has caught up to
within tol + B of r*(I - m). tol >= B makes a deadlock impossible (a blocked learner has
e > tol - B >= 0 > -tol, so the actor is free). The warm-up steps m are not owed training,
like the reference whose ratio clock starts once the replay can be sampled.

Default tol = max(4*B, 64*r): 4 updates, and at least 64 agent steps of slack for the actor,
so that neither side waits on every single step when their speeds are close.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """Blocks the actor (`insert`) or the learner (`sample`) to hold replayed/inserted at
    train_ratio. A threading.Condition guards the counters: this is control flow, not data.

    train_ratio: replayed steps per agent step. batch_steps: replayed steps per update (B*T).
    min_inserts: agent steps before the first update. tolerance: slack in replayed steps.
    """

    def __init__(self, train_ratio: float, batch_steps: int, min_inserts: int,
                 tolerance: float | None = None):
        if train_ratio <= 0 or batch_steps < 1 or min_inserts < 0:
            raise ValueError(f"RateLimiter needs train_ratio > 0, batch_steps >= 1, "
                             f"min_inserts >= 0; got {train_ratio}, {batch_steps}, {min_inserts}")
        if tolerance is None:
            tolerance = max(4.0 * batch_steps, 64.0 * train_ratio)
        if tolerance < batch_steps:
            raise ValueError(f"RateLimiter tolerance {tolerance} must be >= batch_steps "
                             f"{batch_steps}, or actor and learner could deadlock")
        self.train_ratio, self.batch_steps = float(train_ratio), int(batch_steps)
        self.min_inserts, self.tolerance = int(min_inserts), float(tolerance)
        self._cond = threading.Condition()
        self._closed = False
        self.inserted = 0
        self.replayed = 0
        self.actor_wait_s = 0.0
        self.learner_wait_s = 0.0
        self._since = {"actor": None, "learner": None}  # start of a wait in progress

    def _lag(self) -> float:
        """e = R - r * (I - m): positive when the learner is ahead."""
        return self.replayed - self.train_ratio * (self.inserted - self.min_inserts)

    def _can_insert(self) -> bool:
        return self._closed or self.inserted < self.min_inserts or -self._lag() <= self.tolerance

    def _can_sample(self) -> bool:
        return self._closed or (self.inserted >= self.min_inserts
                                and self._lag() + self.batch_steps <= self.tolerance)

    def _wait(self, ready, timeout: float | None, who: str) -> tuple[bool, float]:
        """Wait (lock held) until ready(); returns (ready and not closed, seconds waited).
        While it waits, `stats` counts the wait so far (`_since[who]`)."""
        if ready():
            return not self._closed, 0.0
        start = self._since[who] = time.perf_counter()
        try:
            ok = self._cond.wait_for(ready, timeout)
        finally:
            self._since[who] = None
        return ok and not self._closed, time.perf_counter() - start

    def insert(self, n: int, timeout: float | None = None) -> bool:
        """Actor: wait until n more agent steps may be inserted, then count them.
        Returns False (counting nothing) on close or timeout."""
        with self._cond:
            ok, waited = self._wait(self._can_insert, timeout, "actor")
            self.actor_wait_s += waited
            if ok:
                self.inserted += n
                self._cond.notify_all()
            return ok

    def sample(self, timeout: float | None = None) -> bool:
        """Learner: wait until one more update (batch_steps replayed steps) is allowed, then
        count it. Returns False (counting nothing) on close or timeout."""
        with self._cond:
            ok, waited = self._wait(self._can_sample, timeout, "learner")
            self.learner_wait_s += waited
            if ok:
                self.replayed += self.batch_steps
                self._cond.notify_all()
            return ok

    def close(self) -> None:
        """Shutdown: wake every waiter; all later calls return False at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, float]:
        """inserted, replayed, updates, actor_wait_s, learner_wait_s (seconds blocked, a wait
        in progress counted up to now), lag (R - r*(I - m)) and ratio = R / (I - m) (0 during
        warm-up)."""
        with self._cond:
            trained = self.inserted - self.min_inserts
            now = time.perf_counter()
            open_s = {k: now - t if t is not None else 0.0 for k, t in self._since.items()}
            return {"inserted": self.inserted, "replayed": self.replayed,
                    "updates": self.replayed // self.batch_steps,
                    "actor_wait_s": self.actor_wait_s + open_s["actor"],
                    "learner_wait_s": self.learner_wait_s + open_s["learner"],
                    "lag": self._lag(),
                    "ratio": self.replayed / trained if trained > 0 else 0.0}

    def state_dict(self) -> dict:
        with self._cond:
            return {"inserted": self.inserted, "replayed": self.replayed,
                    "actor_wait_s": self.actor_wait_s, "learner_wait_s": self.learner_wait_s}

    def load_state_dict(self, state: dict) -> None:
        with self._cond:
            self.inserted, self.replayed = int(state["inserted"]), int(state["replayed"])
            self.actor_wait_s = float(state["actor_wait_s"])
            self.learner_wait_s = float(state["learner_wait_s"])
            self._cond.notify_all()
