"""Ring buffer: concurrency stress, seqlock re-check, online queue, wrap-around, write-back,
checkpoint round-trip. Every step's fields encode its (stream, time) so any torn, reordered or
overwritten window is visible."""

import io
import threading
import time

import numpy as np
import pytest
import torch

from dreamer_fast.data.ring import Ring

L = 17  # window length (debug preset: 1 context + 16 trained)
PAD = 64

SPEC = {
    "id": ((3,), torch.float32),      # stream, time, checksum
    "tick": ((), torch.int64),        # stream << 32 | time
    "pad": ((PAD,), torch.uint8),     # (time + i) & 255: a half-written step shows here
    "first": ((), torch.bool),        # time % 3 == 0
    "deter": ((8,), torch.bfloat16),  # flag (1 actor, 2 learner), stream, 5 hex digits of time
    "stoch": ((4,), torch.uint8),     # flag, stream, time & 255, time >> 8
}


def latents(stream, t, flag):
    """deter/stoch of steps (stream, t) (same-shaped int arrays), all exact in bf16/uint8."""
    stream, t = np.broadcast_arrays(np.asarray(stream, np.int64), np.asarray(t, np.int64))
    digits = [(t >> (4 * i)) & 15 for i in range(5)]
    deter = np.stack([np.full_like(t, flag), stream, *digits, np.zeros_like(t)], -1)
    stoch = np.stack([np.full_like(t, flag), stream, t & 255, (t >> 8) & 255], -1)
    return {"deter": torch.tensor(deter, dtype=torch.float32).to(torch.bfloat16),
            "stoch": torch.tensor(stoch, dtype=torch.uint8)}


def make_step(stream, t):
    """Fields of steps (stream[i], t[i])."""
    stream, t = np.asarray(stream, np.int64), np.asarray(t, np.int64)
    step = {
        "id": np.stack([stream, t, stream * 7919 + t * 3], -1).astype(np.float32),
        "tick": (stream << 32) | t,
        "pad": ((t[:, None] + np.arange(PAD)) & 255).astype(np.uint8),
        "first": t % 3 == 0,
    }
    step.update(latents(stream, t, 1))
    return step


def check_windows(ring, data, keys, errors, allow_clobber=False):
    """Append a message to errors for every batch with a row not equal to its (stream,
    start..) steps. Returns how many steps hold a clobbered (older) latent."""
    keys = keys.numpy()
    stream, start = keys[:, 0], keys[:, 1]
    t = start[:, None] + np.arange(L)
    s = np.broadcast_to(stream[:, None], t.shape)
    want = make_step(s.reshape(-1), t.reshape(-1))
    for k in ("id", "tick", "pad", "first"):
        got = data[k].reshape(len(t) * L, *data[k].shape[2:]).numpy()
        if not np.array_equal(got, want[k]):
            errors.append(f"{k} wrong for keys {keys.tolist()}")
    for k in ("deter", "stoch"):
        got = data[k].float().numpy()
        ok = np.zeros(got.shape[:-1] + (got.shape[-1] - 1,), bool)
        # Digits must be this step's (actor or learner version; a read racing a write-back may
        # mix both). allow_clobber: a write-back that raced the actor left the latent of an
        # older step of this slot, t - i*cap (the ring counts it in latent_clobbered).
        for i in range(8 if allow_clobber else 1):
            ok |= got[..., 1:] == latents(s, t - i * ring.cap, 1)[k].float().numpy()[..., 1:]
        if not (ok.all() and np.isin(got[..., 0], (1, 2)).all()):
            errors.append(f"{k} latent wrong for keys {keys.tolist()}")
        if k == "deter":
            exact = got[..., 1:] == latents(s, t, 1)[k].float().numpy()[..., 1:]
            clobbered = int((~exact.all(-1)).sum())
    return clobbered


def fill(ring, stream, n, start=0):
    for t in range(start, start + n):
        ring.add(make_step([stream], [t]), np.array([stream]))


