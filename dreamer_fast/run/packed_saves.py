"""The save and resume protocol of a packed run (`--seeds N`, run/packed.py), as run/saves.py
is a solo run's.

A save point S: the actor is paused to copy every seed's replay tail, the learner also to check
the losses and unpack each seed's weights; then, while training goes on: every seed's replay
save point, the packed <logdir>/checkpoint.pt naming S (every seed's weights and optimizer,
the shared counters, limiter and RNG: the save point a packed resume reads), each seed's own
<logdir>/seed<i>/checkpoint.pt in the solo format (derived: it evaluates or resumes that seed
alone), and last the replay folders drop their older save points. A kill between the packed
checkpoint and a seed's own leaves that one a save behind (missing after the first save); the
packed resume writes it again.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

from dreamer_fast.checks import RunError
from dreamer_fast.data.files import DiskFull, remove_stale_temps
from dreamer_fast.data.store import ChunkStore
from dreamer_fast.run import checkpoint, saves

if TYPE_CHECKING:  # packed.py imports this module (PackedRun.resume, .save)
    from dreamer_fast.run.packed import PackedRun, Seed


def resume(run: PackedRun) -> bool:
    """Restore the packed run's last save point (every seed's weights, optimizer, replay and
    the shared limiter), or start every seed afresh. Before start()."""
    cfg = run.cfg
    os.makedirs(cfg.logdir, exist_ok=True)
    if note := checkpoint.recover_killed_save(cfg.logdir):
        print(note, flush=True)
    remove_stale_temps(cfg.logdir, depth=0, mine=True)
    file = checkpoint.find(cfg.logdir)
    for s in run.seeds:
        os.makedirs(s.cfg.logdir, exist_ok=True)
        remove_stale_temps(s.cfg.logdir, depth=0, mine=True)
    folders = [checkpoint.replay_dir(s.cfg.logdir) for s in run.seeds]
    if file is None:
        run.run_id = saves.new_run_id(run)
        for s, folder in zip(run.seeds, folders):
            saves.fresh(s, folder)
        return False
    ckpt = checkpoint.load_checkpoint(file, run.device)
    checkpoint.check_seeds(ckpt, run.n, file)
    checkpoint.check_compatible(ckpt, cfg, file)
    checkpoint.set_rng_state(ckpt["rng"])
    run.counters.update(ckpt["counters"])
    run.counters["save_id"] = int(ckpt["save_id"])
    run.run_id = ckpt["run_id"]
    for s, agent, folder, state in zip(run.seeds, run.agents, folders, ckpt["seeds"]):
        agent.load_state_dict(state["agent"])
        agent.opt.load_state_dict(state["opt"])
        s.run_id, s.counters = state["run_id"], dict(run.counters)
        s.store = ChunkStore(folder, s.ring, s.run_id, cfg.replay.keep_chunks)
        saves.load_replay(s, file, folder)
    for s, state in zip(run.seeds, ckpt["seeds"]):
        repair_seed_checkpoint(s, state, ckpt, file)
    print(f"resumed from {file} (run {run.run_id}, save {run.counters['save_id']}, "
          f"{run.n} seeds): {run.inserted:,} agent steps and {run.counters['updates']:,} "
          f"updates each, replay {run.fill():.0%} full", flush=True)
    return True


def write_seed_checkpoint(s: Seed, state: dict, save_id: int, limiter: dict, counters: dict,
                          rng: dict) -> None:
    """Seed s's own checkpoint.pt (the solo format) of packed save point `save_id`."""
    checkpoint.write_checkpoint(s.cfg.logdir, {
        **state, "save_id": save_id,
        "config": checkpoint.config_json(s.cfg), "limiter": limiter, "counters": counters,
        "rng": rng, "world_size": 1})


