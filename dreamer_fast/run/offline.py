"""Offline training: the learner on a fixed dataset, no actor, no env stepping.

    python run.py --offline SOURCE --env CartPole-v1 [--updates N] [--eval-every 300]

SOURCE is a replay folder of this project or a Minari dataset (data/datasets.py). The env is
built once for its spaces (and, with --eval-every, for periodic evaluation on envs of its
own); the whole dataset is put in a Ring that nothing writes to, and the learner thread
trains on uniformly sampled windows for N updates. The main thread keeps the clocks of an
online run: progress, log, report, save (checkpoint.pt only: the dataset is the replay), and
stops on Ctrl-C or SIGTERM after a save; with --eval-every a finished run ends with an
evaluation of its final weights. Rerunning the same command resumes at the saved
update count; `python run.py --eval --logdir DIR` evaluates the result, and the checkpoint
continues online with `python run.py --env ID --logdir DIR --replay.resume-empty`.
"""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import torch

from dreamer_fast.agent.agent import Agent
from dreamer_fast.config import Config
from dreamer_fast.checks import ConfigError, RunError
from dreamer_fast.data import datasets
from dreamer_fast.data.capacity import replay_spec
from dreamer_fast.data.files import DiskFull
from dreamer_fast.envs import make_env
from dreamer_fast.envs.spaces import ObsConverter
from dreamer_fast.run import checkpoint
from dreamer_fast.run import distributed as D
from dreamer_fast.run.device import set_cpu_threads
from dreamer_fast.run.evaluate import MAX_EVAL_ENVS, PeriodicEval, play
from dreamer_fast.run import fastpath
from dreamer_fast.run.graphs import compile_steps
from dreamer_fast.run.learner import Learner
from dreamer_fast.run.logger import Logger, format_duration
from dreamer_fast.run.clocks import clocks as make_clocks
from dreamer_fast.run.loop import StopSignals, evaluation
from dreamer_fast.run.resolve import resolve
from dreamer_fast.run.stats import HeldRate, report


class UpdateBudget:
    """The learner's limiter offline (the part of RateLimiter that Learner.run uses): every
    sample is allowed until `total` updates."""

    def __init__(self, done: int, total: int):
        self.done, self.total = done, total
        self.closed = False
        self._lock = threading.Lock()

    def sample(self, timeout: float | None = None) -> bool:
        with self._lock:
            if self.closed or self.done >= self.total:
                self.closed = True
                return False
            self.done += 1
            return True

    def close(self) -> None:
        self.closed = True


class NoPolicy:
    """No actor offline: nothing to publish the policy weights to."""

    def publish(self) -> bool:
        return True


