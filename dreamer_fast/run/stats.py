"""What the run loop logs: rates and scalars between two log ticks, the report, the start line.

Helpers of loop.py; they read the live objects of a `Run` and write through the Logger.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from dreamer_fast.run import distributed as D
from dreamer_fast.run.logger import Logger, openloop_frames

if TYPE_CHECKING:
    from dreamer_fast.run.session import Run


class Stats:
    """Rates and logged scalars between two log calls."""

    def __init__(self, run: Run):
        self.run = run
        self.last = self.snapshot()
        self.score: float | None = None
        self.interval = np.zeros((0, 2))  # (return, length) of the episodes of the last collect

    def snapshot(self) -> dict:
        r = self.run
        return {"time": time.time(), "steps": r.ring.inserted, "updates": r.learner.updates,
                **{f"wait/{k}": v for k, v in r.limiter.stats().items() if k.endswith("wait_s")},
                **{f"time/actor/{k}": v for k, v in r.actor.timer.total.items()},
                **{f"time/learner/{k}": v for k, v in r.learner.timer.total.items()}}

    def rates(self, now: dict | None = None) -> dict:
        now = now or self.snapshot()
        dt = max(1e-9, now["time"] - self.last["time"])
        out = {"steps_per_s": (now["steps"] - self.last["steps"]) / dt,
               "updates_per_s": (now["updates"] - self.last["updates"]) / dt}
        for k in now:
            if k.startswith(("wait/", "time/")):  # fraction of wall-clock in each section
                out[f"{k[:-2] if k.endswith('_s') else k}_frac"] = (
                    now[k] - self.last.get(k, 0.0)) / dt
        return out

    def collect(self) -> dict:
        """Everything logged at one log tick; resets the interval."""
        r = self.run
        now = self.snapshot()
        values = {k if k.startswith(("wait/", "time/")) else f"throughput/{k}": v
                  for k, v in self.rates(now).items()}
        self.last = now
        values.update(r.learner.pop_metrics())
        values.update(self.episodes())
        limiter = r.limiter.stats()
        values.update({"limiter/lag": limiter["lag"], "limiter/ratio": limiter["ratio"],
                       "counts/updates": r.learner.updates, "counts/steps": r.ring.inserted,
                       "replay/fill": r.fill()})
        values.update({f"replay/{k}": v for k, v in r.ring.stats().items()})
        values.update({"weights/published": r.weights.published,
                       "weights/skipped": r.weights.skipped})
        if r.actor.graph is not None:  # policy steps the graph could not take (batch size)
            values["graphs/policy_eager_steps"] = r.actor.eager_steps
        return values

    def episodes(self) -> dict:
        eps = []
        while self.run.actor.episodes:
            eps.append(self.run.actor.episodes.popleft())
        self.interval = np.array(eps, np.float64).reshape(-1, 2)
        if not eps:
            return {}
        self.score = eps[-1][0]
        returns, lengths = np.array(eps).T
        return {"episode/return": float(returns.mean()), "episode/length": float(lengths.mean()),
                "episode/return_max": float(returns.max()), "episode/count": len(eps)}


def report(run: Run, logger: Logger, step: int) -> None:
    """Open-loop predictions on the last trained batch: error scalars and, for images, video."""
    with run.learner.lock:
        batch = run.learner.last_batch(6)
        if batch is None:
            return
        out = run.agent.report_step(batch)
    logger.scalars(step, {k: float(v) for k, v in out.items() if k.startswith("openloop/")})
    for key, value in out.items():
        if isinstance(value, tuple) and value[0].dim() == 5:
            path = logger.video(step, f"openloop/{key}", openloop_frames(*value))
            logger.message(f"report: {path}")


def log(run: Run, stats: Stats, logger: Logger) -> None:
    values = stats.collect()
    bad = run.agent.nonfinite_losses()
    step = run.ring.inserted
    if run.world > 1:
        step, bad = reduce_log(run, stats, values, bad)
    logger.scalars(step, values)
    if bad:
        raise FloatingPointError(f"non-finite losses: {', '.join(bad)}; stopping (the last "
                                 "checkpoint holds the last finite state)")


def reduce_log(run: Run, stats: Stats, values: dict, bad: list[str]) -> tuple[int, list[str]]:
    """Data parallel, every rank at the same log tick, one all-gather: agent steps and env
    steps/s summed over ranks and the interval's episodes pooled, into `values` (the other
    scalars are rank 0's; the learner's metrics agree up to the per-rank batch). Returns
    (global agent steps, non-finite losses here or 'rank r' for a rank that has some)."""
    eps, n = stats.interval, len(stats.interval)
    row = [run.ring.inserted, values.get("throughput/steps_per_s", 0.0), n,
           eps[:, 0].sum(), eps[:, 1].sum(), eps[:, 0].max() if n else -math.inf, len(bad)]
    steps, sps, count, ret, length, ret_max, nbad = D.control_all_gather(
        torch.tensor(row, dtype=torch.float64)).T.tolist()
    run.global_steps = int(sum(steps))
    values.update({"counts/steps": run.global_steps, "throughput/steps_per_s": sum(sps)})
    for key in [k for k in values if k.startswith("episode/")]:
        del values[key]
    if sum(count):
        stats.score = sum(ret) / sum(count)
        values.update({"episode/return": stats.score, "episode/length": sum(length) / sum(count),
                       "episode/return_max": max(ret_max), "episode/count": sum(count)})
    return run.global_steps, bad or [f"rank {r}" for r, k in enumerate(nbad) if k]


def startup_line(run: Run) -> str:
    cfg, world = run.cfg, run.world
    line = f"logdir: {cfg.logdir} | device {cfg.device} | model {cfg.model} | "
    if world == 1:
        return line + f"{cfg.num_envs} envs | train_ratio {cfg.train_ratio:g}"
    B = cfg.agent.batch_size
    return line + (f"{world} processes x {cfg.num_envs} envs | batch {B} per process = "
                   f"{B * world} global | lr x sqrt({world}) after warmup | {cfg.steps:,} "
                   f"steps in all, {run.budget:,} per process | train_ratio {cfg.train_ratio:g}")
