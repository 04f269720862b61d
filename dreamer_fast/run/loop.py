"""The run loop: build the actor-learner (session.py), resume, then a scheduler of clocks.

One process per device: an actor thread (actor.py) fills the ring, a learner thread
(learner.py) trains from it at train_ratio (dreamer_fast/data/limiter.py). The main thread
only keeps time: progress (1 s), log (`log_every` s), report (`report_every` s), save
(`save_every` s), and stops on the step budget, Ctrl-C or SIGTERM (saving first).

Data parallel: under torchrun every process runs all of the above with its own
envs and ring; gradients meet in one all-reduce per update. The main threads meet every tick
(0.2 s) in one small all-gather on a separate gloo group (distributed.control_all_gather):
rank 0's clocks decide log and save, any rank's SIGTERM/Ctrl-C, finished budget or failed
thread stops all. Two rules keep this deadlock-free. (1) A main thread never waits on another
rank while it holds its own actor or learner lock: a save pauses only to copy this rank's
state and meets the other ranks (two control all-gathers: non-finite flags, save points
written) after letting go, so a learner blocked in the all-reduce is only waiting for peers
that each finish their copy and let go. (2) All learners stop after the same update
(`Lockstep`): a rank that stopped one update early would leave the others in the collective.
"""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import torch

from dreamer_fast.config import Config

from dreamer_fast.checks import RunError
from dreamer_fast.run import checkpoint
from dreamer_fast.run import distributed as D
from dreamer_fast.run.logger import Logger
from dreamer_fast.run.replicas import check_replicas, ranks_str
from dreamer_fast.run.session import Run, open_run
from dreamer_fast.run import estimate
from dreamer_fast.run.evaluate import PeriodicEval
from dreamer_fast.run.clocks import Every, clocks as make_clocks
from dreamer_fast.run.stats import Progress, Stats, feasibility_note, log, report, startup_line


class StopSignals:
    """SIGINT and SIGTERM while a run trains and saves. The first asks the loop to stop (it
    saves, then the process exits 0); a second says the save goes on; only a third exits at
    once, saying what was not saved. Installed explicitly, so a process that started with
    SIGINT ignored (a background job of a non-interactive shell) still stops on Ctrl-C; kept
    until the final save has finished."""

    def __init__(self):
        self.stop = threading.Event()
        self.name: str | None = None
        self.count = 0
        self.kept = lambda: "nothing was saved yet"
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count == 1:
            self.name = name
            self.stop.set()
        elif self.count == 2:  # os.write: a print here could re-enter a blocked stdout write
            os.write(2, f"{name}: still stopping and saving; a third signal exits without "
                        "saving\n".encode())
        else:
            os.write(2, f"{name} a third time: exiting without the final save; the steps and "
                        f"updates since the last save are lost; {self.kept()}\n".encode())
            os._exit(130)


def train(cfg: Config) -> None:
    """Train (or resume) until cfg.steps agent steps; save on exit, Ctrl-C and SIGTERM.

    Under torchrun (WORLD_SIZE > 1) this process is one replica of a data-parallel world: the
    same flags on every rank, cfg.steps counted over all of them (module docstring)."""
    D.init()
    run = None
    try:
        with StopSignals() as signals:
            run = open_run(cfg)
            signals.kept = run.kept
            _train(run, signals)
    finally:
        # After a failure a learner may still sit in a collective with a vanished peer;
        # tearing the group down under it could hang, and the process is exiting anyway.
        if run is None or not run.threads_alive():
            D.destroy()


def _train(run: Run, signals: StopSignals) -> None:
    cfg = run.cfg  # with the concrete replay capacity
    if not run.resume() and D.is_main():
        with open(os.path.join(cfg.logdir, "config.json"), "w") as f:
            f.write(checkpoint.config_json(cfg))  # for people; resume reads the checkpoint
    if run.world > 1:
        run.agent.enable_data_parallel()  # after the resume: rank 0's state on every rank
    if D.is_main():
        print(startup_line(run), flush=True)
        # Before anything trains: an estimate from the model's work and this device's speed
        # (the progress line's held rate takes over once updates run).
        per_update, _ = estimate.run_seconds(cfg, run.agent, run.device)
        rate = 1.0 / (per_update * cfg.updates_per_step) * run.world
        if note := feasibility_note(cfg, run.ring.inserted, rate,
                                    f"estimated for {cfg.model} on this {run.device.type}"):
            print(note, flush=True)
    logger = Logger(cfg.logdir, enabled=D.is_main(), cfg=cfg, run_id=run.run_id)
    run.start()
    logger.fields["update_mode"] = run.update_mode
    if cfg.eval_every > 0 and D.is_main():
        run.evaluator = PeriodicEval(cfg, run.env.obs_space, run.env.act_space, run.device,
                                     cfg.eval_episodes)
    stats = Stats(run)
    try:
        finished = (loop if run.world == 1 else loop_replicas)(run, stats, logger, signals)
    except KeyboardInterrupt:  # only if a SIGINT handler other than ours was in place
        logger.message("interrupted: saving")
        finished = False
    except BaseException:
        run.stop(finished=False, failed=True)  # not saved: the last checkpoint stays
        logger.close()
        raise
    finish(run, stats, logger, finished)


