"""Offline training of packed seeds (`--offline SOURCE --seeds N`): N agents trained by one
packed update on one dataset, no env stepping.

Seed i is the offline run `--seed S+i` would be: its agent initialised from that seed, its own
copy of the dataset's ring sampling windows with that seed. The folders are a packed online
run's (run/packed.py): <logdir>/checkpoint.pt holds every seed (what a resume reads), and
<logdir>/seed<i>/ each seed as an offline run of its own (checkpoint.pt, metrics.jsonl,
TensorBoard), which `python run.py --eval --logdir <logdir>/seed<i>` evaluates alone. The
clocks are offline.py's; with --eval-every every seed is evaluated periodically and, once
finished, on its final weights, and the seeds' returns are pooled (IQM and its 95% bootstrap
interval).
"""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import torch

from dreamer_fast.agent.agent import Agent
from dreamer_fast.agent.packed import PackedAgents
from dreamer_fast.checks import ConfigError, RunError
from dreamer_fast.config import Config
from dreamer_fast.data import datasets
from dreamer_fast.data.files import DiskFull
from dreamer_fast.run import checkpoint
from dreamer_fast.run.clocks import clocks as make_clocks
from dreamer_fast.run.evaluate import PeriodicEval
from dreamer_fast.run.logger import Logger
from dreamer_fast.run.loop import StopSignals
from dreamer_fast.run.offline import (NoPolicy, OfflineRun, UpdateBudget, final_eval,
                                      progress_line)
from dreamer_fast.run.packed import (PackedLearner, nonfinite_message, nonfinite_seeds,
                                     prepare_update, seed_config)
from dreamer_fast.run.packed_loop import Logs, pooled_scores, pooled_text
from dreamer_fast.run.resolve import resolve
from dreamer_fast.run.stats import HeldRate


def new_id() -> str:
    return f"{int.from_bytes(os.urandom(6), 'big'):012x}"


