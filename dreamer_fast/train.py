"""The run loop: build the actor-learner, resume, then a scheduler of clocks (STYLE 6).

One process per device: an actor thread (actor.py) fills the ring, a learner thread
(learner.py) trains from it at train_ratio (limiter.py). The main thread only keeps time:
progress (1 s), log (`log_every` s), report (`report_every` s), save (`save_every` s), and
stops on the step budget, Ctrl-C or SIGTERM (saving first).

Data parallel (DESIGN 3.10): under torchrun every process runs all of the above with its own
envs and ring; gradients meet in one all-reduce per update. The main threads meet every tick
(0.2 s) in one small all-gather on a separate gloo group (distributed.control_all_gather):
rank 0's clocks decide log and save, any rank's SIGTERM/Ctrl-C, finished budget or failed
thread stops all. Two rules keep this deadlock-free. (1) A main thread never waits on another
rank while it holds its own actor or learner lock: a save pauses and writes this rank's files
without any collective, so a learner blocked in the all-reduce is only waiting for peers that
each finish their own save and let go. (2) All learners stop after the same update
(`Lockstep`): a rank that stopped one update early would leave the others in the collective.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time

import numpy as np
import torch

from dreamer_fast import checkpoint
from dreamer_fast import distributed as D
from dreamer_fast.actor import Actor, PolicyWeights
from dreamer_fast.agent import Agent
from dreamer_fast.config import Config, ConfigError
from dreamer_fast.envs import make_env
from dreamer_fast.graphs import GraphedPolicy, GraphedTrainStep, compile_steps, resolve_graphs
from dreamer_fast.learner import Learner
from dreamer_fast.limiter import RateLimiter
from dreamer_fast.logger import Logger, format_progress, openloop_frames
from dreamer_fast.replay import Ring

from dreamer_fast.replicas import Lockstep, check_replicas, ranks_str
from dreamer_fast.resources import (local_world_size, replay_capacity, replay_spec, resolve,
                                    set_cpu_threads, warn_large_on_cpu)


class Run:
    """The live objects of one training run and what the clocks do with them."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.world, self.rank = D.world_size(), D.rank()
        # cfg.steps counts every process's agent steps; each actor stops at its share.
        self.budget = -(-cfg.steps // self.world)
        self.global_steps = 0  # every rank's agent steps, as of the last control tick
        self.graphs = resolve_graphs(cfg.graphs, self.device)  # bad flag: fail before any work
        set_cpu_threads(self.device)
        seed = cfg.seed + self.rank  # distinct acting noise, envs and replay sampling per rank
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            self.env = make_env(cfg.env, cfg.num_envs, cfg.env_opts,
                                cfg.seed + self.rank * cfg.num_envs)
        except ValueError as e:  # unknown env id (names the closest ids), bad env options
            raise ConfigError(str(e)) from e
        spec = replay_spec(self.env, cfg.net)
        # Before anything big is allocated; the concrete capacity is what a resume compares.
        capacity = replay_capacity(spec, cfg.replay.capacity, checkpoint.saved_capacity(cfg.logdir),
                                   (0.75 if self.device.type == "cuda" else 0.5)
                                   / local_world_size())
        self.cfg = cfg = dataclasses.replace(
            cfg, replay=dataclasses.replace(cfg.replay, capacity=capacity))
        warn_large_on_cpu(cfg)
        self.agent = Agent(self.env.obs_space, self.env.act_space, cfg.net, cfg.agent,
                           self.device)
        B, T = cfg.agent.batch_size, cfg.agent.batch_length
        self.ring = Ring(spec, cfg.num_envs, cfg.replay.capacity, T + 1, cfg.replay.online,
                         seed)
        # Enough steps that every stream holds a window and B*T starts exist (SPEC 5.1).
        self.limiter = RateLimiter(cfg.train_ratio, B * T, cfg.num_envs * (T + 1) + B * T)
        self.counters = {"steps": 0, "updates": 0, "elapsed_s": 0.0, "save_id": 0}

    def start(self) -> None:
        """Threads start after any resume (they read the restored weights and counters)."""
        self.weights = PolicyWeights(self.agent)
        self.actor = Actor(self.env, self.ring, self.limiter, self.weights, self.device,
                           self.budget)
        self.learner = Learner(self.agent, self.ring, self.limiter, self.weights,
                               self.cfg.agent.batch_size)
        self.learner.updates = int(self.counters["updates"])
        if self.cfg.compile:
            compile_steps(self.agent, self.weights.copies)
        if self.graphs:
            self.capture()
        self.lockstep = (Lockstep(self.learner, self.limiter, self.actor_done)
                         if self.world > 1 else None)
        learn = self.lockstep.run if self.lockstep else self.learner.run
        self.threads = [threading.Thread(target=self.actor.run, name="actor", daemon=True),
                        threading.Thread(target=learn, name="learner", daemon=True)]
        for t in self.threads:
            t.start()
        self.t0 = time.time() - float(self.counters["elapsed_s"])

    def capture(self) -> None:
        """CUDA graphs of the update and the policy step, before any thread starts (DESIGN
        3.4): warm-up (undone) and capture on this thread, with nothing else on the GPU."""
        start = time.perf_counter()
        example = {k: torch.zeros_like(v) for k, v in self.learner.staging[0].items()}
        self.learner.graph = GraphedTrainStep(self.agent, example)
        obs_spec = {k: self.ring.spec[k] for k in self.env.obs_space}
        self.actor.graph = GraphedPolicy(self.weights.copies, self.actor.carry, obs_spec,
                                         self.env.batch_size)
        self.weights.publish()  # the copies' weights again, in case warm-up touched them
        print(f"captured CUDA graphs (update, policy step for {self.env.batch_size} envs) in "
              f"{time.perf_counter() - start:.1f}s", flush=True)

    def resume(self) -> bool:
        file = checkpoint.find(self.cfg.logdir)
        if file is None:
            return False
        ckpt = checkpoint.load_checkpoint(file, self.device)
        checkpoint.check_compatible(ckpt, self.cfg, file)
        checkpoint.check_world_size(ckpt, self.world, file)
        self.counters.update(checkpoint.restore(file, ckpt, self.agent, self.limiter, self.ring,
                                                self.rank, self.world))
        who = f"[rank {self.rank}] " if self.world > 1 else ""
        print(f"{who}resumed from {file}: {self.ring.inserted:,} agent steps, "
              f"{self.counters['updates']:,} updates, replay {self.fill():.0%} full", flush=True)
        return True

    def fill(self) -> float:
        return min(1.0, self.ring.inserted / (self.ring.cap * self.ring.num_streams))

    def check_threads(self) -> None:
        for part in (self.actor, self.learner):
            if part.error is not None:
                raise RuntimeError(f"{type(part).__name__.lower()} thread failed") from part.error

    def pause(self):
        """Context: actor and learner paused between steps (actor first: see learner.lock)."""
        return _Paused(self.actor.lock, self.learner.lock)

    def save(self) -> None:
        """Every rank at once (the same counters): its replay file; rank 0 also checkpoint.pt.
        No collective in here (see the module docstring, rule 1)."""
        with self.pause():
            steps = self.ring.inserted if self.world == 1 else max(self.global_steps,
                                                                   self.ring.inserted)
            self.counters.update(steps=steps, updates=self.learner.updates,
                                 elapsed_s=time.time() - self.t0)
            checkpoint.save(self.cfg.logdir, self.cfg, self.agent, self.limiter, self.ring,
                            self.counters, self.rank, self.world)
            self.counters["save_id"] += 1

    def stop(self, finished: bool, failed: bool = False) -> None:
        """Stop both threads; on a finished run the learner first catches up with the ratio.

        Data parallel: every rank calls it at the same tick; the learners first run to the
        same update count (Lockstep.finish, collectives), unless `failed` (no collectives:
        a peer may be gone; the threads are daemons, so a stuck one cannot keep us alive)."""
        if self.lockstep is not None:
            if not failed:
                self.lockstep.finish(catch_up=finished)
            self.lockstep.stop()
            finished = False  # caught up above; the limiter must wake a blocked actor
        self.actor.stop.set()
        self.learner.stop.set()
        if not finished:
            self.limiter.close()  # wakes an actor blocked on insert
        for t in self.threads:
            t.join(timeout=30.0 if self.world > 1 else None)
        if finished:
            self.learner.catch_up()
        if not any(t.is_alive() for t in self.threads):
            self.learner.finish()
        self.limiter.close()
        self.env.close()

    def actor_done(self) -> bool:
        return not self.threads[0].is_alive()

    def threads_alive(self) -> bool:
        return any(t.is_alive() for t in getattr(self, "threads", ()))


class _Paused:
    def __init__(self, *locks):
        self.locks = locks

    def __enter__(self):
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, *exc):
        for lock in reversed(self.locks):
            lock.release()


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


