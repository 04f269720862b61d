"""EnvPool adapters: Atari (`Pong-v5`) and DMC proprio (`WalkerWalk-v1`), async send/recv.

EnvPool's gymnasium interface reports a time limit as truncated=True, terminated=False, with
`info["elapsed_step"]` equal to the limit; the next send to that env is ignored and returns the
reset observation with elapsed_step 0 and reward 0. `max_episode_steps` counts agent steps
(after frame skip) for both families.
"""

from __future__ import annotations

import math

import numpy as np

from dreamer_fast.config import EnvConfig
from dreamer_fast.envs.base import VecEnv, finish_step
from dreamer_fast.envs.spaces import ActConverter, ObsConverter

DMC_EPISODE = 1000
"""Env (physics control) steps per DMC episode."""


def atari_kwargs(opts: EnvConfig) -> dict:
    """EnvPool Atari options from the env config."""
    kwargs = dict(
        frame_skip=opts.repeat, repeat_action_probability=opts.sticky, noop_max=opts.noops,
        episodic_life=False, reward_clip=False, use_fire_reset=False,
        full_action_space=opts.full_action_space, img_height=opts.image_size,
        img_width=opts.image_size, gray_scale=opts.gray, stack_num=1)
    if opts.time_limit:  # 0 keeps EnvPool's 27000 agent steps
        kwargs["max_episode_steps"] = opts.time_limit
    return kwargs


def dmc_episode_steps(opts: EnvConfig) -> int:
    """Agent steps per DMC episode: time_limit, else 1000 env steps over the action repeat."""
    return opts.time_limit or math.ceil(DMC_EPISODE / opts.repeat)


def dmc_kwargs(opts: EnvConfig) -> dict:
    """EnvPool DMC options; EnvPool counts max_episode_steps after frame skip."""
    return dict(frame_skip=opts.repeat, max_episode_steps=dmc_episode_steps(opts))


class EnvPoolEnv(VecEnv):
    """An EnvPool pool in async mode: recv returns the first `batch_size` envs that finish."""

    def __init__(self, env_id: str, num_envs: int, batch_size: int, seed: int, **kwargs):
        import envpool

        if not 0 < batch_size <= num_envs:
            raise ValueError(f"env_opts.batch_size={batch_size} must be in [1, num_envs="
                             f"{num_envs}] (0 = num_envs)")
        self.env_id = env_id
        self.num_envs = num_envs
        self.batch_size = batch_size
        self._env = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs,
                                 batch_size=batch_size, seed=seed, **kwargs)
        # EnvPool images are already (C, H, W).
        self._obs = ObsConverter(self._env.observation_space, env_id, channels_last=False)
        self._act = ActConverter(self._env.action_space, env_id)
        self.obs_space = self._obs.obs_space
        self.act_space = self._act.act_space

    def start(self) -> None:
        self._env.async_reset()

    def recv(self) -> dict[str, np.ndarray]:
        obs, reward, terminated, truncated, info = self._env.recv()
        is_first = info["elapsed_step"] == 0
        return finish_step(self._obs(obs), reward, terminated, truncated, is_first,
                           info["env_id"])

    def send(self, action: np.ndarray, env_id: np.ndarray) -> None:
        self._env.send(self._act(action), np.asarray(env_id, np.int32))

    def close(self) -> None:
        self._env.close()
