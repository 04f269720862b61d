"""Fixed datasets for offline training, and a run's replay written out as a Minari dataset.

Sources (`open_source`):
  * a replay folder of this project (`<logdir>/replay`, `replay-rank{r}`, or the logdir that
    holds them): every stored step of every stream (store.py's format);
  * a Minari dataset (PyPI `minari`): its folder, or its id in the local Minari store
    (`MINARI_DATASETS_PATH`, default ~/.minari/datasets).

The step format (what the actor stores and the learner trains on), one row per env step:
the observation keys (as spaces.ObsConverter makes them), `action` float32 (A,) (one-hot for
a discrete action, the policy's raw sample in [-1, 1] for a continuous one; zero at an
is_last step, whose action is never executed), `reward` float32 (received on arriving at this
observation; 0 at is_first), `is_first`, `is_last`, `is_terminal` bool.

A Minari episode of T transitions (observations o_0..o_T, actions, rewards, terminations and
truncations a_i, r_i, term_i, trunc_i for i < T) becomes T + 1 steps:

    step i    obs o_i    action a_i (i < T), zero at i = T    reward 0 at i = 0, else r_{i-1}
              is_first: i = 0    is_last: i = T    is_terminal: i = T and term_{T-1}

Discrete actions become one-hots (index minus the space's start); Box actions are mapped from
the space's bounds to [-1, 1] (the inverse of envs.base.BoxAction; unbounded dimensions are
clipped to [-1, 1], as the agent's actions are). Observations go through the same
ObsConverter as the env's (images resized by area, categorical entries as one-hots, Dict
entries by key), so they match what the env gives online. `export_minari` is the inverse:
one Minari episode per is_first .. is_last run of a stream (a stream's leading partial
episode is left out; one the data cuts off ends truncated), observations in Gymnasium layout
(images H x W x C, categorical entries as indices, vectors as stored).

The RSSM latents a replay folder stores belong to the model that collected the data, so they
are not used: a window of a fixed dataset starts from the zero latent until the learner has
written its own back (ring.write_latents), as the first windows of an online run do.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from dreamer_fast.checks import ConfigError
from dreamer_fast.data import store
from dreamer_fast.data.capacity import mem_available
from dreamer_fast.data.ring import RING_MARGIN, Ring

STEP_FIELDS = ("action", "reward", "is_first", "is_last", "is_terminal")
LATENT_KEYS = ("deter", "stoch")
MAX_STREAMS = 16
"""Streams a Minari dataset's episodes are packed into (fewer for a small dataset)."""


@dataclass
class Dataset:
    """A fixed dataset as streams of steps (each stream's rows are consecutive env steps;
    episodes are cut by is_first / is_last)."""

    streams: list[dict[str, np.ndarray]]
    source: str
    kind: str  # "replay" or "minari"
    episodes: int
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(len(s["reward"]) for s in self.streams)

    def describe(self) -> str:
        return (f"{self.kind} dataset {self.source}: {self.steps:,} steps, {self.episodes:,} "
                f"episodes in {len(self.streams)} streams")


# ---------------------------------------------------------------------- sources

def replay_folders(path: str) -> list[str]:
    """The replay folders of this project at path (a replay folder, or a logdir holding
    `replay`, `replay-rank*` (data parallel) or `seed*/replay` (packed seeds)); [] when there
    are none."""
    if os.path.isfile(os.path.join(path, store.MANIFEST)):
        return [path]
    found = [os.path.dirname(m) for m in
             sorted(glob.glob(os.path.join(path, "replay", store.MANIFEST)) +
                    glob.glob(os.path.join(path, "replay-rank*", store.MANIFEST)) +
                    glob.glob(os.path.join(path, "seed*", "replay", store.MANIFEST)))]
    return found


def _minari():
    try:
        import minari
    except ImportError:
        raise ConfigError("reading or writing a Minari dataset needs the minari package: "
                          "pip install 'minari[hdf5]' (or this project's extra: pip install "
                          "'dreamer_fast[offline]')") from None
    return minari


