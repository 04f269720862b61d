"""What a save costs: seconds and bytes vs steps stored and vs replay capacity (not a test).

    python bench/saves.py                       # 5,000,000-step capacity, 16 env streams
    python bench/saves.py --capacity 1000000 --stored 4000 200000

For each number of stored steps, the replay save of this version (chunks appended by the
background writer plus one save point with the open tails) beside the whole-ring file that
versions before it wrote at every save (torch.save of the ring). The actor is paused only
for the snapshot (the copy of the open tails). Per-step payload: a DMC-proprio-like step
(24 float32 observations, 6 float32 actions, reward, flags, size1m latents). Appends JSON
lines to bench/results/saves-cpu.jsonl.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append, environment  # noqa: E402
from dreamer_fast.data.ring import Ring  # noqa: E402
from dreamer_fast.data.store import ChunkStore  # noqa: E402

SPEC = {"vector": ((24,), torch.float32), "action": ((6,), torch.float32),
        "reward": ((), torch.float32), "is_first": ((), torch.bool), "is_last": ((), torch.bool),
        "is_terminal": ((), torch.bool), "deter": ((512,), torch.bfloat16),
        "stoch": ((32,), torch.int16)}


def fill(ring, store, upto: int, streams: int) -> None:
    """Add steps (one per stream per call) until the ring holds `upto`, the writer keeping up."""
    step = {k: torch.zeros((streams, *shape), dtype=dtype) for k, (shape, dtype) in SPEC.items()}
    ids = np.arange(streams)
    while ring.inserted < upto:
        ring.add(step, ids)
        if ring.inserted % (streams * 256) == 0:
            store.write_ready()
    store.write_ready()


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capacity", type=int, default=5_000_000)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--stored", type=int, nargs="+", default=[4_000, 200_000])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "saves-cpu.jsonl"))
    args = parser.parse_args()
    env = environment()
    root = tempfile.mkdtemp(prefix="dreamer-saves-")
    try:
        ring = Ring(SPEC, args.streams, args.capacity, length=65)
        store = ChunkStore(os.path.join(root, "replay"), ring, "bench")
        store.create()
        print(f"device: {env['device']}  commit {env['commit']}  capacity {args.capacity:,} "
              f"steps = {ring.nbytes / 2**30:.2f} GiB in RAM")
        print(f"{'stored':>9} {'kind':<22} {'pause s':>8} {'write s':>8} {'bytes':>14}")
        rows, before, save_id = [], folder_bytes(store.path), 0
        for stored in args.stored:
            fill(ring, store, stored, args.streams)
            save_id += 1
            t0 = time.perf_counter()
            snap = store.snapshot()
            t1 = time.perf_counter()
            point = store.write_point(snap, save_id, {})
            store.commit(save_id, snap["state"]["count"])
            t2 = time.perf_counter()
            now = folder_bytes(store.path)
            new = {"bench": "saves", "kind": "chunks+save point", "capacity": args.capacity,
                   "stored": ring.inserted, "pause_s": t1 - t0, "write_s": t2 - t1,
                   "point_bytes": point, "bytes_since_last_save": now - before,
                   "folder_bytes": now}
            before = now
            path = os.path.join(root, "replay.pt")
            t3 = time.perf_counter()
            with open(path, "wb") as f:  # what every save wrote before, the actor paused
                torch.save({"ring": ring.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
            t4 = time.perf_counter()
            old = {"bench": "saves", "kind": "whole ring (before)", "capacity": args.capacity,
                   "stored": ring.inserted, "pause_s": t4 - t3, "write_s": 0.0,
                   "bytes_since_last_save": os.path.getsize(path)}
            os.remove(path)
            for row in (new, old):
                print(f"{row['stored']:>9,} {row['kind']:<22} {row['pause_s']:>8.3f} "
                      f"{row['write_s']:>8.3f} {row['bytes_since_last_save']:>14,}")
                rows.append({**env, **row})
        append(args.out, rows)
        print(f"appended {len(rows)} rows to {os.path.relpath(args.out)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
