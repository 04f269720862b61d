"""Checkpoints and save points: what a save writes, and what a resume reads back.

A save point S is two files written in order, each atomically (temp file, fsync, rename):
1. this rank's replay save point <replay folder>/save-S.npz (dreamer_fast/data/store.py:
   each env stream's open tail, the ring's sampling state, the rate limiter, the counters);
   the full chunks before it were written by the background writer as the streams filled;
2. <logdir>/checkpoint.pt (rank 0): parameters, optimizer state, counters, RNG states, the
   config (a JSON string), the run id and S. Readable by torch.load(weights_only=True).

The checkpoint names S, so a resume restores weights, counters, limiter and replay from one
save point: a kill between the two renames resumes from S - 1 (its save point is kept until
S + 1 is written). The run id (made at a run's start) is in the checkpoint, the replay
manifest and every save point; a replay of another run is refused.

Data parallel (world size N > 1): rank r writes its own replay folder replay-rank{r} (its
ring, rate limiter and RNG states), rank 0 alone writes checkpoint.pt, which records N: a
resume must use the same world size.

Runs saved before the replay folder existed (one replay.pt holding the whole ring) still
resume: `restore_legacy`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random

import numpy as np
import torch

from dreamer_fast.config import Config

from dreamer_fast.checks import ConfigError
from dreamer_fast.data.files import atomic_write, pid_alive

CHECKPOINT = "checkpoint.pt"
REPLAY = "replay.pt"

RUNTIME_FIELDS = ("steps", "logdir", "device", "log_every", "report_every", "save_every",
                  "agent.kernels", "agent.precision", "graphs", "compile",
                  "replay.resume_empty", "replay.keep_chunks", "name", "track",
                  "wandb_project", "wandb_entity", "eval_every", "eval_episodes",
                  "offline", "updates")
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
    """'field: saved -> new' for every differing field that a resume cannot change. A field
    the saved config lacks (added by a later version) counts as its default."""
    old, new = _flatten(saved), _flatten(dataclasses.asdict(cfg))
    defaults = _flatten(dataclasses.asdict(Config()))
    old.update({k: defaults[k] for k in set(new) - set(old) if k in defaults})
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


def replay_dir(logdir: str, rank: int = 0, world: int = 1) -> str:
    """This rank's replay folder: replay alone, replay-rank{r} in a world of N > 1."""
    return os.path.join(logdir, "replay" if world == 1 else f"replay-rank{rank}")


def cpu_copy(obj):
    """A copy of a (nested) state dict with every tensor copied to the CPU, so that the file
    can be written while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def write_checkpoint(logdir: str, payload: dict) -> int:
    """checkpoint.pt, atomically (temp file, fsync, rename); DiskFull when out of space."""
    path = os.path.join(logdir, CHECKPOINT)
    return atomic_write(path, lambda f: torch.save(payload, f), _nbytes(payload) + 2**20)


def rng_arrays(state: dict) -> tuple[dict, dict]:
    """rng_state() as (JSON-able part, numpy arrays) for a save point file."""
    arrays = {"rng_torch": state["torch"].numpy()}
    for i, t in enumerate(state.get("cuda", [])):
        arrays[f"rng_cuda{i}"] = t.numpy()
    return {"numpy": state["numpy"], "python": state["python"]}, arrays


def rng_from_arrays(meta: dict, arrays: dict) -> dict:
    state = {"torch": torch.from_numpy(arrays["rng_torch"]), **meta}
    cuda = sorted(k for k in arrays if k.startswith("rng_cuda"))
    if cuda:
        state["cuda"] = [torch.from_numpy(arrays[k]) for k in cuda]
    return state


def find(path: str) -> str | None:
    """The checkpoint file of a logdir (or the path itself when it is a file)."""
    if os.path.isfile(path):
        return path
    file = os.path.join(path, CHECKPOINT)
    return file if os.path.isfile(file) else None


def recover_killed_save(logdir: str) -> str | None:
    """With no checkpoint.pt in logdir: a whole `checkpoint.pt.tmp<pid>` of a dead process (a
    save killed after its fsync, before its rename) becomes checkpoint.pt. Returns the line to
    print, or None. Call before the dead processes' temp files are removed."""
    if find(logdir) is not None:
        return None
    temps = sorted(glob.glob(os.path.join(glob.escape(logdir), CHECKPOINT + ".tmp*")),
                   key=os.path.getmtime, reverse=True)
    for tmp in temps:
        pid = tmp.rsplit(".tmp", 1)[1]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        try:
            load_checkpoint(tmp)
        except ConfigError:  # cut off mid-write: nothing of it is usable
            continue
        os.replace(tmp, os.path.join(logdir, CHECKPOINT))
        return (f"note: recovered {CHECKPOINT} from {os.path.basename(tmp)}, written whole by "
                "a save that was killed before its rename")
    return None


