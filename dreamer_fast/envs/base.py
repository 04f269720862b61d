"""The vectorised environment contract shared by every adapter.

Every adapter turns its suite into the same batched send/recv loop:

    env.start()
    while True:
        step = env.recv()                        # batch of env.batch_size envs
        action = policy(step)                    # zero where step["is_last"]
        env.send(action, step["env_id"])

A step dict holds every observation key (uint8 images (N, C, H, W) under `image`, float32
vectors (N, dim)), plus `reward` float32 (N,), `is_first`, `is_last`, `is_terminal` bool (N,) and
`env_id` int32 (N,).
"""

from __future__ import annotations

import os

from dataclasses import dataclass

import numpy as np

STEP_KEYS = ("reward", "is_first", "is_last", "is_terminal", "env_id")
"""Keys every step dict carries besides the observations; no observation may use them."""

ObsSpace = dict[str, tuple[tuple[int, ...], np.dtype]]


@dataclass(frozen=True)
class ActSpace:
    """The action space as the agent sees it."""

    discrete: bool
    """Discrete actions are int64 indices; continuous ones float32 vectors in [-1, 1]."""
    size: int
    """Number of actions (discrete) or action dimensions (continuous)."""


class VecEnv:
    """A batch of `num_envs` environments stepped through send/recv.

    Attributes:
        num_envs: environments in the batch.
        batch_size: environments returned per `recv` (EnvPool async mode: < num_envs; the
            others are still stepping). Every other adapter returns all envs, in env_id order.
        obs_space: per-env (shape, dtype) of every observation key.
        act_space: the action space.
        log_keys: extra per-step keys (`log/<name>`, numbers (N,)) for the logger only: never
            observed by the model nor stored in the replay (Crafter's achievement counts).
        notes: what the adapter changed, for the start line (e.g. `image 288x512x3 -> 64x64x3`).

    Episode boundaries:
        * `is_first` marks the first observation of an episode; its reward is 0.
        * `is_last = terminated or truncated`; `is_terminal = terminated` only, so a time-limit
          truncation has is_last True and is_terminal False.
        * The `send` that follows an `is_last` step is a reset: the env ignores that action and
          its next step is an `is_first` observation with reward 0 (next-step autoreset, as in
          EnvPool and Gymnasium 1.x). **The caller (actor) must store a zero action for an
          is_last step**, because the action it sends there is never executed.

    Arrays returned by `recv` are fresh per call: the caller may keep them.
    """

    num_envs: int
    batch_size: int
    obs_space: ObsSpace
    act_space: ActSpace
    log_keys: tuple[str, ...] = ()
    notes: tuple[str, ...] | list[str] = ()

    def start(self) -> None:
        """Reset every env. The first `recv` then returns is_first steps."""
        raise NotImplementedError

    def recv(self) -> dict[str, np.ndarray]:
        """The next `batch_size` steps (see the class docstring for the keys)."""
        raise NotImplementedError

    def send(self, action: np.ndarray, env_id: np.ndarray) -> None:
        """Step the envs `env_id` (int32 (N,), as returned by the last recv).

        action: int64 (N,) for discrete spaces; float32 (N, size) raw policy samples for
        continuous ones (clipped to [-1, 1] here and rescaled to the env's bounds).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the envs."""

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SyncVecEnv(VecEnv):
    """An adapter that steps all its envs inside `send` and hands the result to `recv`.

    Subclasses call `_publish(obs, reward, terminated, truncated, is_first)` once per step
    (and from `start`); `recv` returns that step once.
    """

    _step: dict[str, np.ndarray] | None = None
    _last: np.ndarray

    def _publish(self, obs, reward, terminated, truncated, is_first) -> None:
        self._step = finish_step(obs, reward, terminated, truncated, is_first,
                                 np.arange(self.num_envs, dtype=np.int32))
        self._last = self._step["is_last"].copy()

    def recv(self) -> dict[str, np.ndarray]:
        if self._step is None:
            raise RuntimeError("recv before start or twice without send")
        step, self._step = self._step, None
        return step


class BoxAction:
    """Maps raw policy actions in [-1, 1] onto a Box's bounds.

    Dimensions with an infinite bound are clipped to [-1, 1] and passed unscaled.
    """

    def __init__(self, low: np.ndarray, high: np.ndarray, dtype=np.float32):
        low = np.asarray(low, np.float64).reshape(-1)
        high = np.asarray(high, np.float64).reshape(-1)
        finite = np.isfinite(low) & np.isfinite(high)
        low, high = np.where(finite, low, -1.0), np.where(finite, high, 1.0)
        self.scale = ((high - low) / 2).astype(dtype)
        self.offset = ((high + low) / 2).astype(dtype)
        self.size = low.size
        self.dtype = np.dtype(dtype)

    def __call__(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action, self.dtype).reshape(-1, self.size)
        return np.clip(action, -1.0, 1.0) * self.scale + self.offset


def headless_rendering() -> None:
    """Before a Gymnasium env renders `rgb_array` frames: SDL (pygame, which classic-control
    envs draw with) without a window system, so it does not print `XDG_RUNTIME_DIR is invalid
    or not set` on machines without a desktop. A value the user set is kept."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


def check_obs_space(obs_space: ObsSpace, env_id: str) -> ObsSpace:
    """Reject observation keys that collide with the step keys."""
    clash = sorted(set(obs_space) & set(STEP_KEYS))
    if clash:
        raise ValueError(f"env {env_id!r}: observation keys {clash} collide with step keys "
                         f"{list(STEP_KEYS)}")
    return obs_space


def finish_step(obs: dict[str, np.ndarray], reward, terminated, truncated, is_first,
                env_id) -> dict[str, np.ndarray]:
    """Assemble a step dict: flags as bool, reward float32 and 0 on is_first steps."""
    is_first = np.asarray(is_first, bool)
    terminated = np.asarray(terminated, bool)
    step = dict(obs)
    step["reward"] = np.where(is_first, 0.0, reward).astype(np.float32)
    step["is_first"] = is_first
    step["is_last"] = terminated | np.asarray(truncated, bool)
    step["is_terminal"] = terminated
    step["env_id"] = np.asarray(env_id, np.int32)
    return step


def scatter(action: np.ndarray, env_id: np.ndarray, num_envs: int) -> np.ndarray:
    """Reorder a full batch of actions into env order (adapters that step all envs at once)."""
    env_id = np.asarray(env_id).reshape(-1)
    if env_id.size != num_envs or not np.array_equal(np.sort(env_id), np.arange(num_envs)):
        raise ValueError(f"send needs an action for each of the {num_envs} envs, got env_id "
                         f"{env_id.tolist()}")
    action = np.asarray(action)
    if action.shape[0] != num_envs:
        raise ValueError(f"action batch {action.shape} does not match env_id {env_id.shape}")
    out = np.empty_like(action)
    out[env_id] = action
    return out
