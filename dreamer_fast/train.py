"""The run loop: build the actor-learner, resume, then a scheduler of clocks (STYLE 6).

One process per device: an actor thread (actor.py) fills the ring, a learner thread
(learner.py) trains from it at train_ratio (limiter.py). The main thread only keeps time:
progress (1 s), log (`log_every` s), report (`report_every` s), save (`save_every` s), and
stops on the step budget, Ctrl-C or SIGTERM (saving first).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import numpy as np
import torch

from dreamer_fast import checkpoint
from dreamer_fast.actor import Actor, PolicyWeights
from dreamer_fast.agent import Agent
from dreamer_fast.config import Config, ConfigError
from dreamer_fast.envs import make_env
from dreamer_fast.learner import Learner
from dreamer_fast.limiter import RateLimiter
from dreamer_fast.logger import Logger, format_progress, openloop_frames
from dreamer_fast.replay import Ring

LARGE_ON_CPU = 2048
"""deter size (size12m and up) from which CPU training is too slow to be useful."""


def resolve(cfg: Config) -> Config:
    """Fill run-time defaults into a new Config: timestamped logdir, concrete device."""
    logdir = cfg.logdir or os.path.join(
        "logdir", f"{cfg.env.replace(':', '_').replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return dataclasses.replace(cfg, logdir=logdir, device=device)


def replay_spec(env, net) -> dict:
    """What the ring stores per step: observations, action, reward, flags, latent (SPEC 5.3)."""
    spec = {k: (shape, torch.from_numpy(np.zeros((), dtype)).dtype)
            for k, (shape, dtype) in env.obs_space.items()}
    spec.update(action=((env.act_space.size,), torch.float32), reward=((), torch.float32),
                is_first=((), torch.bool), is_last=((), torch.bool), is_terminal=((), torch.bool),
                deter=((net.deter,), torch.bfloat16), stoch=((net.stoch,), torch.int16))
    return spec


def mem_available() -> int:
    """Bytes of MemAvailable from /proc/meminfo (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


SPEC_CAPACITY = 5_000_000
"""The official replay size in steps (SPEC 5.2); the automatic capacity never exceeds it."""


def replay_capacity(spec: dict, requested: int, saved: int | None = None,
                    fraction: float = 0.75) -> int:
    """The replay capacity in steps, printed with its memory.

    requested 0 (the default) means SPEC's 5e6 steps, or as many as fit in `fraction` of the
    free RAM (the rest is for the model, the envs and the page cache; on CPU the update's
    activations live in RAM too, so pass less); a resumed run keeps its saved capacity. An
    explicit capacity that does not fit fails at once naming a value that does.
    """
    per_step = sum(int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
                   for shape, dtype in spec.values())
    avail = mem_available()
    fits = int(fraction * avail / per_step) // 1000 * 1000 if avail else SPEC_CAPACITY
    capacity = requested or saved or min(SPEC_CAPACITY, fits)
    need = per_step * capacity
    print(f"replay: {capacity:,} steps x {per_step:,} bytes = {need / 2**30:.2f} GiB "
          f"(MemAvailable {avail / 2**30:.1f} GiB)", flush=True)
    if not requested and not saved and capacity < SPEC_CAPACITY:
        print(f"replay: SPEC's {SPEC_CAPACITY:,} steps would need "
              f"{per_step * SPEC_CAPACITY / 2**30:.1f} GiB; using {capacity:,} that fit "
              "(set --replay.capacity to choose)", flush=True)
    if avail and need > fraction * avail:
        raise ConfigError(f"replay of {capacity:,} steps needs {need / 2**30:.1f} GiB but only "
                          f"{avail / 2**30:.1f} GiB is available; use --replay.capacity {fits} "
                          f"(or less)")
    return capacity


def set_cpu_threads(device: torch.device) -> None:
    """On CPU give the actor and the learner half the cores each: both run parallel ops at
    once, and oversubscribed OpenMP teams thrash (a debug-size update took 3.2 s with 2
    threads per team vs 0.26 s with 1 on a busy 2-core VM)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))


def warn_large_on_cpu(cfg: Config) -> None:
    if torch.device(cfg.device).type == "cpu" and cfg.net.deter >= LARGE_ON_CPU:
        print(f"warning: training model {cfg.model} (deter {cfg.net.deter}) on the CPU will be "
              "very slow; use a smaller one, e.g. --model size1m (or --model debug)", flush=True)


class Run:
    """The live objects of one training run and what the clocks do with them."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        set_cpu_threads(self.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        try:
            self.env = make_env(cfg.env, cfg.num_envs, cfg.env_opts, cfg.seed)
        except ValueError as e:  # unknown env id (names the closest ids), bad env options
            raise ConfigError(str(e)) from e
        spec = replay_spec(self.env, cfg.net)
        # Before anything big is allocated; the concrete capacity is what a resume compares.
        capacity = replay_capacity(spec, cfg.replay.capacity, checkpoint.saved_capacity(cfg.logdir),
                                   0.75 if self.device.type == "cuda" else 0.5)
        self.cfg = cfg = dataclasses.replace(
            cfg, replay=dataclasses.replace(cfg.replay, capacity=capacity))
        warn_large_on_cpu(cfg)
        self.agent = Agent(self.env.obs_space, self.env.act_space, cfg.net, cfg.agent,
                           self.device)
        B, T = cfg.agent.batch_size, cfg.agent.batch_length
        self.ring = Ring(spec, cfg.num_envs, cfg.replay.capacity, T + 1, cfg.replay.online,
                         cfg.seed)
        # Enough steps that every stream holds a window and B*T starts exist (SPEC 5.1).
        self.limiter = RateLimiter(cfg.train_ratio, B * T, cfg.num_envs * (T + 1) + B * T)
        self.counters = {"steps": 0, "updates": 0, "elapsed_s": 0.0, "save_id": 0}

    def start(self) -> None:
        """Threads start after any resume (they read the restored weights and counters)."""
        self.weights = PolicyWeights(self.agent)
        self.actor = Actor(self.env, self.ring, self.limiter, self.weights, self.device,
                           self.cfg.steps)
        self.learner = Learner(self.agent, self.ring, self.limiter, self.weights,
                               self.cfg.agent.batch_size)
        self.learner.updates = int(self.counters["updates"])
        self.threads = [threading.Thread(target=self.actor.run, name="actor", daemon=True),
                        threading.Thread(target=self.learner.run, name="learner", daemon=True)]
        for t in self.threads:
            t.start()
        self.t0 = time.time() - float(self.counters["elapsed_s"])

    def resume(self) -> bool:
        file = checkpoint.find(self.cfg.logdir)
        if file is None:
            return False
        ckpt = checkpoint.load_checkpoint(file, self.device)
        checkpoint.check_compatible(ckpt, self.cfg, file)
        self.counters.update(checkpoint.restore(file, ckpt, self.agent, self.limiter, self.ring))
        print(f"resumed from {file}: {self.ring.inserted:,} agent steps, "
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
        with self.pause():
            self.counters.update(steps=self.ring.inserted, updates=self.learner.updates,
                                 elapsed_s=time.time() - self.t0)
            checkpoint.save(self.cfg.logdir, self.cfg, self.agent, self.limiter, self.ring,
                            self.counters)
            self.counters["save_id"] += 1

    def stop(self, finished: bool) -> None:
        """Stop both threads; on a finished run the learner first catches up with the ratio."""
        self.actor.stop.set()
        self.learner.stop.set()
        if not finished:
            self.limiter.close()  # wakes an actor blocked on insert
        for t in self.threads:
            t.join()
        if finished:
            self.learner.catch_up()
        self.learner.finish()
        self.limiter.close()
        self.env.close()


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
        return values

    def episodes(self) -> dict:
        eps = []
        while self.run.actor.episodes:
            eps.append(self.run.actor.episodes.popleft())
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
    logger.scalars(run.ring.inserted, values)
    bad = run.agent.nonfinite_losses()
    if bad:
        raise FloatingPointError(f"non-finite losses: {', '.join(bad)}; stopping (the last "
                                 "checkpoint holds the last finite state)")


def train(cfg: Config) -> None:
    """Train (or resume) until cfg.steps agent steps; save on exit, Ctrl-C and SIGTERM."""
    cfg = resolve(cfg)
    run = Run(cfg)
    cfg = run.cfg  # with the concrete replay capacity
    os.makedirs(cfg.logdir, exist_ok=True)
    if not run.resume():
        with open(os.path.join(cfg.logdir, "config.json"), "w") as f:
            f.write(checkpoint.config_json(cfg))  # for people; resume reads the checkpoint
    print(f"logdir: {cfg.logdir} | device {cfg.device} | model {cfg.model} | "
          f"{cfg.num_envs} envs | train_ratio {cfg.train_ratio:g}", flush=True)
    logger = Logger(cfg.logdir)
    stop = threading.Event()
    old = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run.start()
    stats = Stats(run)
    try:
        finished = loop(run, stats, logger, stop)
    except KeyboardInterrupt:
        logger.message("interrupted: saving")
        finished = False
    except BaseException:
        run.stop(finished=False)  # a failed run is not saved: the last checkpoint stays
        logger.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
    finish(run, stats, logger, finished)


def finish(run: Run, stats: Stats, logger: Logger, finished: bool) -> None:
    """Stop the threads, log and report a last time, save, close."""
    run.stop(finished)
    log(run, stats, logger)
    report(run, logger, run.ring.inserted)
    run.save()
    logger.message(f"saved {os.path.join(run.cfg.logdir, checkpoint.CHECKPOINT)} at "
                   f"{run.ring.inserted:,} steps, {run.learner.updates:,} updates")
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