def train(cfg: Config) -> None:
    """Train (or resume) until cfg.steps agent steps; save on exit, Ctrl-C and SIGTERM.

    Under torchrun (WORLD_SIZE > 1) this process is one replica of a data-parallel world: the
    same flags on every rank, cfg.steps counted over all of them (module docstring)."""
    D.init()
    run = None
    try:
        run = Run(resolve(cfg))
        _train(run)
    finally:
        # After a failure a learner may still sit in a collective with a vanished peer;
        # tearing the group down under it could hang, and the process is exiting anyway.
        if run is None or not run.threads_alive():
            D.destroy()


def _train(run: Run) -> None:
    cfg = run.cfg  # with the concrete replay capacity
    os.makedirs(cfg.logdir, exist_ok=True)
    if not run.resume() and D.is_main():
        with open(os.path.join(cfg.logdir, "config.json"), "w") as f:
            f.write(checkpoint.config_json(cfg))  # for people; resume reads the checkpoint
    if run.world > 1:
        run.agent.enable_data_parallel()  # after the resume: rank 0's state on every rank
    if D.is_main():
        print(startup_line(run), flush=True)
    logger = Logger(cfg.logdir, enabled=D.is_main())
    stop = threading.Event()
    signals = [signal.SIGTERM] + ([signal.SIGINT] if run.world > 1 else [])
    # Data parallel: Ctrl-C must not raise mid-collective; the flag reaches every rank.
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in signals}
    run.start()
    stats = Stats(run)
    try:
        finished = (loop if run.world == 1 else loop_replicas)(run, stats, logger, stop)
    except KeyboardInterrupt:
        logger.message("interrupted: saving")
        finished = False
    except BaseException:
        run.stop(finished=False, failed=True)  # not saved: the last checkpoint stays
        logger.close()
        raise
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    finish(run, stats, logger, finished)


