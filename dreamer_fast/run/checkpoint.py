"""Checkpoints: atomic files readable by torch.load(weights_only=True).

<logdir>/checkpoint.pt holds parameters, optimizer state, counters, RNG states, the config (a
JSON string) and the limiter; <logdir>/replay.pt holds the ring. Each is written to a temp
file and renamed with os.replace, so a crash mid-save leaves the previous file intact. The
replay is written first and both carry the same `save_id`, so a kill between the two renames
is detected on resume (the replay is then newer than the checkpoint: still usable).

Data parallel (world size N > 1): rank r writes its own ring, rate limiter and
RNG states to <logdir>/replay-rank{r}.pt (each self-consistent), rank 0 alone writes
checkpoint.pt, which records N: a resume must use the same world size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

import numpy as np
import torch

from dreamer_fast.config import Config, ConfigError

CHECKPOINT = "checkpoint.pt"
REPLAY = "replay.pt"

RUNTIME_FIELDS = ("steps", "logdir", "device", "log_every", "report_every", "save_every",
                  "agent.kernels", "agent.precision", "graphs", "compile")
"""Config fields that may change between a run and its resume; all others must match."""


def config_json(cfg: Config) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def config_from_dict(data: dict, default=None):
    """Rebuild a (nested, frozen) config dataclass from dataclasses.asdict output."""
    default = Config() if default is None else default
    kwargs = {}
    for f in dataclasses.fields(default):
        if f.name not in data:
            continue
        value, sub = data[f.name], getattr(default, f.name)
        kwargs[f.name] = config_from_dict(value, sub) if dataclasses.is_dataclass(sub) else value
    return type(default)(**kwargs)


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict, cfg: Config) -> list[str]:
    """'field: saved -> new' for every differing field that a resume cannot change."""
    old, new = _flatten(saved), _flatten(dataclasses.asdict(cfg))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in RUNTIME_FIELDS and old.get(k) != new.get(k)]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(),
             "numpy": json.dumps(np.random.get_state(legacy=False), default=_np_default),
             "python": json.dumps(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _np_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    raise TypeError(type(obj))


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = json.loads(state["numpy"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], np.uint32)
    np.random.set_state(np_state)
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replay_file(rank: int = 0, world: int = 1) -> str:
    """This rank's replay file name: replay.pt alone, replay-rank{r}.pt in a world of N > 1."""
    return REPLAY if world == 1 else f"replay-rank{rank}.pt"


def save(logdir: str, cfg: Config, agent, limiter, ring, counters: dict, rank: int = 0,
         world: int = 1) -> None:
    """Write replay then checkpoint; call with the actor and the learner paused.

    With world > 1 every rank calls it (same counters): the replay file also holds this
    rank's limiter and RNG states; only rank 0 writes checkpoint.pt."""
    save_id = int(counters.get("save_id", 0)) + 1
    counters = {**counters, "save_id": save_id}
    replay = {"save_id": save_id, "ring": ring.state_dict()}
    if world > 1:
        replay.update(limiter=limiter.state_dict(), rng=rng_state())
    atomic_save(replay, os.path.join(logdir, replay_file(rank, world)))
    if rank != 0:
        return
    atomic_save({
        "save_id": save_id, "config": config_json(cfg), "agent": agent.state_dict(),
        "opt": agent.opt.state_dict(), "limiter": limiter.state_dict(), "counters": counters,
        "rng": rng_state(), "world_size": world,
    }, os.path.join(logdir, CHECKPOINT))


def find(path: str) -> str | None:
    """The checkpoint file of a logdir (or the path itself when it is a file)."""
    if os.path.isfile(path):
        return path
    file = os.path.join(path, CHECKPOINT)
    return file if os.path.isfile(file) else None


def saved_capacity(logdir: str) -> int | None:
    """The replay capacity a run in logdir was started with (None when there is no run)."""
    file = find(logdir)
    if file is None:
        return None
    return int(json.loads(load_checkpoint(file)["config"])["replay"]["capacity"])


def load_checkpoint(file: str, map_location="cpu") -> dict:
    return torch.load(file, map_location=map_location, weights_only=True)


def check_compatible(ckpt: dict, cfg: Config, file: str) -> None:
    """Refuse to resume with a config that differs in a field other than RUNTIME_FIELDS."""
    diff = config_diff(json.loads(ckpt["config"]), cfg)
    if diff:
        raise ConfigError(f"cannot resume from {file}: the config differs in "
                         f"{', '.join(d.split(':')[0] for d in diff)} ({'; '.join(diff)}). "
                         "Use the same flags or a new --logdir.")


def check_world_size(ckpt: dict, world: int, file: str) -> None:
    """Refuse to resume with another number of processes: the replay is split per rank."""
    saved = int(ckpt.get("world_size", 1))
    if saved != world:
        raise ConfigError(f"cannot resume from {file}: it was saved with world size {saved} "
                          f"({f'{saved} processes, one replay each' if saved > 1 else 'one process'}) but "
                          f"this run has world size {world}. Launch "
                          + ("python run.py" if saved == 1 else
                             f"torchrun --nproc-per-node {saved} run.py")
                          + " with the same flags, or use a new --logdir.")


def restore(file: str, ckpt: dict, agent, limiter, ring, rank: int = 0,
            world: int = 1) -> dict:
    """Load a checkpoint (and this rank's replay) into the live objects; returns the counters."""
    agent.load_state_dict(ckpt["agent"])
    agent.opt.load_state_dict(ckpt["opt"])
    set_rng_state(ckpt["rng"])
    name = replay_file(rank, world)
    replay = os.path.join(os.path.dirname(file), name)
    if os.path.isfile(replay):
        # mmap: the ring is copied from the page cache, never held twice in RAM.
        data = torch.load(replay, map_location="cpu", weights_only=True, mmap=True)
        ring.load_state_dict(data["ring"])
        # Only with its data: it counts the ring. Ranks > 1 keep their own, and their RNG.
        limiter.load_state_dict(data.get("limiter", ckpt["limiter"]))
        if "rng" in data:
            set_rng_state(data["rng"])
        if data["save_id"] != ckpt["save_id"]:
            print(f"note: {replay} (save {data['save_id']}) differs from the checkpoint "
                  f"(save {ckpt['save_id']}): a save was interrupted; resuming with both")
    else:
        print(f"warning: no {name} beside {file}: resuming with an empty replay "
              "and a fresh rate limiter")
    return dict(ckpt["counters"])
