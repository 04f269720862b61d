"""run.py end to end in subprocesses (CPU, tiny settings): smoke runs on CartPole and Pong, the
train-ratio contract, SIGKILL + resume, SIGTERM save, incompatible resume, evaluation."""

import json
import os
import re
import signal

import pytest
import torch

from dreamer_fast.data.store import list_replay
from procs import load, run, start, wait_for

CARTPOLE = ["--env", "CartPole-v1", "--preset", "debug", "--steps", "1000", "--train-ratio", "16",
            "--seed", "1", "--log-every", "1", "--save-every", "2", "--report-every", "3"]
PONG = ["--env", "Pong-v5", "--model", "debug", "--agent.batch-size", "2",
        "--agent.batch-length", "16", "--replay.capacity", "4000", "--num-envs", "2",
        "--env-opts.image-size", "64", "--env-opts.time-limit", "200", "--train-ratio", "8",
        "--steps", "100000",
        "--log-every", "2", "--save-every", "3", "--report-every", "3"]


def assert_ratio(ckpt, train_ratio, batch_steps, min_inserts):
    """Contract: updates ~= train_ratio x (agent steps - warm-up) / (B*T), within the limiter's
    tolerance (default max(4 B*T, 64 train_ratio) replayed steps: the learner may run that far
    ahead, and the end of a run lets it catch up to within one update when it is behind)."""
    inserted, replayed = ckpt["limiter"]["inserted"], ckpt["limiter"]["replayed"]
    tolerance = max(4 * batch_steps, 64 * train_ratio)
    owed = train_ratio * (inserted - min_inserts)
    assert -batch_steps < replayed - owed <= tolerance, (replayed, owed, tolerance)
    updates = ckpt["counters"]["updates"]  # the learner's own count: may trail by one sample
    assert -2 < updates - owed / batch_steps <= tolerance / batch_steps, (updates, owed)


def test_cartpole_smoke_kill_resume_contract_and_eval(tmp_path):
    logdir = tmp_path / "cartpole"
    proc = start(CARTPOLE, logdir)
    # SIGKILL mid-run, once a checkpoint with training in it exists.
    wait_for(lambda: load(logdir)["counters"]["updates"] > 0, proc, 180)
    proc.kill()
    proc.wait()
    saved = load(logdir)
    saved_steps = saved["counters"]["steps"]
    assert 0 < saved_steps < 1000 and saved["counters"]["updates"] > 0
    assert {"checkpoint.pt", "replay", "metrics.jsonl", "config.json"} <= set(os.listdir(logdir))
    info = list_replay(str(logdir / "replay"))
    assert info["manifest"]["run_id"] == saved["run_id"]
    assert saved["save_id"] in info["save_points"]  # the checkpoint's own save point is kept
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(logdir))

    code, out = run(CARTPOLE, logdir)  # the same command resumes
    assert code == 0, out
    m = re.search(r"resumed from .*: ([\d,]+) agent steps, ([\d,]+) updates, replay", out)
    assert m, out
    steps, updates = (int(g.replace(",", "")) for g in m.groups())
    assert steps == saved_steps and updates == saved["counters"]["updates"] > 0
    final = load(logdir)
    assert final["limiter"]["inserted"] >= 1000 and final["counters"]["updates"] > updates
    # debug preset: 4 envs, B4 x T16 -> warm-up 4 * 17 + 64 steps.
    assert_ratio(final, 16, 64, 4 * 17 + 64)
    rows = [json.loads(line) for line in open(logdir / "metrics.jsonl")]
    keys = set().union(*rows)
    for key in ("loss/dyn", "loss/policy", "episode/return", "episode/length",
                "throughput/steps_per_s", "throughput/updates_per_s",
                "wait/actor_wait_frac", "wait/learner_wait_frac", "time/actor/env_frac",
                "time/actor/policy_frac", "time/learner/replay_frac",
                "time/learner/train_frac", "openloop/vector", "episode/return_last10"):
        assert key in keys, key
    assert {r["update_mode"] for r in rows} == {"eager+fused"}  # the CPU default's update

    code, out = run(["--eval", "--episodes", "2"], logdir, timeout=120)
    assert code == 0, out
    result = json.load(open(logdir / "eval" / "returns.json"))
    assert result["episodes"] == 2 and all(r > 0 for r in result["returns"])

    # A different model cannot resume this run: the error names the fields.
    code, out = run([*CARTPOLE, "--model", "size1m"], logdir, timeout=120)
    assert code != 0 and "cannot resume" in out and "net.deter: 64 -> 512" in out, out