def test_stress_concurrent_writer_and_samplers():
    streams, cap = 6, 64
    ring = Ring(SPEC, streams, streams * cap, length=L, margin=2, seed=1)
    stop = threading.Event()
    errors, windows, written, clobbered = [], {}, {}, {}  # per sampler thread: no shared +=

    def writer():
        rng = np.random.default_rng(0)
        counts = np.zeros(streams, np.int64)
        try:
            for _ in range(6_000):
                ids = rng.choice(streams, size=rng.integers(1, streams + 1), replace=False)
                ring.add(make_step(ids, counts[ids]), ids)
                counts[ids] += 1
        except Exception as e:  # surface in the main thread
            errors.append(f"writer: {e!r}")
        finally:
            stop.set()

    def sampler(seed):
        rng = np.random.default_rng(seed)
        windows[seed] = written[seed] = clobbered[seed] = 0
        try:
            while not stop.is_set():
                if ring.sampleable() == 0:
                    time.sleep(1e-4)
                    continue
                data, keys = ring.sample(8)
                clobbered[seed] += check_windows(ring, data, keys, errors, allow_clobber=True)
                windows[seed] += 8
                if rng.random() < 0.5:
                    k = keys.numpy()
                    t = k[:, 1, None] + 1 + np.arange(L - 1)
                    written[seed] += ring.write_latents(keys, latents(k[:, 0, None], t, 2))
        except Exception as e:
            errors.append(f"sampler: {e!r}")

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=sampler, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=45)
    assert not any(th.is_alive() for th in threads), "deadlock: threads still running"
    assert not errors, errors[:5]
    # All steps stay consistent afterwards, latents included (written back or original).
    data, keys = ring.sample(256)
    clobbered[-1] = check_windows(ring, data, keys, errors, allow_clobber=True)
    assert not errors, errors[:5]
    stats = ring.stats()
    # A stale latent can only come from a write-back that raced the actor, which is counted.
    # (Needs the writer to advance a stream `margin` steps during one copy: rare, not never.)
    assert sum(clobbered.values()) == 0 or stats["latent_clobbered"] > 0
    print(f"stress: {stats}, clobbered latents seen {sum(clobbered.values())}")
    assert stats["inserted"] == int(ring._count.sum()) > 6_000
    assert ring._count.min() > 25 * cap, "wrap-around must happen many times"
    assert sum(windows.values()) > 500 and sum(written.values()) > 0
    assert stats["sampled"] == sum(windows.values()) + 256
    assert stats["latent_written"] == sum(written.values())


def test_sample_recheck_resamples_rows_overwritten_during_copy():
    class Racy(Ring):
        """Lets the writer run between choosing windows and copying them (as a preempted
        reader would see it), on the first copy only."""
        def _gather(self, stream, start, out, rows):
            if self.race:
                self.race = False
                for j in range(self.num_streams):
                    fill(self, j, self.cap - L, start=int(self._count[j]))
            super()._gather(stream, start, out, rows)

    ring = Racy(SPEC, 2, 2 * 40, length=L, margin=1)
    for j in range(2):
        fill(ring, j, 40)
    ring.race = True
    data, keys = ring.sample(32)
    errors = []
    check_windows(ring, data, keys, errors)
    assert not errors, errors[:3]
    # The race overwrote every window that started below count - cap + 1; all were resampled.
    assert ring.stats()["resampled"] > 0
    assert (keys[:, 1].numpy() >= ring._count[keys[:, 0].numpy()] - ring.cap + 1).all()


def test_online_queue_yields_each_fresh_window_once_in_order_then_uniform():
    ring = Ring(SPEC, 3, 3 * 200, length=L, margin=2, seed=3)
    order = []
    for t in range(3 * L):
        for j in (2, 0, 1):  # stream 2 always writes first in each step
            ring.add(make_step([j], [t]), np.array([j]))
        if (t + 1) % L == 0:
            order += [(2, t + 1 - L), (0, t + 1 - L), (1, t + 1 - L)]
    fill(ring, 0, 5, start=3 * L)  # 5 extra steps: no new full window
    assert ring.stats()["queued"] == 9
    got = []
    for _ in range(5):
        data, keys = ring.sample(2)
        got += [tuple(k) for k in keys.tolist()]
    errors = []
    check_windows(ring, data, keys, errors)
    assert got[:9] == order, "online windows must come first, FIFO, each once"
    assert ring.stats()["online"] == 9 and ring.stats()["queued"] == 0
    assert ring.stats()["sampled"] == 10
    assert not errors


def test_online_queue_drops_overwritten_entries_and_can_be_off():
    ring = Ring(SPEC, 1, 60, length=L, margin=2)
    fill(ring, 0, 200)  # windows at 0, 17, ... 170 queued; the ring holds steps 140..199
    data, keys = ring.sample(4)
    starts = keys[:, 1].tolist()
    valid_queued = [s for s in range(0, 200 - L + 1, L) if s >= 200 - 60 + 2]
    assert starts[:len(valid_queued)] == valid_queued
    # The bounded queue kept the last cap // L + 1 = 4 windows (119, 136, 153, 170); the two
    # older ones were overwritten and dropped when popped.
    assert ring.stats()["online_dropped"] == 2
    errors = []
    check_windows(ring, data, keys, errors)
    assert not errors
    off = Ring(SPEC, 1, 60, length=L, online=False)
    fill(off, 0, 40)
    assert off.stats()["queued"] == 0
    off.sample(4)
    assert off.stats()["online"] == 0


