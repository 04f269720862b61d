"""Evaluation: run N episodes of a trained policy; write returns (JSON), video and TensorBoard.

    python run.py --eval --logdir DIR [--episodes 10] [--greedy] [--seed 0] [--videos 1]

The config comes from the checkpoint (flags: config.EvalConfig). One line per finished
episode; Ctrl-C stops and writes what finished. Image envs film their observations;
vector-only Gymnasium envs are filmed with render_mode="rgb_array" when the env can render
(CartPole needs pygame); otherwise only the returns are written, and the command says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import threading
import time

import numpy as np
import torch

from dreamer_fast.agent.agent import Agent
from dreamer_fast.config import EvalConfig
from dreamer_fast.checks import ConfigError
from dreamer_fast.machine import settle, settle_device
from dreamer_fast.envs import make_env, suite_of
from dreamer_fast.run import checkpoint
from dreamer_fast.run.actor import policy_act
from dreamer_fast.run.logger import Logger
from dreamer_fast.scores import summary

MAX_EVAL_ENVS = 16


def load_agent(path: str, device: str = "auto"):
    """(config, agent, checkpoint dict) from a logdir or a checkpoint file."""
    file = checkpoint.find(path)
    if file is None:
        parent = os.path.dirname(os.path.abspath(path))
        if checkpoint.find(parent) and re.fullmatch(r"seed\d+", os.path.basename(
                os.path.abspath(path))):
            raise ConfigError(f"no checkpoint at {path!r}: the packed run in {parent} "
                              "stopped before writing this seed's own; resume it once "
                              f"(python run.py --logdir {parent} ...) to write it")
        raise ConfigError(f"no checkpoint at {path!r} (expected a logdir holding "
                          f"{checkpoint.CHECKPOINT} or the file itself)")
    device = settle_device(device)
    ckpt = checkpoint.load_checkpoint(file, device)
    cfg = checkpoint.config_from_dict(json.loads(ckpt["config"]))
    # The run's machine choices (device, kernels, precision, graphs) are this machine's.
    machine = dataclasses.replace(cfg.agent, kernels="auto", precision="auto")
    cfg = settle(dataclasses.replace(cfg, device=device, graphs="auto", agent=machine))
    return cfg, file, ckpt


def check_env_module(env_id: str, ecfg: EvalConfig) -> None:
    """A checkpoint's `module:Id` env imports (runs) `module`: only when the user named it
    (--env module:Id) or trusts the checkpoint (--trust-env-module); else one ConfigError."""
    if ecfg.env is not None and ecfg.env != env_id:
        raise ConfigError(f"--env {ecfg.env} but the checkpoint was trained on {env_id}; the "
                          f"eval runs the checkpoint's env: pass --env {env_id} or leave it out")
    if ":" not in env_id or ecfg.env == env_id or ecfg.trust_env_module:
        return
    module = env_id.split(":", 1)[0]
    raise ConfigError(f"the checkpoint's env {env_id!r} imports module {module!r}, which runs "
                      f"its code; to allow it, pass --env {env_id} (or --trust-env-module)")


def seed_all(seed: int) -> None:
    """Seed the policy's samples (torch, numpy, random)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Episodes:
    """Finished episodes in the order they finished, with a line printed for each."""

    def __init__(self, total: int):
        self.total, self.start = total, time.time()
        self.returns: list[float] = []
        self.lengths: list[int] = []

    def add(self, ret: float, length: int) -> None:
        self.returns.append(ret)
        self.lengths.append(length)
        print(f"eval episode {len(self.returns)}/{self.total}: return {ret:.1f}, length "
              f"{length:,}, {time.time() - self.start:.0f} s", flush=True)


