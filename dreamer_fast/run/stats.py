"""What the run loop logs: rates and scalars between two log ticks, the report, the start line.

Helpers of loop.py; they read the live objects of a `Run` and write through the Logger.
"""

from __future__ import annotations

import collections
import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from dreamer_fast.checks import RunError
from dreamer_fast.run import distributed as D
from dreamer_fast.run import fastpath
from dreamer_fast.run.logger import Logger, format_duration, format_progress, openloop_frames

if TYPE_CHECKING:
    from dreamer_fast.run.session import Run


LAST_EPISODES = 10
"""`episode/return_last10`: the mean return of the last 10 finished training episodes (of
this process, once 10 have finished): the learning suite's success measure."""


class Stats:
    """Rates and logged scalars between two log calls."""

    def __init__(self, run: Run):
        self.run = run
        self.last = self.snapshot()
        self.score: float | None = None
        self.interval = np.zeros((0, 2))  # (return, length) of the episodes of the last collect
        self.recent: collections.deque = collections.deque(maxlen=LAST_EPISODES)
        self.achieved = Achievements(run.actor.log_keys)

    def snapshot(self) -> dict:
        r = self.run
        return {"time": time.time(), "steps": r.ring.inserted, "updates": r.learner.updates,
                **{f"wait/{k}": v for k, v in r.limiter.stats().items() if k.endswith("wait_s")},
                **{f"time/actor/{k}": v for k, v in r.actor.timer.read().items()},
                **{f"time/learner/{k}": v for k, v in r.learner.timer.read().items()}}

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
        values.update(self.achieved.update(r.actor.episode_logs))
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
        self.recent.extend(ret for ret, _ in eps)
        returns, lengths = np.array(eps).T
        out = {"episode/return": float(returns.mean()), "episode/length": float(lengths.mean()),
               "episode/return_max": float(returns.max()), "episode/count": len(eps)}
        if len(self.recent) == LAST_EPISODES:
            out[f"episode/return_last{LAST_EPISODES}"] = float(np.mean(self.recent))
        return out


class Achievements:
    """Success rates of `log/achievement_<name>` keys (Crafter) over every episode so far.

    An episode unlocks an achievement when its count was above 0 at any step. Logged as
    `achievement/<name>`, the percentage of episodes that unlocked it, and
    `achievement/score`, the Crafter score of Hafner (2021): exp(mean(ln(1 + s_i))) - 1 over
    the success rates s_i in percent. Counts restart with the process (a resumed run scores
    the episodes since the resume)."""

    PREFIX = "log/achievement_"

    def __init__(self, log_keys: tuple[str, ...]):
        self.index = [i for i, k in enumerate(log_keys) if k.startswith(self.PREFIX)]
        self.names = [log_keys[i][len(self.PREFIX):] for i in self.index]
        self.unlocked = np.zeros(len(self.index), np.int64)
        self.episodes = 0

    def update(self, rows) -> dict:
        """Pops the finished episodes' rows (deque of per-episode maxima); returns the
        scalars, or {} before the first episode or without achievement keys."""
        new = []
        while rows:
            new.append(rows.popleft())
        if not self.index:
            return {}
        for row in new:
            self.unlocked += np.asarray(row)[self.index] > 0
            self.episodes += 1
        if not self.episodes:
            return {}
        rates = 100.0 * self.unlocked / self.episodes
        out = {f"achievement/{n}": float(r) for n, r in zip(self.names, rates)}
        out["achievement/score"] = crafter_score(rates)
        return out


def crafter_score(rates: np.ndarray) -> float:
    """Crafter score of success rates in percent: exp(mean(ln(1 + s))) - 1 (Hafner 2021)."""
    return float(np.exp(np.mean(np.log1p(np.asarray(rates, np.float64)))) - 1.0)


