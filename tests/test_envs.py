"""Env adapters on real envs: spaces, episode boundaries, truncation vs termination, ignored reset
actions, async batches and the factory's errors (SPEC 1.6, 5.4; DESIGN 3.7)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import gymnasium
import numpy as np
import pytest

from dreamer_fast.config import EnvConfig
from dreamer_fast.envs import ActSpace, make_env, suite_of
from dreamer_fast.envs.base import STEP_KEYS, BoxAction
from dreamer_fast.envs.spaces import resize_area

os.environ.setdefault("MUJOCO_GL", "egl")

ATARI = EnvConfig(repeat=4, image_size=64, gray=False, sticky=0.0, full_action_space=False,
                  noops=30, time_limit=0)
DMC = EnvConfig(repeat=1, image_size=64, sticky=0.0, noops=0, time_limit=0)
GYM = EnvConfig(time_limit=0)


def check_step(env, step: dict, n: int | None = None) -> None:
    """Every key present with the batch size, per-env shape and dtype the env declares."""
    n = env.batch_size if n is None else n
    assert set(step) == set(env.obs_space) | set(STEP_KEYS)
    for key, (shape, dtype) in env.obs_space.items():
        assert step[key].shape == (n, *shape), (key, step[key].shape, shape)
        assert step[key].dtype == dtype, (key, step[key].dtype, dtype)
    assert step["reward"].shape == (n,) and step["reward"].dtype == np.float32
    for key in ("is_first", "is_last", "is_terminal"):
        assert step[key].shape == (n,) and step[key].dtype == bool, key
    assert step["env_id"].shape == (n,) and step["env_id"].dtype == np.int32
    assert not (step["is_terminal"] & ~step["is_last"]).any()


def random_actions(env, n: int, rng: np.random.Generator) -> np.ndarray:
    if env.act_space.discrete:
        return rng.integers(0, env.act_space.size, n).astype(np.int64)
    return rng.uniform(-1, 1, (n, env.act_space.size)).astype(np.float32)


def rollout(env, steps: int, seed: int = 0) -> dict[int, list[dict]]:
    """Run random actions for `steps` recvs; per env id, its list of steps (scalars + obs)."""
    rng = np.random.default_rng(seed)
    per_env: dict[int, list[dict]] = {i: [] for i in range(env.num_envs)}
    env.start()
    for _ in range(steps):
        step = env.recv()
        check_step(env, step)
        for j, i in enumerate(step["env_id"]):
            per_env[int(i)].append({k: v[j] for k, v in step.items()})
        env.send(random_actions(env, len(step["env_id"]), rng), step["env_id"])
    return per_env


def check_boundaries(steps: list[dict]) -> None:
    """One env's stream: starts is_first; is_first exactly after is_last, with reward 0."""
    assert steps[0]["is_first"] and steps[0]["reward"] == 0
    for prev, cur in zip(steps[:-1], steps[1:]):
        assert cur["is_first"] == prev["is_last"], (prev, cur)
        if cur["is_first"]:
            assert cur["reward"] == 0 and not cur["is_last"]


def episode_ends(steps: list[dict]) -> list[tuple[int, bool]]:
    """(index, is_terminal) of every is_last step."""
    return [(t, bool(s["is_terminal"])) for t, s in enumerate(steps) if s["is_last"]]


# ---------------------------------------------------------------------------------------------
# Factory


def test_unknown_id_names_closest_ids():
    with pytest.raises(ValueError, match=r"unknown env id 'Pong-v6'; closest: .*Pong-v5"):
        make_env("Pong-v6", 2, ATARI)
    with pytest.raises(ValueError, match=r"unknown env id 'CartPol-v1'; closest: .*CartPole-v1"):
        make_env("CartPol-v1", 2, GYM)
    with pytest.raises(ValueError, match="WalkerWalk-v1"):
        make_env("WalkerWalkk-v1", 2, DMC)
    with pytest.raises(ValueError, match="BigfishEasy-v0.*does not support"):
        make_env("BigfishEasy-v0", 2, GYM)  # an EnvPool procgen task