def startup_line(run: Run) -> str:
    cfg, world = run.cfg, run.world
    line = f"logdir: {cfg.logdir} | device {cfg.device} | model {cfg.model} | "
    if world == 1:
        return line + f"{cfg.num_envs} envs | train_ratio {cfg.train_ratio:g}"
    B = cfg.agent.batch_size
    return line + (f"{world} processes x {cfg.num_envs} envs | batch {B} per process = "
                   f"{B * world} global | lr x sqrt({world}) after warmup | {cfg.steps:,} "
                   f"steps in all, {run.budget:,} per process | train_ratio {cfg.train_ratio:g}")


def finish(run: Run, stats: Stats, logger: Logger, finished: bool) -> None:
    """Stop the threads, log and report a last time, save, close."""
    run.stop(finished)
    log(run, stats, logger)
    steps = run.ring.inserted if run.world == 1 else run.global_steps
    if D.is_main():
        report(run, logger, steps)
    run.save()
    logger.message(f"saved {os.path.join(run.cfg.logdir, checkpoint.CHECKPOINT)} at "
                   f"{steps:,} steps, {run.learner.updates:,} updates")
    if run.world > 1:
        check_replicas(run)
    logger.close()


def loop(run: Run, stats: Stats, logger: Logger, stop: threading.Event) -> bool:
    """The scheduler of clocks. Returns True when the step budget was reached."""
    cfg = run.cfg
    progress_stats = Stats(run)
    clocks = {"progress": Every(1.0 if logger.tty else cfg.log_every), "log": Every(cfg.log_every),
              "report": Every(cfg.report_every), "save": Every(cfg.save_every)}
    while not stop.wait(0.2):
        run.check_threads()
        if not run.threads[0].is_alive():
            return run.ring.inserted >= cfg.steps
        if clocks["log"]():
            log(run, stats, logger)
        if clocks["progress"]():
            logger.progress(format_progress(run.ring.inserted, cfg.steps,
                                            progress_stats.rates(), run.fill(), stats.score))
            progress_stats.last = progress_stats.snapshot()
        if clocks["report"]():
            report(run, logger, run.ring.inserted)
        if clocks["save"]():
            run.save()
    logger.message("SIGTERM: saving")
    return False


def loop_replicas(run: Run, stats: Stats, logger: Logger, stop: threading.Event) -> bool:
    """The scheduler of clocks of a data-parallel world, on every rank. Each tick one control
    all-gather of (stop requested, actor done, thread failed, agent steps, log, save): rank 0's
    clocks decide log and save, any rank's stop request stops all. Returns True once every
    rank reached its share of the step budget."""
    cfg, main = run.cfg, D.is_main()
    progress_stats = Stats(run)
    clocks = {"progress": Every(1.0 if logger.tty else cfg.log_every), "log": Every(cfg.log_every),
              "report": Every(cfg.report_every), "save": Every(cfg.save_every)}
    last = (time.time(), run.global_steps)
    while True:
        stop.wait(0.2)
        done = run.actor_done()  # read before `failed`: a failure ends the actor
        failed = run.actor.error is not None or run.learner.error is not None
        row = [stop.is_set(), done, failed, run.ring.inserted,
               main and clocks["log"](), main and clocks["save"]()]
        rows = D.control_all_gather(torch.tensor(row, dtype=torch.float64))
        run.global_steps = int(rows[:, 3].sum())
        if rows[:, 2].any():
            run.check_threads()
            raise RuntimeError(f"rank(s) {ranks_str(rows[:, 2])} failed; stopping")
        if rows[:, 1].all():
            return True
        if rows[:, 0].any():
            logger.message(f"stop requested on rank(s) {ranks_str(rows[:, 0])} (SIGTERM or "
                           "Ctrl-C): saving")
            return False
        if rows[0, 4]:
            log(run, stats, logger)
        if main and clocks["progress"]():
            now = (time.time(), run.global_steps)
            rates = {**progress_stats.rates(),
                     "steps_per_s": (now[1] - last[1]) / max(1e-9, now[0] - last[0])}
            logger.progress(format_progress(now[1], cfg.steps, rates, run.fill(), stats.score))
            progress_stats.last, last = progress_stats.snapshot(), now
        if main and clocks["report"]():
            report(run, logger, run.global_steps)
        if rows[0, 5]:
            run.save()
