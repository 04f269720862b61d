"""RateLimiter: the exact admission rule, the bound on the lag under two racing threads,
shutdown, wait accounting, checkpoint round-trip."""

import threading
import time

import pytest

from dreamer_fast.data.limiter import RateLimiter


def drain(lim):
    """Updates the learner may run right now (without waiting)."""
    n = 0
    while lim.sample(timeout=0):
        n += 1
    return n


def test_exact_rule_single_thread():
    r, b, m, tol = 4.0, 16, 40, 32.0
    lim = RateLimiter(r, b, m, tolerance=tol)
    # Warm-up: the actor never blocks, the learner waits.
    for _ in range(m // 8 - 1):
        assert lim.insert(8, timeout=0)
    assert lim.inserted == m - 8 and drain(lim) == 0
    assert lim.insert(8, timeout=0)
    updates = 0
    for _ in range(30):
        # Learner: R + B <= r*(I - m) + tol  =>  updates = floor((r*(I-m) + tol) / B).
        updates += drain(lim)
        assert updates == int((r * (lim.inserted - m) + tol) // b)
        assert lim.replayed == updates * b
        assert lim.insert(3, timeout=0)  # the learner just caught up: the actor is free
    # Actor: blocked once r*(I - m) - R > tol, i.e. more than tol/r = 8 agent steps ahead.
    ahead = 0
    while ahead < 1000 and lim.insert(1, timeout=0):
        ahead += 1
    assert r * (lim.inserted - m) - lim.replayed > tol
    assert r * (lim.inserted - 1 - m) - lim.replayed <= tol
    assert ahead >= 1 and not lim.insert(1, timeout=0)
    assert lim.sample(timeout=0) and lim.insert(1, timeout=0)  # one update frees the actor


def test_defaults_and_validation():
    assert RateLimiter(32, 1024, 2048).tolerance == 4 * 1024
    assert RateLimiter(1024, 1024, 2048).tolerance == 64 * 1024
    with pytest.raises(ValueError, match="tolerance"):
        RateLimiter(32, 1024, 0, tolerance=512)
    with pytest.raises(ValueError):
        RateLimiter(0, 1024, 0)


def test_two_threads_hold_ratio_within_tolerance():
    r, b, m, n = 2.0, 16, 64, 4
    lim = RateLimiter(r, b, m)  # tol = max(64, 128) = 128
    tol = lim.tolerance
    total, half = 2400, 1200
    lags, errors, at_actor_end = [], [], {}

    def record():
        st = lim.stats()
        if st["inserted"] >= m:
            lags.append(st["lag"])

    def actor():
        for i in range(total // n):
            if not lim.insert(n, timeout=5):
                errors.append("actor timed out")
                return
            record()
            if i * n >= half:
                time.sleep(0.001)  # second half: the actor is the slow side
        at_actor_end.update(lim.stats())  # before the learner's final timed-out wait

    def learner():
        while True:
            if not lim.sample(timeout=0.3):  # actor done and learner caught up
                return
            record()
            if lim.replayed < r * (half - m):
                time.sleep(0.001)  # first half: the learner is the slow side

    threads = [threading.Thread(target=actor), threading.Thread(target=learner)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert not any(th.is_alive() for th in threads), "deadlock"
    assert not errors
    st = lim.stats()
    assert st["inserted"] == total
    # At every point after warm-up: -(tol + r*n) <= R - r*(I - m) <= tol.
    assert lags and min(lags) >= -(tol + r * n) and max(lags) <= tol
    # At the end the learner has caught up: within one batch of the upper edge.
    assert tol - b < st["lag"] <= tol
    assert abs(st["ratio"] - r) <= (tol + b) / (total - m)
    # Each side waited in the phase where it was the fast one, and that was accounted.
    assert at_actor_end["actor_wait_s"] > 0.05 and at_actor_end["learner_wait_s"] > 0.05


def test_close_releases_blocked_waiters_promptly():
    lim = RateLimiter(1.0, 8, 100, tolerance=8)
    results = {}

    def learner():  # blocked: warm-up not done
        results["learner"] = lim.sample()

    th = threading.Thread(target=learner)
    th.start()
    time.sleep(0.1)
    assert th.is_alive()
    # Push the actor past warm-up and ahead: it blocks once r*(I - m) - R > tol.
    lim2 = RateLimiter(1.0, 8, 4, tolerance=8)
    assert lim2.insert(20, timeout=0) and not lim2.insert(1, timeout=0)

    def actor():
        results["actor"] = lim2.insert(1)

    th2 = threading.Thread(target=actor)
    th2.start()
    time.sleep(0.1)
    assert th2.is_alive()
    t0 = time.perf_counter()
    lim.close()
    lim2.close()
    th.join(timeout=1)
    th2.join(timeout=1)
    assert not th.is_alive() and not th2.is_alive()
    assert time.perf_counter() - t0 < 0.5
    assert results == {"learner": False, "actor": False}
    assert lim.stats()["learner_wait_s"] >= 0.09 and lim2.stats()["actor_wait_s"] >= 0.09
    # After close nothing blocks and nothing is counted.
    assert not lim.insert(5) and not lim.sample() and lim.inserted == 0


def test_timeout_returns_false_and_counts_wait():
    lim = RateLimiter(1.0, 8, 10)
    t0 = time.perf_counter()
    assert not lim.sample(timeout=0.05)
    assert 0.04 < time.perf_counter() - t0 < 1.0
    assert lim.replayed == 0 and lim.stats()["learner_wait_s"] >= 0.04


def test_state_dict_roundtrip():
    lim = RateLimiter(2.0, 16, 8)
    lim.insert(40)
    drain(lim)
    other = RateLimiter(2.0, 16, 8)
    other.load_state_dict(lim.state_dict())
    assert other.stats() == lim.stats()
    assert drain(other) == drain(lim) == 0
    assert other.insert(10, timeout=0) and lim.insert(10, timeout=0)
    assert drain(other) == drain(lim) > 0
