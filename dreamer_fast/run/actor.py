"""The actor thread: steps the envs with the policy and writes every step into the ring.

    recv (env_id) -> gather carries -> policy_step on the device -> scatter carries -> send
    -> ring.add (obs, action zeroed on is_last, reward, flags, latent) -> limiter.insert

The policy runs on one of two copies of the policy modules (enc, dyn, pol), handed over by
`weights.PolicyWeights`.
"""

from __future__ import annotations

import collections
import contextlib
import threading

import numpy as np
import torch

from dreamer_fast.checks import RunError
from dreamer_fast.envs.base import STEP_KEYS
from dreamer_fast.run.clocks import Timer
from dreamer_fast.run.weights import PolicyWeights


class Actor:
    """Runs envs with the latest policy; one writer of the ring.

    env: a started-or-not VecEnv. ring: the replay Ring (num_streams = env.num_envs).
    limiter: RateLimiter. weights: PolicyWeights. steps: stop after the ring holds this many.
    `lock` is held around each ring write + limiter insert: hold it to pause the writer
    (checkpointing). Finished episodes land in `episodes` as (return, length) for the logger,
    and the per-episode maxima of the env's `log_keys` in `episode_logs`.
    """

    def __init__(self, env, ring, limiter, weights: PolicyWeights, device: torch.device,
                 steps: int):
        self.env, self.ring, self.limiter, self.weights = env, ring, limiter, weights
        self.device, self.steps = device, steps
        self.discrete = env.act_space.discrete
        self.obs_keys = list(env.obs_space)
        self.float_keys = float_keys(env)
        self.carry = weights.copies[0].initial_carry(env.num_envs)
        self.tracker = EpisodeTracker(env)
        self.episodes, self.episode_logs = self.tracker.episodes, self.tracker.episode_logs
        self.log_keys = self.tracker.log_keys
        self.lock = threading.Lock()
        self.timer = Timer()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.graph = None  # graphs.GraphedPolicy for the env batch, set before the thread starts
        self.eager_steps = 0  # policy steps the graph could not take (another batch size)

    def run(self) -> None:
        """Thread body: step until `steps` are stored, `stop` is set or the limiter closes."""
        try:
            # Its own CUDA stream, so policy steps do not queue behind the learner's update.
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self.env.start()
                while not self.stop.is_set() and self.ring.inserted < self.steps:
                    if not self.step():
                        break
        except BaseException as e:  # surfaced by the run loop
            self.error = e
            self.limiter.close()
        finally:
            if getattr(self.env, "close_in_stepping_thread", False):
                self.env.close()  # its rendering contexts belong to this thread

    def step(self) -> bool:
        """One recv -> policy -> send -> store. False once the limiter has closed."""
        with self.timer.section("env"):
            obs = self.env.recv()
            self.check_finite(obs)
        with self.timer.section("policy"):
            action, sent, latent = self.act(obs)
        with self.timer.section("env"):
            self.env.send(sent, obs["env_id"])
        step = {k: obs[k] for k in self.obs_keys}
        step.update({k: obs[k] for k in STEP_KEYS if k != "env_id"})
        step.update(action=action, **latent)
        self.track(obs)
        with self.lock:
            with self.timer.section("replay"):
                self.ring.add(step, obs["env_id"])  # before insert: the limiter counts data
            return self.limiter.insert(len(obs["env_id"]))  # waits logged by the limiter

    def act(self, obs: dict) -> tuple[torch.Tensor, np.ndarray, dict]:
        """Policy step for the envs in obs["env_id"] with the active weights copy.

        Returns (action to store, action to send (host), latent). The copy stays locked until
        the host has the action: that sync also means every kernel reading it has run."""
        policy, lock = self.weights.acquire()
        try:
            if self.graph is not None and len(obs["env_id"]) == self.graph.n:
                action, latent = self.graph(self.weights.copies.index(policy), obs)
            else:
                self.eager_steps += self.graph is not None
                action, latent = policy_act(policy, self.carry, obs, self.obs_keys, self.device)
            sent = action.argmax(-1) if self.discrete else action
            return action, sent.cpu().numpy(), latent  # host sync: the env needs the action
        finally:
            lock.release()

    def check_finite(self, obs: dict) -> None:
        check_finite(obs, self.float_keys, self.ring.inserted)

    def track(self, obs: dict) -> None:
        self.tracker.track(obs)


