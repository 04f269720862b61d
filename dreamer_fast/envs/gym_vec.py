"""Any registered Gymnasium id through `gymnasium.make_vec(..., vectorization_mode="sync")`.

Gymnasium 1.x next-step autoreset: the step after terminated/truncated ignores its action and
returns the reset observation with reward 0 and both flags False, so `is_first` is tracked here
as "the previous step of this env was last".
"""

from __future__ import annotations

import numpy as np

from dreamer_fast.config import EnvConfig
from dreamer_fast.envs.base import SyncVecEnv, scatter
from dreamer_fast.envs.spaces import ActConverter, ObsConverter


class GymVecEnv(SyncVecEnv):
    """A SyncVectorEnv of `num_envs` copies; every recv returns all envs in env_id order."""

    def __init__(self, env_id: str, num_envs: int, opts: EnvConfig, seed: int = 0):
        import gymnasium
        from gymnasium.vector import AutoresetMode

        kwargs = {"max_episode_steps": opts.time_limit} if opts.time_limit else {}
        self.env_id = env_id
        self.num_envs = self.batch_size = num_envs
        self._env = gymnasium.make_vec(
            env_id, num_envs=num_envs, vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP}, **kwargs)
        self._seed = seed
        self._obs = ObsConverter(self._env.single_observation_space, env_id, channels_last=True)
        self._act = ActConverter(self._env.single_action_space, env_id)
        self.obs_space = self._obs.obs_space
        self.act_space = self._act.act_space
        self._last = np.zeros(num_envs, bool)
        self._step: dict[str, np.ndarray] | None = None

    def start(self) -> None:
        obs, _ = self._env.reset(seed=self._seed)
        n = self.num_envs
        self._finish(obs, np.zeros(n), np.zeros(n, bool), np.zeros(n, bool), np.ones(n, bool))

    def _finish(self, obs, reward, terminated, truncated, is_first) -> None:
        self._publish(self._obs(obs), reward, terminated, truncated, is_first)

    def send(self, action: np.ndarray, env_id: np.ndarray) -> None:
        action = self._act(scatter(action, env_id, self.num_envs))
        is_first = self._last.copy()
        obs, reward, terminated, truncated, _ = self._env.step(action)
        self._finish(obs, reward, terminated, truncated, is_first)

    def close(self) -> None:
        self._env.close()
