"""Crafter (Hafner 2021, PyPI `crafter`) behind the VecEnv contract, as the official
embodied/envs/crafter.py builds it: `crafter.Env(size, reward=True, seed)`, 64x64 RGB `image`,
17 discrete actions, episodes of 10,000 steps unless the agent dies (a death is terminal:
the env's discount is 0; the length limit is a truncation).

Each step also carries `log/achievement_<name>` (int32 (N,), the episode's count of that
achievement so far, 0 on is_first steps) for the 22 achievements: the actor keeps them out of
the replay and logs per-episode success rates and the Crafter score from them.
"""

from __future__ import annotations

import numpy as np

from dreamer_fast.config import EnvConfig
from dreamer_fast.envs.base import ActSpace, SyncVecEnv, check_obs_space, scatter
from dreamer_fast.envs.spaces import resize_area

LENGTH = 10_000
"""Crafter's own episode length (steps)."""


def achievements() -> list[str]:
    import crafter

    return list(crafter.constants.achievements)


class CrafterEnv(SyncVecEnv):
    """`num_envs` Crafter worlds (seeds seed, seed+1, ...) stepped in turn; next-step reset."""

    def __init__(self, num_envs: int, opts: EnvConfig, seed: int = 0):
        try:
            import crafter
        except ImportError:
            raise ValueError("env 'crafter' needs the crafter package: pip install crafter "
                             "(or pip install -e '.[crafter]')") from None
        size = opts.image_size
        self.env_id = "crafter"
        self.num_envs = self.batch_size = num_envs
        self._envs = [crafter.Env(size=(size, size), reward=True,
                                  length=opts.time_limit or LENGTH, seed=seed + i)
                      for i in range(num_envs)]
        self.names = achievements()
        self.log_keys = tuple(f"log/achievement_{k}" for k in self.names)
        self.obs_space = check_obs_space({"image": ((3, size, size), np.dtype(np.uint8))},
                                         "crafter")
        self.act_space = ActSpace(discrete=True, size=int(self._envs[0].action_space.n))
        self.notes: list[str] = []
        self._last = np.zeros(num_envs, bool)

    def _frames(self, frames: list[np.ndarray]) -> np.ndarray:
        images = np.stack(frames).transpose(0, 3, 1, 2)
        size = self.obs_space["image"][0][1]
        return images if images.shape[2:] == (size, size) else resize_area(images, size)

    def _finish(self, frames, reward, terminated, truncated, is_first, counts) -> None:
        self._publish({"image": self._frames(frames)}, reward, terminated, truncated, is_first)
        for j, key in enumerate(self.log_keys):
            self._step[key] = counts[:, j]

    def start(self) -> None:
        n = self.num_envs
        self._finish([e.reset() for e in self._envs], np.zeros(n), np.zeros(n, bool),
                     np.zeros(n, bool), np.ones(n, bool),
                     np.zeros((n, len(self.names)), np.int32))

    def send(self, action: np.ndarray, env_id: np.ndarray) -> None:
        action = np.asarray(scatter(action, env_id, self.num_envs), np.int64).reshape(-1)
        n = self.num_envs
        frames, reward = [], np.zeros(n, np.float32)
        terminated, truncated = np.zeros(n, bool), np.zeros(n, bool)
        counts = np.zeros((n, len(self.names)), np.int32)
        is_first = self._last.copy()
        for i, env in enumerate(self._envs):
            if is_first[i]:
                frames.append(env.reset())
                continue
            frame, r, done, info = env.step(int(action[i]))
            frames.append(frame)
            reward[i] = r
            dead = done and info["discount"] == 0
            terminated[i], truncated[i] = dead, done and not dead
            counts[i] = [info["achievements"][k] for k in self.names]
        self._finish(frames, reward, terminated, truncated, is_first, counts)