class HeldRate:
    """The agent-step rate a run holds, for the progress line and its time left.

    Rates are over a sliding window of `window_s` seconds of (time, agent steps, updates)
    samples, not the last second (which flickered between 0 and bursts). The window starts
    at the first update it saw: before it the actor runs unthrottled to fill the replay (the
    prefill burst), which says nothing of the rate to come. Agent steps are capped by what
    the learner allows: a learner-bound run takes only updates/s x batch_steps / train_ratio
    agent steps per second (the rate limiter holds the ratio). The rate is unknown (None)
    until updates have run for `min_s` seconds.
    """

    def __init__(self, batch_steps: int, train_ratio: float, window_s: float = 60.0,
                 min_s: float = 10.0):
        self.per_update = batch_steps / train_ratio  # agent steps one update allows
        self.window_s, self.min_s = window_s, min_s
        self.samples: collections.deque = collections.deque()

    def add(self, t: float, steps: int, updates: int) -> None:
        self.samples.append((t, steps, updates))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def _span(self) -> tuple[tuple, tuple] | None:
        """(first, last) sample: from the last sample before the window's first update (the
        whole window when it holds no update); None with fewer than two samples."""
        if len(self.samples) < 2:
            return None
        start = self.samples[0]
        for sample in self.samples:
            if sample[2] > self.samples[0][2]:
                break
            start = sample
        if start is self.samples[-1]:  # no update in the window
            start = self.samples[0]
        return start, self.samples[-1]

    def rates(self) -> dict:
        span = self._span()
        if span is None:
            return {"steps_per_s": 0.0, "updates_per_s": 0.0}
        (t0, s0, u0), (t1, s1, u1) = span
        dt = max(1e-9, t1 - t0)
        return {"steps_per_s": (s1 - s0) / dt, "updates_per_s": (u1 - u0) / dt}

    def eta_rate(self) -> float | None:
        """Agent steps/s to extrapolate with; None while updates ran for under min_s."""
        span = self._span()
        if span is None or span[1][2] <= span[0][2] or span[1][0] - span[0][0] < self.min_s:
            return None
        r = self.rates()
        rate = min(r["steps_per_s"], r["updates_per_s"] * self.per_update)
        return rate if rate > 0 else None  # the actor held back all window: not known yet


def feasibility_note(cfg, steps: int, rate: float,
                     how: str = "this run holds here") -> str | None:
    """A line when the rest of the run would take more than a day at `rate` agent steps/s:
    how long, and the flags that make it feasible here. `how` says where the rate is from."""
    if not rate or rate <= 0:  # no steps held yet (e.g. the envs are still starting)
        return None
    left = (cfg.steps - steps) / rate
    if left <= 86400:
        return None
    hints = [f"--steps {int(steps + rate * 86400)} (what a day gives)"]
    if cfg.net.deter > 512:
        hints.insert(0, "a smaller --model (e.g. --model size1m)")
    if cfg.preset == "atari":
        hints.insert(0, "--preset atari100k (110,000 steps)")
    elif cfg.preset in ("dmc_proprio", "dmc_vision", "vision"):
        hints.insert(0, "--preset control")
    return (f"note: at the {rate:,.1f} agent steps/s {how}, the remaining "
            f"{cfg.steps - steps:,} steps take {format_duration(left)}, more than a day; "
            f"for a run that finishes here use {' or '.join(hints)}")


class Progress:
    """The progress line of the run loop: sampled every tick, printed on its clock, with a
    one-time note when the run would take more than a day here (see feasibility_note)."""

    def __init__(self, cfg, world: int = 1, window_s: float = 60.0):
        # In a data-parallel world every update moves world x B x T replayed steps.
        self.cfg = cfg
        self.held = HeldRate(cfg.agent.batch_size * cfg.agent.batch_length * world,
                             cfg.train_ratio, window_s)
        self.noted = False

    def sample(self, steps: int, updates: int, t: float | None = None) -> None:
        self.held.add(time.time() if t is None else t, steps, updates)

    def line(self, steps: int, fill: float, score: float | None) -> str:
        return format_progress(steps, self.cfg.steps, self.held.rates(), fill, score,
                               self.held.eta_rate())

    def note(self, steps: int) -> str | None:
        """The feasibility note, once, as soon as the held rate is known (else None)."""
        rate = self.held.eta_rate()  # None until updates ran for min_s
        if self.noted or rate is None or (
                self.held.samples[-1][0] - self.held.samples[0][0] < self.held.window_s / 2):
            return None
        self.noted = True
        return feasibility_note(self.cfg, steps, rate)


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
            path = logger.video(step, f"openloop_video/{key}", openloop_frames(*value))
            if path is not None:
                logger.message(f"report: {path}")


def log(run: Run, stats: Stats, logger: Logger, values: dict | None = None) -> None:
    """One log row (values: stats.collect() taken earlier, else now); a non-finite loss
    stops the run (RunError)."""
    values = stats.collect() if values is None else values
    bad = run.agent.nonfinite_losses()
    step = run.ring.inserted
    if run.world > 1:
        step, bad = reduce_log(run, stats, values, bad)
    logger.scalars(step, values)
    if bad:
        raise RunError(run.nonfinite_message(bad))


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
    line = (f"logdir: {cfg.logdir} | device {cfg.device} | preset {cfg.preset} | model "
            f"{cfg.model} | update {fastpath.planned(run.graphs, run.agent.ops.impl)} | ")
    line += "".join(f"{note} | " for note in getattr(run.env, "notes", ()))
    if world == 1:
        return line + f"{cfg.num_envs} envs | train_ratio {cfg.train_ratio:g}"
    B = cfg.agent.batch_size
    return line + (f"{world} processes x {cfg.num_envs} envs | batch {B} per process = "
                   f"{B * world} global | lr x sqrt({world}) after warmup | {cfg.steps:,} "
                   f"steps in all, {run.budget:,} per process | train_ratio {cfg.train_ratio:g}")
