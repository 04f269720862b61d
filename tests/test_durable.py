"""Runs survive what happens to real runs (subprocesses, CPU, tiny settings): SIGKILL in the
middle of a checkpoint or chunk write, signals during a save, a shell that ignores SIGINT,
non-finite losses and env data, missing, foreign, truncated and empty files, a full disk.

DREAMER_FAST_WRITE_DELAY_S makes every file write wait before its rename, so a kill or a
signal lands mid-write on purpose."""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dreamer_fast.checks import ConfigError
from dreamer_fast.data.store import list_replay
from dreamer_fast.run import checkpoint
from procs import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
# Capacity 2000 over 4 envs: chunks of 125 steps, the first after ~500 agent steps.
BASE = ["--preset", "debug", "--train-ratio", "16", "--replay.capacity", "2000",
        "--log-every", "1", "--report-every", "1000"]
CARTPOLE = ["--env", "CartPole-v1", *BASE, "--steps", "100000", "--save-every", "2"]


def start(args, logdir, delay=0.0, ignore_sigint=False):
    env = {**os.environ, "PYTHONPATH": TESTS, "DREAMER_FAST_WRITE_DELAY_S": str(delay)}
    # A background job of a non-interactive shell starts with SIGINT ignored.
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen([sys.executable, "run.py", *args, "--logdir", str(logdir)],
                            cwd=ROOT, env=env, preexec_fn=pre, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(args, logdir, timeout=180):
    proc = start(args, logdir)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def load(logdir):
    return torch.load(os.path.join(logdir, "checkpoint.pt"), weights_only=True)


def temps(logdir):
    return glob.glob(os.path.join(logdir, "*.tmp*")) + glob.glob(
        os.path.join(logdir, "replay", "*.tmp*")) + glob.glob(
        os.path.join(logdir, "replay", "*", "*.tmp*"))


def resumed(out):
    m = re.search(r"resumed from .*: ([\d,]+) agent steps, ([\d,]+) updates", out)
    assert m, out
    return tuple(int(g.replace(",", "")) for g in m.groups())


def finite(ckpt):
    return all(torch.isfinite(v).all() for v in ckpt["agent"].values() if v.is_floating_point())


def test_sigkill_mid_checkpoint_and_chunk_write_then_resume(tmp_path):
    logdir = tmp_path / "run"
    last = (0, 0)
    for target in ("checkpoint.pt.tmp", "replay/stream"):
        proc = start(CARTPOLE, logdir, delay=0.4)
        wait_for(lambda: load(logdir)["counters"]["updates"] > 0, proc)
        wait_for(lambda: any(target in p for p in temps(logdir)), proc)
        proc.kill()  # SIGKILL while a temp file waits for its rename
        proc.wait()
        ckpt = load(logdir)
        counts = (ckpt["counters"]["steps"], ckpt["counters"]["updates"])
        assert counts >= last  # never backwards
        last = counts
        assert temps(logdir)  # the dead writer's temp file is left behind ...
        code, out = run([*CARTPOLE[:-2], "--save-every", "1000", "--steps",
                         str(counts[0] + 200)], logdir)
        assert code == 0, out
        assert resumed(out) == counts  # ... the resume restores one save point exactly
        assert not temps(logdir)  # ... and removes the dead process's temp files
        assert "dropped" not in out
        last = (load(logdir)["counters"]["steps"], load(logdir)["counters"]["updates"])
    final = load(logdir)
    info = list_replay(str(logdir / "replay"))
    assert final["save_id"] in info["save_points"] and info["manifest"]["run_id"] == final["run_id"]


def test_sigint_during_save_finishes_it_and_double_sigterm(tmp_path):
    logdir = tmp_path / "int"
    proc = start(CARTPOLE, logdir, delay=0.5)
    wait_for(lambda: load(logdir)["counters"]["updates"] > 0, proc)
    before = load(logdir)["save_id"]
    wait_for(lambda: any("checkpoint.pt.tmp" in p for p in temps(logdir)), proc)
    proc.send_signal(signal.SIGINT)  # inside a periodic save
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGINT: stopping and saving" in out, out
    assert load(logdir)["save_id"] >= before + 2 and not temps(logdir)  # that save and the final

    logdir = tmp_path / "term"
    proc = start([*CARTPOLE[:-2], "--save-every", "1000"], logdir, delay=1.0)
    wait_for(lambda: list_replay(str(logdir / "replay"))["chunks"][0], proc)
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: any("save-" in p for p in temps(logdir)), proc)  # the final save
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "still stopping and saving; a third signal exits without saving" in out, out
    ckpt = load(logdir)
    assert ckpt["save_id"] == 1 and ckpt["counters"]["steps"] > 0 and not temps(logdir)


