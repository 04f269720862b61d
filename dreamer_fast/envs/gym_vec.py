"""Any registered Gymnasium id through `gymnasium.make_vec(..., vectorization_mode="sync")`.

Gymnasium 1.x next-step autoreset: the step after terminated/truncated ignores its action and
returns the reset observation with reward 0 and both flags False, so `is_first` is tracked here
as "the previous step of this env was last".

Observations go through `spaces.ObsConverter` (images resized to `opts.image_size`, keys
filtered by `opts.obs_keys`); `opts.render_image` adds each env's `render()` frame as `image`.
"""

from __future__ import annotations

import numpy as np

from dreamer_fast.config import EnvConfig
from dreamer_fast.envs.base import SyncVecEnv, headless_rendering, scatter
from dreamer_fast.envs.spaces import ActConverter, ObsConverter


class GymVecEnv(SyncVecEnv):
    """A SyncVectorEnv of `num_envs` copies; every recv returns all envs in env_id order."""

    def __init__(self, env_id: str, num_envs: int, opts: EnvConfig, seed: int = 0):
        import gymnasium
        from gymnasium.vector import AutoresetMode

        kwargs = {"max_episode_steps": opts.time_limit} if opts.time_limit else {}
        if opts.render_image:
            kwargs["render_mode"] = "rgb_array"
            headless_rendering()
        self.env_id = env_id
        self.num_envs = self.batch_size = num_envs
        self._env = gymnasium.make_vec(
            env_id, num_envs=num_envs, vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP}, **kwargs)
        self._seed = seed
        self._render = opts.render_image
        space = self._env.single_observation_space
        if self._render:
            space = self._with_frame(space, env_id)
        self._obs = ObsConverter(space, env_id, channels_last=None, image_size=opts.image_size,
                                 keys=opts.obs_keys)
        self.notes = self._obs.notes
        self._act = ActConverter(self._env.single_action_space, env_id)
        self.obs_space = self._obs.obs_space
        self.act_space = self._act.act_space
        self._last = np.zeros(num_envs, bool)
        self._step: dict[str, np.ndarray] | None = None

    def _with_frame(self, space, env_id: str):
        """The observation space plus `image`, the shape of one rendered frame."""
        from gymnasium import spaces

        self._env.reset(seed=self._seed)
        frame = np.asarray(self._env.render()[0])
        if frame.dtype != np.uint8 or frame.ndim != 3:
            raise ValueError(f"env {env_id!r}: render() returned {frame.dtype} {frame.shape}; "
                             "--env-opts.render-image needs uint8 (H, W, C) rgb_array frames")
        entries = dict(space.spaces) if isinstance(space, spaces.Dict) else {"vector": space}
        if "image" in entries:
            raise ValueError(f"env {env_id!r} already has an observation key 'image'; "
                             "--env-opts.render-image would replace it")
        entries["image"] = spaces.Box(0, 255, frame.shape, np.uint8)
        return spaces.Dict(entries)

    def _observe(self, obs):
        if not self._render:
            return obs
        obs = dict(obs) if isinstance(obs, dict) else {"vector": obs}
        obs["image"] = np.stack([np.asarray(f) for f in self._env.render()])
        return obs

    def start(self) -> None:
        obs, _ = self._env.reset(seed=self._seed)
        n = self.num_envs
        self._finish(obs, np.zeros(n), np.zeros(n, bool), np.zeros(n, bool), np.ones(n, bool))

    def _finish(self, obs, reward, terminated, truncated, is_first) -> None:
        self._publish(self._obs(self._observe(obs)), reward, terminated, truncated, is_first)

    def send(self, action: np.ndarray, env_id: np.ndarray) -> None:
        action = self._act(scatter(action, env_id, self.num_envs))
        is_first = self._last.copy()
        obs, reward, terminated, truncated, _ = self._env.step(action)
        self._finish(obs, reward, terminated, truncated, is_first)

    def close(self) -> None:
        self._env.close()