def test_an_env_module_that_cannot_be_imported_says_why_and_how(tmp_path, monkeypatch):
    """`module:Id` with the module not on the path names PYTHONPATH; a module whose own
    import fails shows that error (not 'unknown env id ...; closest: none')."""
    with pytest.raises(ValueError, match=r"^env 'no_such_mod:Env-v0': cannot import module "
                       r"'no_such_mod' \(No module named 'no_such_mod'\); run from the folder "
                       r"that holds no_such_mod.py, or add that folder to PYTHONPATH: "
                       r"PYTHONPATH=path/to/folder python run.py --env no_such_mod:Env-v0$"):
        make_env("no_such_mod:Env-v0", 2, GYM)
    (tmp_path / "needs_dep.py").write_text("import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"importing module 'needs_dep' failed: No module named "
                       r"'not_installed_dependency'; install what it needs"):
        make_env("needs_dep:Env-v0", 2, GYM)


def test_suite_dispatch():
    assert suite_of("Pong-v5") == "atari"
    assert suite_of("Breakout-v5") == "atari"
    assert suite_of("WalkerWalk-v1") == "dmc"
    assert suite_of("BallInCupCatch-v1") == "dmc"
    # EnvPool registers CartPole-v1 and Pendulum-v1 too; they go through Gymnasium.
    assert suite_of("CartPole-v1") == "gymnasium"
    assert suite_of("Pendulum-v1") == "gymnasium"


