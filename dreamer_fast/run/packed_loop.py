"""The run loop of packed seeds (`--seeds N`): loop.py's clocks over a run/packed.PackedRun.

Each log tick writes one row per seed to <logdir>/seed<i>/ (metrics.jsonl, TensorBoard: the
keys of a solo run) and one pooled row to <logdir>/: the shared counts and rates, and the
return across seeds (`pooled/*`: each seed's mean return of its last 10 training episodes,
their mean, interquartile mean (IQM) and a 95% stratified-bootstrap interval of the IQM, as
Agarwal et al. 2021 recommend reporting seeds; dreamer_fast/scores.py). The progress line
shows the same. Periodic evals run per seed and log to its folder, and pooled once every
seed's eval of one trigger has finished.
"""

from __future__ import annotations

import os

import numpy as np

from dreamer_fast.checks import RunError
from dreamer_fast.config import Config
from dreamer_fast.run import checkpoint
from dreamer_fast.run.clocks import clocks as make_clocks
from dreamer_fast.run.evaluate import PeriodicEval
from dreamer_fast.run.logger import Logger, openloop_frames
from dreamer_fast.run.loop import StopSignals
from dreamer_fast.run.packed import PackedRun, open_run
from dreamer_fast.run.stats import Progress, Stats
from dreamer_fast.scores import iqm, stratified_bootstrap

SHARED = ("throughput/", "wait/", "time/", "limiter/", "counts/", "weights/")
"""Keys every seed shares (one actor, one learner, one limiter): logged once, pooled."""


class _SeedLearner:
    """What Stats reads of a learner, for one seed of the packed one."""

    def __init__(self, run: PackedRun):
        self.run, self.metrics = run, {}

    @property
    def updates(self) -> int:
        return self.run.learner.updates

    @property
    def timer(self):
        return self.run.learner.timer

    def pop_metrics(self) -> dict:
        metrics, self.metrics = self.metrics, {}
        return metrics


class _SeedActor:
    """What Stats reads of an actor, for one seed (its own episodes, the shared timer)."""

    def __init__(self, run: PackedRun, i: int):
        tracker = run.seeds[i].tracker
        self.episodes, self.episode_logs = tracker.episodes, tracker.episode_logs
        self.log_keys, self.timer, self.graph = tracker.log_keys, run.actor.timer, None


class SeedView:
    """Seed i of a packed run as stats.Stats reads a run: its ring and episodes, the
    shared limiter, learner and weights."""

    def __init__(self, run: PackedRun, i: int):
        self.ring, self.limiter, self.weights = run.seeds[i].ring, run.limiter, run.weights
        self.learner, self.actor = _SeedLearner(run), _SeedActor(run, i)
        self.fill = run.seeds[i].fill


def pooled_scores(scores: list[float]) -> dict:
    """pooled/* of the seeds' scores (those with episodes): count, mean, IQM, its 95%
    stratified-bootstrap interval (one task, so a plain bootstrap over seeds)."""
    if not scores:
        return {}
    a = np.asarray(scores, np.float64)
    lo, hi = stratified_bootstrap(a) if len(a) > 1 else (float(a[0]), float(a[0]))
    return {"pooled/seeds": len(a), "pooled/return_mean": float(a.mean()),
            "pooled/return_iqm": iqm(a), "pooled/return_iqm_lo": lo,
            "pooled/return_iqm_hi": hi}


def pooled_text(pooled: dict, n: int) -> str:
    if not pooled:
        return f"{n} seeds: no episode yet"
    return (f"{pooled['pooled/seeds']}/{n} seeds: IQM {pooled['pooled/return_iqm']:.1f} "
            f"[{pooled['pooled/return_iqm_lo']:.1f}, {pooled['pooled/return_iqm_hi']:.1f}]")