def evaluation(run: Run, logger: Logger, clock: Every | None, step: int | None = None) -> None:
    """Periodic evaluation (rank 0): trigger one on its clock with a copy of the weights, and
    log the ones that finished (at the agent step of the trigger, or `step`: offline, the
    update count)."""
    if run.evaluator is None:
        return
    for result in run.evaluator.pop():
        returns = result["returns"]
        logger.scalars(result["step"], {
            "eval/return": float(np.mean(returns)), "eval/return_std": float(np.std(returns)),
            "eval/length": float(np.mean(result["lengths"])), "eval/episodes": len(returns)})
        if result["frames"] is not None:
            logger.video(result["step"], "eval/episode", result["frames"], fps=30)
    if clock is not None and clock():
        with run.learner.lock:
            weights = checkpoint.cpu_copy(run.agent.state_dict())
        run.evaluator.trigger(run.ring.inserted if step is None else step, weights)


def finish(run: Run, stats: Stats, logger: Logger, finished: bool) -> None:
    """Stop the threads, save, then log (and, when the run finished its steps, report) a last
    time, close. The save comes first: a stop by Ctrl-C is saved in seconds, and nothing a
    log or a video write meets (a full disk) can lose it. The final save is checked like
    every save (non-finite losses stop unsaved); without disk space it is an error."""
    try:
        if run.evaluator is not None:
            run.evaluator.close()
            evaluation(run, logger, None)  # a finished last eval is still logged
        run.stop(finished)
        stats_values = stats.collect()  # the last interval's rates, read before the save
        saved = run.save()
        steps = run.ring.inserted if run.world == 1 else run.global_steps
        if saved:
            logger.message(f"saved {os.path.join(run.cfg.logdir, checkpoint.CHECKPOINT)} at "
                           f"{steps:,} steps, {run.learner.updates:,} updates")
        log(run, stats, logger, stats_values)
        if finished and saved and D.is_main():
            report(run, logger, steps)
        if not saved:
            raise RunError(f"the final save failed for lack of disk space; {run.kept()}. Free "
                           "some space and rerun the same command to resume from there")
        if run.world > 1:
            check_replicas(run.agent, run.ring.inserted, run.learner.updates)
    finally:
        logger.close()


def loop(run: Run, stats: Stats, logger: Logger, signals: StopSignals) -> bool:
    """The scheduler of clocks. Returns True when the step budget was reached."""
    cfg = run.cfg
    progress = Progress(cfg)
    clocks = make_clocks(cfg, logger.tty)
    while not signals.stop.wait(0.2):
        run.check_threads()
        if not run.threads[0].is_alive():
            return run.ring.inserted >= cfg.steps
        progress.sample(run.ring.inserted, run.learner.updates)
        if clocks["log"]():
            log(run, stats, logger)
        if clocks["progress"](run.learner.updates):
            logger.progress(progress.line(run.ring.inserted, run.fill(), stats.score))
            if note := progress.note(run.ring.inserted):
                logger.message(note)
        if clocks["report"]():
            report(run, logger, run.ring.inserted)
        if clocks["save"]():
            run.save()
        evaluation(run, logger, clocks["eval"])
    logger.message(f"{signals.name}: stopping and saving")
    return False


def loop_replicas(run: Run, stats: Stats, logger: Logger, signals: StopSignals) -> bool:
    """The scheduler of clocks of a data-parallel world, on every rank. Each tick one control
    all-gather of (stop requested, actor done, thread failed, agent steps, log, save): rank 0's
    clocks decide log and save, any rank's stop request stops all. Returns True once every
    rank reached its share of the step budget."""
    cfg, main = run.cfg, D.is_main()
    progress = Progress(cfg, run.world)
    clocks = make_clocks(cfg, logger.tty)
    while True:
        signals.stop.wait(0.2)
        done = run.actor_done()  # read before `failed`: a failure ends the actor
        failed = run.actor.error is not None or run.learner.error is not None
        row = [signals.stop.is_set(), done, failed, run.ring.inserted,
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
        progress.sample(run.global_steps, run.learner.updates)  # lockstep: same on all ranks
        if main and clocks["progress"](run.learner.updates):
            logger.progress(progress.line(run.global_steps, run.fill(), stats.score))
            if note := progress.note(run.global_steps):
                logger.message(note)
        if main and clocks["report"]():
            report(run, logger, run.global_steps)
        if main:
            evaluation(run, logger, clocks["eval"])
        if rows[0, 5]:
            run.save()