def test_dm_control_imported_only_for_pixels():
    code = ("import sys; import dreamer_fast.envs as e; from dreamer_fast.config import EnvConfig;"
            "assert not {'dm_control', 'envpool', 'gymnasium'} & set(sys.modules);"
            "e.make_env('CartPole-v1', 1, EnvConfig()).close();"
            "e.make_env('WalkerWalk-v1', 1, EnvConfig(repeat=1)).close();"
            "assert 'dm_control' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_box_action_clips_and_rescales():
    act = BoxAction(np.array([-2.0, 0.0, -np.inf]), np.array([2.0, 10.0, np.inf]))
    out = act(np.array([[-1, -1, -1], [1, 1, 1], [0, 0, 0.5], [5, -7, 9]], np.float32))
    np.testing.assert_allclose(out, [[-2, 0, -1], [2, 10, 1], [0, 5, 0.5], [2, 0, 1]])
    assert out.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# EnvPool Atari


def test_atari_spaces_and_time_limit_truncation():
    env = make_env("Pong-v5", 2, replace(ATARI, time_limit=5, sticky=0.25), seed=3)
    assert env.obs_space == {"image": ((3, 64, 64), np.dtype(np.uint8))}
    assert env.act_space == ActSpace(discrete=True, size=6)
    assert (env.num_envs, env.batch_size) == (2, 2)
    per_env = rollout(env, 14)
    env.close()
    for steps in per_env.values():
        check_boundaries(steps)
        # Steps 1..5 are the 5 agent steps of the episode; the limit is a truncation.
        assert episode_ends(steps) == [(5, False), (11, False)]
        assert steps[0]["image"].std() > 0


def test_atari_options_reach_envpool():
    env = make_env("Pong-v5", 1, replace(ATARI, gray=True, image_size=32,
                                          full_action_space=True))
    assert env.obs_space == {"image": ((1, 32, 32), np.dtype(np.uint8))}
    assert env.act_space == ActSpace(discrete=True, size=18)
    rollout(env, 2)
    env.close()


def test_atari_game_over_is_terminal():
    # A random Pong player loses 21-0 in about 380 agent steps at repeat 8.
    env = make_env("Pong-v5", 2, replace(ATARI, repeat=8, image_size=32), seed=0)
    rng = np.random.default_rng(0)
    env.start()
    seen_end = False
    for t in range(1500):
        step = env.recv()
        if seen_end:
            assert step["is_first"][end].all() and (step["reward"][end] == 0).all()
            break
        if step["is_last"].any():
            end = step["is_last"]
            assert step["is_terminal"][end].all(), "game over must be a termination"
            seen_end = True
        if t > 0 and not seen_end:
            assert not step["is_first"].any()
        env.send(random_actions(env, 2, rng), step["env_id"])
    env.close()
    assert seen_end, "no Pong episode ended"


def test_atari_async_batches_cover_all_envs():
    env = make_env("Pong-v5", 4, replace(ATARI, batch_size=2, time_limit=3, image_size=32))
    assert (env.num_envs, env.batch_size) == (4, 2)
    per_env = rollout(env, 24)
    env.close()
    assert all(len(steps) > 1 for steps in per_env.values()), {
        i: len(s) for i, s in per_env.items()}
    for steps in per_env.values():
        check_boundaries(steps)
        ends = episode_ends(steps)
        assert ends and ends[0] == (3, False)


def test_batch_size_out_of_range():
    with pytest.raises(ValueError, match="batch_size"):
        make_env("Pong-v5", 2, replace(ATARI, batch_size=3))


# ---------------------------------------------------------------------------------------------
# EnvPool DMC (proprio)


def test_dmc_proprio_spaces_and_1000_env_step_episodes():
    env = make_env("WalkerWalk-v1", 2, replace(DMC, repeat=2))
    assert env.obs_space == {"orientations": ((14,), np.dtype(np.float32)),
                             "height": ((1,), np.dtype(np.float32)),
                             "velocity": ((9,), np.dtype(np.float32))}
    assert env.act_space == ActSpace(discrete=False, size=6)
    per_env = rollout(env, 503)
    env.close()
    for steps in per_env.values():
        check_boundaries(steps)
        # 1000 env steps at repeat 2 = 500 agent steps, ended by truncation.
        assert episode_ends(steps) == [(500, False)]
        assert any(s["reward"] > 0 for s in steps)


def test_dmc_proprio_async_and_time_limit():
    env = make_env("CheetahRun-v1", 3, replace(DMC, batch_size=1, time_limit=4))
    assert env.batch_size == 1
    per_env = rollout(env, 30)
    env.close()
    for steps in per_env.values():
        assert len(steps) >= 5
        check_boundaries(steps)
        assert episode_ends(steps)[0] == (4, False)


# ---------------------------------------------------------------------------------------------
# Gymnasium


def test_gym_cartpole_termination():
    env = make_env("CartPole-v1", 3, GYM, seed=1)
    assert env.obs_space == {"vector": ((4,), np.dtype(np.float32))}
    assert env.act_space == ActSpace(discrete=True, size=2)
    per_env = rollout(env, 120)
    env.close()
    for steps in per_env.values():
        check_boundaries(steps)
        ends = episode_ends(steps)
        assert ends and all(terminal for _, terminal in ends)  # random play falls over
        assert all(s["reward"] == 1 for s in steps if not s["is_first"])


def test_gym_pendulum_truncation_and_time_limit():
    env = make_env("Pendulum-v1", 2, GYM)
    assert env.obs_space == {"vector": ((3,), np.dtype(np.float32))}
    assert env.act_space == ActSpace(discrete=False, size=1)
    per_env = rollout(env, 203)
    env.close()
    for steps in per_env.values():
        check_boundaries(steps)
        assert episode_ends(steps) == [(200, False)]
    env = make_env("Pendulum-v1", 2, replace(GYM, time_limit=7))
    per_env = rollout(env, 17)
    env.close()
    for steps in per_env.values():
        assert episode_ends(steps) == [(7, False), (15, False)]


def _first_step_after(eid: str, opts: EnvConfig, action) -> np.ndarray:
    env = make_env(eid, 2, opts, seed=5)
    env.start()
    env.send(np.asarray(action, np.float32), env.recv()["env_id"])
    vector = env.recv()["vector"]
    env.close()
    return vector


def test_gym_actions_clipped_rescaled_and_ordered():
    one = _first_step_after("Pendulum-v1", GYM, [[1.0], [-1.0]])
    np.testing.assert_array_equal(one, _first_step_after("Pendulum-v1", GYM, [[5.0], [-3.0]]))
    assert not np.allclose(one, _first_step_after("Pendulum-v1", GYM, [[0.5], [-1.0]]))
    # env_id [1, 0] sends the first row to env 1.
    env = make_env("Pendulum-v1", 2, GYM, seed=5)
    env.start()
    env.recv()
    env.send(np.array([[-1.0], [1.0]], np.float32), np.array([1, 0], np.int32))
    np.testing.assert_array_equal(env.recv()["vector"], one)
    env.close()


class DictEnv(gymnasium.Env):
    """Deterministic Dict-observation env: HWC image, vector, discrete; terminates at step 3."""

    observation_space = gymnasium.spaces.Dict({
        "image": gymnasium.spaces.Box(0, 255, (8, 6, 3), np.uint8),
        "pos": gymnasium.spaces.Box(-1, 1, (2,), np.float64),
        "mode": gymnasium.spaces.Discrete(3)})
    action_space = gymnasium.spaces.Discrete(4)

    def _obs(self):
        h, w, c = np.meshgrid(np.arange(8), np.arange(6), np.arange(3), indexing="ij")
        image = (h * 20 + w * 3 + c + self.t).astype(np.uint8)
        return {"image": image, "pos": np.array([self.t, -self.t], np.float64) / 10,
                "mode": self.t % 3}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), float(action), self.t >= 3, False, {}


