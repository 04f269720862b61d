"""The replay on disk (dreamer_fast/data/store.py): chunks and save points restore the ring
exactly, a damaged chunk drops only its stream's older steps, a save writes what is new (not
the capacity), temp files never outlive their writer, a full disk keeps the last save."""

import errno
import json
import os

import numpy as np
import pytest
import torch

from dreamer_fast.data import files as F
from dreamer_fast.data import store as S
from dreamer_fast.data.ring import Ring

SPEC = {"obs": ((3,), torch.float32), "image": ((2, 4, 4), torch.uint8),
        "deter": ((5,), torch.bfloat16), "is_first": ((), torch.bool)}


def fill(ring, steps, start=0, store=None):
    """Write `steps` steps to every stream; step t of stream j has obs = [j, t, 0]. With a
    store, its writer runs every 8 steps (as the background writer would)."""
    n = ring.num_streams
    for t in range(start, start + steps):
        if store is not None and t % 8 == 0:
            store.write_ready()
        ring.add({"obs": np.stack([[j, t, 0] for j in range(n)]).astype(np.float32),
                  "image": np.full((n, 2, 4, 4), t % 256, np.uint8),
                  "deter": torch.full((n, 5), float(t % 100), dtype=torch.bfloat16),
                  "is_first": np.full(n, t % 10 == 0)}, np.arange(n))


def save(store, save_id):
    snap = store.snapshot()
    store.write_point(snap, save_id, {"counters": {"steps": store.ring.inserted}})
    store.commit(save_id, snap["state"]["count"])
    return snap


def fresh(tmp_path, ring, run_id="run1"):
    store = S.ChunkStore(str(tmp_path / "replay"), ring, run_id)
    store.create()
    return store


def test_chunks_and_save_point_restore_the_ring_exactly(tmp_path):
    ring = Ring(SPEC, num_streams=3, capacity=3 * 64, length=5, seed=1)
    store = fresh(tmp_path, ring)
    assert store.chunk == 16
    fill(ring, 150, store=store)  # wraps the 64-step rings twice
    store.write_ready()
    assert store.lost_steps == 0
    assert len(os.listdir(tmp_path / "replay" / "stream0002")) == 150 // 16
    for _ in range(7):
        ring.sample(4)  # moves the RNG and the online queue
    save(store, 1)
    fill(ring, 10, start=150)  # after the save point: not restored
    store.write_ready()

    other = Ring(SPEC, num_streams=3, capacity=3 * 64, length=5, seed=99)
    meta = S.ChunkStore(str(tmp_path / "replay"), other, "run1").load(1)
    assert meta["counters"]["steps"] == 3 * 150 and meta["dropped_steps"] == 0
    assert other.inserted == 3 * 150 and [other.count(j) for j in range(3)] == [150] * 3
    for j in range(3):
        got = other.read_steps(j, 87, 150)
        assert got["obs"][:, 1].tolist() == list(range(87, 150))
        assert (got["obs"][:, 0] == j).all()
        assert got["deter"].float()[:, 0].tolist() == [float(t % 100) for t in range(87, 150)]
    # Same sampling state: the two rings now draw the same windows.
    fresh_copy = Ring(SPEC, num_streams=3, capacity=3 * 64, length=5, seed=99)
    S.ChunkStore(str(tmp_path / "replay"), fresh_copy, "run1").load(1)
    assert torch.equal(other.sample(8)[1], fresh_copy.sample(8)[1])
    # Chunks written after the save point are gone (those step numbers come again).
    names = os.listdir(tmp_path / "replay" / "stream0000")
    assert max(int(n[:-4]) for n in names) < 150 // 16