class OfflineRun:
    """The live objects of an offline run: dataset ring, agent, learner thread."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.world, self.rank = 1, 0
        self.graphs = cfg.graphs == "on"  # settled by run/resolve.resolve
        set_cpu_threads(self.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        try:  # the spaces only (and a check that the env exists here)
            env = make_env(cfg.env, 1, cfg.env_opts, cfg.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        try:
            self.obs_space, self.act_space = env.obs_space, env.act_space
            self.env_notes = list(getattr(env, "notes", ()))
        finally:
            env.close()
        spec = replay_spec(env, cfg.net)
        opts = cfg.env_opts
        convert = lambda space: ObsConverter(space, cfg.env, None, opts.image_size, opts.obs_keys)
        self.data = datasets.load(cfg.offline, spec, convert, self.act_space.discrete)
        T = cfg.agent.batch_length
        self.ring = datasets.to_ring(self.data, spec, T + 1, cfg.seed)
        self.total = cfg.updates or max(1, round(self.data.steps * cfg.updates_per_step))
        self.agent = Agent(self.obs_space, self.act_space, cfg.net, cfg.agent, self.device)
        self.counters = {"steps": 0, "updates": 0, "elapsed_s": 0.0, "save_id": 0,
                         "offline": 1, "dataset_steps": self.data.steps}
        self.run_id: str | None = None
        self.evaluator = None
        self.last_log = {"time": time.time(), "updates": 0}
        self.threads: list[threading.Thread] = []

    # -------------------------------------------------------------- resume, start
    def resume(self) -> bool:
        """Restore cfg.logdir's offline checkpoint, if any. An online run's logdir is refused
        (its replay and save points belong to that run)."""
        os.makedirs(self.cfg.logdir, exist_ok=True)
        file = checkpoint.find(self.cfg.logdir)
        if file is None:
            self.run_id = f"{int.from_bytes(os.urandom(6), 'big'):012x}"
            return False
        ckpt = checkpoint.load_checkpoint(file, self.device)
        if not ckpt["counters"].get("offline"):
            raise ConfigError(f"{self.cfg.logdir} holds an online run ({file}); train offline "
                              "into a new --logdir")
        checkpoint.check_compatible(ckpt, self.cfg, file)
        self.agent.load_state_dict(ckpt["agent"])
        self.agent.opt.load_state_dict(ckpt["opt"])
        checkpoint.set_rng_state(ckpt["rng"])
        self.counters.update(ckpt["counters"])
        self.counters["dataset_steps"] = self.data.steps
        self.run_id = ckpt.get("run_id")
        print(f"resumed from {file} (run {self.run_id}, save {self.counters['save_id']}): "
              f"{int(self.counters['updates']):,} offline updates", flush=True)
        return True

    def start(self) -> None:
        self.budget = UpdateBudget(int(self.counters["updates"]), self.total)
        self.learner = Learner(self.agent, self.ring, self.budget, NoPolicy(),
                               self.cfg.agent.batch_size)
        self.learner.updates = int(self.counters["updates"])
        if self.cfg.compile:
            compile_steps(self.agent, [])  # no policy copies: nothing acts
        example = {k: torch.zeros_like(v) for k, v in self.learner.staging[0].items()}
        update = fastpath.prepare(self.agent, example, self.graphs,
                                  say=lambda line: print(line, flush=True))
        self.learner.graph, self.update_mode = update.graph, update.mode
        self.threads = [threading.Thread(target=self.learner.run, name="learner", daemon=True)]
        self.threads[0].start()
        self.t0 = time.time() - float(self.counters["elapsed_s"])

    # -------------------------------------------------------------- save, stop
    def kept(self) -> str:
        if not self.counters.get("save_id"):
            return f"nothing was saved (no checkpoint in {self.cfg.logdir} yet)"
        return (f"{os.path.join(self.cfg.logdir, checkpoint.CHECKPOINT)} keeps save "
                f"{self.counters['save_id']} at {int(self.counters['updates']):,} updates")

    def save(self) -> bool:
        """checkpoint.pt with the weights, optimizer, counters and RNG (the learner paused
        only for the copy). Non-finite losses raise RunError, unsaved; no disk space prints
        one line and returns False (the previous checkpoint stays whole)."""
        save_id = int(self.counters["save_id"]) + 1
        with self.learner.lock:
            bad = self.agent.nonfinite_losses()
            if bad:
                raise RunError(f"non-finite {', '.join(bad)} by update "
                               f"{self.learner.updates:,}; stopping without saving them: "
                               f"{self.kept()}. Lower --agent.optim.lr or check the dataset's "
                               "rewards and observations")
            counters = {**self.counters, "updates": self.learner.updates,
                        "elapsed_s": time.time() - self.t0, "save_id": save_id}
            payload = {"run_id": self.run_id, "save_id": save_id,
                       "config": checkpoint.config_json(self.cfg),
                       "agent": checkpoint.cpu_copy(self.agent.state_dict()),
                       "opt": checkpoint.cpu_copy(self.agent.opt.state_dict()),
                       "limiter": {}, "counters": counters, "rng": checkpoint.rng_state(),
                       "world_size": 1}
        try:
            checkpoint.write_checkpoint(self.cfg.logdir, payload)
        except DiskFull as e:
            print(f"save {save_id} failed: {e}; {self.kept()}; the next save tries again",
                  flush=True)
            return False
        self.counters = counters
        return True

    def stop(self) -> None:
        self.learner.stop.set()
        self.budget.close()
        for t in self.threads:
            t.join()
        self.learner.finish()

    def check_threads(self) -> None:
        if self.learner.error is not None:
            raise RuntimeError("learner thread failed") from self.learner.error

    def threads_alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)


def train_offline(cfg: Config) -> None:
    """Train from cfg.offline for cfg.updates updates (module docstring)."""
    if D.world_size() > 1:
        raise ConfigError("--offline trains in one process; run it with python, not torchrun")
    with StopSignals() as signals:
        run = OfflineRun(resolve(cfg, None))
        signals.kept = run.kept
        cfg = run.cfg
        resumed = run.resume()
        if not resumed:
            with open(os.path.join(cfg.logdir, "config.json"), "w") as f:
                f.write(checkpoint.config_json(cfg))
        print(startup_line(run), flush=True)
        logger = Logger(cfg.logdir, cfg=cfg, run_id=run.run_id)
        try:
            run.start()
            logger.fields["update_mode"] = run.update_mode
            if cfg.eval_every > 0:
                run.evaluator = PeriodicEval(cfg, run.obs_space, run.act_space, run.device,
                                             cfg.eval_episodes)
            finished = loop(run, logger, signals)
        except BaseException:
            if run.threads:
                run.learner.stop.set()
                run.budget.close()
            logger.close()
            raise
        finish(run, logger, finished)


def startup_line(run: OfflineRun) -> str:
    cfg = run.cfg
    notes = "".join(f"{n} | " for n in [*run.env_notes, *run.data.notes])
    B, T = cfg.agent.batch_size, cfg.agent.batch_length
    return (f"logdir: {cfg.logdir} | device {cfg.device} | preset {cfg.preset} | model "
            f"{cfg.model} | update {fastpath.planned(run.graphs, run.agent.ops.impl)} | "
            f"{notes}offline from {run.data.describe()} | {run.total:,} updates "
            f"of {B}x{T} (= {run.total * B * T / max(1, run.data.steps):.1f} replayed steps "
            "per dataset step)")


def progress_line(updates: int, total: int, rate: float | None) -> str:
    left = (total - updates) / rate if rate else math.inf
    return (f"offline update {updates:,}/{total:,} | {rate or 0.0:.2f} updates/s | "
            f"left {format_duration(left)}")


def loop(run: OfflineRun, logger: Logger, signals: StopSignals) -> bool:
    """Clocks until the learner has done its updates (True) or a stop signal (False)."""
    cfg = run.cfg
    held = HeldRate(1, 1.0)
    clocks = make_clocks(cfg, logger.tty)
    run.last_log = {"time": time.time(), "updates": run.learner.updates}
    while not signals.stop.wait(0.2):
        run.check_threads()
        updates = run.learner.updates
        held.add(time.time(), updates, updates)
        if not run.threads[0].is_alive():
            return True
        if clocks["log"]():
            log(run, logger)
        if clocks["progress"](run.learner.updates):
            logger.progress(progress_line(updates, run.total, held.rates().get("updates_per_s")))
        if clocks["report"]():
            report(run, logger, updates)
        if clocks["save"]():
            run.save()
        evaluation(run, logger, clocks["eval"], step=updates)
    logger.message(f"{signals.name}: stopping and saving")
    return False


def log(run: OfflineRun, logger: Logger) -> None:
    """Learner metrics since the last log, updates/s, at the update count."""
    last = run.last_log
    run.last_log = now = {"time": time.time(), "updates": run.learner.updates}
    values = run.learner.pop_metrics()
    values["throughput/updates_per_s"] = (now["updates"] - last["updates"]) / max(
        1e-9, now["time"] - last["time"])
    values["counts/updates"] = now["updates"]
    logger.scalars(now["updates"], values)
    if bad := run.agent.nonfinite_losses():
        raise RunError(f"non-finite {', '.join(bad)} by update {now['updates']:,}; stopping "
                       f"without saving them: {run.kept()}")


def final_eval(run: OfflineRun, logger: Logger) -> float:
    """With --eval-every, a finished offline run ends with an evaluation of its final weights
    (--eval-episodes on envs of their own, in this thread: the learner has stopped). Returns
    the mean return."""
    cfg, returns, lengths = run.cfg, [], []
    env = make_env(cfg.env, min(cfg.eval_episodes, MAX_EVAL_ENVS), cfg.env_opts,
                   seed=cfg.seed + 20_000)
    try:
        frames = play(env, run.agent, cfg.eval_episodes, film=1,
                      on_episode=lambda r, n: (returns.append(r), lengths.append(n)))
    finally:
        env.close()
    step = run.learner.updates
    logger.scalars(step, {"eval/return": float(np.mean(returns)),
                          "eval/return_std": float(np.std(returns)),
                          "eval/length": float(np.mean(lengths)), "eval/episodes": len(returns)})
    if frames:
        logger.video(step, "eval/episode", np.stack(frames), fps=30)
    logger.message(f"final eval: return {np.mean(returns):.1f} +- {np.std(returns):.1f} over "
                   f"{len(returns)} episodes at {step:,} updates")
    return float(np.mean(returns))


def finish(run: OfflineRun, logger: Logger, finished: bool) -> None:
    try:
        if run.evaluator is not None:
            run.evaluator.close()
            evaluation(run, logger, None, step=run.learner.updates)
        run.stop()
        if finished and run.evaluator is not None:
            final_eval(run, logger)
        log(run, logger)
        report(run, logger, run.learner.updates)
        if not run.save():
            raise RunError(f"the final save failed for lack of disk space; {run.kept()}. Free "
                           "some space and rerun the same command to resume from there")
        done = "done" if finished else "stopped"
        logger.message(f"offline training {done}: saved "
                       f"{os.path.join(run.cfg.logdir, checkpoint.CHECKPOINT)} at "
                       f"{run.learner.updates:,} updates; evaluate with: python run.py --eval "
                       f"--logdir {run.cfg.logdir}")
    finally:
        logger.close()
