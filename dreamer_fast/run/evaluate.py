"""Evaluation: run N episodes of a trained policy; write returns (JSON) and one episode's mp4.

    python run.py --eval --logdir DIR [--episodes 10] [--greedy] [--device cpu]

The config comes from the checkpoint. Image envs film their observations; vector-only
Gymnasium envs are filmed with render_mode="rgb_array" when the env can render (CartPole
needs pygame); otherwise only the returns are written, and the command says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import torch

from dreamer_fast.agent.agent import Agent
from dreamer_fast.config import ConfigError
from dreamer_fast.envs import make_env, suite_of
from dreamer_fast.run import checkpoint
from dreamer_fast.run.actor import policy_act
from dreamer_fast.run.logger import write_mp4

MAX_EVAL_ENVS = 16


def load_agent(path: str, device: str = "auto"):
    """(config, agent, checkpoint dict) from a logdir or a checkpoint file."""
    file = checkpoint.find(path)
    if file is None:
        raise ConfigError(f"no checkpoint at {path!r} (expected a logdir holding "
                          f"{checkpoint.CHECKPOINT} or the file itself)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = checkpoint.load_checkpoint(file, device)
    cfg = checkpoint.config_from_dict(json.loads(ckpt["config"]))
    cfg = dataclasses.replace(cfg, device=device)
    return cfg, file, ckpt


def run_episodes(cfg, ckpt, episodes: int, greedy: bool):
    """Returns (returns list, frames (T, H, W, C) uint8 of env 0's first episode or None)."""
    n = min(episodes, MAX_EVAL_ENVS)
    per_env = math.ceil(episodes / n)
    env = make_env(cfg.env, n, cfg.env_opts, seed=cfg.seed + 10_000)
    device = torch.device(cfg.device)
    agent = Agent(env.obs_space, env.act_space, cfg.net, cfg.agent, device)
    agent.load_state_dict(ckpt["agent"])
    agent.eval()
    carry = agent.initial_carry(n)
    image = next((k for k, (shape, _) in env.obs_space.items() if len(shape) == 3), None)
    returns: list[list[float]] = [[] for _ in range(n)]
    score = np.zeros(n)
    frames: list[np.ndarray] | None = [] if image else None
    env.start()
    try:
        while min(len(r) for r in returns) < per_env:
            obs = env.recv()
            ids = obs["env_id"]
            action, _ = policy_act(agent, carry, obs, list(env.obs_space), device, greedy)
            sent = action.argmax(-1) if env.act_space.discrete else action
            env.send(sent.cpu().numpy(), ids)
            score[ids] = np.where(obs["is_first"], 0.0, score[ids] + obs["reward"])
            if image and not returns[0] and 0 in ids:  # film env 0's first episode
                frames.append(obs[image][list(ids).index(0)].transpose(1, 2, 0))
            for j in ids[obs["is_last"]]:
                returns[j].append(float(score[j]))
    finally:
        env.close()
    flat = [r for env_returns in returns for r in env_returns[:per_env]][:episodes]
    return flat, (np.stack(frames) if frames else None), agent


def render_episode(cfg, agent, greedy: bool) -> np.ndarray | None:
    """Film one episode of a Gymnasium env through render_mode='rgb_array'; None if it can't."""
    import gymnasium

    from dreamer_fast.envs.spaces import ActConverter, ObsConverter

    try:
        env = gymnasium.make(cfg.env, render_mode="rgb_array")
        obs, _ = env.reset(seed=cfg.seed + 20_000)
        frames = [env.render()]
    except Exception as e:  # e.g. gymnasium.error.DependencyNotInstalled (pygame)
        print(f"cannot render {cfg.env}: {e}")
        return None
    to_obs = ObsConverter(env.observation_space, cfg.env, channels_last=True)
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


def evaluate(path: str, episodes: int = 10, greedy: bool = False, device: str = "auto") -> dict:
    """Evaluate the checkpoint in `path`; writes <logdir>/eval/returns.json and episode.mp4."""
    cfg, file, ckpt = load_agent(path, device)
    returns, frames, agent = run_episodes(cfg, ckpt, episodes, greedy)
    folder = os.path.join(os.path.dirname(os.path.abspath(file)), "eval")
    os.makedirs(folder, exist_ok=True)
    if frames is None and suite_of(cfg.env) == "gymnasium":
        frames = render_episode(cfg, agent, greedy)
    video = os.path.join(folder, "episode.mp4")
    if frames is not None:
        write_mp4(video, frames, fps=30)
    else:
        video = None
        print(f"{cfg.env} has no image observation and cannot render here: "
              "wrote the returns only (no mp4)")
    result = {"checkpoint": file, "env": cfg.env, "episodes": len(returns), "greedy": greedy,
              "returns": returns, "mean": float(np.mean(returns)), "std": float(np.std(returns)),
              "steps": int(ckpt["limiter"]["inserted"]), "video": video}
    with open(os.path.join(folder, "returns.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"eval {cfg.env}: mean return {result['mean']:.1f} +- {result['std']:.1f} over "
          f"{len(returns)} episodes -> {folder}")
    return result
