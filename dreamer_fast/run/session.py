"""One training run's live objects: envs, agent, ring, limiter, actor and learner threads.

`Run` builds them in order (bad flags and an unfitting replay fail before anything big is
allocated), captures the CUDA graphs, starts the two threads and stops them; the save and
resume protocol is saves.py's, the clocks that drive a run are loop.py's.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from dreamer_fast.agent.agent import Agent, set_kernels
from dreamer_fast.config import Config
from dreamer_fast.checks import ConfigError, RunError
from dreamer_fast.data.limiter import RateLimiter
from dreamer_fast.data.capacity import replay_spec
from dreamer_fast.data.ring import Ring
from dreamer_fast.data.files import DiskFull
from dreamer_fast.data.store import ChunkStore
from dreamer_fast.envs import make_env
from dreamer_fast.run import distributed as D
from dreamer_fast.run import fastpath, resolve, saves
from dreamer_fast.run.actor import Actor
from dreamer_fast.run.device import set_cpu_threads, warn_large_on_cpu
from dreamer_fast.run.graphs import GraphedPolicy, compile_steps
from dreamer_fast.run.learner import Learner
from dreamer_fast.run.replicas import Lockstep
from dreamer_fast.run.weights import PolicyWeights


def open_run(cfg: Config) -> "Run":
    """This process's env, then the one resolve step (its spaces size the replay), then the
    Run of that concrete config. An unknown env id or bad env options are one ConfigError."""
    rank = D.rank()
    try:
        env = make_env(cfg.env, cfg.num_envs, cfg.env_opts, cfg.seed + rank * cfg.num_envs)
    except ValueError as e:  # unknown env id (names the closest ids), bad env options
        raise ConfigError(str(e)) from e
    try:
        return Run(resolve.resolve(cfg, replay_spec(env, cfg.net)), env)
    except BaseException:
        env.close()
        raise


class Run:
    """The live objects of one training run and what the clocks do with them."""

    def __init__(self, cfg: Config, env):
        """cfg: concrete (run/resolve.resolve), with env's spec; env: this process's envs."""
        self.cfg, self.env = cfg, env
        self.device = torch.device(cfg.device)
        self.world, self.rank = D.world_size(), D.rank()
        # cfg.steps counts every process's agent steps; each actor stops at its share.
        self.budget = -(-cfg.steps // self.world)
        self.global_steps = 0  # every rank's agent steps, as of the last control tick
        self.graphs = cfg.graphs == "on"  # settled by run/resolve.resolve
        set_cpu_threads(self.device)
        seed = cfg.seed + self.rank  # distinct acting noise, envs and replay sampling per rank
        torch.manual_seed(seed)
        np.random.seed(seed)
        spec = replay_spec(env, cfg.net)
        warn_large_on_cpu(cfg)
        self.agent = Agent(self.env.obs_space, self.env.act_space, cfg.net, cfg.agent,
                           self.device)
        B, T = cfg.agent.batch_size, cfg.agent.batch_length
        self.ring = Ring(spec, cfg.num_envs, cfg.replay.capacity, T + 1, cfg.replay.online,
                         seed)
        # Enough steps that every stream holds a window and B*T starts exist.
        self.limiter = RateLimiter(cfg.train_ratio, B * T, cfg.num_envs * (T + 1) + B * T)
        self.counters = {"steps": 0, "updates": 0, "elapsed_s": 0.0, "save_id": 0}
        self.run_id: str | None = None  # set by resume (saved) or a fresh start (new)
        self.evaluator = None  # evaluate.PeriodicEval with --eval-every (rank 0), set by loop
        self.store: ChunkStore | None = None
        self.writer_error: BaseException | None = None
        self._writer_stop = threading.Event()
        self._writer: threading.Thread | None = None

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
        self.prepare_update()
        self.lockstep = (Lockstep(self.learner, self.limiter, self.actor_done)
                         if self.world > 1 else None)
        learn = self.lockstep.run if self.lockstep else self.learner.run
        self.threads = [threading.Thread(target=self.actor.run, name="actor", daemon=True),
                        threading.Thread(target=learn, name="learner", daemon=True)]
        for t in self.threads:
            t.start()
        self._writer = threading.Thread(target=self._write_replay, name="replay-writer",
                                        daemon=True)
        self._writer.start()
        self.t0 = time.time() - float(self.counters["elapsed_s"])

    def prepare_update(self) -> None:
        """The learner's update and the actor's policy step, before any thread starts (no
        other CUDA work may run during a capture): with graphs, the update's rung of
        fastpath's ladder (captured and checked against the eager reference, falling back on
        a failure) and the policy step's graph with the same kernels. Sets `update_mode`."""
        start = time.perf_counter()
        example = {k: torch.zeros_like(v) for k, v in self.learner.staging[0].items()}
        update = fastpath.prepare(self.agent, example, self.graphs, say=_say)
        self.learner.graph, self.update_mode = update.graph, update.mode
        for copy in self.weights.copies:  # the policy acts with the update's kernels
            set_kernels(copy, self.agent.ops.impl)
        if update.graph is not None:
            obs_spec = {k: self.ring.spec[k] for k in self.env.obs_space}
            try:
                self.actor.graph = GraphedPolicy(self.weights.copies, self.actor.carry,
                                                 obs_spec, self.env.batch_size)
            except Exception as e:  # noqa: BLE001 (the actor runs eagerly instead)
                _say(f"the policy step's graph failed ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200]}); the actor runs it eagerly")
        self.weights.publish()  # the copies' weights again, in case warm-up touched them
        if self.graphs:
            checked = update.checks.get(update.mode)
            how = (f", checked against the eager reference (losses within "
                   f"{checked['loss_rtol']:.1g} relative, deltas' cosine "
                   f"{checked['delta_cos']:.3f})" if checked else "")
            policy = "graphed" if self.actor.graph is not None else "eager"
            _say(f"update: {update.mode}{how}; policy step {policy}; ready in "
                 f"{time.perf_counter() - start:.1f}s")

    def resume(self) -> bool:
        """Restore the last save point, if any (saves.resume)."""
        return saves.resume(self)

    def fill(self) -> float:
        return min(1.0, self.ring.inserted / (self.ring.cap * self.ring.num_streams))

    def check_threads(self) -> None:
        for part in (self.actor, self.learner):
            if isinstance(part.error, RunError):
                raise RunError(f"{part.error}; {self.kept()}") from None
            if part.error is not None:
                raise RuntimeError(f"{type(part).__name__.lower()} thread failed") from part.error
        if self.writer_error is not None:
            raise RuntimeError("replay writer thread failed") from self.writer_error

    def kept(self) -> str:
        """What is on disk to resume from, for messages (saves.kept)."""
        return saves.kept(self)

    def nonfinite(self) -> list[str]:
        """Names of the losses that were ever non-finite, or ['parameters'] when only the
        weights are (one host sync each)."""
        bad = self.agent.nonfinite_losses()
        params = list(self.agent.parameters())
        if not bad and params and not bool(torch.stack([torch.isfinite(p).all()
                                                        for p in params]).all()):
            bad = ["parameters"]
        return bad

    def nonfinite_message(self, bad: list[str]) -> str:
        return (f"non-finite {', '.join(bad)} by update {self.learner.updates:,}; stopping "
                f"without saving them: {self.kept()}. Lower --agent.optim.lr or check the "
                "env's rewards and observations")

    def _write_replay(self) -> None:
        """Replay writer thread: full chunks to disk as the streams fill them. Out of disk
        space it says so once and tries again later (a save then keeps the open tails)."""
        told = False
        while not self._writer_stop.wait(0.5):
            try:
                for store in self.replay_stores():
                    store.write_ready()
                told = False
            except DiskFull as e:
                if not told:
                    print(f"warning: replay chunk not written: {e}; retrying every 0.5 s",
                          flush=True)
                    told = True
            except BaseException as e:  # surfaced by check_threads
                self.writer_error = e
                return

    def replay_stores(self) -> list[ChunkStore]:
        """The replay folders the writer thread fills (one; a packed run's: one per seed)."""
        return [self.store]

    def save(self) -> bool:
        """The next save point (saves.save): False when the disk is full."""
        return saves.save(self)

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
        self._writer_stop.set()
        if self._writer is not None:
            self._writer.join()
            if not failed and not self.actor_alive():
                try:  # the actor has stopped: the final save's tails stay short
                    self.store.write_ready()
                except DiskFull:
                    pass  # the save point keeps those steps in its tail
        self.limiter.close()
        self.env.close()

    def actor_alive(self) -> bool:
        return bool(getattr(self, "threads", ())) and self.threads[0].is_alive()

    def actor_done(self) -> bool:
        return not self.threads[0].is_alive()

    def threads_alive(self) -> bool:
        return any(t.is_alive() for t in getattr(self, "threads", ()))


def _say(line: str) -> None:
    print(line, flush=True)