gymnasium.register("DreamerFastDictTest-v0", entry_point=DictEnv)


def test_gym_dict_observations():
    env = make_env("DreamerFastDictTest-v0", 2, replace(GYM, image_size=16))
    assert env.obs_space == {"image": ((3, 16, 16), np.dtype(np.uint8)),  # resized (area)
                             "pos": ((2,), np.dtype(np.float32)),
                             "mode": ((1, 3), np.dtype(np.uint8))}  # categorical one-hot
    assert env.notes == ["image 8x6x3 -> 16x16x3"]
    assert env.act_space == ActSpace(discrete=True, size=4)
    env.start()
    steps = [env.recv()]
    for t in range(5):
        env.send(np.array([2, 3]), steps[-1]["env_id"])
        steps.append(env.recv())
        check_step(env, steps[-1])
    env.close()
    image = steps[1]["image"][0]  # t = 1, channels first, 8x6 -> 16x16
    frame = DictEnv()
    frame.t = 1
    raw = frame._obs()["image"]
    assert raw[5, 4, 2] == 5 * 20 + 4 * 3 + 2 + 1
    np.testing.assert_array_equal(image, resize_area(raw.transpose(2, 0, 1)[None], 16)[0])
    np.testing.assert_allclose(steps[1]["pos"][0], [0.1, -0.1], rtol=1e-6)
    np.testing.assert_array_equal(steps[2]["mode"][0], [[0, 0, 1]])
    np.testing.assert_array_equal(steps[1]["reward"], [2, 3])
    flags = [(s["is_first"][0], s["is_last"][0], s["is_terminal"][0]) for s in steps]
    assert flags == [(1, 0, 0), (0, 0, 0), (0, 0, 0), (0, 1, 1), (1, 0, 0), (0, 0, 0)]
    assert steps[4]["reward"][1] == 0 and steps[4]["image"][0, 0, 0, 0] == 0


# ---------------------------------------------------------------------------------------------
# dm_control pixels


@pytest.fixture(scope="module")
def egl():
    try:
        from dm_control import suite

        env = suite.load("cartpole", "balance")
        env.reset()
        env.physics.render(8, 8, camera_id=0)
    except Exception as exc:  # noqa: BLE001 - any renderer failure means no pixels here
        pytest.skip(f"dm_control cannot render with MUJOCO_GL={os.environ['MUJOCO_GL']}: "
                    f"{exc!r}")