def test_pong_smoke_report_sigterm_and_eval_video(tmp_path):
    logdir = tmp_path / "pong"
    proc = start(PONG, logdir)
    reports = logdir / "reports"
    wait_for(lambda: os.listdir(reports) and load(logdir)["counters"]["updates"] > 0, proc, 200)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM: stopping and saving" in out, out
    assert re.search(r"replay: 4,000 steps x [\d,]+ bytes", out)
    ckpt = load(logdir)
    assert ckpt["counters"]["updates"] > 0 and json.loads(ckpt["config"])["env"] == "Pong-v5"
    assert any(name.endswith(".mp4") for name in os.listdir(reports))
    rows = [json.loads(line) for line in open(logdir / "metrics.jsonl")]
    assert any("loss/rec/image" in r for r in rows) and any("openloop/image" in r for r in rows)

    code, out = run(["--eval", "--episodes", "1"], logdir, timeout=180)
    assert code == 0, out
    assert os.path.getsize(logdir / "eval" / "episode.mp4") > 0


def test_unknown_env_and_oversized_replay_fail_at_once(tmp_path):
    code, out = run(["--env", "Pong-v9", "--model", "debug"], tmp_path / "a", timeout=120)
    assert code != 0 and "unknown env id 'Pong-v9'; closest: " in out and "Pong-v5" in out
    code, out = run(["--env", "CartPole-v1", "--replay.capacity", str(10**12)], tmp_path / "b",
                    timeout=120)
    assert code != 0 and re.search(r"use --replay.capacity \d+", out), out
    # Too small for one window per env stream: one line, before any model is built.
    code, out = run(["--env", "Pong-v5", "--replay.capacity", "10"], tmp_path / "c",
                    timeout=120)
    assert code != 0 and "Traceback" not in out, out
    assert "replay.capacity=10; allowed: 0 (automatic) or >= " in out, out
    assert not (tmp_path / "c").exists()
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_replay_capacity_auto_fits_ram_and_keeps_saved(monkeypatch, capsys):
    import torch

    from dreamer_fast.data import capacity as ring
    from dreamer_fast.checks import ConfigError

    spec = {"image": ((3, 64, 64), torch.uint8), "deter": ((8192,), torch.bfloat16)}
    per_step = 3 * 64 * 64 + 2 * 8192
    monkeypatch.setattr(ring, "mem_available", lambda: 100_000 * per_step)
    # Default: SPEC's 5e6 does not fit, so as many as fit in the fraction of free RAM.
    assert ring.replay_capacity(spec, 0, None, 0.5) == 50_000
    # A resumed run keeps its capacity; an explicit value is used as given.
    assert ring.replay_capacity(spec, 0, 30_000, 0.5) == 30_000
    assert ring.replay_capacity(spec, 20_000, None, 0.5) == 20_000
    with pytest.raises(ConfigError, match=r"use --replay.capacity 50000"):
        ring.replay_capacity(spec, 90_000, None, 0.5)
    # A resume keeps a saved capacity that no longer fits, with a warning, never an error.
    assert ring.replay_capacity(spec, 0, 90_000, 0.5) == 90_000
    # The training memory is kept free, and the automatic capacity never exceeds the budget.
    assert ring.replay_capacity(spec, 0, None, 0.5, reserve=40_000 * per_step) == 30_000
    assert ring.replay_capacity(spec, 0, None, 0.5, steps=12_345) == 12_345
    assert ring.replay_capacity(spec, 0, None, 0.5, steps=10, minimum=500) == 500
    monkeypatch.setattr(ring, "mem_available", lambda: 10**9 * per_step)
    assert ring.replay_capacity(spec, 0, None, 0.75) == ring.SPEC_CAPACITY
    # No preset fixes a replay larger than its run needs (the control preset's is automatic).
    from dreamer_fast.config import DOMAINS
    assert DOMAINS["control"].replay.capacity == 0
    # A CPU run's automatic replay stops at what the device can use, saying so.
    assert ring.replay_capacity(spec, 0, None, 0.4, steps=10**6, ceiling=200_000) == 200_000
    assert "replay: at most 200,000 on this device (set --replay.capacity" in capsys.readouterr().out


def test_a_resume_warns_only_when_replay_and_training_exceed_the_ram(monkeypatch, capsys):
    """The saved replay plus the training memory against the available RAM (not against the
    automatic replay's share of it): 7.0 + 5.2 GiB of 22.4 GiB available is no warning."""
    import torch

    from dreamer_fast.data import capacity as ring

    spec = {"x": ((1024,), torch.uint8)}
    monkeypatch.setattr(ring, "mem_available", lambda: int(22.4 * 2**30))
    saved = int(7.0 * 2**30) // 1024
    capsys.readouterr()
    ring.replay_capacity(spec, 0, saved, 0.4, reserve=int(5.2 * 2**30))
    assert "warning" not in capsys.readouterr().out
    ring.replay_capacity(spec, 0, saved, 0.4, reserve=int(16 * 2**30))
    assert "warning: the saved replay of 7,340,032 steps needs 7.0 GiB and training 16.0 GiB " \
        "more, 23.0 GiB of the 22.4 GiB available" in capsys.readouterr().out