class Logs:
    """The per-seed loggers and stats and the pooled logger of one packed run."""

    def __init__(self, run: PackedRun):
        self.run = run
        self.seeds = [Logger(s.cfg.logdir, run_id=s.run_id) for s in run.seeds]
        self.pool = Logger(run.cfg.logdir, cfg=run.cfg, run_id=run.run_id)
        self.views = [SeedView(run, i) for i in range(run.n)]
        self.stats = [Stats(v) for v in self.views]
        self.pooled: dict = {}
        self.evals: dict[int, dict[int, list]] = {}  # trigger step -> seed -> returns

    def set_field(self, key: str, value: str) -> None:
        for logger in (*self.seeds, self.pool):
            logger.fields[key] = value

    def scores(self) -> list[float]:
        """Each seed's mean return of its last LAST_EPISODES training episodes (of those it
        finished, before it has that many)."""
        return [float(np.mean(s.recent)) for s in self.stats if len(s.recent)]

    def log(self) -> None:
        """One row per seed and one pooled row; a non-finite seed stops the run."""
        run = self.run
        step = run.inserted
        for view, metrics in zip(self.views, run.learner.pop_seed_metrics()):
            view.learner.metrics = metrics
        rows = [stats.collect() for stats in self.stats]
        for logger, row in zip(self.seeds, rows):
            logger.scalars(step, row)
        self.pooled = pooled_scores(self.scores())
        shared = {k: v for k, v in rows[0].items() if k.startswith(SHARED)}
        self.pool.scalars(step, {**shared, "replay/fill": run.fill(), **self.pooled})
        if bad := run.nonfinite():
            raise RunError(run.nonfinite_message(bad))

    def progress(self, progress: Progress) -> str:
        score = self.pooled.get("pooled/return_mean")
        return (progress.line(self.run.inserted, self.run.fill(), score)
                + f" | {pooled_text(self.pooled, self.run.n)}")

    def evaluation(self, clock) -> None:
        """Per-seed periodic evals: log the finished ones (and pool a complete trigger);
        trigger the next on its clock with every seed's weights of the moment."""
        run = self.run
        for i, evaluator in enumerate(run.evaluators):
            for result in evaluator.pop():
                returns = result["returns"]
                self.seeds[i].scalars(result["step"], {
                    "eval/return": float(np.mean(returns)),
                    "eval/return_std": float(np.std(returns)),
                    "eval/length": float(np.mean(result["lengths"])),
                    "eval/episodes": len(returns)})
                if result["frames"] is not None:
                    self.seeds[i].video(result["step"], "eval/episode", result["frames"],
                                        fps=30)
                done = self.evals.setdefault(result["step"], {})
                done[i] = float(np.mean(returns))
                if len(done) == run.n:
                    pooled = pooled_scores(list(done.values()))
                    self.pool.scalars(result["step"], {k.replace("pooled/", "pooled/eval_"): v
                                                       for k, v in pooled.items()})
                    del self.evals[result["step"]]
        if run.evaluators and clock is not None and clock():
            with run.learner.lock:
                weights = [checkpoint.cpu_copy(run.unpack(i).state_dict())
                           for i in range(run.n)]
            for evaluator, w in zip(run.evaluators, weights):
                evaluator.trigger(run.inserted, w)

    def report(self) -> None:
        """Open-loop predictions of every seed on its part of the last batch."""
        run = self.run
        for i, logger in enumerate(self.seeds):
            with run.learner.lock:
                batch = run.learner.seed_batch(i, 6)
                if batch is None:
                    return
                out = run.unpack(i).report_step(batch)
            logger.scalars(run.inserted, {k: float(v) for k, v in out.items()
                                          if k.startswith("openloop/")})
            for key, value in out.items():
                if isinstance(value, tuple) and value[0].dim() == 5:
                    logger.video(run.inserted, f"openloop_video/{key}", openloop_frames(*value))

    def close(self) -> None:
        for logger in (*self.seeds, self.pool):
            logger.close()


def startup_line(run: PackedRun) -> str:
    cfg = run.cfg
    return (f"logdir: {cfg.logdir} | device {cfg.device} | preset {cfg.preset} | model "
            f"{cfg.model} | {run.n} seeds packed (--seed {cfg.seed}..{cfg.seed + run.n - 1}, "
            f"each in {cfg.logdir}{os.sep}seed<i>; steps and rates are per seed) | update "
            f"{run.update_mode} | {cfg.num_envs} envs per seed | train_ratio "
            f"{cfg.train_ratio:g}")


def train(cfg: Config) -> None:
    """Train (or resume) N packed seeds until cfg.steps agent steps each; save on exit,
    Ctrl-C and SIGTERM (loop.train's protocol)."""
    run = None
    with StopSignals() as signals:
        run = open_run(cfg)
        signals.kept = run.kept
        if not run.resume():
            with open(os.path.join(cfg.logdir, "config.json"), "w") as f:
                f.write(checkpoint.config_json(run.cfg))
            for s in run.seeds:
                with open(os.path.join(s.cfg.logdir, "config.json"), "w") as f:
                    f.write(checkpoint.config_json(s.cfg))
        run.start()
        print(startup_line(run), flush=True)
        logs = Logs(run)
        logs.set_field("update_mode", run.update_mode)
        if run.cfg.eval_every > 0:
            run.evaluators = [PeriodicEval(s.cfg, s.env.obs_space, s.env.act_space,
                                           run.device, cfg.eval_episodes) for s in run.seeds]
        try:
            finished = loop(run, logs, signals)
        except BaseException:
            run.actor.stop.set()
            run.learner.stop.set()
            run.limiter.close()
            logs.close()
            raise
        finish(run, logs, finished)


def loop(run: PackedRun, logs: Logs, signals: StopSignals) -> bool:
    """loop.loop's scheduler of clocks. Returns True when every seed took its steps."""
    cfg = run.cfg
    progress = Progress(cfg)
    clocks = make_clocks(cfg, logs.pool.tty)
    while not signals.stop.wait(0.2):
        run.check_threads()
        if not run.actor_alive():
            return run.inserted >= cfg.steps
        progress.sample(run.inserted, run.learner.updates)
        if clocks["log"]():
            logs.log()
        if clocks["progress"](run.learner.updates):
            logs.pool.progress(logs.progress(progress))
            if note := progress.note(run.inserted):
                logs.pool.message(note)
        if clocks["report"]():
            logs.report()
        if clocks["save"]():
            run.save()
        logs.evaluation(clocks["eval"])
    logs.pool.message(f"{signals.name}: stopping and saving")
    return False


def finish(run: PackedRun, logs: Logs, finished: bool) -> None:
    """loop.finish for packed seeds: stop, save first, log, report, close."""
    try:
        for evaluator in run.evaluators:
            evaluator.close()
        logs.evaluation(None)
        run.stop(finished)
        saved = run.save()
        if saved:
            logs.pool.message(
                f"saved {os.path.join(run.cfg.logdir, checkpoint.CHECKPOINT)} and each seed's "
                f"{os.path.join('seed<i>', checkpoint.CHECKPOINT)} at {run.inserted:,} steps, "
                f"{run.learner.updates:,} updates per seed")
        logs.log()
        if logs.pooled:
            logs.pool.message(f"final: {pooled_text(logs.pooled, run.n)}; per seed "
                              + ", ".join(f"{x:.1f}" for x in logs.scores()))
        if finished and saved:
            logs.report()
        if not saved:
            raise RunError(f"the final save failed for lack of disk space; {run.kept()}. Free "
                           "some space and rerun the same command to resume from there")
    finally:
        logs.close()
