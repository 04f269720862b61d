"""Data-parallel replicas: learners in lockstep and replica checks.

See loop.py for how the ranks coordinate; these are the pieces that only exist with N > 1.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import torch

from dreamer_fast.run import distributed as D

if TYPE_CHECKING:
    from dreamer_fast.data.limiter import RateLimiter
    from dreamer_fast.run.learner import Learner


class Lockstep:
    """The learner thread of a data-parallel run: every rank runs exactly the same updates.

    Each update ends in the gradient all-reduce, so a rank that stopped one update earlier
    than another would leave it blocked in that collective. An update is therefore committed
    (`started`) before it waits on the limiter, and `finish` stops at an agreed count: freeze
    commits, take U = the largest commit count over ranks (they differ by at most one: a
    rank commits update k+1 only after update k's all-reduce, which every rank had entered),
    then run every rank to exactly U updates, past its limiter (the actors are stopping).
    A rank whose actor has reached its budget also runs its updates past the limiter (no more
    inserts would allow them), so the ranks still acting are never left waiting on it.
    """

    def __init__(self, learner: Learner, limiter: RateLimiter, actor_done):
        self.learner, self.limiter, self.actor_done = learner, limiter, actor_done
        self.cond = threading.Condition()
        self.started = learner.updates
        self.limit: int | None = None  # commit no update past this count (None: no limit)
        self.force = False  # run committed updates without waiting for the limiter

    def run(self) -> None:
        """Thread body (replaces Learner.run)."""
        learner = self.learner
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: learner.stop.is_set() or self.limit is None
                                       or self.started < self.limit)
                    if learner.stop.is_set():
                        return
                    self.started += 1
                while not self.limiter.sample(timeout=0.0 if self.forced() else 0.5):
                    if self.forced():
                        break
                    if self.limiter.closed or learner.stop.is_set():
                        return
                with learner.lock:
                    learner.update()
        except BaseException as e:  # surfaced by the run loop
            learner.error = e
            self.limiter.close()

    def forced(self) -> bool:
        return self.force or self.actor_done()

    def finish(self, catch_up: bool, timeout_s: float = 600.0) -> None:
        """All ranks at once: stop at the same update count (collectives on the control
        group), after catching up with the ratio if `catch_up` (the fewest owed by any rank)."""
        with self.cond:
            self.limit = self.started  # final: nothing more is committed
            started = self.started
        target = int(D.control_all_gather(torch.tensor([started])).max())
        self._run_to(target, timeout_s)
        if catch_up:
            owed = max(0, int(-self.limiter.stats()["lag"] // self.limiter.batch_steps))
            target += int(D.control_all_gather(torch.tensor([owed])).min())
            self._run_to(target, timeout_s)

    def _run_to(self, target: int, timeout_s: float) -> None:
        with self.cond:
            self.limit, self.force = target, True
            self.cond.notify_all()
        deadline = time.monotonic() + timeout_s
        while self.learner.updates < target:
            if self.learner.error is not None:
                raise RuntimeError("learner thread failed") from self.learner.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {D.rank()}: learner at update "
                                   f"{self.learner.updates} after {timeout_s:.0f} s, not {target}")
            time.sleep(0.01)

    def stop(self) -> None:
        self.learner.stop.set()
        with self.cond:
            self.cond.notify_all()


def param_checksum(state: dict[str, torch.Tensor]) -> int:
    """An exact, order-sensitive checksum of the bits of the floating tensors of an agent
    state_dict: integers mod a prime, so any device or thread count gives the same value."""
    prime, total, offset = 2**31 - 1, 0, 0
    for v in state.values():
        if v.is_floating_point():
            bits = v.detach().float().flatten().view(torch.int32).long()
            pos = torch.arange(offset + 1, offset + len(bits) + 1, device=bits.device)
            total = (total + int(((bits * pos) % prime).sum())) % prime
            offset += len(bits)
    return total


def check_replicas(agent, steps: int, updates: int) -> None:
    """Data parallel: every rank must hold the same agent (identical averaged gradients and
    optimizer steps from one broadcast start); a mismatch is a bug, so it fails loudly.
    steps, updates: this rank's counts, for the printed line."""
    mine = param_checksum(agent.state_dict())
    sums = D.control_all_gather(torch.tensor([mine]))[:, 0]
    print(f"[rank {D.rank()}] {steps:,} agent steps, {updates:,} "
          f"updates, parameter checksum {mine}", flush=True)
    if not bool((sums == sums[0]).all()):
        raise RuntimeError(f"data-parallel replicas diverged: parameter checksums {sums.tolist()}")
    if D.is_main():
        print(f"replicas identical: parameter checksums agree on all {D.world_size()} ranks",
              flush=True)


def ranks_str(flags: torch.Tensor) -> str:
    return ", ".join(str(r) for r in flags.nonzero().flatten().tolist())