class PackedOfflineRun(OfflineRun):
    """OfflineRun's objects for N seeds: a ring and an agent per seed, one packed learner."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)  # the dataset, and seed 0's ring and agent
        self.n = cfg.seeds
        self.seed_cfgs = [seed_config(cfg, i) for i in range(self.n)]
        length = cfg.agent.batch_length + 1
        self.rings = [self.ring] + [datasets.to_ring(self.data, self.ring.spec, length, c.seed)
                                    for c in self.seed_cfgs[1:]]
        self.agents = [self.agent]
        for c in self.seed_cfgs[1:]:
            torch.manual_seed(c.seed)
            np.random.seed(c.seed)
            self.agents.append(Agent(self.obs_space, self.act_space, cfg.net, cfg.agent,
                                     self.device))
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.run_ids: list[str] = []
        self.evaluators: list = []
        self.packed: PackedAgents | None = None

    @property
    def inserted(self) -> int:
        """The x-axis of an offline run's logs: updates."""
        return self.learner.updates

    def resume(self) -> bool:
        """Restore the packed offline checkpoint of cfg.logdir, if any."""
        for c in (self.cfg, *self.seed_cfgs):
            os.makedirs(c.logdir, exist_ok=True)
        file = checkpoint.find(self.cfg.logdir)
        if file is None:
            self.run_id, self.run_ids = new_id(), [new_id() for _ in range(self.n)]
            return False
        ckpt = checkpoint.load_checkpoint(file, self.device)
        checkpoint.check_seeds(ckpt, self.n, file)
        if not ckpt["counters"].get("offline"):
            raise ConfigError(f"{self.cfg.logdir} holds an online run ({file}); train offline "
                              "into a new --logdir")
        checkpoint.check_compatible(ckpt, self.cfg, file)
        for agent, state in zip(self.agents, ckpt["seeds"]):
            agent.load_state_dict(state["agent"])
            agent.opt.load_state_dict(state["opt"])
        self.run_ids = [state["run_id"] for state in ckpt["seeds"]]
        checkpoint.set_rng_state(ckpt["rng"])
        self.counters.update(ckpt["counters"])
        self.counters["dataset_steps"] = self.data.steps
        self.run_id = ckpt["run_id"]
        print(f"resumed from {file} (run {self.run_id}, save {self.counters['save_id']}, "
              f"{self.n} seeds): {int(self.counters['updates']):,} offline updates each",
              flush=True)
        return True

    def start(self) -> None:
        self.budget = UpdateBudget(int(self.counters["updates"]), self.total)
        self.packed = PackedAgents(self.agents)
        self.scratch, self.agents, self.agent = self.agents[0], [], None
        self.learner = PackedLearner(self.packed, self.rings, self.budget, NoPolicy(),
                                     self.cfg.agent.batch_size)
        self.learner.updates = int(self.counters["updates"])
        self.update_mode = prepare_update(self.packed, self.learner, self.graphs,
                                          self.scratch.ops.impl)
        self.threads = [threading.Thread(target=self.learner.run, name="learner", daemon=True)]
        self.threads[0].start()
        self.t0 = time.time() - float(self.counters["elapsed_s"])

    def unpack(self, i: int) -> Agent:
        return self.packed.unpack(i, self.scratch)

    def save(self) -> bool:
        """The packed checkpoint, then each seed's own (offline.OfflineRun.save's rules)."""
        save_id = int(self.counters["save_id"]) + 1
        with self.learner.lock:
            if bad := nonfinite_seeds(self.packed):
                raise RunError(nonfinite_message(bad, self.cfg.seed, self.learner.updates,
                                                 self.kept(), "the dataset's rewards and "
                                                 "observations"))
            counters = {**self.counters, "updates": self.learner.updates,
                        "elapsed_s": time.time() - self.t0, "save_id": save_id}
            rng = checkpoint.rng_state()
            states = []
            for i, rid in enumerate(self.run_ids):
                agent = self.unpack(i)
                states.append({"run_id": rid, "agent": checkpoint.cpu_copy(agent.state_dict()),
                               "opt": checkpoint.cpu_copy(agent.opt.state_dict())})
        common = {"save_id": save_id, "limiter": {}, "counters": counters, "rng": rng,
                  "world_size": 1}
        try:
            checkpoint.write_checkpoint(self.cfg.logdir, {
                **common, "run_id": self.run_id, "packed": self.n, "seeds": states,
                "config": checkpoint.config_json(self.cfg)})
        except DiskFull as e:
            print(f"save {save_id} failed: {e}; {self.kept()}; the next save tries again",
                  flush=True)
            return False
        self.counters = counters
        try:  # each seed as a run of its own (derived from the packed checkpoint)
            for c, state in zip(self.seed_cfgs, states):
                checkpoint.write_checkpoint(c.logdir, {**common, **state,
                                                       "config": checkpoint.config_json(c)})
        except DiskFull as e:
            print(f"warning: the seeds' own checkpoints of save {save_id} were not all "
                  f"written ({e}); the packed run's is, and the next save writes them again",
                  flush=True)
        return True


class OfflineLogs(Logs):
    """Per-seed learner metrics and the pooled rates of a packed offline run (Logs' evals and
    reports; no episodes offline)."""

    def __init__(self, run: PackedOfflineRun):
        self.run = run
        self.seeds = [Logger(c.logdir, run_id=rid) for c, rid in zip(run.seed_cfgs, run.run_ids)]
        self.pool = Logger(run.cfg.logdir, cfg=run.cfg, run_id=run.run_id)
        self.pooled: dict = {}
        self.evals: dict = {}
        self.last = {"time": time.time(), "updates": run.learner.updates}

    def log(self) -> None:
        run = self.run
        now = {"time": time.time(), "updates": run.learner.updates}
        rate = (now["updates"] - self.last["updates"]) / max(1e-9, now["time"]
                                                             - self.last["time"])
        self.last = now
        shared = {"throughput/updates_per_s": rate, "counts/updates": now["updates"]}
        for logger, metrics in zip(self.seeds, run.learner.pop_seed_metrics()):
            logger.scalars(now["updates"], {**metrics, **shared})
        self.pool.scalars(now["updates"], shared)
        if bad := nonfinite_seeds(run.packed):
            raise RunError(nonfinite_message(bad, run.cfg.seed, now["updates"], run.kept(),
                                             "the dataset's rewards and observations"))


