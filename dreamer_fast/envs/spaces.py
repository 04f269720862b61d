"""Gymnasium spaces (used by Gymnasium and EnvPool alike) -> our observation and action spaces.

Observation rules: a uint8 rank-3 Box is an image (channels-first out), any other Box a float32
vector flattened per key, a Discrete a float32 one-hot vector. A bare space becomes the key
`image` or `vector`; a Dict space one key per entry, named by the env.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from dreamer_fast.envs.base import ActSpace, BoxAction, ObsSpace, check_obs_space


def _is_image(space) -> bool:
    return isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3


class ObsConverter:
    """Converts batched observations of a gymnasium space into our float32/uint8 key dict.

    channels_last: images arrive (N, H, W, C) (Gymnasium) rather than (N, C, H, W) (EnvPool).
    """

    def __init__(self, space, env_id: str, channels_last: bool):
        self.channels_last = channels_last
        if isinstance(space, spaces.Dict):
            entries = dict(space.spaces)
        else:
            entries = {"image" if _is_image(space) else "vector": space}
        self.entries = entries
        self.obs_space: ObsSpace = {}
        for key, sub in entries.items():
            self.obs_space[key] = self._entry_space(sub, key, env_id)
        check_obs_space(self.obs_space, env_id)

    def _entry_space(self, space, key: str, env_id: str) -> tuple[tuple[int, ...], np.dtype]:
        if _is_image(space):
            shape = tuple(space.shape)
            if self.channels_last:
                shape = (shape[2], shape[0], shape[1])
            return shape, np.dtype(np.uint8)
        if isinstance(space, spaces.Box):
            return (int(np.prod(space.shape, dtype=np.int64)),), np.dtype(np.float32)
        if isinstance(space, spaces.Discrete):
            return (int(space.n),), np.dtype(np.float32)
        raise ValueError(f"env {env_id!r}: observation {key!r} has unsupported space {space}; "
                         "supported: Box, Discrete, or a Dict of them")

    def __call__(self, obs) -> dict[str, np.ndarray]:
        if not isinstance(obs, dict):
            obs = {next(iter(self.entries)): obs}
        out = {}
        for key, space in self.entries.items():
            value = np.asarray(obs[key])
            if _is_image(space):
                if self.channels_last:
                    value = value.transpose(0, 3, 1, 2)
                out[key] = np.ascontiguousarray(value, np.uint8)
            elif isinstance(space, spaces.Discrete):
                out[key] = np.eye(space.n, dtype=np.float32)[value.reshape(-1) - space.start]
            else:
                out[key] = value.astype(np.float32).reshape(value.shape[0], -1)
        return out


class ActConverter:
    """Converts our actions (int64 indices or float32 in [-1, 1]) into the env's action space."""

    def __init__(self, space, env_id: str):
        if isinstance(space, spaces.Discrete):
            self.act_space = ActSpace(discrete=True, size=int(space.n))
            self.start = int(space.start)
            self.box = None
        elif isinstance(space, spaces.Box):
            self.box = BoxAction(space.low, space.high, space.dtype)
            self.act_space = ActSpace(discrete=False, size=self.box.size)
            self.shape = tuple(space.shape)
        else:
            raise ValueError(f"env {env_id!r}: unsupported action space {space}; supported: "
                             "Discrete, Box")

    def __call__(self, action: np.ndarray) -> np.ndarray:
        if self.box is None:
            return np.asarray(action, np.int64).reshape(-1) + self.start
        action = self.box(action)
        return action.reshape((action.shape[0], *self.shape))
