"""Gymnasium spaces (used by Gymnasium and EnvPool alike) -> our observation and action spaces.

Observation rules, per key:
  * image: a uint8 Box (H, W), (H, W, C) or (C, H, W) with C in 1..4. Stored channels first,
    resized to `image_size` x `image_size` with area interpolation (OpenCV `INTER_AREA`) when
    it has another size; (H, W) becomes one channel.
  * categorical: Discrete, MultiDiscrete and MultiBinary. Stored as uint8 one-hots (G, K): G
    sub-spaces of K = the largest class count each (MultiBinary: K = 2). As the official code,
    the encoder reads them as one-hots (no symlog) and the decoder predicts them with a
    categorical loss.
  * vector: any other Box, a float32 vector flattened per key.
A bare space becomes the key `image` or `vector` (`state` for a categorical one); a Dict
space one key per entry, named by the env. Keys that do not match `keys` (a regex, matched in
full) are dropped before anything else, so an unsupported entry can be left out.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from dreamer_fast.checks import match_keys
from dreamer_fast.envs.base import ActSpace, BoxAction, ObsSpace, check_obs_space


def image_layout(space, channels_last: bool | None = None) -> str | None:
    """'hw', 'hwc' or 'chw' for a uint8 Box that is an image, else None.

    channels_last None guesses from the shape: a last axis of 1..4 is channels last, else a
    first axis of 1..4 is channels first."""
    if not (isinstance(space, spaces.Box) and space.dtype == np.uint8):
        return None
    shape = tuple(space.shape)
    if len(shape) == 2:
        return "hw"
    if len(shape) != 3:
        return None
    if channels_last is None:
        channels_last = shape[2] <= 4 or shape[0] > 4
    return "hwc" if channels_last else "chw"


def _categorical(space) -> tuple[int, int] | None:
    """(groups G, classes K) of a Discrete, MultiDiscrete or MultiBinary space, else None."""
    if isinstance(space, spaces.Discrete):
        return 1, int(space.n)
    if isinstance(space, spaces.MultiDiscrete):
        return int(np.prod(space.shape, dtype=np.int64)), int(np.max(space.nvec))
    if isinstance(space, spaces.MultiBinary):
        return int(np.prod(space.shape, dtype=np.int64)), 2
    return None


def resize_area(images: np.ndarray, size: int) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8 by area interpolation (OpenCV)."""
    import cv2

    n, c = images.shape[:2]
    hwc = images.transpose(0, 2, 3, 1)
    out = np.empty((n, size, size, c), np.uint8)
    for i in range(n):
        frame = cv2.resize(hwc[i], (size, size), interpolation=cv2.INTER_AREA)
        out[i] = frame.reshape(size, size, c)
    return out.transpose(0, 3, 1, 2)


class ObsConverter:
    """Converts batched observations of a gymnasium space into our key dict (see the module).

    channels_last: the layout of rank-3 images (Gymnasium: True; EnvPool: False); None guesses
    per key from the shape. image_size: the side every image is resized to (None keeps it).
    keys: regex of the entries to keep. `notes` says what was transformed, for the start line.
    """

    def __init__(self, space, env_id: str, channels_last: bool | None,
                 image_size: int | None = None, keys: str = ".*"):
        self.channels_last, self.image_size = channels_last, image_size
        if isinstance(space, spaces.Dict):
            entries = dict(space.spaces)
        else:
            name = ("image" if image_layout(space, channels_last) else
                    "state" if _categorical(space) else "vector")
            entries = {name: space}
        kept = {k: entries[k] for k in match_keys(entries, keys, "env_opts.obs_keys")}
        self.entries = kept
        self.obs_space: ObsSpace = {}
        self.notes: list[str] = []
        self.layouts: dict[str, str] = {}  # image keys -> layout
        self.categorical: set[str] = set()
        for key, sub in kept.items():
            self.obs_space[key] = self._entry_space(sub, key, env_id)
        check_obs_space(self.obs_space, env_id)

    def _entry_space(self, space, key: str, env_id: str) -> tuple[tuple[int, ...], np.dtype]:
        layout = image_layout(space, self.channels_last)
        if layout:
            shape = tuple(int(s) for s in space.shape)
            h, w, c = ((*shape, 1) if layout == "hw" else shape if layout == "hwc" else
                       (shape[1], shape[2], shape[0]))
            if not 1 <= c <= 4:
                raise ValueError(
                    f"env {env_id!r}: observation {key!r} is a uint8 image {shape} with {c} "
                    "channels; supported: 1 to 4 (H x W, H x W x C or C x H x W). Leave it out "
                    "with --env-opts.obs-keys, or wrap the env to split the channels")
            self.layouts[key] = layout
            size = self.image_size
            if size and (h, w) != (size, size):
                self.notes.append(f"{key} {h}x{w}x{c} -> {size}x{size}x{c}")
                h = w = size
            return (c, h, w), np.dtype(np.uint8)
        cat = _categorical(space)
        if cat:
            self.categorical.add(key)
            return cat, np.dtype(np.uint8)
        if isinstance(space, spaces.Box):
            return (int(np.prod(space.shape, dtype=np.int64)),), np.dtype(np.float32)
        raise ValueError(f"env {env_id!r}: observation {key!r} has unsupported space {space}; "
                         "supported: Box, Discrete, MultiDiscrete, MultiBinary, or a Dict of "
                         "them (leave a key out with --env-opts.obs-keys)")

    def __call__(self, obs) -> dict[str, np.ndarray]:
        if not isinstance(obs, dict):
            obs = {next(iter(self.entries)): obs}
        out = {}
        for key, space in self.entries.items():
            value = np.asarray(obs[key])
            layout = self.layouts.get(key)
            if layout:
                value = (value[:, None] if layout == "hw" else
                         value.transpose(0, 3, 1, 2) if layout == "hwc" else value)
                if value.shape[2:] != self.obs_space[key][0][1:]:
                    value = resize_area(value, self.obs_space[key][0][1])
                out[key] = np.ascontiguousarray(value, np.uint8)
            elif key in self.categorical:
                out[key] = self._one_hot(space, value, *self.obs_space[key][0])
            else:
                out[key] = value.astype(np.float32).reshape(value.shape[0], -1)
        return out

    @staticmethod
    def _one_hot(space, value: np.ndarray, groups: int, classes: int) -> np.ndarray:
        index = value.reshape(value.shape[0], groups).astype(np.int64)
        if isinstance(space, spaces.Discrete):
            index = index - int(space.start)
        elif isinstance(space, spaces.MultiDiscrete):
            index = index - np.asarray(space.start, np.int64).reshape(1, groups)
        return np.eye(classes, dtype=np.uint8)[index]


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
