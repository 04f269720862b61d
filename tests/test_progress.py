"""The progress line's rate and time left follow the rate a run holds: smoothed over a window,
the unthrottled prefill burst not counted, and a note when the run needs more than a day."""

import dataclasses
import re

from dreamer_fast.config import DOMAINS, SIZES
from dreamer_fast.run.stats import HeldRate, Progress


def simulate(progress, seconds, t0, steps, updates, sps, ups, lines):
    """Feed one sample per second at the given rates; collect the progress lines."""
    for i in range(seconds):
        steps += sps
        updates += ups
        progress.sample(int(steps), int(updates), t0 + i)
        lines.append(progress.line(int(steps), 0.1, None))
    return t0 + seconds, steps, updates


def left_seconds(line):
    m = re.search(r"left (\?|(?:(\d+)d(\d+)h)|(?:(\d+)h(\d+)m)|(?:(\d+)m(\d+)s))$", line)
    assert m, line
    if m.group(1) == "?":
        return None
    d, h1, h2, m2, m3, s3 = (int(g) if g else 0 for g in m.groups()[1:])
    return d * 86400 + (h1 + h2) * 3600 + (m2 + m3) * 60 + s3


def test_eta_ignores_prefill_and_is_steady():
    # control-like: B16 x T16 = 256 replayed steps per update, ratio 64 -> 4 agent steps each.
    cfg = dataclasses.replace(DOMAINS["control"], steps=100_000, train_ratio=64.0)
    progress, lines = Progress(cfg, window_s=60.0), []
    # Prefill: the actor runs unthrottled (500 steps/s), no update yet: time left unknown.
    t, steps, updates = simulate(progress, 10, 0.0, 0, 0, 500, 0, lines)
    assert all(left_seconds(line) is None for line in lines)
    # Then the learner holds the run: 3 updates/s -> 12 agent steps/s, with jitter.
    lines.clear()
    for k in range(120):
        t, steps, updates = simulate(progress, 1, t, steps, updates, 12 + (6 if k % 2 else -6),
                                     3, lines)
    lefts = [left_seconds(line) for line in lines]
    # Unknown for the first 10 s of updates, then known on every line.
    assert all(x is None for x in lefts[:9]) and all(x is not None for x in lefts[10:]), lines
    lefts = lefts[10:]
    true_left = (100_000 - steps) / 12
    # Held rate, the burst before the first update not counted ...
    assert abs(lefts[0] - (100_000 - 5120) / 12) / lefts[0] < 0.1, lines[10]
    # ... and steady: no flicker between neighbouring lines, the end near the truth.
    assert max(abs(a - b) / a for a, b in zip(lefts, lefts[1:])) < 0.1
    assert abs(lefts[-1] - true_left) / true_left < 0.05, (lines[-1], true_left)
    rate = float(re.search(r"\| ([\d,.]+) env steps/s", lines[-1]).group(1))
    assert 11 <= rate <= 13, lines[-1]


def test_held_rate_is_the_actor_rate_when_the_actor_is_slower():
    held = HeldRate(batch_steps=256, train_ratio=64.0, window_s=30.0)
    for i in range(40):  # actor-bound: 5 steps/s; the learner could allow 4 x 3 = 12
        held.add(float(i), 5 * i, 3 * i)
    assert abs(held.eta_rate() - 5.0) < 1e-6


def test_more_than_a_day_names_the_flags():
    cfg = dataclasses.replace(DOMAINS["atari"], net=SIZES["size200m"])
    progress = Progress(cfg, window_s=60.0)
    for i in range(61):
        progress.sample(5000 + 7 * i, 2 * i, float(i))  # learner-bound at 7 agent steps/s
    note = progress.note(5000 + 7 * 60)
    assert note and "more than a day" in note and "--model size1m" in note, note
    assert "--steps 6" in note  # what a day gives: 5420 + 7 * 86400 = 610,220
    assert progress.note(5000 + 7 * 60) is None  # once
    control = Progress(dataclasses.replace(DOMAINS["control"], steps=100_000, train_ratio=64.0),
                       window_s=60.0)
    for i in range(61):
        control.sample(12 * i, 3 * i, float(i))
    assert control.note(720) is None  # 2.3 hours: no note


def test_start_estimate_counts_the_update_and_says_when_a_run_needs_days():
    import numpy as np
    import torch

    from dreamer_fast.agent.agent import Agent
    from dreamer_fast.config import AgentConfig
    from dreamer_fast.flags import parse
    from dreamer_fast.data.synthetic import ActSpace
    from dreamer_fast.run import estimate
    from dreamer_fast.run.stats import feasibility_note

    def flops(obs, B):
        cfg = AgentConfig(batch_size=B, batch_length=16, imag_horizon=15)
        agent = Agent(obs, ActSpace(True, 3), SIZES["debug"], cfg, torch.device("cpu"))
        return estimate.update_flops(agent), agent

    vec = {"vector": ((7,), np.float32)}
    img = {"image": ((3, 64, 64), np.uint8)}
    f16, agent = flops(vec, 16)
    assert flops(vec, 32)[0] == 2 * f16  # linear in the batch
    # Convolutions counted at their output sizes: far more than their weights alone.
    fimg, img_agent = flops(img, 16)
    convs = estimate._macs([img_agent.enc], run=lambda: img_agent.enc(
        {"image": torch.zeros((1, 1, 3, 64, 64), dtype=torch.uint8)}))
    assert convs > 20 * estimate._macs([img_agent.enc]) and fimg > 3 * f16
    # A run of 10^9 steps at any sensible rate needs more than a day: the note says so.
    cfg = parse(["--env", "CartPole-v1", "--preset", "control", "--steps", str(10**9)])
    per_update, total = estimate.run_seconds(cfg, agent, torch.device("cpu"))
    assert per_update > 0 and total > 86400
    note = feasibility_note(cfg, 0, 1 / (per_update * cfg.updates_per_step), "estimated here")
    assert note and "estimated here" in note and "--steps" in note


def test_a_run_that_logs_every_120_s_shows_progress_early_and_saves_on_ctrl_c_at_once(tmp_path):
    """The Atari preset logs every 120 s (the official cadence): its first progress lines
    still come every 15 s, the first with updates within ~20 s of the first update; Ctrl-C
    saves within seconds (the report video is not written first)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "run.py", "--env", "Pong-v5", "--model", "debug", "--num-envs", "4",
           "--agent.batch-size", "2", "--agent.batch-length", "8", "--replay.capacity", "2000",
           "--logdir", str(tmp_path / "pong")]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    start, lines, first_update = time.time(), [], None
    try:
        while time.time() - start < 150:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            m = re.match(r"step [\d,]+/[\d,]+ \| .* \| ([\d.]+) updates/s", line)
            if m and float(m.group(1)) > 0:
                first_update = time.time()
                break
        assert first_update is not None, "".join(lines)
        progress = [line for line in lines if line.startswith("step ")]
        assert progress and first_update - start < 90, "".join(lines)
        proc.send_signal(signal.SIGINT)
        stopped = time.time()
        out = proc.communicate(timeout=60)[0]
        saved = time.time() - stopped
    finally:
        proc.kill()
    assert proc.returncode == 0 and re.search(r"saved .*checkpoint.pt at [\d,]+ steps", out), out
    assert saved < 15, (saved, out)
    assert not os.path.exists(tmp_path / "pong" / "reports"), out