def saved_capacity(logdir: str) -> int | None:
    """The replay capacity a run in logdir was started with (None when there is no run)."""
    file = find(logdir)
    if file is None:
        return None
    return int(json.loads(load_checkpoint(file)["config"])["replay"]["capacity"])


def load_checkpoint(file: str, map_location="cpu") -> dict:
    """torch.load(weights_only=True) of a checkpoint, or one ConfigError line naming the file
    and what is wrong with it (empty, truncated, not a checkpoint of this program)."""
    try:
        size = os.path.getsize(file)
    except OSError as e:
        raise ConfigError(f"cannot read checkpoint {file}: {e.strerror}") from None
    if size == 0:
        raise ConfigError(f"checkpoint {file} is empty (0 bytes): it was cut off while being "
                          "copied or written; restore it from a copy, or move it away to start "
                          "this logdir afresh")
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {file} is truncated or damaged ({size:,} bytes that "
                          f"torch.load cannot read: {type(e).__name__}); restore it from a "
                          "copy, or move it away to start this logdir afresh") from None
    except Exception as e:  # weights_only refuses pickled objects: not one of ours
        raise ConfigError(f"{file} is not a dreamer_fast checkpoint (torch.load with "
                          f"weights_only=True refused it: {type(e).__name__}); use a run folder "
                          "written by run.py, or another --logdir") from None
    keys = (("config", "seeds", "counters") if isinstance(ckpt, dict) and "packed" in ckpt
            else ("config", "agent", "opt", "counters"))  # a packed run's: every seed's state
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ConfigError(f"{file} is not a dreamer_fast checkpoint (it lacks "
                          f"{', '.join(missing)}); use a run folder written by run.py, or "
                          "another --logdir")
    return ckpt


def check_compatible(ckpt: dict, cfg: Config, file: str) -> None:
    """Refuse to resume with a config that differs in a field other than RUNTIME_FIELDS."""
    diff = config_diff(json.loads(ckpt["config"]), cfg)
    if diff:
        raise ConfigError(f"cannot resume from {file}: the config differs in "
                         f"{', '.join(d.split(':')[0] for d in diff)} ({'; '.join(diff)}). "
                         "Use the same flags or a new --logdir.")


def check_seeds(ckpt: dict, seeds: int, file: str) -> None:
    """Refuse to resume a packed run (--seeds N) with another number of seeds."""
    saved = int(ckpt.get("packed", 1))
    if saved == seeds:
        return
    alone = (f", or resume one seed alone: --logdir {os.path.join(os.path.dirname(file), 'seed0')}"
             " --seed S (its seed, as in that folder's config.json)" if saved > 1 else "")
    raise ConfigError(f"cannot resume from {file}: it holds {saved} packed seed(s), this run "
                      f"has {seeds}; rerun with --seeds {saved}{alone}, or use a new --logdir")


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


def restore_legacy(file: str, ckpt: dict, limiter, ring, rank: int = 0,
                   world: int = 1) -> bool:
    """The replay of a run saved before the chunk folder (one replay.pt holding the whole
    ring), if it is there; returns whether it was."""
    replay = os.path.join(os.path.dirname(file), REPLAY if world == 1 else
                          f"replay-rank{rank}.pt")
    if not os.path.isfile(replay):
        return False
    # mmap: the ring is copied from the page cache, never held twice in RAM.
    data = torch.load(replay, map_location="cpu", weights_only=True, mmap=True)
    ring.load_state_dict(data["ring"])
    limiter.load_state_dict(data.get("limiter", ckpt["limiter"]))
    if "rng" in data:
        set_rng_state(data["rng"])
    return True