def train(cfg: Config) -> None:
    """Train N packed seeds from cfg.offline (module docstring; offline.train_offline's
    protocol)."""
    from dreamer_fast.run import distributed as D

    if D.world_size() > 1:
        raise ConfigError("--offline trains in one process; run it with python, not torchrun")
    with StopSignals() as signals:
        run = PackedOfflineRun(resolve(cfg, None))
        signals.kept = run.kept
        cfg = run.cfg
        if not run.resume():
            for c in (cfg, *run.seed_cfgs):
                with open(os.path.join(c.logdir, "config.json"), "w") as f:
                    f.write(checkpoint.config_json(c))
        run.start()
        B, T = cfg.agent.batch_size, cfg.agent.batch_length
        print(f"logdir: {cfg.logdir} | device {cfg.device} | model {cfg.model} | {run.n} seeds "
              f"packed (--seed {cfg.seed}..{cfg.seed + run.n - 1}, each in {cfg.logdir}"
              f"{os.sep}seed<i>) | update {run.update_mode} | offline from "
              f"{run.data.describe()} | {run.total:,} updates of {B}x{T} per seed", flush=True)
        logs = OfflineLogs(run)
        logs.set_field("update_mode", run.update_mode)
        if cfg.eval_every > 0:
            run.evaluators = [PeriodicEval(c, run.obs_space, run.act_space, run.device,
                                           cfg.eval_episodes) for c in run.seed_cfgs]
        try:
            finished = loop(run, logs, signals)
        except BaseException:
            run.learner.stop.set()
            run.budget.close()
            logs.close()
            raise
        finish(run, logs, finished)


def loop(run: PackedOfflineRun, logs: OfflineLogs, signals: StopSignals) -> bool:
    """offline.loop's clocks. True once every update is done."""
    held = HeldRate(1, 1.0)
    clocks = make_clocks(run.cfg, logs.pool.tty)
    while not signals.stop.wait(0.2):
        run.check_threads()
        updates = run.learner.updates
        held.add(time.time(), updates, updates)
        if not run.threads[0].is_alive():
            return True
        if clocks["log"]():
            logs.log()
        if clocks["progress"](updates):
            logs.pool.progress(progress_line(updates, run.total,
                                             held.rates().get("updates_per_s"))
                               + f" | {run.n} seeds")
        if clocks["report"]():
            logs.report()
        if clocks["save"]():
            run.save()
        logs.evaluation(clocks["eval"])
    logs.pool.message(f"{signals.name}: stopping and saving")
    return False


def finish(run: PackedOfflineRun, logs: OfflineLogs, finished: bool) -> None:
    try:
        for evaluator in run.evaluators:
            evaluator.close()
        logs.evaluation(None)
        run.stop()
        if finished and run.evaluators:  # every seed's final weights, pooled
            means = []
            for i, (c, logger) in enumerate(zip(run.seed_cfgs, logs.seeds)):
                seed = SimpleNamespace(cfg=c, agent=run.unpack(i), learner=run.learner)
                means.append(final_eval(seed, logger))
            pooled = pooled_scores(means)
            logs.pool.scalars(run.learner.updates, {k.replace("pooled/", "pooled/eval_"): v
                                                    for k, v in pooled.items()})
            logs.pool.message(f"final eval pooled: {pooled_text(pooled, run.n)}")
        logs.log()
        logs.report()
        if not run.save():
            raise RunError(f"the final save failed for lack of disk space; {run.kept()}. Free "
                           "some space and rerun the same command to resume from there")
        done = "done" if finished else "stopped"
        logs.pool.message(f"offline training of {run.n} seeds {done}: saved "
                          f"{os.path.join(run.cfg.logdir, checkpoint.CHECKPOINT)} at "
                          f"{run.learner.updates:,} updates; evaluate with: python run.py "
                          f"--eval --logdir {run.cfg.logdir}")
    finally:
        logs.close()
