"""Evaluation as a command (tyro flags, seeds, progress, Ctrl-C, TensorBoard), video summaries
and time fractions that are true fractions."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from dreamer_fast.data.limiter import RateLimiter
from dreamer_fast.run.clocks import Timer
from dreamer_fast.run.logger import Logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "ckpt-66b07c6")  # a tiny CartPole run


@pytest.fixture
def run_dir(tmp_path):
    logdir = tmp_path / "run"
    shutil.copytree(FIXTURE, logdir)
    return logdir


def cli(*args, timeout=180):
    out = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout,
                         env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests")))
    return out.returncode, out.stdout + out.stderr


def read_until(proc, pattern: str, timeout: float = 150) -> list[str]:
    """The child's output lines up to the first that matches `pattern`; kills it and fails
    with its output if it ends or the time runs out first."""
    lines, end = [], time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        lines.append(line)
        if re.search(pattern, line):
            return lines
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("".join(lines))


def tb_tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


def test_eval_flags_seed_progress_steps_and_tensorboard(run_dir):
    code, out = cli("--eval", f"--logdir={run_dir}", "--episodes=3", "--seed", "5")
    assert code == 0, out
    assert len(re.findall(r"eval episode \d/3: return [\d.]+, length \d+, \d+ s", out)) == 3, out
    first = json.load(open(run_dir / "eval" / "returns.json"))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert first["steps"] == ckpt["counters"]["steps"] and first["seed"] == 5
    assert first["episodes"] == 3 and not first["interrupted"]
    code, out = cli("--eval", "--logdir", str(run_dir), "--episodes", "3", "--seed", "5")
    assert code == 0, out
    again = json.load(open(run_dir / "eval" / "returns.json"))
    assert again["returns"] == first["returns"]  # same seed, same checkpoint: same returns
    ea = tb_tags(run_dir)
    assert "eval/return" in ea.Tags()["scalars"]
    assert ea.Scalars("eval/return")[-1].step == ckpt["counters"]["steps"]
    if first["video"]:  # CartPole renders when pygame is installed
        assert "eval/episode" in ea.Tags()["images"]
        assert ea.Images("eval/episode")[-1].encoded_image_string[:6] == b"GIF89a"
        assert "XDG_RUNTIME_DIR" not in out  # SDL renders headless, silently
    # Greedy evals get curves of their own (never the sampled one's tag at the same step).
    code, out = cli("--eval", "--logdir", str(run_dir), "--episodes", "2", "--greedy")
    assert code == 0, out
    ea = tb_tags(run_dir)
    assert len(ea.Scalars("eval/return")) == 2 and len(ea.Scalars("eval_greedy/return")) == 1


def test_eval_help_and_bad_flags_are_one_liners(run_dir):
    code, out = cli("--eval", "--help")
    assert code == 0 and all(f in out for f in ("--episodes", "--greedy", "--seed", "--videos"))
    code, out = cli("--eval", "--logdir", str(run_dir), "--episodes", "abc")
    assert code != 0 and "Traceback" not in out and "episodes" in out, out
    code, out = cli("--eval", "--logdir", str(run_dir), "--episodes", "0")
    assert code != 0 and "Traceback" not in out and "episodes=0" in out, out
    code, out = cli("--eval", "--logdir", str(run_dir / "nothing"))
    assert code != 0 and "Traceback" not in out and "no checkpoint at" in out, out
    code, out = cli("--help")
    assert code == 0 and "--eval --help" in out


def test_eval_ctrl_c_writes_the_finished_episodes(run_dir):
    proc = subprocess.Popen([sys.executable, "run.py", "--eval", "--logdir", str(run_dir),
                             "--episodes", "2000", "--videos", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = read_until(proc, r"eval episode 3/2000")
    proc.send_signal(signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "Traceback" not in out, out
    assert "eval interrupted: writing the" in out
    result = json.load(open(run_dir / "eval" / "returns.json"))
    assert result["interrupted"] and 3 <= result["episodes"] < 2000
    assert len(result["returns"]) == result["episodes"] == len(result["lengths"])


def test_video_summary_in_tensorboard(tmp_path):
    logger = Logger(str(tmp_path))
    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 24, 1), dtype=np.uint8)
    path = logger.video(7, "openloop/image", frames)
    logger.close()
    assert path.endswith("openloop_image-7.mp4") and os.path.getsize(path) > 0
    image = tb_tags(tmp_path).Images("openloop/image")[0]
    assert image.step == 7 and (image.width, image.height) == (24, 16)
    assert image.encoded_image_string[:6] == b"GIF89a"
    from PIL import Image
    import io
    gif = Image.open(io.BytesIO(image.encoded_image_string))
    assert gif.n_frames == 5


def _fractions(read, reads=6, every=0.1):
    out, last, t_last = [], read(), time.perf_counter()
    for _ in range(reads):
        time.sleep(every)
        now, t = read(), time.perf_counter()
        out.append({k: (now[k] - last.get(k, 0.0)) / (t - t_last) for k in now})
        last, t_last = now, t
    return out


def test_time_fractions_count_a_section_across_log_ticks():
    """A section (or a limiter wait) spanning several log intervals gives each interval its
    share, never more than the interval (before: the whole section at its end, e.g. 1.49)."""
    timer = Timer()

    def work():
        with timer.section("policy"):
            time.sleep(0.45)

    thread = threading.Thread(target=work)
    thread.start()
    fracs = _fractions(timer.read)
    thread.join()
    policy = [f.get("policy", 0.0) for f in fracs]
    assert max(policy) <= 1.02 and sum(p > 0.5 for p in policy) >= 3, policy

    limiter = RateLimiter(train_ratio=1.0, batch_steps=1, min_inserts=10)
    thread = threading.Thread(target=lambda: limiter.sample(timeout=0.45))
    thread.start()
    fracs = _fractions(limiter.stats)
    thread.join()
    waits = [f["learner_wait_s"] for f in fracs]
    assert max(waits) <= 1.02 and sum(w > 0.5 for w in waits) >= 3, waits


def _fake_run(folder, name, env, values, dt=60.0):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"name": name, "env": env}, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for i, v in enumerate(values):
            f.write(json.dumps({"step": 100 * (i + 1), "time": 1000.0 + dt * i,
                                "episode/return": v}) + "\n")
        f.write('{"step": 9')  # a line cut by a kill is skipped


def test_plot_pools_runs_of_one_name(tmp_path):
    from dreamer_fast.plot import load_run, plot, pooled

    _fake_run(tmp_path / "a1", None, "CartPole-v1", [10, 20, 30])
    _fake_run(tmp_path / "a2", None, "CartPole-v1", [30, 40, 50, 60])
    _fake_run(tmp_path / "b", "mine", "CartPole-v1", [5, 5, 5])
    runs = [load_run(str(tmp_path / d), "episode/return") for d in ("a1", "a2", "b")]
    assert runs[0]["minutes"].tolist() == [0.0, 1.0, 2.0] and runs[2]["name"] == "mine"
    for band in ("minmax", "ci"):  # two runs: the mean's 95% interval spans them too
        x, mean, lo, hi = pooled(runs[:2], "steps", points=3, band=band)
        assert x.tolist() == [100, 200, 300] and mean.tolist() == [20, 30, 40]
        assert lo.tolist() == [10, 20, 30] and hi.tolist() == [30, 40, 50]
    out = tmp_path / "curves.png"
    assert plot(runs, "episode/return", str(out)) == {"CartPole-v1": 2, "mine": 1}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A folder without the key (no metrics, an offline run, a young run) is skipped, saying
    # which; the others are drawn, a run of one log point as a dot.
    _fake_run(tmp_path / "young", None, "Pong-v5", [-21])
    offline = tmp_path / "offline"
    offline.mkdir()
    (offline / "metrics.jsonl").write_text('{"step": 1, "time": 0, "loss/rec": 1.0}\n')
    proc = subprocess.run([sys.executable, "-m", "dreamer_fast.plot", str(tmp_path / "a1"),
                           str(tmp_path / "nothing"), str(offline), str(tmp_path / "young"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"skipped {tmp_path / 'nothing'}: no metrics.jsonl in" in proc.stdout
    assert f"skipped {offline}: " in proc.stdout and "no 'episode/return' rows yet" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == (
        f"wrote {out}: CartPole-v1 (1 run), Pong-v5 (1 run)")
    proc = subprocess.run([sys.executable, "-m", "dreamer_fast.plot", str(tmp_path / "a1"),
                           "--key", "eval/return"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "has no 'eval/return' rows yet" in proc.stdout
    assert proc.stderr.strip() == ("error: no run folder among the 1 given has 'eval/return' "
                                   "rows (skipped above); nothing to plot")


TRACKED = ["--env", "image_envs:BigImage-v0", "--model", "debug", "--steps", "300",
           "--num-envs", "2", "--train-ratio", "8", "--log-every", "1", "--report-every", "1",
           "--agent.batch-size", "2", "--agent.batch-length", "8", "--replay.capacity", "1000",
           "--name", "tracked"]


def test_track_and_periodic_eval_log_scalars_and_videos(tmp_path):
    """--track: the same scalars and videos to W&B; --eval-every: eval/* during training."""
    log = tmp_path / "wandb.jsonl"
    env = dict(os.environ, FAKE_WANDB_LOG=str(log),
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests", "fake_wandb"),
                                           os.path.join(ROOT, "tests")]))
    out = subprocess.run([sys.executable, "run.py", *TRACKED, "--track", "--wandb-project",
                          "proj", "--eval-every", "2", "--eval-episodes", "2",
                          "--logdir", str(tmp_path / "run")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = [json.loads(line) for line in open(log)]
    init = calls[0]
    assert init["call"] == "init" and init["project"] == "proj" and init["name"] == "tracked"
    assert init["config_env"] == "image_envs:BigImage-v0" and init["id"] and init["resume"] == "allow"
    logged = {k for c in calls if c["call"] == "log" for k in c["values"]}
    assert {"episode/return", "loss/rec/image", "throughput/steps_per_s"} <= logged, logged
    videos = [c["values"]["openloop_video/image"] for c in calls
              if c["call"] == "log" and "openloop_video/image" in c["values"]]
    assert videos and videos[0].startswith("Video(") and videos[0].endswith(".mp4, mp4)")
    assert calls[-1]["call"] == "finish"
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in rows if "eval/return" in r]
    assert evals and all(r["eval/episodes"] == 2 and r["eval/length"] > 0 for r in evals)
    assert "eval/episode" in logged  # the eval video, to W&B
    ea = tb_tags(tmp_path / "run")
    assert "eval/return" in ea.Tags()["scalars"] and "eval/episode" in ea.Tags()["images"]


def test_track_without_wandb_is_one_line_before_anything_is_built(tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    start = time.time()
    code, out = cli(*TRACKED, "--track", "--logdir", str(tmp_path / "run"))
    assert code != 0 and "Traceback" not in out and "pip install wandb" in out, out
    assert not (tmp_path / "run").exists() and time.time() - start < 60


def test_ctrl_c_of_a_dm_control_pixels_run_prints_no_egl_noise(tmp_path):
    """dm_control's EGL contexts are freed in the actor thread that rendered with them (freed
    from the main thread they printed ~30 lines of EGL_BAD_ACCESS / 'Exception ignored')."""
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    proc = subprocess.Popen([sys.executable, "run.py", "--env", "CartpoleBalance-v1",
                             "--env-opts.pixels", "--model", "debug", "--num-envs", "2",
                             "--env-opts.image-size", "32", "--replay.capacity", "2000",
                             "--agent.batch-length", "8", "--agent.batch-size", "2",
                             "--log-every", "1", "--logdir", str(tmp_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = read_until(proc, r"step [\d,]+/.* [1-9][\d.]* updates/s")
    proc.send_signal(signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "SIGINT: stopping and saving" in out, out
    assert "EGL" not in out and "Exception ignored" not in out, out


def test_help_is_true():
    """--help names the preset and model choices, cites nothing outside the repository, and
    its replay shares are the code's."""
    from dreamer_fast.run.resolve import REPLAY_RAM_SHARE

    code, out = cli("--help", timeout=120)
    assert code == 0
    text = re.sub(r"[\s│]+", " ", out)
    assert "atari100k,dmc_proprio,dmc_vision,crafter,control," in text.replace(" ", "")
    assert "size300k,size1m,size12m" in text.replace(" ", "")
    for foreign in ("SPEC", "DESIGN", "STYLE", "issue "):
        assert foreign not in text, foreign
    gpu, cpu = (f"{round(REPLAY_RAM_SHARE[k] * 100)}%" for k in (True, False))
    assert f"{gpu} (GPU) or {cpu} (CPU)" in text
    assert "(Atari);" not in text and "in every suite" in text
    # Which preset's defaults it shows, and how to see another env's.
    assert ("Defaults shown: the atari preset's, model size1m, for --env Pong-v5 (the default "
            "env)") in text or ("Defaults shown: the atari preset's, model size200m" in text)
    code, out = cli("--env", "CartPole-v1", "--help", timeout=120)
    text = re.sub(r"[\s│]+", " ", out)
    assert "Defaults shown: the control preset's, model size300k, for --env CartPole-v1." in text
    assert re.search(r"--agent\.optim\.lr FLOAT Learning rate after warmup\. \(default: "
                     r"0\.0003\)", text), text


def test_eval_imports_a_checkpoints_env_module_only_when_named(run_dir, tmp_path):
    """A checkpoint from someone else names `module:Id`: the eval refuses in one line, without
    importing the module (its side effect does not happen), until the user repeats the id
    (--env) or passes --trust-env-module."""
    mods = tmp_path / "mods"
    mods.mkdir()
    marker = tmp_path / "imported"
    (mods / "evil_env.py").write_text(
        f"import gymnasium, pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "gymnasium.register('Evil-v0', entry_point='gymnasium.envs.classic_control:CartPoleEnv',"
        " max_episode_steps=20)\n")
    file = run_dir / "checkpoint.pt"
    ckpt = torch.load(file, weights_only=True)
    config = json.loads(ckpt["config"])
    config["env"] = "evil_env:Evil-v0"
    ckpt["config"] = json.dumps(config)
    torch.save(ckpt, file)
    env = dict(os.environ, PYTHONPATH=str(mods))

    def evaluate(*flags):
        proc = subprocess.run([sys.executable, "run.py", "--eval", "--logdir", str(run_dir),
                               "--episodes", "1", "--videos", "0", *flags], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
        return proc.returncode, proc.stdout + proc.stderr
    code, out = evaluate()
    assert code == 1 and out.strip() == (
        "error: the checkpoint's env 'evil_env:Evil-v0' imports module 'evil_env', which runs "
        "its code; to allow it, pass --env evil_env:Evil-v0 (or --trust-env-module)"), out
    assert not marker.exists()
    code, out = evaluate("--env", "Other-v0")
    assert code == 1 and "pass --env evil_env:Evil-v0 or leave it out" in out and not marker.exists()
    for flags in (["--env", "evil_env:Evil-v0"], ["--trust-env-module"]):
        marker.unlink(missing_ok=True)
        code, out = evaluate(*flags)
        assert code == 0 and "eval episode 1/1" in out and marker.exists(), out
