"""A stand-in for EnvPool's Pong with Atari100k's shapes, for end-to-end runs where EnvPool is
not installed (bench/gpu_session.sh on a machine without it: its wheels are 61 MiB plus
65-92 MB of asset wheels, more than a remote call can carry).

`StandInPong-v0` (registered on import, so run.py takes `--env bench.standin:StandInPong-v0`):
64x64x3 uint8 frames, 6 discrete actions, reward +-1 now and then, episodes of 800 steps. The
frames cycle through 16 precomputed noise images, so a step costs microseconds: an end-to-end
run with it measures the actor-learner pipeline (policy steps, ring, rate limiter, learner)
with an env that is never the bottleneck, an upper bound on what real Pong gives. It goes
through the same Gymnasium adapter as a user's own env. Rows measured with it say so.
"""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces

ID = "StandInPong-v0"
LABEL = "stand-in (bench/standin.py: 64x64x3 noise frames, 6 actions; EnvPool not installed)"


class StandInPong(gymnasium.Env):
    observation_space = spaces.Box(0, 255, (64, 64, 3), np.uint8)
    action_space = spaces.Discrete(6)

    def __init__(self):
        self.frames = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = int(self.np_random.integers(16))
        return self.frames[self.t % 16], {}

    def step(self, action):
        self.t += 1
        reward = float(self.np_random.choice((-1.0, 0.0, 1.0), p=(0.01, 0.98, 0.01)))
        return self.frames[self.t % 16], reward, False, False, {}


if ID not in gymnasium.registry:
    gymnasium.register(ID, entry_point=StandInPong, max_episode_steps=800)