class EpisodeTracker:
    """Per-env episode return and length of one set of envs; finished episodes land in
    `episodes` as (return, length), and the per-episode maxima of the env's `log_keys`
    (e.g. Crafter achievement counts) in `episode_logs`, one row per episode."""

    def __init__(self, env):
        self.score = np.zeros(env.num_envs, np.float64)
        self.length = np.zeros(env.num_envs, np.int64)
        self.episodes: collections.deque = collections.deque(maxlen=10_000)
        self.log_keys = tuple(getattr(env, "log_keys", ()))
        self.log_max = np.zeros((env.num_envs, len(self.log_keys)), np.float64)
        self.episode_logs: collections.deque = collections.deque(maxlen=10_000)

    def track(self, obs: dict) -> None:
        ids = obs["env_id"]
        first = obs["is_first"]
        self.score[ids] = np.where(first, 0.0, self.score[ids] + obs["reward"])
        self.length[ids] = np.where(first, 0, self.length[ids] + 1)
        if self.log_keys:
            values = np.stack([np.asarray(obs[k], np.float64) for k in self.log_keys], 1)
            self.log_max[ids] = np.where(first[:, None], values,
                                         np.maximum(self.log_max[ids], values))
        for j in ids[obs["is_last"]]:
            self.episodes.append((float(self.score[j]), int(self.length[j])))
            if self.log_keys:
                self.episode_logs.append(self.log_max[j].copy())


def float_keys(env) -> list[str]:
    """The keys check_finite checks: the float observations and the reward."""
    return [k for k, (_, dtype) in env.obs_space.items()
            if np.issubdtype(np.dtype(dtype), np.floating)] + ["reward"]


def check_finite(obs: dict, keys, step: int, who: str = "env index") -> None:
    """NaN or inf in a float observation or the reward: RunError naming the key, the env
    index and the value, before the step reaches the policy or the replay."""
    for key in keys:
        value = np.asarray(obs[key])
        ok = np.isfinite(value)
        if not ok.all():
            row = int(np.argwhere(~ok.reshape(len(ok), -1).all(1))[0, 0])
            bad = value.reshape(len(value), -1)[row][~ok.reshape(len(ok), -1)[row]][0]
            raise RunError(
                f"{who} {int(obs['env_id'][row])} returned a non-finite {key!r} "
                f"({bad}) at agent step {step:,}; it never reached the replay. "
                f"Fix the env, or wrap it to clip or replace non-finite {key} values")


@torch.no_grad()
def policy_act(policy, carry: dict, obs: dict, obs_keys, device: torch.device,
               greedy: bool = False) -> tuple[torch.Tensor, dict]:
    """One policy step for the envs obs["env_id"] (N of them, any order, any subset).

    carry: {k: (num_envs, ...)} on the device, one row per env: the envs' rows are gathered,
    stepped and scattered back in place. Returns (action (N, A) float on the device, zero
    where is_last, as stored in replay; latent {deter, stoch} to store with the step).
    """
    inp = {k: torch.as_tensor(obs[k]).to(device, non_blocking=True)
           for k in (*obs_keys, "is_first", "is_last")}
    inp["env_id"] = torch.as_tensor(obs["env_id"], dtype=torch.int64).to(device)
    return policy_core(policy, carry, inp, obs_keys, greedy)


@torch.no_grad()
def policy_core(policy, carry: dict, inp: dict, obs_keys, greedy: bool = False):
    """policy_act on device inputs {obs keys, is_first, is_last, env_id (int64)}: no host
    sync and no Python state, so graphs.GraphedPolicy captures it as it is."""
    ids = inp["env_id"]
    rows = {k: v.index_select(0, ids) for k, v in carry.items()}
    action, rows, latent = policy.policy_step(
        rows, {k: inp[k] for k in (*obs_keys, "is_first")}, greedy)
    # The action sent at an is_last step is never executed: store zero.
    action = action * (~inp["is_last"])[:, None].to(action.dtype)
    rows["action"] = action
    for k, v in rows.items():
        carry[k].index_copy_(0, ids, v)
    return action, latent
