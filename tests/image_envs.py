"""Gymnasium envs with image and categorical observations, registered on import (used as
`image_envs:...` ids; tests/ is on sys.path under pytest and for run.py subprocesses)."""

import gymnasium
import numpy as np
from gymnasium import spaces


class TinyImage(gymnasium.Env):
    """48x40 RGB frames of noise, 3 actions, reward 1 per step."""

    observation_space = spaces.Box(0, 255, (48, 40, 3), np.uint8)
    action_space = spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.integers(0, 255, (48, 40, 3), dtype=np.uint8), {}

    def step(self, action):
        return (self.np_random.integers(0, 255, (48, 40, 3), dtype=np.uint8), 1.0, False,
                False, {})


class Frames(gymnasium.Env):
    """Frames of a given shape whose pixel (i, j) is (i + j + t) % 256 at step t (a known
    pattern, so resizing can be checked); 2 actions; reward 1 per step."""

    action_space = spaces.Discrete(2)

    def __init__(self, shape=(288, 512, 3)):
        self.shape = shape
        self.observation_space = spaces.Box(0, 255, shape, np.uint8)
        self.t = 0

    def frame(self):
        i, j = np.indices(self.shape[:2])
        f = ((i + j + self.t) % 256).astype(np.uint8)
        return np.broadcast_to(f[..., None], self.shape).copy() if len(self.shape) == 3 else f

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self.frame(), {}

    def step(self, action):
        self.t += 1
        return self.frame(), 1.0, False, False, {}


class Mixed(gymnasium.Env):
    """Two cameras of different sizes, a vector and categorical observations:
    cam_a 64x64x3, cam_b 32x48 gray, pos (3,) float, room Discrete(5), grid MultiDiscrete
    (3, 3), flags MultiBinary(4). 3 actions; reward = action."""

    observation_space = spaces.Dict({
        "cam_a": spaces.Box(0, 255, (64, 64, 3), np.uint8),
        "cam_b": spaces.Box(0, 255, (32, 48), np.uint8),
        "pos": spaces.Box(-1.0, 1.0, (3,), np.float32),
        "room": spaces.Discrete(5, start=1),
        "grid": spaces.MultiDiscrete([3, 3]),
        "flags": spaces.MultiBinary(4),
    })
    action_space = spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), float(action), False, False, {}


class Rendered(TinyImage):
    """TinyImage whose render() shows another view: 80x96 frames (rgb_array)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def render(self):
        return np.full((80, 96, 3), 200, np.uint8)


gymnasium.register("TinyImage-v0", entry_point=TinyImage, max_episode_steps=77)
gymnasium.register("RenderedImage-v0", entry_point=Rendered, max_episode_steps=20)
gymnasium.register("BigImage-v0", entry_point=Frames, max_episode_steps=40)
gymnasium.register("GrayImage-v0", entry_point=Frames, kwargs={"shape": (84, 84)},
                   max_episode_steps=40)
gymnasium.register("Mixed-v0", entry_point=Mixed, max_episode_steps=30)
