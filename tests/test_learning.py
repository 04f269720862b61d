"""Learning in seconds on CPU with the debug net (a larger test lr, stated per test).

The default lr 4e-5 with 1000 warmup updates is tuned for long runs; these tests use
lr 1e-3..3e-3 with 10 warmup updates so a few hundred updates show learning.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dreamer_fast.agent.agent import Agent
from dreamer_fast.config import SIZES, AgentConfig, OptimConfig
from dreamer_fast.data.synthetic import ActSpace

NET = SIZES["debug"]


def _window(obs, reward, action, B, L):
    z = torch.zeros(B, L, dtype=torch.bool)
    first = z.clone()
    first[:, 1] = True
    return {"vector": obs, "reward": reward, "action": action, "is_first": first,
            "is_last": z, "is_terminal": z, "deter": torch.zeros(B, L, NET.deter).bfloat16(),
            "stoch": torch.zeros(B, L, NET.stoch, dtype=torch.int16)}


def wave_batch(B=8, L=17):
    """Sinusoids with a random phase per sequence; reward = 3 sin(.) of the observation."""
    phase, t = torch.rand(B, 1) * 6.28, torch.arange(L)[None].float()
    obs = torch.stack([torch.sin(0.5 * t + phase), torch.cos(0.5 * t + phase),
                       2 * torch.sin(0.25 * t + phase)], -1)
    action = F.one_hot(torch.randint(0, 2, (B, L)), 2).float()
    return _window(obs, 3 * obs[..., 0], action, B, L)


def chain_batch(B=8, L=17):
    """Two-state chain under a random policy: the action picks the next state; state 0 pays 1."""
    action = torch.randint(0, 2, (B, L))
    state = torch.cat([torch.randint(0, 2, (B, 1)), action[:, :-1]], 1)
    return _window(F.one_hot(state, 2).float(), (state == 0).float(),
                   F.one_hot(action, 2).float(), B, L)


def _posterior_feat(agent, batch):
    with torch.no_grad():
        stoch0 = F.one_hot(batch["stoch"][:, 0].long(), NET.classes).float()
        deter, stoch, _ = agent.dyn.observe(batch["deter"][:, 0].float(), stoch0,
                                            batch["action"][:, :-1],
                                            agent.enc({"vector": batch["vector"][:, 1:]}),
                                            batch["is_first"][:, 1:])
        return agent.feat(deter, stoch)


def _reward_mse(agent, batch):
    with torch.no_grad():
        pred = agent.rew.mean(agent.rew(_posterior_feat(agent, batch)))
        return (pred - batch["reward"][:, 1:]).square().mean().item()


def test_world_model_learns_sequences():
    torch.manual_seed(0)
    cfg = AgentConfig(batch_size=8, batch_length=16, imag_horizon=5,
                      optim=OptimConfig(lr=1e-3, warmup=10))
    agent = Agent({"vector": ((3,), np.float32)}, ActSpace(True, 2), NET, cfg)
    probe = wave_batch()
    first_rec, first_mse = None, _reward_mse(agent, probe)
    for _ in range(250):
        metrics, _ = agent.train_step(wave_batch())
        first_rec = first_rec or metrics["loss/rec"].item()
    rec, mse = metrics["loss/rec"].item(), _reward_mse(agent, probe)
    assert rec < first_rec / 10, (first_rec, rec)
    assert mse < first_mse / 5, (first_mse, mse)
    assert agent.nonfinite_losses() == []


def test_actor_critic_improves_return_in_imagination():
    torch.manual_seed(0)
    cfg = AgentConfig(batch_size=8, batch_length=16, imag_horizon=5,
                      optim=OptimConfig(lr=3e-3, warmup=10))
    agent = Agent({"vector": ((2,), np.float32)}, ActSpace(True, 2), NET, cfg)
    probe = chain_batch()

    def expected_reward():  # per step under the policy = P(choose the paying state)
        with torch.no_grad():
            return agent.pol(_posterior_feat(agent, probe)).probs[..., 0].mean().item()

    before = expected_reward()
    for _ in range(150):
        metrics, _ = agent.train_step(chain_batch())
    after = expected_reward()
    assert abs(before - 0.5) < 0.02  # near-uniform initial policy
    assert after > 0.9, (before, after)
    assert metrics["imag/ret"] > 2.0  # imagined returns of the improved policy