def play(env, agent, episodes: int, greedy: bool = False, film: int = 0,
         on_episode=None, stop: threading.Event | None = None) -> list[np.ndarray] | None:
    """Run `episodes` episodes of `agent` on `env` (started here); each env its share, so
    the set of episodes, not their finishing order, is fixed by the env seeds. Calls
    on_episode(return, length) per finished episode. Returns env 0's frames (H, W, C) of its
    first `film` episodes (image envs; None otherwise), or None early when `stop` is set.
    KeyboardInterrupt propagates with what finished already reported."""
    n = env.num_envs
    quota = [episodes // n + (j < episodes % n) for j in range(n)]
    done, score, length = [0] * n, np.zeros(n), np.zeros(n, np.int64)
    carry = agent.initial_carry(n)
    image = next((k for k, (shape, _) in env.obs_space.items() if len(shape) == 3), None)
    frames: list[np.ndarray] | None = [] if image and film else None
    env.start()
    while sum(done) < episodes:
        if stop is not None and stop.is_set():
            return None
        obs = env.recv()
        ids = obs["env_id"]
        action, _ = policy_act(agent, carry, obs, list(env.obs_space), agent.device, greedy)
        sent = action.argmax(-1) if env.act_space.discrete else action
        env.send(sent.cpu().numpy(), ids)
        first = obs["is_first"]
        score[ids] = np.where(first, 0.0, score[ids] + obs["reward"])
        length[ids] = np.where(first, 0, length[ids] + 1)
        if frames is not None and done[0] < film and 0 in ids:  # film env 0
            frames.append(obs[image][list(ids).index(0)].transpose(1, 2, 0))
        for j in ids[obs["is_last"]]:
            if done[j] < quota[j]:
                done[j] += 1
                if on_episode is not None:
                    on_episode(float(score[j]), int(length[j]))
    return frames


def run_episodes(cfg, ckpt, ecfg: EvalConfig, seed: int, episodes: Episodes):
    """The eval command's episodes over up to MAX_EVAL_ENVS envs; fills `episodes`. Returns
    (frames (T, H, W, C) uint8 of env 0's first ecfg.videos episodes or None, agent)."""
    try:
        env = make_env(cfg.env, min(ecfg.episodes, MAX_EVAL_ENVS), cfg.env_opts, seed=seed)
    except ValueError as e:  # e.g. the env's package is not installed here
        raise ConfigError(str(e)) from e
    agent = Agent(env.obs_space, env.act_space, cfg.net, cfg.agent, torch.device(cfg.device))
    agent.load_state_dict(ckpt["agent"])
    agent.eval()
    try:
        frames = play(env, agent, ecfg.episodes, ecfg.greedy, ecfg.videos, episodes.add)
    finally:
        env.close()
    return (np.stack(frames) if frames else None), agent


def render_episode(cfg, agent, greedy: bool, seed: int) -> np.ndarray | None:
    """Film one episode of a Gymnasium env through render_mode='rgb_array'; None if it can't."""
    import gymnasium

    from dreamer_fast.envs.base import headless_rendering
    from dreamer_fast.envs.spaces import ActConverter, ObsConverter

    headless_rendering()
    try:
        env = gymnasium.make(cfg.env, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        frames = [env.render()]
        if frames[0] is None or np.asarray(frames[0]).ndim != 3:
            raise ValueError("render() gave no rgb_array frame")
    except Exception as e:  # e.g. gymnasium.error.DependencyNotInstalled (pygame)
        print(f"cannot render {cfg.env} ({type(e).__name__}: {str(e)[:100]})")
        return None
    opts = cfg.env_opts
    to_obs = ObsConverter(env.observation_space, cfg.env, None, opts.image_size, opts.obs_keys)
    to_act = ActConverter(env.action_space, cfg.env)
    batch = lambda o: {k: v[None] for k, v in o.items()} if isinstance(o, dict) else o[None]
    carry, first, last = agent.initial_carry(1), True, False
    device = agent.device
    while not last:
        step = to_obs(batch(obs))
        step.update(is_first=np.array([first]), is_last=np.array([False]), env_id=np.zeros(1, int))
        action, _ = policy_act(agent, carry, step, list(to_obs.obs_space), device, greedy)
        sent = action.argmax(-1) if agent.act_space.discrete else action
        obs, _, terminated, truncated, _ = env.step(to_act(sent.cpu().numpy())[0])
        frames.append(env.render())
        first, last = False, terminated or truncated
    env.close()
    return np.stack(frames)


def evaluate(ecfg: EvalConfig) -> dict:
    """Evaluate the checkpoint in ecfg.logdir; writes <logdir>/eval/returns.json, episode.mp4
    and eval/* to the run's TensorBoard. Returns the result (with `interrupted`). A packed
    run's logdir (--seeds N) evaluates each seed's own checkpoint (evaluate_seeds)."""
    file = checkpoint.find(ecfg.logdir)
    seeds = 1 if file is None else int(checkpoint.load_checkpoint(file).get("packed", 1))
    if seeds > 1:
        return evaluate_seeds(ecfg, file, seeds)
    if ecfg.seed_index is not None:
        raise ConfigError(f"--seed-index {ecfg.seed_index}: {ecfg.logdir} is a run of one seed "
                          "(--seed-index picks a seed of a packed run, trained with --seeds N)")
    cfg, file, ckpt = load_agent(ecfg.logdir, ecfg.device)
    check_env_module(cfg.env, ecfg)
    seed = cfg.seed + 10_000 if ecfg.seed is None else ecfg.seed
    counters = ckpt["counters"]
    # The x-axis of the run's TensorBoard: agent steps, or updates for an offline run.
    steps = int(counters["updates"] if counters.get("offline") else counters["steps"])
    trained = (f"{steps:,} offline updates" if counters.get("offline") else
               f"{steps:,} agent steps")
    print(f"eval {cfg.env}: {ecfg.episodes} episodes of {file} ({trained}), "
          f"seed {seed}, {'greedy' if ecfg.greedy else 'sampled'} actions", flush=True)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if ignored
    seed_all(seed)
    episodes, frames, agent, interrupted = Episodes(ecfg.episodes), None, None, False
    try:
        frames, agent = run_episodes(cfg, ckpt, ecfg, seed, episodes)
        # A Gymnasium env films its own frames at their size (render_mode rgb_array) where it
        # renders; with --env-opts.render-image the observations are those frames already.
        if (ecfg.videos and suite_of(cfg.env) == "gymnasium"
                and not cfg.env_opts.render_image):
            rendered = render_episode(cfg, agent, ecfg.greedy, seed)
            frames = frames if rendered is None else rendered
    except KeyboardInterrupt:
        interrupted = True
        print(f"eval interrupted: writing the {len(episodes.returns)} finished episodes",
              flush=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    return write_result(cfg, file, ecfg, seed, steps, episodes, frames, interrupted)


def evaluate_seeds(ecfg: EvalConfig, file: str, seeds: int) -> dict:
    """A packed run: evaluate seed --seed-index (its folder seed<i>), or every seed and then
    the interquartile mean of their mean returns with its 95% bootstrap interval (scores.py),
    written to <logdir>/eval/returns.json."""
    if ecfg.seed_index is not None and ecfg.seed_index >= seeds:
        raise ConfigError(f"--seed-index {ecfg.seed_index} but {file} packs {seeds} seeds "
                          f"(0..{seeds - 1})")
    logdir = os.path.dirname(os.path.abspath(file))
    folder = lambda i: os.path.join(logdir, f"seed{i}")
    if ecfg.seed_index is not None:
        return evaluate(dataclasses.replace(ecfg, logdir=folder(ecfg.seed_index),
                                            seed_index=None))
    results = []
    for i in range(seeds):
        print(f"seed {i} of {seeds}: {folder(i)}", flush=True)
        results.append(evaluate(dataclasses.replace(ecfg, logdir=folder(i))))
        if results[-1]["interrupted"]:
            break
    means = [r["mean"] for r in results if r["mean"] is not None]
    pooled = summary(means) if means else {}
    if pooled:
        print(f"eval {results[0]['env']}: {len(means)} seeds, IQM of their mean returns "
              f"{pooled['iqm']:.1f} [95% CI {pooled['iqm_lo']:.1f}, {pooled['iqm_hi']:.1f}], "
              f"mean {pooled['mean']:.1f}; per seed {', '.join(f'{m:.1f}' for m in means)}")
    out = {"checkpoint": file, "seeds": results, "pooled": pooled,
           "interrupted": any(r["interrupted"] for r in results)}
    os.makedirs(os.path.join(logdir, "eval"), exist_ok=True)
    with open(os.path.join(logdir, "eval", "returns.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def write_result(cfg, file, ecfg, seed, steps, episodes, frames, interrupted) -> dict:
    logdir = os.path.dirname(os.path.abspath(file))
    folder = os.path.join(logdir, "eval")
    os.makedirs(folder, exist_ok=True)
    logger = Logger(logdir)
    video = None
    tag = "eval_greedy" if ecfg.greedy else "eval"  # the two kinds never share a curve
    if frames is not None:
        video = logger.video(steps, f"{tag}/episode", frames, fps=30,
                             path=os.path.join(folder, f"{'greedy-' * ecfg.greedy}episode.mp4"))
    elif ecfg.videos and not interrupted:
        print(f"{cfg.env} has no image observation and cannot render here: "
              "wrote the returns only (no mp4)")
    returns = episodes.returns
    mean = float(np.mean(returns)) if returns else None
    std = float(np.std(returns)) if returns else None
    if returns:
        logger.scalars(steps, {f"{tag}/return": mean, f"{tag}/length": float(np.mean(
            episodes.lengths)), f"{tag}/return_std": std, f"{tag}/episodes": len(returns)})
    logger.close()
    result = {"checkpoint": file, "env": cfg.env, "steps": steps, "seed": seed,
              "greedy": ecfg.greedy, "episodes": len(returns), "requested": ecfg.episodes,
              "interrupted": interrupted, "returns": returns, "lengths": episodes.lengths,
              "mean": mean, "std": std, "video": video}
    with open(os.path.join(folder, "returns.json"), "w") as f:
        json.dump(result, f, indent=1)
    if returns:
        print(f"eval {cfg.env}: mean return {mean:.1f} +- {std:.1f} over {len(returns)} "
              f"episodes -> {folder}")
    return result


class PeriodicEval:
    """Evaluation during training (`--eval-every` seconds, `--eval-episodes`) in a thread of
    its own, on envs of its own (seed + 20,000) with a copy of the weights taken at the
    trigger: the actor and learner never wait for it. One eval at a time (a trigger while one
    runs is skipped). `pop` hands finished evals to the main loop: {step, returns, lengths,
    frames (env 0's first episode, image envs) or None}."""

    def __init__(self, cfg, obs_space, act_space, device: torch.device, episodes: int):
        self.cfg, self.device, self.episodes = cfg, device, episodes
        self.obs_space, self.act_space = obs_space, act_space
        self._request: tuple[int, dict] | None = None
        self._cond = threading.Condition()
        self._results: list[dict] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.skipped = 0
        self.thread = threading.Thread(target=self._run, name="eval", daemon=True)
        self.thread.start()

    def trigger(self, step: int, weights: dict) -> None:
        """Evaluate `weights` (a CPU state dict of the agent) as of agent step `step`."""
        with self._cond:
            if self._request is not None or self._busy:
                self.skipped += 1
                return
            self._request = (step, weights)
            self._cond.notify()

    _busy = False

    def pop(self) -> list[dict]:
        with self._cond:
            out, self._results = self._results, []
        if self.error is not None:
            raise RuntimeError(f"periodic evaluation failed: {self.error!r}") from self.error
        return out

    def close(self) -> None:
        self.stop.set()
        with self._cond:
            self._cond.notify()
        self.thread.join(timeout=60)

    def _run(self) -> None:
        agent = None
        try:
            while not self.stop.is_set():
                with self._cond:
                    while self._request is None and not self.stop.is_set():
                        self._cond.wait()
                    if self.stop.is_set():
                        return
                    (step, weights), self._request = self._request, None
                    self._busy = True
                if agent is None:
                    agent = Agent(self.obs_space, self.act_space, self.cfg.net, self.cfg.agent,
                                  self.device)
                    agent.eval()
                agent.load_state_dict(weights)
                # Fresh envs each time, same seeds: every eval sees the same starts.
                env = make_env(self.cfg.env, min(self.episodes, MAX_EVAL_ENVS),
                               self.cfg.env_opts, seed=self.cfg.seed + 20_000)
                try:
                    result = self._episodes(env, agent)
                finally:
                    env.close()
                with self._cond:
                    self._busy = False
                    if result is not None:
                        self._results.append({"step": step, **result})
        except BaseException as e:  # surfaced by pop() in the main loop
            self.error = e

    def _episodes(self, env, agent) -> dict | None:
        returns, lengths = [], []
        frames = play(env, agent, self.episodes, film=1, stop=self.stop,
                      on_episode=lambda r, n: (returns.append(r), lengths.append(n)))
        if self.stop.is_set():
            return None
        return {"returns": returns, "lengths": lengths,
                "frames": np.stack(frames) if frames else None}
