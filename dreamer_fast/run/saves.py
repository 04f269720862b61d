"""The save and resume protocol of a training run (the files are checkpoint.py's and
data/store.py's; the order and what each side waits for are here).

A save point S: every rank writes its replay save point (the open tails, the ring's and the
limiter's state, counters), then rank 0 writes checkpoint.pt naming S; the actor is paused only
to copy the tails and the small state, the learner also to check the losses and copy the
weights, and the files are written while training goes on. A resume restores the checkpoint's
save point: weights, optimizer, counters, RNG, limiter and replay from one moment. A kill at
any instant leaves the previous save point whole (a first save killed before its checkpoint's
rename is recovered from the whole temp file, or started afresh); a full disk fails the save in
one line and the next one tries again.
"""

from __future__ import annotations

import os
import shutil
import time

import torch

from dreamer_fast.checks import ConfigError, RunError
from dreamer_fast.data.files import DiskFull, remove_stale_temps
from dreamer_fast.data.store import ChunkStore, ReplayFileError, list_replay, read_manifest
from dreamer_fast.run import checkpoint
from dreamer_fast.run import distributed as D


def resume(run) -> bool:
    """Restore the last save point of cfg.logdir, if any (else start a fresh replay
    folder); returns whether it resumed. Every problem is one ConfigError line."""
    os.makedirs(run.cfg.logdir, exist_ok=True)
    if run.rank == 0:  # each rank cleans its own replay folder (ChunkStore)
        if note := checkpoint.recover_killed_save(run.cfg.logdir):
            print(note, flush=True)
        remove_stale_temps(run.cfg.logdir, depth=0, mine=True)
    if run.world > 1:  # every rank looks for the checkpoint after rank 0 recovered it
        D.control_all_gather(torch.zeros(1))
    folder = checkpoint.replay_dir(run.cfg.logdir, run.rank, run.world)
    file = checkpoint.find(run.cfg.logdir)
    if file is None:
        fresh(run, folder)
        return False
    ckpt = checkpoint.load_checkpoint(file, run.device)
    checkpoint.check_seeds(ckpt, 1, file)
    checkpoint.check_compatible(ckpt, run.cfg, file)
    checkpoint.check_world_size(ckpt, run.world, file)
    run.agent.load_state_dict(ckpt["agent"])
    run.agent.opt.load_state_dict(ckpt["opt"])
    checkpoint.set_rng_state(ckpt["rng"])
    run.counters.update(ckpt["counters"])
    run.counters["save_id"] = int(ckpt.get("save_id", run.counters.get("save_id", 0)))
    run.run_id = ckpt.get("run_id")
    if run.run_id is None:  # saved before the replay folder: one replay.pt
        run.run_id = new_run_id(run)
        if not checkpoint.restore_legacy(file, ckpt, run.limiter, run.ring, run.rank,
                                         run.world):
            empty_replay(run, file, f"no {checkpoint.REPLAY} beside {file}")
        run.store = ChunkStore(folder, run.ring, run.run_id, run.cfg.replay.keep_chunks)
        run.store.create()
        run.store.start_from_ring()
    else:
        run.store = ChunkStore(folder, run.ring, run.run_id, run.cfg.replay.keep_chunks)
        load_replay(run, file, folder)
    who = f"[rank {run.rank}] " if run.world > 1 else ""
    print(f"{who}resumed from {file} (run {run.run_id}, save {run.counters['save_id']}): "
          f"{run.ring.inserted:,} agent steps, {run.counters['updates']:,} updates, "
          f"replay {run.fill():.0%} full", flush=True)
    return True


def new_run_id(run) -> str:
    """12 hex digits, rank 0's in a data-parallel world (every rank calls it)."""
    rid = int.from_bytes(os.urandom(6), "big")
    if run.world > 1:  # 48 bits are exact in a float64
        rid = int(D.control_all_gather(torch.tensor([float(rid)], dtype=torch.float64))[0, 0])
    return f"{rid:012x}"


def fresh(run, folder: str) -> None:
    """A new run: a new run id and replay folder. A replay folder left by a run that
    never saved a checkpoint holds nothing resumable and is cleared; one with save points
    but no checkpoint beside it is refused."""
    run.run_id = new_run_id(run)
    if os.path.exists(folder):
        try:
            info = list_replay(folder)
        except ReplayFileError as e:
            raise ConfigError(f"{folder} is in the way of a new run ({e}); move it away or "
                              "use a new --logdir") from None
        if info["save_points"] == [1]:  # the first save never wrote its checkpoint
            print(f"note: the first save was interrupted before its checkpoint was "
                  f"written: nothing of run {info['manifest']['run_id']} was saved; "
                  f"starting afresh (removing {folder})", flush=True)
        elif info["save_points"]:
            raise ConfigError(
                f"{folder} holds the replay of run {info['manifest']['run_id']} (save "
                f"points {info['save_points']}) but {run.cfg.logdir} has no "
                f"{checkpoint.CHECKPOINT}; put the checkpoint back to resume, or use a new "
                "--logdir")
        else:
            print(f"note: removing {folder}: the replay of a run that never saved a "
                  "checkpoint", flush=True)
        shutil.rmtree(folder)
    run.store = ChunkStore(folder, run.ring, run.run_id, run.cfg.replay.keep_chunks)
    run.store.create()