def open_minari(source: str):
    """A MinariDataset from its folder (holding data/) or its id in the local store."""
    minari = _minari()
    from minari import MinariDataset

    for data in (os.path.join(source, "data"), source):
        if os.path.isfile(os.path.join(data, "metadata.json")):
            return MinariDataset(data)
    try:
        return minari.load_dataset(source)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(
            f"--offline {source!r} is neither a replay folder of this project (a logdir or "
            f"its replay/ holding {store.MANIFEST}) nor a local Minari dataset ({e}); give a "
            "run's logdir, a Minari dataset folder, or an id from `minari list local` "
            "(`minari download ID` fetches a remote one)") from None


def load(source: str, spec: dict, obs_converter=None, discrete: bool | None = None
         ) -> Dataset:
    """The dataset at `source` in the step format of `spec` (replay_spec of the env the
    agent is built for). Every mismatch with the env is one ConfigError line.

    obs_converter(space) -> spaces.ObsConverter builds the env's observation conversion for a
    Minari dataset's observation space (the env's image size and key selection); discrete:
    whether the env's actions are (a Minari dataset's must be of the same kind)."""
    folders = replay_folders(source) if os.path.isdir(source) else []
    if folders:
        data = _from_replay(source, folders)
    else:
        data = _from_minari(source, open_minari(source), obs_converter, discrete)
    check_spec(data, spec)
    return data


def _from_replay(source: str, folders: list[str]) -> Dataset:
    streams, episodes = [], 0
    for folder in folders:
        try:
            info = store.list_replay(folder)
            for j in range(info["manifest"]["num_streams"]):
                steps = store.load_stream(folder, j)
                steps.pop("step")
                for k in LATENT_KEYS:
                    steps.pop(k, None)
                if len(steps["reward"]):
                    streams.append(steps)
                    episodes += int(steps["is_first"].sum())
        except store.ReplayFileError as e:
            raise ConfigError(f"--offline {source}: {e}") from None
    return Dataset(streams, source, "replay", episodes)


def _minari_action(space):
    """Env actions of a Minari action space -> our stored actions (see module docstring)."""
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        n, start = int(space.n), int(space.start)
        return n, True, lambda a: np.eye(n, dtype=np.float32)[np.asarray(a, np.int64).reshape(-1)
                                                                - start]
    if isinstance(space, spaces.Box):
        low = np.asarray(space.low, np.float64).reshape(-1)
        high = np.asarray(space.high, np.float64).reshape(-1)
        finite = np.isfinite(low) & np.isfinite(high)
        scale = np.where(finite, (high - low) / 2, 1.0)
        offset = np.where(finite, (high + low) / 2, 0.0)
        scale = np.where(scale > 0, scale, 1.0)

        def convert(a):
            a = np.asarray(a, np.float64).reshape(len(a), -1)
            return np.clip((a - offset) / scale, -1.0, 1.0).astype(np.float32)

        return low.size, False, convert
    raise ConfigError(f"Minari action space {space} is not supported; supported: Discrete, Box")


def minari_steps(episode, obs_convert, act_convert, act_size: int) -> dict[str, np.ndarray]:
    """One Minari episode (T transitions) -> T + 1 steps (module docstring)."""
    T = len(episode.rewards)
    obs = obs_convert(episode.observations)
    if any(len(v) != T + 1 for v in obs.values()):
        raise ConfigError(f"Minari episode {episode.id} has {T} rewards but "
                          f"{ {k: len(v) for k, v in obs.items()} } observations; expected "
                          f"{T + 1}")
    steps = dict(obs)
    steps["action"] = np.zeros((T + 1, act_size), np.float32)
    if T:
        steps["action"][:T] = act_convert(episode.actions)
    steps["reward"] = np.zeros(T + 1, np.float32)
    steps["reward"][1:] = np.asarray(episode.rewards, np.float32).reshape(-1)
    steps["is_first"] = np.zeros(T + 1, bool)
    steps["is_first"][0] = True
    steps["is_last"] = np.zeros(T + 1, bool)
    steps["is_last"][T] = True
    steps["is_terminal"] = np.zeros(T + 1, bool)
    steps["is_terminal"][T] = bool(T and np.asarray(episode.terminations)[-1])
    return steps


