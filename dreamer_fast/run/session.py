"""One training run's live objects: envs, agent, ring, limiter, actor and learner threads.

`Run` builds them in order (bad flags and an unfitting replay fail before anything big is
allocated), resumes from a checkpoint, captures the CUDA graphs, starts the two threads,
pauses them for a save and stops them. The clocks that drive it are in loop.py.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import torch

from dreamer_fast.agent.agent import Agent
from dreamer_fast.config import Config, ConfigError
from dreamer_fast.data.limiter import RateLimiter
from dreamer_fast.data.ring import Ring, replay_capacity, replay_spec
from dreamer_fast.envs import make_env
from dreamer_fast.run import checkpoint
from dreamer_fast.run import distributed as D
from dreamer_fast.run.actor import Actor, PolicyWeights
from dreamer_fast.run.device import set_cpu_threads, warn_large_on_cpu
from dreamer_fast.run.graphs import GraphedPolicy, GraphedTrainStep, compile_steps, resolve_graphs
from dreamer_fast.run.learner import Learner
from dreamer_fast.run.replicas import Lockstep


def resolve(cfg: Config) -> Config:
    """Fill run-time defaults into a new Config: timestamped logdir, concrete device."""
    now = time.time()
    if cfg.logdir is None and D.world_size() > 1:  # one folder: rank 0's clock names it
        now = float(D.control_all_gather(torch.tensor([now], dtype=torch.float64))[0, 0])
    stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(now))
    logdir = cfg.logdir or os.path.join(
        "logdir", f"{cfg.env.replace(':', '_').replace('/', '_')}-{stamp}")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return dataclasses.replace(cfg, logdir=logdir, device=device)


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
                                   # CPU: the update's activations live in RAM too (Pong,
                                   # size1m, 64 envs: 15.2 GB peak RSS at 50%)
                                   (0.75 if self.device.type == "cuda" else 0.3)
                                   / D.local_world_size())
        self.cfg = cfg = dataclasses.replace(
            cfg, replay=dataclasses.replace(cfg.replay, capacity=capacity))
        warn_large_on_cpu(cfg)
        self.agent = Agent(self.env.obs_space, self.env.act_space, cfg.net, cfg.agent,
                           self.device)
        B, T = cfg.agent.batch_size, cfg.agent.batch_length
        self.ring = Ring(spec, cfg.num_envs, cfg.replay.capacity, T + 1, cfg.replay.online,
                         seed)
        # Enough steps that every stream holds a window and B*T starts exist.
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
        """CUDA graphs of the update and the policy step, before any thread starts (no
        other CUDA work may run during a capture): warm-up (undone) and capture on this
        thread, with nothing else on the GPU."""
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