def test_dmc_task_map_and_cameras(egl):
    from dreamer_fast.envs.dmc import default_camera, dmc_tasks

    tasks = dmc_tasks()
    assert tasks["WalkerWalk-v1"] == ("walker", "walk")
    assert tasks["CheetahRun-v1"] == ("cheetah", "run")
    assert tasks["BallInCupCatch-v1"] == ("ball_in_cup", "catch")
    assert tasks["HumanoidCMURun-v1"] == ("humanoid_CMU", "run")
    from envpool.registration import registry

    pool_dmc = {k for k, v in registry.specs.items() if v[0] == "envpool.mujoco.dmc"}
    assert set(tasks) == pool_dmc
    assert (default_camera("walker"), default_camera("quadruped"), default_camera("rodent")) == (
        0, 2, 4)


def test_dmc_pixels(egl):
    opts = replace(DMC, pixels=True, image_size=32, repeat=2, time_limit=3)
    env = make_env("WalkerWalk-v1", 2, opts)
    assert env.obs_space == {"image": ((3, 32, 32), np.dtype(np.uint8))}
    assert env.act_space == ActSpace(discrete=False, size=6)
    per_env = rollout(env, 6)
    env.close()
    for steps in per_env.values():
        check_boundaries(steps)
        assert episode_ends(steps) == [(3, False)]
        assert steps[1]["image"].std() > 5 and steps[1]["reward"] > 0
    other = make_env("WalkerWalk-v1", 1, replace(opts, camera=1))
    other.start()
    assert not np.array_equal(other.recv()["image"][0], per_env[0][0]["image"])
    other.close()


# ---------------------------------------------------------------------------------------------
# The action sent on the reset step is never executed (all suites)

RESET_CASES = [
    ("Pong-v5", replace(ATARI, time_limit=2, image_size=32), 2, 3),
    ("WalkerWalk-v1", replace(DMC, time_limit=2), -1.0, 1.0),
    ("CartPole-v1", replace(GYM, time_limit=2), 0, 1),
    ("Pendulum-v1", replace(GYM, time_limit=2), -1.0, 1.0),
    ("WalkerWalk-v1", replace(DMC, time_limit=2, pixels=True, image_size=32), -1.0, 1.0),
]


@pytest.mark.parametrize("eid,opts,low,high", RESET_CASES,
                         ids=["pong", "walker", "cartpole", "pendulum", "walker-pixels"])
def test_reset_action_is_ignored(request, eid, opts, low, high):
    """Two identically seeded pools get identical actions except on the reset step."""
    if opts.pixels:
        request.getfixturevalue("egl")
    a, b = make_env(eid, 2, opts, seed=7), make_env(eid, 2, opts, seed=7)

    def act(env, value):
        shape = (2,) if env.act_space.discrete else (2, env.act_space.size)
        return np.full(shape, value, np.int64 if env.act_space.discrete else np.float32)

    def both(value_a, value_b):
        sa, sb = a.recv(), b.recv()
        a.send(act(a, value_a), sa["env_id"])
        b.send(act(b, value_b), sb["env_id"])
        return sa, sb

    key = next(iter(a.obs_space))
    a.start(), b.start()
    both(low, low)
    both(high, high)
    sa, sb = both(low, high)  # is_last: this action triggers the reset and is ignored
    assert sa["is_last"].all() and not sa["is_terminal"].any()
    sa, sb = both(high, high)
    assert sa["is_first"].all() and (sa["reward"] == 0).all()
    np.testing.assert_array_equal(sa[key], sb[key])
    sa, sb = both(low, high)  # an ordinary step: here the actions do matter
    np.testing.assert_array_equal(sa[key], sb[key])
    sa, sb = a.recv(), b.recv()
    assert not np.array_equal(sa[key], sb[key]), "control: different actions should differ"
    a.close(), b.close()
