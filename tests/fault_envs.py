"""Gymnasium envs that misbehave on purpose, registered on import (`fault_envs:...` ids)."""

import gymnasium
import numpy as np
from gymnasium import spaces


class NanReward(gymnasium.Env):
    """4 float observations, 2 actions; the reward turns NaN after 150 steps of an env."""

    observation_space = spaces.Box(-1, 1, (4,), np.float32)
    action_space = spaces.Discrete(2)
    steps = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(4, np.float32), {}

    def step(self, action):
        self.steps += 1
        reward = float("nan") if self.steps > 150 else 1.0
        return self.np_random.uniform(-1, 1, 4).astype(np.float32), reward, False, False, {}


gymnasium.register("NanReward-v0", entry_point=NanReward, max_episode_steps=50)