def own_save_id(logdir: str) -> int | None:
    """The save id of logdir's checkpoint.pt; None when it is missing or unreadable."""
    file = os.path.join(logdir, checkpoint.CHECKPOINT)
    try:
        return int(torch.load(file, map_location="cpu", weights_only=True, mmap=True)["save_id"])
    except Exception:  # noqa: BLE001 (missing or damaged: written again from the packed one)
        return None


def repair_seed_checkpoint(s: Seed, state: dict, ckpt: dict, file: str) -> None:
    """A kill between the packed checkpoint and the seeds' own (the save order) leaves a
    seed's checkpoint one save behind, or missing after the first save: write it again from
    the packed one, so every seed can be evaluated or resumed alone. A seed checkpoint ahead
    of the packed one is a seed resumed alone since, and is left as it is."""
    save_id = int(ckpt["save_id"])
    own = own_save_id(s.cfg.logdir)
    if own is not None and own != save_id - 1:
        return
    was = "missing" if own is None else f"at save {own}"
    write_seed_checkpoint(s, checkpoint.cpu_copy(state), save_id, ckpt["limiter"],
                          ckpt["counters"], checkpoint.cpu_copy(ckpt["rng"]))
    print(f"note: {os.path.join(s.cfg.logdir, checkpoint.CHECKPOINT)} was {was} (the run "
          f"stopped during save {save_id}); written again from {file}", flush=True)


def save(run: PackedRun) -> bool:
    """Save point counters['save_id'] + 1 of every seed (the module docstring's order). The
    actor is paused to copy the replays' open tails, the learner also to unpack each seed's
    weights; files are written after. A full disk: one line, False. A non-finite seed:
    RunError naming it, nothing saved."""
    save_id = int(run.counters["save_id"]) + 1
    run.actor.lock.acquire()
    run.learner.lock.acquire()
    try:
        try:
            bad = run.nonfinite()
            if bad:
                raise RunError(run.nonfinite_message(bad))
            counters = {**run.counters, "steps": run.inserted, "updates": run.learner.updates,
                        "elapsed_s": time.time() - run.t0, "save_id": save_id}
            snaps = [s.store.snapshot() for s in run.seeds]
            limiter = run.limiter.state_dict()
            rng = checkpoint.rng_state()
        finally:
            run.actor.lock.release()
        states = []
        for i, s in enumerate(run.seeds):
            agent = run.unpack(i)
            states.append({"run_id": s.run_id, "agent": checkpoint.cpu_copy(agent.state_dict()),
                           "opt": checkpoint.cpu_copy(agent.opt.state_dict())})
    finally:
        run.learner.lock.release()
    rng_meta, rng_arrays = checkpoint.rng_arrays(rng)
    meta = {"limiter": limiter, "counters": counters, "rng": rng_meta, "arrays": rng_arrays}
    try:
        for s, snap in zip(run.seeds, snaps):
            s.store.write_point(snap, save_id, meta)
        checkpoint.write_checkpoint(run.cfg.logdir, {
            "run_id": run.run_id, "save_id": save_id, "packed": run.n,
            "config": checkpoint.config_json(run.cfg), "seeds": states, "limiter": limiter,
            "counters": counters, "rng": rng, "world_size": 1})
    except DiskFull as e:
        intact = " and is intact" if run.counters.get("save_id") else ""
        print(f"save {save_id} failed: {e}; {run.kept()}{intact}; its partial files were "
              "removed; the next save tries again", flush=True)
        return False
    run.counters = counters
    try:  # each seed as a run of its own (derived: the packed checkpoint is the save point)
        for s, state in zip(run.seeds, states):
            write_seed_checkpoint(s, state, save_id, limiter, counters, rng)
    except DiskFull as e:
        print(f"warning: the seeds' own checkpoints of save {save_id} were not all written "
              f"({e}); the packed run's is, and the next save writes them again", flush=True)
    for s, snap in zip(run.seeds, snaps):
        s.counters = counters
        s.store.commit(save_id, snap["state"]["count"])
    return True
