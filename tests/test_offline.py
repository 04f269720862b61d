"""Offline training (dreamer_fast/data/datasets.py, run/offline.py, export.py): the Minari
episode -> step mapping on datasets made with Minari's DataCollector (discrete and
continuous actions, Dict observations with an image), a replay folder written as a Minari
dataset and read back unchanged, and run.py --offline end to end (train, periodic eval,
eval command, resume, Ctrl-C, one-line errors)."""

import json
import os
import signal
import sys

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces

from dreamer_fast.checks import ConfigError
from dreamer_fast.data import datasets
from dreamer_fast.data import store as S
from dreamer_fast.data.ring import Ring
from dreamer_fast.envs.spaces import ObsConverter
from procs import ROOT, load, run, start, wait_for

minari = pytest.importorskip("minari")
pytest.importorskip("jax")  # Minari's DataCollector needs it (minari[create])
from minari import DataCollector  # noqa: E402



class Camera(gymnasium.Env):
    """Dict observations (a 20x24 RGB frame whose pixels are t, a 2-vector [t, -t]), a Box
    action in [-2, 2]^2 (bounds to map), reward = t; terminates at t = 6 on even resets,
    else the time limit (9) truncates."""

    observation_space = spaces.Dict({"image": spaces.Box(0, 255, (20, 24, 3), np.uint8),
                                     "pos": spaces.Box(-100, 100, (2,), np.float32)})
    action_space = spaces.Box(-2.0, 2.0, (2,), np.float32)
    resets = 0

    def obs(self):
        return {"image": np.full((20, 24, 3), self.t, np.uint8),
                "pos": np.array([self.t, -self.t], np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, Camera.resets = 0, Camera.resets + 1
        self.ends = Camera.resets % 2 == 0
        return self.obs(), {}

    def step(self, action):
        self.t += 1
        return self.obs(), float(self.t), self.ends and self.t == 6, False, {}


gymnasium.register("OfflineCamera-v0", entry_point="test_offline:Camera", max_episode_steps=9)


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def collect(env_id, dataset_id, episodes, policy=None, seed=0):
    """A Minari dataset of `episodes` episodes of env_id (random actions by default)."""
    env = DataCollector(gymnasium.make(env_id))
    env.action_space.seed(seed)
    env.reset(seed=seed)
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done = False
        while not done:
            action = env.action_space.sample() if policy is None else policy(obs)
            obs, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
    return env.create_dataset(dataset_id, algorithm_name="random", author="tests",
                              author_email="tests@example.com", description="test data")


def converter(env_id, image_size=64):
    return lambda space: ObsConverter(space, env_id, None, image_size)


def test_minari_episodes_map_to_steps_dict_image_and_box_actions(minari_root):
    ds = collect("OfflineCamera-v0", "test/camera-v0", 4)
    eps = list(ds.iterate_episodes())
    conv = converter("OfflineCamera-v0", 16)(ds.observation_space)
    _, discrete, act = datasets._minari_action(ds.action_space)
    assert not discrete
    for ep in eps:
        steps = datasets.minari_steps(ep, conv, act, 2)
        T = len(ep.rewards)
        assert T in (6, 9) and len(steps["reward"]) == T + 1
        # step i: obs o_i (t = i), reward r_{i-1} (= i; 0 at the start), action a_i in [-1, 1]
        assert steps["image"].shape == (T + 1, 3, 16, 16)  # 20x24 resized by area, CHW
        assert (steps["image"][:, 0, 0, 0] == np.arange(T + 1)).all()
        np.testing.assert_array_equal(steps["pos"][:, 0], np.arange(T + 1))
        np.testing.assert_array_equal(steps["reward"], np.arange(T + 1))
        np.testing.assert_allclose(steps["action"][:T], np.asarray(ep.actions) / 2, atol=1e-6)
        assert (steps["action"][T] == 0).all()  # the is_last step's action is never executed
        assert steps["is_first"].tolist() == [True] + [False] * T
        assert steps["is_last"].tolist() == [False] * T + [True]
        terminal = bool(ep.terminations[-1])
        assert terminal == (T == 6)  # terminated on even resets, truncated at 9 otherwise
        assert steps["is_terminal"].tolist() == [False] * T + [terminal]


def test_minari_discrete_actions_are_one_hots_and_env_mismatch_is_one_line(minari_root):
    collect("CartPole-v1", "test/cartpole-v0", 3)
    spec = {"vector": ((4,), torch.float32), "action": ((2,), torch.float32),
            "reward": ((), torch.float32), "is_first": ((), torch.bool),
            "is_last": ((), torch.bool), "is_terminal": ((), torch.bool),
            "deter": ((8,), torch.bfloat16), "stoch": ((2,), torch.int16)}
    data = datasets.load("test/cartpole-v0", spec, converter("CartPole-v1"), True)
    ds = minari.load_dataset("test/cartpole-v0")
    assert data.kind == "minari" and data.episodes == 3 and len(data.streams) == 1
    assert data.steps == ds.total_steps + ds.total_episodes
    steps, eps = data.streams[0], list(ds.iterate_episodes())
    starts = np.flatnonzero(steps["is_first"])
    for s, ep in zip(starts, eps):
        T = len(ep.rewards)
        np.testing.assert_array_equal(steps["action"][s:s + T].argmax(-1), ep.actions)
        assert (steps["action"][s:s + T].sum(-1) == 1).all()
        np.testing.assert_array_equal(steps["vector"][s:s + T + 1], ep.observations)
    with pytest.raises(ConfigError, match="has discrete actions.*the env.s are continuous"):
        datasets.load("test/cartpole-v0", spec, converter("CartPole-v1"), False)
    other = {**spec, "vector": ((3,), torch.float32)}  # Pendulum's observation
    with pytest.raises(ConfigError, match=r"key 'vector' is float32 \(4,\), the env gives "
                       r"float32 \(3,\)"):
        datasets.load("test/cartpole-v0", other, converter("CartPole-v1"), True)
    with pytest.raises(ConfigError, match="neither a replay folder.*nor a local Minari"):
        datasets.load("test/nothing-v0", spec, converter("CartPole-v1"), True)


SPEC = {"image": ((3, 8, 8), torch.uint8), "pos": ((3,), torch.float32),
        "room": ((1, 5), torch.uint8), "action": ((3,), torch.float32),
        "reward": ((), torch.float32), "is_first": ((), torch.bool), "is_last": ((), torch.bool),
        "is_terminal": ((), torch.bool), "deter": ((4,), torch.bfloat16),
        "stoch": ((2,), torch.int16)}


def replay_folder(tmp_path, steps=150, streams=2):
    """A replay folder as a run writes it (chunks + a save point), episodes of 7..19 steps
    (even episodes terminal) starting mid-episode on stream 1; returns (path, streams)."""
    ring = Ring(SPEC, streams, streams * 400, 17)
    store = S.ChunkStore(str(tmp_path / "run" / "replay"), ring, "r1")
    store.create()
    rng = np.random.default_rng(0)
    t = np.array([0, 5])[:streams]  # step within the episode
    ep = np.zeros(streams, int)
    length = [7 + 3 * (k % 5) for k in range(100)]
    for i in range(steps):
        first = t == 0
        last = np.array([t[j] == length[ep[j]] - 1 for j in range(streams)])
        a = np.eye(3, dtype=np.float32)[rng.integers(0, 3, streams)] * ~last[:, None]
        ring.add({"image": rng.integers(0, 255, (streams, 3, 8, 8), dtype=np.uint8),
                  "pos": rng.normal(size=(streams, 3)).astype(np.float32),
                  "room": np.eye(5, dtype=np.uint8)[rng.integers(0, 5, (streams, 1))],
                  "action": a, "reward": np.where(first, 0, rng.normal(size=streams)),
                  "is_first": first, "is_last": last, "is_terminal": last & (ep % 2 == 0),
                  "deter": torch.ones(streams, 4, dtype=torch.bfloat16),
                  "stoch": torch.ones(streams, 2, dtype=torch.int16)}, np.arange(streams))
        t = np.where(last, 0, t + 1)
        ep = ep + last
        if i % 32 == 0:
            store.write_ready()
    store.write_point(store.snapshot(), 1, {})
    return str(tmp_path / "run"), [S.load_stream(store.path, j) for j in range(streams)]


def test_replay_folder_reads_as_a_dataset_and_round_trips_through_minari(tmp_path, minari_root):
    path, original = replay_folder(tmp_path)
    spec_data = datasets.load(path, SPEC)
    assert spec_data.kind == "replay" and len(spec_data.streams) == 2
    for got, want in zip(spec_data.streams, original):
        assert set(got) == set(SPEC) - {"deter", "stoch"}  # the collecting model's latents
        for k in got:
            np.testing.assert_array_equal(got[k], want[k])

    dataset = datasets.export_minari(datasets.replay_folders(path), "test/export-v0")
    assert isinstance(dataset.observation_space, spaces.Dict)
    assert dataset.observation_space["image"].shape == (8, 8, 3)  # Gymnasium layout
    assert dataset.observation_space["room"] == spaces.Discrete(5)
    assert dataset.action_space == spaces.Discrete(3)
    back = datasets.load("test/export-v0", SPEC, converter("x", None), True)
    # Every complete episode comes back step for step; the stream-1 episode that had
    # started before the data did is left out, the last ones (cut off) end truncated.
    want = []
    for steps in original:
        for s, e in datasets.episodes_of(steps):
            want.append({k: v[s:e + 1] for k, v in steps.items()})
    got = []
    for steps in back.streams:
        for s, e in datasets.episodes_of(steps):
            got.append({k: v[s:e + 1] for k, v in steps.items()})
    assert len(got) == len(want) == dataset.total_episodes
    key = lambda ep: ep["pos"][0].tobytes()  # packing reorders episodes over streams
    for g, w in zip(sorted(got, key=key), sorted(want, key=key)):
        n = len(w["reward"])
        assert len(g["reward"]) == n
        for k in ("image", "pos", "room", "reward", "is_first", "is_terminal"):
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
        np.testing.assert_array_equal(g["action"][:-1], w["action"][:-1])
        assert g["is_last"][-1] and not g["is_last"][:-1].any()
    assert original[1]["is_first"][0] == 0  # stream 1 did start mid-episode
    with pytest.raises(ValueError, match="already exists"):
        datasets.export_minari(datasets.replay_folders(path), "test/export-v0")


OFFLINE = ["--env", "CartPole-v1", "--preset", "debug", "--log-every", "1", "--save-every", "2",
           "--report-every", "2"]


def test_offline_run_trains_evaluates_resumes_and_stops(tmp_path, minari_root):
    collect("CartPole-v1", "test/cartpole-v1", 40)
    logdir = tmp_path / "offline"
    code, out = run(["--offline", "test/cartpole-v1", *OFFLINE, "--updates", "12",
                     "--eval-every", "1", "--eval-episodes", "2"], logdir)
    assert code == 0, out
    assert "offline from minari dataset test/cartpole-v1" in out and "12 updates of 4x16" in out
    ckpt = load(logdir)
    assert ckpt["counters"]["updates"] == 12 and ckpt["counters"]["offline"] == 1
    assert ckpt["counters"]["steps"] == 0  # no env was stepped for training
    rows = [json.loads(line) for line in open(logdir / "metrics.jsonl")]
    keys = set().union(*rows)
    assert {"loss/dyn", "loss/policy", "throughput/updates_per_s", "openloop/vector"} <= keys
    assert "eval/return" in keys, out  # evaluation on envs of its own...
    assert "final eval: return" in out, out  # ...always of the final weights

    code, out = run(["--eval", "--episodes", "2"], logdir, timeout=120)
    assert code == 0 and "12 offline updates" in out, out
    assert json.load(open(logdir / "eval" / "returns.json"))["episodes"] == 2

    # The same command with more updates resumes; Ctrl-C then saves and exits 0.
    proc = start(["--offline", "test/cartpole-v1", *OFFLINE, "--updates", "100000"], logdir)
    wait_for(lambda: load(logdir)["counters"]["updates"] > 12, proc, 150)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "resumed from" in out and "12 offline updates" in out and "SIGINT" in out, out
    assert 12 < load(logdir)["counters"]["updates"] < 100000

    # An offline-trained agent continues online with an empty replay.
    code, out = run([*OFFLINE, "--steps", "200", "--replay.resume-empty"], logdir)
    assert code == 0 and "resuming with an empty replay" in out, out
    assert load(logdir)["counters"]["steps"] >= 200


def test_offline_one_line_errors(tmp_path, minari_root, capsys):
    """Bad sources and envs are one `error:` line each, before anything is built (in-process:
    run.py's command line exits with the message)."""
    from dreamer_fast.cli import run_py

    collect("CartPole-v1", "test/cartpole-v2", 2)
    logdir = ["--logdir", str(tmp_path / "err")]
    cases = [
        (["--offline", "test/cartpole-v2", "--env", "Pendulum-v1", "--preset", "debug"],
         "has discrete actions (Discrete(2)); the env's are continuous"),
        (["--offline", str(tmp_path / "missing"), "--env", "CartPole-v1", "--preset", "debug"],
         "is neither a replay folder of this project"),
        (["--offline", "test/cartpole-v2", "--env", "CartPole-v1", "--preset", "debug",
          "--agent.batch-length", "64"], "fewer than one training window"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            run_py([*args, *logdir])
        text = str(exit_.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not os.path.exists(tmp_path / "err" / "checkpoint.pt")
    # A bad flag value is tyro's error box (exit 2), checked before anything is built.
    with pytest.raises(SystemExit) as exit_:
        run_py(["--env", "CartPole-v1", "--preset", "debug", "--updates", "5", *logdir])
    assert exit_.value.code == 2
    out = capsys.readouterr()
    printed = " ".join((out.out + out.err).split())
    assert "updates=5; allowed: 0 without" in printed, printed


def test_packed_seeds_train_offline_evaluate_pooled_and_resume(tmp_path, minari_root):
    """--offline with --seeds 2: one packed learner on one dataset, each seed's folder an
    offline run of its own, the final evals pooled, and the packed run resumes."""
    collect("CartPole-v1", "test/cartpole-v1", 40)
    logdir = tmp_path / "packed"
    code, out = run(["--offline", "test/cartpole-v1", *OFFLINE, "--seeds", "2", "--updates",
                     "6", "--eval-every", "1", "--eval-episodes", "2"], logdir)
    assert code == 0, out
    assert "2 seeds packed (--seed 0..1" in out and "final eval pooled: 2/2 seeds: IQM" in out
    top = load(logdir)
    assert top["packed"] == 2 and top["counters"]["offline"] == 1
    for i in range(2):
        own = load(logdir / f"seed{i}")
        assert own["counters"]["updates"] == 6 and json.loads(own["config"])["seed"] == i
        rows = [json.loads(line) for line in open(logdir / f"seed{i}" / "metrics.jsonl")]
        assert {"loss/dyn", "eval/return"} <= set().union(*rows)
    pooled = set().union(*(json.loads(line) for line in open(logdir / "metrics.jsonl")))
    assert "pooled/eval_return_iqm" in pooled
    code, out = run(["--offline", "test/cartpole-v1", *OFFLINE, "--seeds", "2", "--updates",
                     "9"], logdir)
    assert code == 0 and "6 offline updates each" in out, out
    assert load(logdir)["counters"]["updates"] == 9


def test_a_packed_runs_folder_is_every_seeds_replay(tmp_path):
    for i in range(2):
        (tmp_path / f"seed{i}" / "replay").mkdir(parents=True)
        (tmp_path / f"seed{i}" / "replay" / "manifest.json").write_text("{}")
    assert datasets.replay_folders(str(tmp_path)) == [
        str(tmp_path / "seed0" / "replay"), str(tmp_path / "seed1" / "replay")]