def test_wraparound_windows_across_physical_end():
    cap = 50
    ring = Ring(SPEC, 2, 2 * cap, length=L, margin=3, seed=5)
    fill(ring, 1, 3 * cap + 20)  # count 170: valid starts 123..153, slots wrap at 150
    lo, num = ring._bounds(ring._count.copy())
    assert num[0] == 0 and lo[1] == 123 and num[1] == 153 - 123 + 1
    assert ring.sampleable() == num[1]
    # The storage is time-major: step t of stream 1 sits at slot t % cap.
    assert ring._storage["tick"][1, 165 % cap].item() == (1 << 32) | 165
    data, keys = ring.sample(200)
    starts = keys[:, 1].numpy()
    assert (keys[:, 0] == 1).all()
    assert (starts % cap + L > cap).any(), "no wrapping window sampled"
    assert starts.min() >= lo[1] and starts.max() <= 170 - L
    errors = []
    check_windows(ring, data, keys, errors)
    assert not errors, errors[:3]


def test_write_latents_skips_overwritten_steps():
    cap, margin = 40, 2
    ring = Ring(SPEC, 2, 2 * cap, length=L, margin=margin, online=False)
    fill(ring, 0, 30)
    fill(ring, 1, 30)
    keys = torch.tensor([[0, 5], [1, 10]])
    t = keys[:, 1, None].numpy() + 1 + np.arange(L - 1)
    # Stream 0 advances by 20: steps < 50 - 40 + 2 = 12 are (about to be) overwritten.
    fill(ring, 0, 20, start=30)
    n = ring.write_latents(keys, latents(keys[:, 0, None].numpy(), t, 2))
    expect0 = int((t[0] >= 12).sum())  # steps 12..21 of stream 0
    assert n == expect0 + (L - 1)
    st = ring.stats()
    assert st["latent_written"] == n and st["latent_skipped"] == (L - 1) - expect0
    assert st["latent_clobbered"] == 0
    deter = ring._storage["deter"]
    for tt in range(6, 22):  # stream 0: only still-valid steps got the learner's flag
        want_flag = 2 if tt >= 12 else 1
        slot = tt % cap
        if tt < 10:  # slots 6..9 now hold steps 46..49, written by the actor
            assert deter[0, slot, 0].item() == 1 and ring._storage["tick"][0, slot] == 40 + tt
        else:
            assert deter[0, slot, 0].item() == want_flag
    assert (deter[1, 11:27, 0] == 2).all()
    # A window whose steps were all overwritten writes nothing.
    fill(ring, 1, cap, start=30)
    assert ring.write_latents(torch.tensor([[1, 10]]), {k: v[1:] for k, v in
                              latents(keys[:, 0, None].numpy(), t, 2).items()}) == 0
    data, keys2 = ring.sample(64)
    errors = []
    check_windows(ring, data, keys2, errors)
    assert not errors


def test_write_latents_counts_a_race_during_the_first_keys_copy():
    """The actor overwrites steps while the first key (deter) is copied in: those deter steps
    now hold a stale latent. The later key re-checks and skips them, and the clobber count
    must still cover the first key's steps (it once used the last key's range only)."""
    cap, margin = 40, 2

    class Racy(Ring):
        def _copy_in(self, ring, first, end, value):
            if self.race:  # the actor runs 6 steps on stream 0 between the check and the copy
                self.race = False
                fill(self, 0, 6, start=int(self._count[0]))
            super()._copy_in(ring, first, end, value)

    ring = Racy(SPEC, 1, cap, length=L, margin=margin, online=False)
    fill(ring, 0, 44)
    keys = torch.tensor([[0, 5]])  # steps 6..21; valid from 44 - 40 + 2 = 6
    t = keys[:, 1, None].numpy() + 1 + np.arange(L - 1)
    ring.race = True
    n = ring.write_latents(keys, latents(np.zeros_like(t), t, 2))
    # After the race count = 50: slots 6..9 hold steps 46..49, then got the stale deter of
    # steps 6..9; stoch re-checked and started at 50 - 40 + 2 = 12. The count is conservative
    # by one step (count 50: the actor may be writing step 50 into slot 10 right now).
    assert n == 22 - 12
    deter, stoch = ring._storage["deter"], ring._storage["stoch"]
    stale = [tt for tt in range(46, 50) if deter[0, tt % cap, 0].item() == 2]
    assert stale == [46, 47, 48, 49]  # the benign race the ring documents
    assert (stoch[0, 6:10, 0] == 1).all() and (stoch[0, 12:22, 0] == 2).all()
    assert ring.stats()["latent_clobbered"] == 5