def test_background_job_with_sigint_ignored_stops_on_sigint(tmp_path):
    logdir = tmp_path / "bg"
    proc = start(CARTPOLE, logdir, ignore_sigint=True)
    wait_for(lambda: load(logdir)["counters"]["updates"] > 0, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGINT: stopping and saving" in out, out


def test_nonfinite_losses_and_env_data_keep_the_last_finite_checkpoint(tmp_path):
    logdir = tmp_path / "lr"
    code, out = run([*CARTPOLE[:-2], "--save-every", "1", "--agent.optim.lr", "1e20",
                     "--agent.optim.warmup", "0"], logdir)
    assert code != 0 and "non-finite" in out and "stopping without saving them" in out, out
    assert "Traceback" not in out
    if os.path.exists(logdir / "checkpoint.pt"):
        assert finite(load(logdir))

    logdir = tmp_path / "nan"
    code, out = run(["--env", "fault_envs:NanReward-v0", *BASE, "--steps", "100000",
                     "--save-every", "1"], logdir)
    assert code != 0 and "Traceback" not in out, out
    assert re.search(r"env index \d returned a non-finite 'reward' \(nan\)", out), out
    if os.path.exists(logdir / "checkpoint.pt"):
        assert finite(load(logdir))
        for path in glob.glob(str(logdir / "replay" / "save-*.npz")):
            with np.load(path) as d:
                assert np.isfinite(d["tail_reward"]).all()


def in_process(logdir, *flags, mode="save"):
    """A Run of CARTPOLE in this process, resumed (or fresh). mode 'resume': only that;
    'live': started and trained for a few updates; 'save': that, then saved and stopped."""
    import dataclasses

    from dreamer_fast.flags import parse
    from dreamer_fast.run.session import open_run

    cfg = parse([*CARTPOLE, *flags, "--logdir", str(logdir)])
    run_ = open_run(dataclasses.replace(cfg, device="cpu"))
    try:
        run_.resume()
    finally:
        if mode == "resume":
            run_.env.close()
    if mode != "resume":
        run_.start()
        while run_.learner.updates < 2:
            time.sleep(0.1)
    if mode == "save":
        assert run_.save()
        run_.stop(finished=False)
    return run_


def test_missing_foreign_truncated_and_empty_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    in_process(a)
    in_process(b)
    ckpt_a, ckpt_b = load(a), load(b)

    # Another run's replay beside this checkpoint: refused, naming both run ids.
    shutil.move(a / "replay", tmp_path / "a-replay")
    shutil.copytree(b / "replay", a / "replay")
    with pytest.raises(ConfigError, match=f"run {ckpt_b['run_id']}, not of this run "
                                          f"\\({ckpt_a['run_id']}\\).*--replay.resume-empty"):
        in_process(a, mode="resume")

    # A missing replay: an error naming the flag; with it, the counts carry on.
    shutil.rmtree(a / "replay")
    with pytest.raises(ConfigError, match="manifest.json is missing.*--replay.resume-empty"):
        in_process(a, mode="resume")
    run_ = in_process(a, "--replay.resume-empty", mode="resume")
    assert run_.ring.inserted == ckpt_a["counters"]["steps"] > 0
    assert run_.counters["updates"] == ckpt_a["counters"]["updates"]

    # Checkpoint files: empty, truncated, not a checkpoint, a pickle.
    file = str(b / "checkpoint.pt")
    data = open(file, "rb").read()
    cut = data[: len(data) // 3]
    cases = {b"": "is empty (0 bytes): it was cut off",
             cut: f"is truncated or damaged ({len(cut):,} bytes that torch.load cannot read: "
                  "RuntimeError); restore it from a copy, or move it away"}
    for content, message in cases.items():
        with open(file, "wb") as f:
            f.write(content)
        with pytest.raises(ConfigError, match=re.escape(file) + " " + re.escape(message)):
            checkpoint.load_checkpoint(file)
    torch.save({"weights": torch.zeros(3)}, file)
    with pytest.raises(ConfigError, match="is not a dreamer_fast checkpoint .*lacks config"):
        checkpoint.load_checkpoint(file)
    torch.save({"x": np.dtype}, file)  # a pickled object weights_only refuses
    with pytest.raises(ConfigError, match="is not a dreamer_fast checkpoint"):
        checkpoint.load_checkpoint(file)
    code, out = run(CARTPOLE, b)  # the command line says it in one line
    assert code != 0 and "is not a dreamer_fast checkpoint" in out and "Traceback" not in out


def test_full_disk_save_fails_cleanly_and_retries(tmp_path, monkeypatch, capsys):
    from dreamer_fast.data import store as S

    logdir = tmp_path / "full"
    run_ = in_process(logdir, mode="live")
    try:
        assert run_.save()
        good = load(logdir)
        real = np.savez

        def full(f, **arrays):
            f.write(b"x" * 1000)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(S.np, "savez", full)
        assert not run_.save()
        line = capsys.readouterr().out
        assert re.search(r"save 2 failed: \[Errno 28\] no space left on device writing "
                         r".*save-000002.npz \(needs about [\d.]+ MiB, [\d,.]+ MiB free\); "
                         r".*checkpoint.pt keeps save 1 at [\d,]+ steps", line), line
        assert load(logdir)["save_id"] == good["save_id"] == 1
        assert not temps(logdir)
        monkeypatch.setattr(S.np, "savez", real)
        assert run_.save() and load(logdir)["save_id"] == 2  # the retry works
    finally:
        run_.stop(finished=False)


def test_sigkill_during_the_first_save_resumes_or_restarts_by_itself(tmp_path):
    """Killed after the first save point's replay file and before checkpoint.pt's rename: a
    whole temp checkpoint is recovered and resumed; a cut one means nothing was saved, and
    the rerun starts afresh (one note each), never refusing the logdir."""
    for cut in (False, True):
        logdir = tmp_path / f"first-{cut}"
        proc = start(CARTPOLE, logdir, delay=1.0)

        def whole():  # the temp checkpoint written and fsynced, its rename still waiting
            try:
                return [torch.load(p, weights_only=True) for p in temps(logdir)
                        if "checkpoint.pt.tmp" in p]
            except Exception:  # noqa: BLE001 (still being written)
                return False
        wait_for(whole, proc)
        proc.kill()
        proc.wait()
        assert not (logdir / "checkpoint.pt").exists()
        tmp, = glob.glob(str(logdir / "checkpoint.pt.tmp*"))
        assert 1 in list_replay(str(logdir / "replay"))["save_points"]
        if cut:
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
        code, out = run([*CARTPOLE[:-2], "--save-every", "1000", "--steps", "300"], logdir)
        assert code == 0, out
        if cut:
            assert "the first save was interrupted" in out and "resumed from" not in out, out
        else:
            assert "recovered checkpoint.pt" in out and resumed(out)[0] > 0, out
        assert load(logdir)["counters"]["steps"] >= 300 and not temps(logdir)


def _tmpfs(path, size_mb):
    """A small filesystem of its own at path (root and permission to mount), else skip."""
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


def _fill(folder):
    """Fill folder's disk to the last byte; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_at_every_write_keeps_training_and_the_last_save(tmp_path):
    """The disk fills up during a run: the log rows, metrics, replay chunks and saves that
    meet it each say so in one line and the run trains on; space comes back and the next
    save works; full again at the end, the final save fails in one line naming the save kept
    (exit 1), never a traceback; a fresh run on the full disk is one line before anything
    is built."""
    disk = tmp_path / "disk"
    _tmpfs(disk, 64)
    try:
        logdir = disk / "run"
        proc = start([*CARTPOLE[:-2], "--save-every", "3"], logdir)
        wait_for(lambda: (logdir / "checkpoint.pt").exists(), proc)
        filler = _fill(disk)
        saved = load(logdir)["save_id"]
        time.sleep(8)  # log ticks every second, saves every 3 s, chunks as they fill
        assert proc.poll() is None  # still training
        filler.unlink()
        wait_for(lambda: load(logdir)["save_id"] > saved, proc)  # space again: saves resume
        _fill(disk)
        kept = load(logdir)["save_id"]
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 1, out
        assert "Traceback" not in out, out
        assert re.search(r"warning: the log row at step [\d,]+ was not written \(No space left "
                         r"on device\); training goes on", out), out
        assert re.search(r"save \d+ failed: \[Errno 28\] no space left on device", out), out
        last = out.strip().splitlines()[-1]
        assert last.startswith("error: the final save failed for lack of disk space") and (
            f"keeps save {load(logdir)['save_id']}" in last), last
        assert load(logdir)["save_id"] >= kept and finite(load(logdir))
        code, out = run(CARTPOLE, disk / "fresh")
        assert code == 1 and out.strip().splitlines()[-1].startswith(
            f"error: no space left on the device of --logdir {disk / 'fresh'}"), out
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_logdir_that_is_a_file_or_not_writable_is_one_line(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    code, out = run(CARTPOLE, file)
    assert code == 1 and out.strip().splitlines()[-1] == (
        f"error: --logdir {file} is a file, not a run folder: pass the folder that holds it "
        f"(--logdir {tmp_path}) to resume that run, or a new folder for a new run"), out
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"x")
    code, out = run(CARTPOLE, ckpt)
    assert code == 1 and f"error: --logdir {ckpt} is a checkpoint file, not a run folder" in out
    # No permission: as another user where this machine lets one run Python (root ignores
    # permission bits), and in any case through the check itself.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    want = (f"cannot write to --logdir {locked / 'run'}: permission denied; use a folder you "
            "can write to (e.g. --logdir ~/runs/NAME)")
    cmd = [sys.executable, "run.py", *CARTPOLE, "--logdir", str(locked / "run")]
    proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": TESTS})
    if "No module named" not in proc.stderr and "setpriv:" not in proc.stderr:
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == f"error: {want}"
    from dreamer_fast.run import resolve as session

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    real = os.makedirs
    os.makedirs = refuse
    try:
        with pytest.raises(ConfigError) as e:
            session.check_logdir(str(locked / "run"))
    finally:
        os.makedirs = real
    assert str(e.value) == want
