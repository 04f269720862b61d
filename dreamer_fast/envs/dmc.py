"""DMC from pixels through dm_control (EnvPool's DMC `from_pixels` needs a GPU renderer).

Envs are stepped one after the other in the calling thread, rendering `image_size`^2 RGB
(about 20 ms per 64x64 frame with software EGL). dm_control is imported only here, on first
use, with MUJOCO_GL defaulting to egl.
"""

from __future__ import annotations

import os

import numpy as np

from dreamer_fast.config import EnvConfig
from dreamer_fast.envs.base import ActSpace, BoxAction, SyncVecEnv, scatter
from dreamer_fast.envs.pool import dmc_episode_steps


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def dmc_tasks() -> dict[str, tuple[str, str]]:
    """EnvPool-style id -> (domain, task) for dm_control's suite, e.g. BallInCupCatch-v1."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from dm_control import suite

    return {f"{_camel(domain)}{_camel(task)}-v1": (domain, task)
            for domain, task in suite.ALL_TASKS}


def default_camera(domain: str) -> int:
    """Camera of the official DMC config: 0; quadruped 2; rodent 4."""
    return {"quadruped": 2, "rodent": 4}.get(domain, 0)


class DMCPixels(SyncVecEnv):
    """dm_control suite tasks observed as `image` (N, 3, H, W) uint8 only.

    Each send steps every env `opts.repeat` times (rewards summed, stopping at an episode end);
    episodes are truncated after `dmc_episode_steps(opts)` agent steps (1000 env steps by
    default); a dm_control step with discount 0 is a termination.
    """

    def __init__(self, env_id: str, num_envs: int, opts: EnvConfig, seed: int = 0):
        tasks = dmc_tasks()
        if env_id not in tasks:
            raise ValueError(f"unknown dm_control id {env_id!r}; known: {', '.join(tasks)}")
        from dm_control import suite

        domain, task = tasks[env_id]
        self.env_id = env_id
        self.num_envs = self.batch_size = num_envs
        self._envs = [suite.load(domain, task, task_kwargs={"random": seed + i,
                                                            "time_limit": float("inf")})
                      for i in range(num_envs)]
        spec = self._envs[0].action_spec()
        self._act = BoxAction(spec.minimum, spec.maximum, np.float64)
        self.act_space = ActSpace(discrete=False, size=self._act.size)
        self._size = opts.image_size
        self._camera = default_camera(domain) if opts.camera < 0 else opts.camera
        self._repeat = opts.repeat
        self._limit = dmc_episode_steps(opts)
        self.obs_space = {"image": ((3, self._size, self._size), np.dtype(np.uint8))}
        self._elapsed = np.zeros(num_envs, np.int64)
        self._last = np.ones(num_envs, bool)
        self._step: dict[str, np.ndarray] | None = None

    def _render(self, env) -> np.ndarray:
        return env.physics.render(self._size, self._size, camera_id=self._camera)

    def start(self) -> None:
        self._last[:] = True
        self._advance(np.zeros((self.num_envs, self.act_space.size)))

    def _advance(self, action: np.ndarray) -> None:
        n = self.num_envs
        images = np.empty((n, self._size, self._size, 3), np.uint8)
        reward = np.zeros(n, np.float32)
        terminated = np.zeros(n, bool)
        ended = np.zeros(n, bool)  # dm_control ended the episode itself
        is_first = self._last.copy()
        action = self._act(action)
        for i, env in enumerate(self._envs):
            if is_first[i]:  # the action after an episode end is ignored: reset instead
                env.reset()
                self._elapsed[i] = 0
            else:
                for _ in range(self._repeat):
                    ts = env.step(action[i])
                    reward[i] += ts.reward or 0.0
                    if ts.last():
                        ended[i], terminated[i] = True, ts.discount == 0
                        break
                self._elapsed[i] += 1
            images[i] = self._render(env)
        truncated = (ended | (self._elapsed >= self._limit)) & ~terminated
        obs = {"image": np.ascontiguousarray(images.transpose(0, 3, 1, 2))}
        self._publish(obs, reward, terminated, truncated, is_first)

    def send(self, action: np.ndarray, env_id: np.ndarray) -> None:
        self._advance(scatter(action, env_id, self.num_envs))

    close_in_stepping_thread = True
    """dm_control's EGL contexts are current in the thread that rendered: the actor closes
    this env there (freeing them from another thread prints EGL_BAD_ACCESS noise)."""

    def close(self) -> None:
        """Free every env's physics and rendering contexts (again: a no-op)."""
        for env in self._envs:
            env.close()
        self._envs = []
