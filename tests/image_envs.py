"""A Gymnasium env with image observations, registered on import (used as `image_envs:...`)."""

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


gymnasium.register("TinyImage-v0", entry_point=TinyImage, max_episode_steps=77)