def test_evicted_chunks_removed_and_dataset_reader(tmp_path):
    ring = Ring(SPEC, num_streams=2, capacity=2 * 64, length=5)
    store = fresh(tmp_path, ring)
    fill(ring, 300, store=store)
    store.write_ready()
    save(store, 1)
    save(store, 2)
    folder = str(tmp_path / "replay")
    info = S.list_replay(folder)
    assert info["save_points"] == [1, 2]  # the one before stays until the next
    # Only the chunks the ring still holds (plus the one it is leaving) remain.
    assert info["chunks"][0] == list(range((300 - 64) // 16, 300 // 16))
    data = S.load_stream(folder, 1)
    assert data["step"][-1] == 299 and (np.diff(data["step"]) == 1).all()
    assert data["obs"][:, 1].tolist() == data["step"].tolist()
    assert data["deter"].dtype == np.float32 and data["image"].dtype == np.uint8
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert manifest["keys"]["deter"] == {"shape": [5], "dtype": "bfloat16"}

    keep = S.ChunkStore(str(tmp_path / "keep"), Ring(SPEC, 2, 2 * 64, 5), "r", keep=True)
    keep.create()
    fill(keep.ring, 300, store=keep)
    keep.write_ready()
    save(keep, 1)
    assert S.list_replay(str(tmp_path / "keep"))["chunks"][0] == list(range(300 // 16))


def test_damaged_chunk_drops_only_older_steps_of_its_stream(tmp_path, capsys):
    ring = Ring(SPEC, num_streams=2, capacity=2 * 256, length=5)
    store = fresh(tmp_path, ring)
    fill(ring, 200)
    store.write_ready()
    save(store, 1)
    assert store.chunk == 64
    bad = store.chunk_path(0, 1)  # steps 64..127 of stream 0
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    other = Ring(SPEC, num_streams=2, capacity=2 * 256, length=5)
    meta = S.ChunkStore(str(tmp_path / "replay"), other, "run1").load(1)
    assert meta["dropped_steps"] == 128
    assert "replay stream 0: dropped 128 steps" in capsys.readouterr().out
    for _ in range(50):  # windows of stream 0 start at 128 or later
        _, keys = other.sample(16)
        assert all(s >= 128 for j, s in keys.tolist() if j == 0)
    assert other.read_steps(1, 0, 200)["obs"][:, 1].tolist() == list(range(200))


def test_save_writes_what_is_new_not_the_capacity(tmp_path):
    ring = Ring(SPEC, num_streams=4, capacity=4 * 100_000, length=5)
    per_step = 3 * 4 + 32 + 5 * 2 + 1
    store = fresh(tmp_path, ring)
    fill(ring, 1500)
    store.write_ready()
    size = store.write_point(store.snapshot(), 1, {})
    # The open tails only (1500 % 1024 steps per stream), never the 400,000-step capacity.
    assert size < 4 * 600 * per_step + 10_000
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                os.walk(tmp_path / "replay") for f in fs)
    assert total < 4 * 1600 * per_step + 50_000 < ring.nbytes / 50


def test_foreign_and_damaged_replay_files(tmp_path):
    ring = Ring(SPEC, num_streams=2, capacity=2 * 64, length=5)
    store = fresh(tmp_path, ring, "aaa")
    fill(ring, 40)
    save(store, 1)
    with pytest.raises(S.ReplayFileError, match="belongs to run aaa"):
        S.ChunkStore(store.path, Ring(SPEC, 2, 128, 5), "bbb").load(1)
    with pytest.raises(S.ReplayFileError, match="save-000002.npz is missing"):
        S.ChunkStore(store.path, Ring(SPEC, 2, 128, 5), "aaa").load(2)
    with pytest.raises(S.ReplayFileError, match="holds the replay of run aaa"):
        S.ChunkStore(store.path, Ring(SPEC, 2, 128, 5), "bbb").create()
    open(store.point_path(1), "wb").close()
    with pytest.raises(S.ReplayFileError, match=r"save-000001.npz is empty \(0 bytes\)"):
        S.ChunkStore(store.path, Ring(SPEC, 2, 128, 5), "aaa").load(1)
    with open(os.path.join(store.path, "manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(S.ReplayFileError, match="manifest.json is damaged"):
        S.list_replay(store.path)


def test_temp_files_removed_on_error_and_when_stale(tmp_path):
    path = str(tmp_path / "f.bin")
    F.atomic_write(path, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        F.atomic_write(path, boom)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["f.bin"]

    def full(f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(F.DiskFull, match=r"no space left on device writing .*f.bin \(needs "
                                         r"about 0.5 MiB"):
        F.atomic_write(path, full, needed=2**19)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["f.bin"]

    dead = tmp_path / "checkpoint.pt.tmp999999999"  # no such process
    mine = tmp_path / f"replay.tmp{os.getpid()}"
    dead.write_bytes(b"x")
    mine.write_bytes(b"x")
    assert S.remove_stale_temps(str(tmp_path)) == [str(dead)]
    assert mine.exists()