def _from_minari(source: str, dataset, obs_converter, discrete: bool | None) -> Dataset:
    act_size, is_discrete, act_convert = _minari_action(dataset.action_space)
    if discrete is not None and is_discrete != discrete:
        kinds = {True: "discrete", False: "continuous"}
        raise ConfigError(f"Minari dataset {source} has {kinds[is_discrete]} actions "
                          f"({dataset.action_space}); the env's are {kinds[discrete]}: give the "
                          "--env the data was collected on")
    try:
        conv = obs_converter(dataset.observation_space)
    except ValueError as e:
        raise ConfigError(f"Minari dataset {source}: {e}") from None
    episodes = [minari_steps(ep, conv, act_convert, act_size)
                for ep in dataset.iterate_episodes()]
    if not episodes:
        raise ConfigError(f"Minari dataset {source} holds no episodes")
    streams = pack(episodes, MAX_STREAMS)
    return Dataset(streams, source, "minari", len(episodes), list(conv.notes))


def pack(episodes: list[dict[str, np.ndarray]], max_streams: int,
         min_stream: int = 1024) -> list[dict[str, np.ndarray]]:
    """Episodes -> at most max_streams streams of whole episodes back to back (each to the
    shortest stream so far, in dataset order), about min_stream steps or more per stream."""
    total = sum(len(e["reward"]) for e in episodes)
    n = max(1, min(max_streams, len(episodes), total // min_stream))
    parts: list[list[dict]] = [[] for _ in range(n)]
    sizes = np.zeros(n, np.int64)
    for ep in episodes:
        j = int(np.argmin(sizes))
        parts[j].append(ep)
        sizes[j] += len(ep["reward"])
    return [{k: np.concatenate([e[k] for e in part]) for k in part[0]} for part in parts if part]


def check_spec(data: Dataset, spec: dict) -> None:
    """Each stream holds exactly the env's keys with its shapes and dtypes (latents aside)."""
    want = {k: v for k, v in spec.items() if k not in LATENT_KEYS}
    for steps in data.streams[:1]:
        have = {k: (tuple(v.shape[1:]), v.dtype) for k, v in steps.items()}
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            raise ConfigError(
                f"{data.describe()} has keys {sorted(have)}; the env gives {sorted(want)} "
                f"(missing {missing or 'none'}, extra {extra or 'none'}): give the --env the "
                "data was collected on, with the same --env-opts (obs-keys, image-size, "
                "render-image)")
        for k, (shape, dtype) in want.items():
            np_dtype = store._storage_dtype(dtype)
            if have[k][0] != tuple(shape) or have[k][1] != np_dtype:
                raise ConfigError(
                    f"{data.describe()}: key {k!r} is {have[k][1]} {have[k][0]}, the env gives "
                    f"{np_dtype} {tuple(shape)}: give the --env the data was collected on, "
                    "with the same --env-opts")


# ---------------------------------------------------------------------- into the ring

def to_ring(data: Dataset, spec: dict, length: int, seed: int = 0) -> Ring:
    """A Ring holding the whole dataset (one ring stream per dataset stream, uniform
    sampling, zero latents). Fails in one line when it does not fit in RAM or no stream
    holds a window of `length` steps."""
    lengths = np.array([len(s["reward"]) for s in data.streams], np.int64)
    if lengths.max() < length:
        raise ConfigError(f"{data.describe()}: its longest stream has {lengths.max():,} steps, "
                          f"fewer than one training window (batch_length + 1 = {length}); "
                          "lower --agent.batch-length or use more data")
    cap = int(lengths.max()) + RING_MARGIN
    per_step = sum(int(np.prod(s, dtype=np.int64)) * torch.empty((), dtype=d).element_size()
                   for s, d in spec.values())
    need, avail = per_step * cap * len(lengths), mem_available()
    if avail and need > 0.75 * avail:
        raise ConfigError(f"{data.describe()} needs {need / 2**30:.1f} GiB in memory; "
                          f"{avail / 2**30:.1f} GiB is available: use a machine with more RAM "
                          "or a part of the dataset")
    ring = Ring(spec, len(lengths), cap * len(lengths), length, online=False, seed=seed)
    for j, steps in enumerate(data.streams):
        ring.write_steps(j, 0, {k: torch.from_numpy(np.ascontiguousarray(v))
                                for k, v in steps.items()})
    state = ring.small_state()
    state.update(count=lengths, first=np.zeros_like(lengths), next_online=lengths,
                 queue=np.zeros((0, 2), np.int64))
    state["stats"] = {**state["stats"], "inserted": int(lengths.sum())}
    ring.restore_small_state(state)
    return ring


# ---------------------------------------------------------------------- export

def episodes_of(steps: dict[str, np.ndarray]):
    """(start, end) index pairs (end inclusive) of the episodes of one stream: from each
    is_first to its is_last, or to the stream's end (an episode the data cuts off). Steps
    before the stream's first is_first (an episode whose start has left the replay) and
    one-step episodes (no transition) are left out."""
    first = np.flatnonzero(steps["is_first"])
    n = len(steps["is_first"])
    for i, s in enumerate(first):
        nxt = first[i + 1] if i + 1 < len(first) else n
        lasts = np.flatnonzero(steps["is_last"][s:nxt])
        e = s + int(lasts[0]) if len(lasts) else nxt - 1
        if e > s:
            yield int(s), int(e)


def stored_spaces(keys: dict, env_space=None):
    """Gymnasium observation space of stored keys (store manifest `keys`), in Gymnasium
    layout, plus per-key converters stored -> Gymnasium. A single key named as
    ObsConverter names a bare space (image, vector, state) becomes a bare space again. A
    vector key whose env entry (env_space, optional) is a float32 Box of the same size keeps
    that Box (its bounds and shape)."""
    from gymnasium import spaces

    from dreamer_fast.envs.spaces import image_layout

    entries, converters = {}, {}
    env_entries = (dict(env_space.spaces) if isinstance(env_space, spaces.Dict) else
                   {next(iter(keys)): env_space} if env_space is not None and len(keys) == 1
                   else {})
    for key, info in keys.items():
        shape, dtype = tuple(info["shape"]), info["dtype"]
        if dtype == "uint8" and len(shape) == 3:  # image, stored C x H x W
            c, h, w = shape
            entries[key] = spaces.Box(0, 255, (h, w, c), np.uint8)
            converters[key] = lambda v: np.ascontiguousarray(v.transpose(0, 2, 3, 1))
        elif dtype == "uint8" and len(shape) == 2:  # categorical one-hots G x K
            g, k = shape
            entries[key] = spaces.Discrete(k) if g == 1 else spaces.MultiDiscrete([k] * g)
            converters[key] = ((lambda v: v.argmax(-1)[:, 0].astype(np.int64)) if g == 1 else
                               (lambda v: v.argmax(-1).astype(np.int64)))
        elif dtype == "float32" and len(shape) == 1:
            sub = env_entries.get(key)
            if (isinstance(sub, spaces.Box) and sub.dtype == np.float32 and not image_layout(sub)
                    and int(np.prod(sub.shape)) == shape[0]):
                entries[key] = sub
                converters[key] = (lambda s: lambda v: v.reshape(len(v), *s))(tuple(sub.shape))
            else:
                entries[key] = spaces.Box(-np.inf, np.inf, shape, np.float32)
                converters[key] = lambda v: v
        else:
            raise ConfigError(f"replay key {key!r} ({dtype} {shape}) has no Minari space")
    bare = len(keys) == 1 and next(iter(keys)) in ("image", "vector", "state")
    if bare:
        key = next(iter(keys))
        return entries[key], (lambda obs: converters[key](obs[key]))
    return spaces.Dict(entries), (lambda obs: {k: converters[k](obs[k]) for k in entries})


def export_minari(folders: list[str], dataset_id: str, act_space=None, env_id: str | None = None,
                  env_space=None, jpeg: bool = False, description: str = "", log=print):
    """Write the replay folders' episodes as Minari dataset `dataset_id` (module docstring).

    act_space: the env's Gymnasium action space (continuous actions are scaled to its Box
    bounds; Discrete keeps its start); None writes Discrete(n) / Box(-1, 1). env_id: a
    Gymnasium id recorded as the dataset's env spec (recover_environment), or None. Returns
    the MinariDataset."""
    _minari()
    from gymnasium import spaces
    from minari import create_dataset_from_buffers
    from minari.data_collector import EpisodeBuffer

    manifests = [store.read_manifest(f) for f in folders]
    keys = {k: v for k, v in manifests[0]["keys"].items()
            if k not in (*STEP_FIELDS, *LATENT_KEYS)}
    act = manifests[0]["keys"]["action"]["shape"][0]
    # Without the env's action space, discrete vs continuous is read from the stored actions.
    discrete = None if act_space is None else isinstance(act_space, spaces.Discrete)
    obs_space, to_obs = stored_spaces(keys, env_space)
    buffers, dropped = [], 0
    for folder, manifest in zip(folders, manifests):
        for j in range(manifest["num_streams"]):
            steps = store.load_stream(folder, j)
            if not len(steps["reward"]):
                continue
            if discrete is None:
                a = steps["action"]
                discrete = bool(np.all((a == 0) | (a == 1)) and np.all(a.sum(-1) <= 1))
            spans = list(episodes_of(steps))
            dropped += (spans[0][0] if spans else len(steps["reward"]))
            for s, e in spans:
                buffers.append(_episode_buffer(EpisodeBuffer, steps, s, e, to_obs, discrete,
                                               act_space, len(buffers)))
    if not buffers:
        raise ConfigError(f"{', '.join(folders)} hold no complete episode start to export")
    if act_space is None:
        act_space = (spaces.Discrete(act) if discrete else
                     spaces.Box(-1.0, 1.0, (act,), np.float32))
    if dropped:
        log(f"export: left out {dropped:,} steps before the first episode start of their "
            "stream (episodes whose start had left the replay)")
    kwargs = {"env": env_id} if env_id else {}
    dataset = create_dataset_from_buffers(
        dataset_id, buffers, observation_space=obs_space, action_space=act_space,
        algorithm_name="DreamerV3 (dreamer_fast)", description=description or None,
        jpeg_encoding=jpeg, **kwargs)
    return dataset


def _episode_buffer(EpisodeBuffer, steps, s, e, to_obs, discrete, act_space, index):
    from gymnasium import spaces

    obs = to_obs({k: v[s:e + 1] for k, v in steps.items()})
    a = steps["action"][s:e]
    if discrete:
        start = int(act_space.start) if isinstance(act_space, spaces.Discrete) else 0
        actions = a.argmax(-1).astype(np.int64) + start
    else:
        a = np.clip(a, -1.0, 1.0)
        if isinstance(act_space, spaces.Box):
            low, high = act_space.low.reshape(-1), act_space.high.reshape(-1)
            finite = np.isfinite(low) & np.isfinite(high)
            scaled = a * np.where(finite, (high - low) / 2, 1.0) + np.where(
                finite, (high + low) / 2, 0.0)
            actions = scaled.astype(act_space.dtype).reshape(len(a), *act_space.shape)
        else:
            actions = a.astype(np.float32)
    n = e - s
    terminal = bool(steps["is_terminal"][e])
    terminations = np.zeros(n, bool)
    truncations = np.zeros(n, bool)
    terminations[-1] = terminal
    truncations[-1] = not terminal  # a time limit, or the data ends here
    return EpisodeBuffer(id=index, observations=obs, actions=actions,
                         rewards=steps["reward"][s + 1:e + 1].astype(np.float64),
                         terminations=terminations, truncations=truncations)
