"""Replay on disk: append-only chunks per env stream, plus one small file per save point.

A run's replay folder (`<logdir>/replay`, or `replay-rank{r}` per process in a data-parallel
world) is also a dataset: every file is read with numpy alone (np.load, allow_pickle=False),
no pickle anywhere.

    manifest.json                      format, run id, streams, chunk_steps, keys
    stream0000/000000000.npz           steps [0, C) of stream 0, one array per key
    stream0000/000000001.npz           steps [C, 2C) ...
    save-000007.npz                    save point 7: each stream's open tail and the ring state

manifest.json:
    {"format": "dreamer_fast.replay/1", "run_id": "3f2a...", "num_streams": 16,
     "chunk_steps": 1024, "capacity_per_stream": 312500,
     "keys": {"image": {"shape": [3, 64, 64], "dtype": "uint8"}, "reward": {...}, ...}}

A chunk file `stream{j:04d}/{k:09d}.npz` holds steps k*C .. (k+1)*C-1 of stream j (C =
chunk_steps), each key as an array of shape (C, *shape) in time order. Keys: the env's
observation keys, `action` (float32, one-hot for discrete actions), `reward` (float32),
`is_first`, `is_last`, `is_terminal` (bool), and the RSSM latent the learner last computed for
the step, `deter` (bfloat16, stored as its raw uint16 bits; `load_stream` converts) and `stoch`
(int16 class indices). A stream's steps are consecutive env steps of one env (episodes are cut
by is_first / is_last). Chunks are immutable once written: a latent the learner writes back
later is not in the file (on resume it may be stale until that window is trained again; it is
only the initial RSSM state of a window).

A save point `save-{S:06d}.npz` holds, per stream j, the steps from `tail_start[j]` (a chunk
boundary: every earlier step is in chunk files) to `count[j]` (steps ever written to stream
j), as `tail_<key>` arrays concatenated over streams, plus the ring's sampling state and
`meta` (a JSON string: run id, save id, counters). A resume reads the chunks and the tail of
the save point its checkpoint names, so every restored count belongs to one save point.

Files are written to `<name>.tmp<pid>` and renamed, so a kill leaves either the old or the
new file, never a torn one under the real name; chunks are verified on load anyway (zip CRC,
shapes, dtypes) and a damaged one is skipped with the number of steps it drops.

    python -m dreamer_fast.data.store DIR      # what a replay folder holds
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import threading
import zipfile

import numpy as np
import torch

from dreamer_fast.data.files import atomic_write, remove_stale_temps

FORMAT = "dreamer_fast.replay/1"
MANIFEST = "manifest.json"
CHUNK_STEPS = 1024
"""Steps per chunk file (fewer when a stream's ring is small: at most a quarter of it)."""

class ReplayFileError(Exception):
    """A replay or checkpoint file that cannot be used; the message names the file."""


# ---------------------------------------------------------------------- dtypes

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()  # raw bits; numpy has no bfloat16
    return t.numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _storage_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.uint16) if dtype == torch.bfloat16 else torch.empty(
        (), dtype=dtype).numpy().dtype


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> int:
    needed = sum(a.nbytes for a in arrays.values()) + 4096
    return atomic_write(path, lambda f: np.savez(f, **arrays), needed)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an npz, read fully (zip CRCs checked); ReplayFileError when damaged."""
    try:
        if os.path.getsize(path) == 0:
            raise ReplayFileError(f"{path} is empty (0 bytes)")
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ReplayFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ReplayFileError(f"{path} is truncated or damaged ({type(e).__name__}: {e})"
                              ) from None


# ---------------------------------------------------------------------- the store

class ChunkStore:
    """A ring's steps on disk (module docstring): a background writer appends full chunks as
    streams fill them; a save point adds each stream's open tail and the ring state.

    Thread use: `write_ready` on the writer thread; `snapshot` with the actor paused (it only
    copies the tails); `write_point` and `commit` on the saving thread.
    """

    def __init__(self, path: str, ring, run_id: str, keep: bool = False):
        self.path, self.ring, self.run_id, self.keep = path, ring, run_id, keep
        self.chunk = max(1, min(CHUNK_STEPS, ring.cap // 4))
        self.persisted = np.zeros(ring.num_streams, np.int64)  # next chunk index per stream
        self.lost_steps = 0  # chunks overwritten in the ring before the writer got to them
        self.bytes_written = 0
        self._lock = threading.Lock()  # persisted[] and the chunk files of the writer
        self._committed: np.ndarray | None = None  # counts of the last published save point
        self._evicted = np.zeros(ring.num_streams, np.int64)  # chunks below are removed
        self._lost_upto = np.zeros(ring.num_streams, np.int64)  # end of the last lost chunk

    # -------------------------------------------------------------- layout
    def manifest(self) -> dict:
        return {"format": FORMAT, "run_id": self.run_id, "num_streams": self.ring.num_streams,
                "chunk_steps": self.chunk, "capacity_per_stream": self.ring.cap,
                "keys": {k: {"shape": list(shape), "dtype": _dtype_name(dtype)}
                         for k, (shape, dtype) in self.ring.spec.items()}}

    def chunk_path(self, stream: int, index: int) -> str:
        return os.path.join(self.path, f"stream{stream:04d}", f"{index:09d}.npz")

    def point_path(self, save_id: int) -> str:
        return os.path.join(self.path, f"save-{save_id:06d}.npz")

    def create(self) -> None:
        """A fresh folder for a new run (refuses one that holds another run's replay)."""
        os.makedirs(self.path, exist_ok=True)
        file = os.path.join(self.path, MANIFEST)
        if os.path.exists(file):
            old = read_manifest(self.path)
            if old.get("run_id") != self.run_id:
                raise ReplayFileError(
                    f"{self.path} holds the replay of run {old.get('run_id')}, not of this run "
                    f"({self.run_id}), but there is no checkpoint beside it; move it away or "
                    "use a new --logdir")
        for j in range(self.ring.num_streams):
            os.makedirs(os.path.dirname(self.chunk_path(j, 0)), exist_ok=True)
        text = json.dumps(self.manifest(), indent=1).encode()
        atomic_write(file, lambda f: f.write(text), len(text))
        remove_stale_temps(self.path, mine=True)

    def start_from_ring(self) -> None:
        """For a ring restored some other way (an older save format): write from the oldest
        chunk boundary the ring still holds."""
        for j in range(self.ring.num_streams):
            oldest = max(0, self.ring.count(j) - self.ring.cap, int(self.ring._first[j]))
            self.persisted[j] = -(-oldest // self.chunk)
            self._evicted[j] = self.persisted[j]
            # Steps below the first chunk boundary would never reach the disk: not sampled.
            self.ring._first[j] = max(int(self.ring._first[j]), int(self.persisted[j]) * self.chunk)

    # -------------------------------------------------------------- writer
    def write_ready(self) -> int:
        """Persist every chunk the ring has completed; returns the chunks written."""
        written = 0
        for j in range(self.ring.num_streams):
            while True:
                k = int(self.persisted[j])
                end = (k + 1) * self.chunk
                if int(self.ring.count(j)) < end:
                    break
                data = self.ring.read_steps(j, k * self.chunk, end)
                if data is None:  # overwritten before it was written out
                    with self._lock:
                        self.persisted[j] = k + 1
                        self._lost_upto[j] = end  # steps below are not all on disk
                    self.lost_steps += self.chunk
                    continue
                self.bytes_written += _save_npz(self.chunk_path(j, k),
                                                {key: _to_numpy(v) for key, v in data.items()})
                with self._lock:
                    self.persisted[j] = k + 1
                written += 1
        return written

    # -------------------------------------------------------------- save points
    def snapshot(self) -> dict:
        """With the actor paused: each stream's tail (copied) and the ring state."""
        with self._lock:
            persisted = self.persisted * self.chunk
            lost_upto = self._lost_upto.copy()
        state = self.ring.small_state()
        state["first"] = np.maximum(state["first"], lost_upto)
        # Chunks the writer never got to before the ring overwrote them are lost: then the
        # tail starts at the oldest chunk boundary still in the ring, and so do the steps.
        oldest = -(-np.maximum(state["count"] - self.ring.cap, 0) // self.chunk) * self.chunk
        tail_start = np.maximum(persisted, oldest)
        state["first"] = np.where(tail_start > persisted,
                                  np.maximum(state["first"], tail_start), state["first"])
        tails = [self.ring.read_steps(j, int(tail_start[j]), int(state["count"][j]), check=False)
                 for j in range(self.ring.num_streams)]
        return {"tail_start": tail_start, "tails": tails, "state": state}

    def write_point(self, snap: dict, save_id: int, meta: dict) -> int:
        """Write save point `save_id` (the snapshot's tails and ring state, plus meta)."""
        state = snap["state"]
        arrays = {f"tail_{k}": np.concatenate([_to_numpy(t[k]) for t in snap["tails"]])
                  for k in self.ring.spec}
        arrays.update(tail_start=snap["tail_start"], count=state["count"],
                      first=state["first"], next_online=state["next_online"],
                      queue=state["queue"])
        for name, value in meta.pop("arrays", {}).items():
            arrays[f"meta_{name}"] = value
        meta = {**meta, "run_id": self.run_id, "save_id": save_id, "ring_rng": state["rng"],
                "ring_stats": state["stats"]}
        arrays["meta"] = np.array(json.dumps(meta))
        size = _save_npz(self.point_path(save_id), arrays)
        self.bytes_written += size
        return size

    def commit(self, save_id: int, counts: np.ndarray) -> None:
        """After save point `save_id` is written: drop the save points before the previous
        one, and the chunks that had left the ring at the previous one (unless keep). The
        previous save point stays whole because the checkpoint that names `save_id` may not
        be published yet (another process writes it)."""
        for path in glob.glob(os.path.join(self.path, "save-*.npz")):
            m = re.search(r"save-(\d+)\.npz$", path)
            if m and int(m.group(1)) < save_id - 1:
                _remove(path)
        previous, self._committed = self._committed, counts.copy()
        if self.keep or previous is None:
            return
        for j in range(self.ring.num_streams):
            gone = max(0, int(previous[j]) - self.ring.cap) // self.chunk  # out of the ring
            for k in range(int(self._evicted[j]), gone):
                _remove(self.chunk_path(j, k))
            self._evicted[j] = max(int(self._evicted[j]), gone)

    # -------------------------------------------------------------- resume
    def load(self, save_id: int, log=print) -> dict:
        """Restore the ring from the chunks and save point `save_id`; returns its meta.

        A damaged chunk drops it and every older step of its stream (the ring holds one
        contiguous run of steps per stream), saying how many; chunks written after the save
        point are removed (those step numbers will be written again)."""
        remove_stale_temps(self.path, mine=True)
        point = self.point_path(save_id)
        if not os.path.exists(point):
            raise ReplayFileError(f"{point} is missing")
        data = _load_npz(point)
        try:
            meta = json.loads(str(data["meta"]))
            tail_start, count = data["tail_start"], data["count"]
        except (KeyError, ValueError) as e:
            raise ReplayFileError(f"{point} is not a dreamer_fast save point ({e})") from None
        if meta.get("run_id") != self.run_id or int(meta.get("save_id", -1)) != save_id:
            raise ReplayFileError(f"{point} belongs to run {meta.get('run_id')} save "
                                  f"{meta.get('save_id')}, not to run {self.run_id} save {save_id}")
        n, cap, C = self.ring.num_streams, self.ring.cap, self.chunk
        if len(count) != n:
            raise ReplayFileError(f"{point} has {len(count)} streams; this run has {n}")
        first = np.maximum(count - cap, data["first"]).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(count - tail_start)])
        dropped = {}
        for j in range(n):
            a, b = int(tail_start[j]), int(count[j])
            self.ring.write_steps(j, a, {k: _from_numpy(data[f"tail_{k}"][offsets[j]:offsets[j + 1]],
                                                         dt) for k, (_, dt) in self.ring.spec.items()})
            lo = int(first[j])
            for k in range(a // C - 1, lo // C - 1, -1):  # newest chunk first
                s, e = k * C, (k + 1) * C
                try:
                    arrays = self._read_chunk(j, k)
                except ReplayFileError as err:
                    dropped[j] = (e - lo, str(err))
                    first[j] = e
                    break
                skip = max(0, lo - s)
                self.ring.write_steps(j, s + skip, {key: v[skip:] for key, v in arrays.items()})
            for path in glob.glob(os.path.join(os.path.dirname(self.chunk_path(j, 0)), "*.npz")):
                k = int(os.path.basename(path)[:-4])
                if k >= a // C or (not self.keep and k < int(first[j]) // C):
                    _remove(path)  # written after this save point, or out of the ring
        for j, (steps, why) in dropped.items():
            log(f"warning: replay stream {j}: dropped {steps:,} steps ({why})")
        self.ring.restore_small_state({
            "count": count, "first": first, "next_online": data["next_online"],
            "queue": data["queue"], "rng": meta["ring_rng"], "stats": meta["ring_stats"]})
        self.persisted[:] = tail_start // C
        self._committed = count.copy()
        self._evicted[:] = first // C
        meta["arrays"] = {k[5:]: v for k, v in data.items() if k.startswith("meta_")}
        meta["dropped_steps"] = sum(s for s, _ in dropped.values())
        return meta

    def _read_chunk(self, j: int, k: int) -> dict[str, torch.Tensor]:
        path = self.chunk_path(j, k)
        if not os.path.exists(path):
            raise ReplayFileError(f"{path} is missing")
        arrays = _load_npz(path)
        out = {}
        for key, (shape, dtype) in self.ring.spec.items():
            a = arrays.get(key)
            want = (self.chunk, *shape)
            if a is None or a.shape != want or a.dtype != _storage_dtype(dtype):
                got = "missing" if a is None else f"{a.dtype} {a.shape}"
                raise ReplayFileError(f"{path}: key {key!r} is {got}, expected "
                                      f"{_storage_dtype(dtype)} {want}")
            out[key] = _from_numpy(a, dtype)
        return out


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------- reading a dataset

def read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    try:
        with open(file) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ReplayFileError(f"{file} is missing: {path} is not a dreamer_fast replay folder"
                              ) from None
    except (OSError, ValueError) as e:
        raise ReplayFileError(f"{file} is damaged ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ReplayFileError(f"{file} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def list_replay(path: str) -> dict:
    """What a replay folder holds: manifest, chunk files and steps per stream, save points."""
    manifest = read_manifest(path)
    streams = {}
    for j in range(manifest["num_streams"]):
        files = sorted(glob.glob(os.path.join(path, f"stream{j:04d}", "*.npz")))
        streams[j] = [int(os.path.basename(f)[:-4]) for f in files]
    points = sorted(int(m.group(1)) for f in glob.glob(os.path.join(path, "save-*.npz"))
                    if (m := re.search(r"save-(\d+)\.npz$", f)))
    return {"manifest": manifest, "chunks": streams, "save_points": points,
            "chunk_steps": manifest["chunk_steps"]}


def load_stream(path: str, stream: int, save_id: int | None = None) -> dict[str, np.ndarray]:
    """One stream's stored steps in time order, as numpy arrays (deter as float32).

    Reads the stream's newest contiguous chunks and, when there is a save point (the newest
    unless save_id), its tail. Returns {key: (steps, *shape)} plus 'step' (the step numbers)."""
    info = list_replay(path)
    manifest, C = info["manifest"], info["chunk_steps"]
    parts: list[dict] = []
    tail_start = None
    points = info["save_points"] if save_id is None else [save_id]
    if points:
        data = _load_npz(os.path.join(path, f"save-{points[-1]:06d}.npz"))
        tail_start, count = data["tail_start"], data["count"]
        off = int((count - tail_start)[:stream].sum())
        n = int(count[stream] - tail_start[stream])
        parts.append({k: data[f"tail_{k}"][off:off + n] for k in manifest["keys"]})
        parts[-1]["step"] = np.arange(tail_start[stream], count[stream])
    chunks = info["chunks"][stream]
    if tail_start is not None:
        chunks = [k for k in chunks if k < tail_start[stream] // C]
    expect = chunks[-1] if chunks else None
    for k in reversed(chunks):  # newest first, stop at a gap or a damaged file
        if k != expect:
            break
        try:
            arrays = _load_npz(os.path.join(path, f"stream{stream:04d}", f"{k:09d}.npz"))
        except ReplayFileError:
            break
        arrays["step"] = np.arange(k * C, (k + 1) * C)
        parts.insert(0, arrays)
        expect = k - 1
    out = {}
    for key in [*manifest["keys"], "step"]:
        arrays = [p[key] for p in parts]
        out[key] = np.concatenate(arrays) if arrays else np.zeros((0,))
        if key != "step" and manifest["keys"][key]["dtype"] == "bfloat16":
            out[key] = torch.from_numpy(out[key].astype(np.uint16)).view(
                torch.bfloat16).float().numpy()
    return out


def main(argv: list[str]) -> None:
    """List a replay folder: python -m dreamer_fast.data.store REPLAY_FOLDER."""
    usage = ("usage: dreamer-fast replay REPLAY_FOLDER (or python -m dreamer_fast.data.store "
             "REPLAY_FOLDER)\n\nWhat a replay folder holds: its run id, streams, keys, chunk "
             "files and save points.")
    if argv in (["-h"], ["--help"]):
        print(usage)
        return
    if len(argv) != 1:
        sys.exit(usage)
    try:
        info = list_replay(argv[0])
    except ReplayFileError as e:
        sys.exit(f"error: {e}")
    m, C = info["manifest"], info["chunk_steps"]
    print(f"{argv[0]}: run {m['run_id']}, {m['num_streams']} streams, {C} steps per chunk, "
          f"save points {info['save_points'] or 'none'}")
    for key, k in m["keys"].items():
        print(f"  {key:<12} {k['dtype']:<9} {tuple(k['shape'])}")
    for j, chunks in info["chunks"].items():
        span = f"chunks {chunks[0]}..{chunks[-1]}" if chunks else "no chunks"
        print(f"  stream {j}: {len(chunks)} chunk files ({len(chunks) * C:,} steps), {span}")


if __name__ == "__main__":
    main(sys.argv[1:])