def load_replay(run, file: str, folder: str) -> None:
    """The replay, limiter (and with N > 1 processes this rank's RNG) of the checkpoint's
    save point; a missing, foreign or unusable one is an error unless
    --replay.resume-empty."""
    save_id = run.counters["save_id"]
    try:
        manifest = read_manifest(folder)
    except ReplayFileError as e:
        return empty_replay(run, file, str(e))
    if manifest.get("run_id") != run.run_id:
        return empty_replay(run, file, f"{folder} holds the replay of run "
                                  f"{manifest.get('run_id')}, not of this run "
                                  f"({run.run_id}): files of two runs")
    mine = run.store.manifest()
    for key in ("num_streams", "capacity_per_stream", "chunk_steps", "keys"):
        if manifest.get(key) != mine[key]:
            return empty_replay(run, file, f"{folder}/manifest.json has {key} "
                                      f"{manifest.get(key)}, this run needs {mine[key]}")
    try:
        meta = run.store.load(save_id)
    except ReplayFileError as e:
        return empty_replay(run, file, str(e))
    run.limiter.load_state_dict(meta["limiter"])
    if run.world > 1:
        checkpoint.set_rng_state(checkpoint.rng_from_arrays(meta["rng"], meta["arrays"]))


def empty_replay(run, file: str, why: str) -> None:
    """Continue with an empty replay (--replay.resume-empty), or the error naming it."""
    steps, updates = int(run.counters["steps"]), int(run.counters["updates"])
    if not run.cfg.replay.resume_empty:
        raise ConfigError(
            f"the replay of {file} (save {run.counters['save_id']}, {steps:,} steps) "
            f"cannot be restored: {why}. Rerun with --replay.resume-empty to continue "
            f"with an empty replay keeping the weights and counts ({steps:,} steps, "
            f"{updates:,} updates), or restore the replay folder")
    print(f"warning: {why}; resuming with an empty replay (--replay.resume-empty): the "
          f"counts stay at {steps:,} steps, {updates:,} updates", flush=True)
    folder = run.store.path if run.store else checkpoint.replay_dir(
        run.cfg.logdir, run.rank, run.world)
    if os.path.exists(folder):
        aside = f"{folder}.unused-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(folder, aside)
        print(f"note: moved the unusable {folder} to {aside}", flush=True)
    run.ring.reset_counts(-(-steps // run.world))
    if run.store is not None:
        run.store.create()


def kept(run) -> str:
    """What is on disk to resume from, for messages."""
    if not run.counters.get("save_id"):
        return f"nothing was saved (no checkpoint in {run.cfg.logdir} yet)"
    return (f"{os.path.join(run.cfg.logdir, checkpoint.CHECKPOINT)} keeps save "
            f"{run.counters['save_id']} at {int(run.counters['steps']):,} steps, "
            f"{int(run.counters['updates']):,} updates")


def save(run) -> bool:
    """Save point counters['save_id'] + 1 (checkpoint.py): every rank its replay save
    point, then rank 0 checkpoint.pt. The actor is paused only to copy the open replay
    tails and the small state, the learner also to check the losses and copy the weights;
    the files are written after, while training goes on.
    Out of disk space it prints one line, removes its partial files and returns False
    (the previous save point stays whole). Non-finite losses raise RunError, unsaved."""
    save_id = int(run.counters["save_id"]) + 1
    # Actor first (see learner.lock). The actor waits only for the replay's open tails and
    # the small state; the learner also for the copy of the weights and optimizer state.
    run.actor.lock.acquire()
    run.learner.lock.acquire()
    try:
        try:
            bad = run.nonfinite()
            if bad and run.world == 1:
                raise RunError(run.nonfinite_message(bad))
            steps = run.ring.inserted if run.world == 1 else max(run.global_steps,
                                                                   run.ring.inserted)
            counters = {**run.counters, "steps": steps, "updates": run.learner.updates,
                        "elapsed_s": time.time() - run.t0, "save_id": save_id}
            snap = run.store.snapshot()
            limiter = run.limiter.state_dict()
            rng = checkpoint.rng_state()
        finally:
            run.actor.lock.release()
        payload = None
        if run.rank == 0:
            payload = {"run_id": run.run_id, "save_id": save_id,
                       "config": checkpoint.config_json(run.cfg),
                       "agent": checkpoint.cpu_copy(run.agent.state_dict()),
                       "opt": checkpoint.cpu_copy(run.agent.opt.state_dict()),
                       "limiter": limiter, "counters": counters, "rng": rng,
                       "world_size": run.world}
    finally:
        run.learner.lock.release()
    if run.world > 1:  # every rank stops, or none; no collective while paused (rule 1)
        flags = D.control_all_gather(torch.tensor([bool(bad)], dtype=torch.float64))
        if bool(flags.any()):
            raise RunError(run.nonfinite_message(bad or ["losses on another rank"]))
    rng_meta, rng_arrays = checkpoint.rng_arrays(rng)
    error = None
    try:
        run.store.write_point(snap, save_id, {"limiter": limiter, "counters": counters,
                                               "rng": rng_meta, "arrays": rng_arrays})
    except DiskFull as e:
        error = e
    if run.world > 1:  # rank 0 publishes only once every rank's save point is written
        ok = D.control_all_gather(torch.tensor([error is None], dtype=torch.float64))
        if error is None and not bool(ok.all()):
            error = RuntimeError("another rank could not write its replay save point")
    if error is None and run.rank == 0:
        try:
            checkpoint.write_checkpoint(run.cfg.logdir, payload)
        except DiskFull as e:
            error = e
    if run.world > 1:  # the same outcome everywhere: the save ids stay equal across ranks
        ok = D.control_all_gather(torch.tensor([error is None], dtype=torch.float64))
        if error is None and not bool(ok.all()):
            error = RuntimeError("rank 0 could not write the checkpoint")
    if error is not None:
        intact = " and is intact" if run.counters.get("save_id") else ""
        print(f"save {save_id} failed: {error}; {kept(run)}{intact}; its partial files "
              "were removed; the next save tries again", flush=True)
        return False
    run.counters = counters
    run.store.commit(save_id, snap["state"]["count"])
    return True