def test_write_latents_overlapping_windows_later_wins():
    ring = Ring(SPEC, 1, 100, length=L, online=False)
    fill(ring, 0, 60)
    keys = torch.tensor([[0, 3], [0, 8]])  # steps 4..19 and 9..24
    deter = torch.ones(2, L - 1, 8, dtype=torch.bfloat16)
    deter[1] = 2
    assert ring.write_latents(keys, {"deter": deter}) == 2 * (L - 1)
    got = ring._storage["deter"][0, :, 0]
    assert (got[4:9] == 1).all() and (got[9:25] == 2).all() and got[25] == 1  # 25: actor's flag
    assert got[3] == 1 and ring._storage["stoch"][0, 10, 0] == 1  # other keys untouched


def test_state_dict_roundtrip_reproduces_samples():
    ring = Ring(SPEC, 3, 3 * 45, length=L, margin=2, seed=7)
    rng = np.random.default_rng(0)
    counts = np.zeros(3, np.int64)
    for _ in range(150):
        ids = rng.choice(3, size=rng.integers(1, 4), replace=False)
        ring.add(make_step(ids, counts[ids]), ids)
        counts[ids] += 1
    ring.sample(2)  # leaves some windows queued
    buf = io.BytesIO()
    torch.save(ring.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = Ring(SPEC, 3, 3 * 45, length=L, margin=2, seed=123)
    other.load_state_dict(state)
    assert other.stats() == ring.stats() and other.stats()["queued"] > 0
    for _ in range(5):
        (a, ka), (b, kb) = ring.sample(6), other.sample(6)
        assert torch.equal(ka, kb)
        for k in SPEC:
            assert torch.equal(a[k], b[k])
    # Writes continue identically (counters and online bookkeeping restored).
    for r in (ring, other):
        fill(r, 1, L, start=int(counts[1]))
    assert torch.equal(ring.sample(4)[1], other.sample(4)[1])
    with pytest.raises(ValueError, match="layout"):
        Ring(SPEC, 2, 2 * 45, length=L).load_state_dict(state)


def test_capacity_too_small_raises():
    with pytest.raises(ValueError, match=r"capacity 1000 over 16 streams gives 62 steps"):
        Ring(SPEC, 16, 1000, length=65)
    Ring(SPEC, 16, 16 * (65 + 8), length=65)  # exactly enough


def test_bf16_uint8_exact_roundtrip_and_out_buffers():
    spec = {"image": ((3, 4, 4), torch.uint8), "deter": ((5,), torch.bfloat16),
            "stoch": ((6,), torch.int16), "reward": ((), torch.float32)}
    ring = Ring(spec, 2, 2 * 60, length=L, online=False)
    g = torch.Generator().manual_seed(0)
    steps = {"image": torch.randint(0, 256, (2, 50, 3, 4, 4), generator=g, dtype=torch.uint8),
             "deter": torch.randn(2, 50, 5, generator=g).to(torch.bfloat16),
             "stoch": torch.randint(-500, 500, (2, 50, 6), generator=g, dtype=torch.int16),
             "reward": torch.randn(2, 50, generator=g)}
    for t in range(50):
        step = {k: v[:, t] for k, v in steps.items()}
        step["image"] = step["image"].numpy()  # numpy and torch inputs both accepted
        ring.add(step, np.array([0, 1]))
    out = {k: torch.zeros((8, L, *shape), dtype=dtype) for k, (shape, dtype) in spec.items()}
    data, keys = ring.sample(8, out=out)
    assert all(data[k] is out[k] for k in spec)
    for i, (j, s) in enumerate(keys.tolist()):
        for k in spec:
            assert torch.equal(out[k][i], steps[k][j, s:s + L]), k
    new = torch.randn(8, L - 1, 5, generator=g).to(torch.bfloat16)
    ring.write_latents(keys[:1], {"deter": new[:1]})
    j, s = keys[0].tolist()
    assert torch.equal(ring._storage["deter"][j, s + 1:s + L], new[0])
    with pytest.raises(ValueError, match="out"):
        ring.sample(8, out={**out, "deter": torch.zeros(8, L, 5)})
    with pytest.raises(ValueError, match="shape"):
        ring.add({**{k: v[:, 0] for k, v in steps.items()}, "deter": torch.zeros(2, 4)},
                 np.array([0, 1]))
    assert ring.nbytes == 2 * 60 * (48 + 5 * 2 + 6 * 2 + 4)


def test_sample_before_data_raises():
    ring = Ring(SPEC, 2, 200, length=L)
    fill(ring, 0, L - 1)
    assert ring.sampleable() == 0
    with pytest.raises(RuntimeError, match="no sampleable"):
        ring.sample(1)
    with pytest.raises(ValueError, match="distinct"):
        ring.add(make_step([0, 0], [0, 1]), np.array([0, 0]))
