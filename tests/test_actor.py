"""Actor/learner units: env_id gather/scatter of carries, zero action at is_last, weight
double-buffering, the is_last annotation, and the resume config check."""

import dataclasses
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreamer_fast.run import checkpoint
from dreamer_fast.run.actor import Actor, policy_act
from dreamer_fast.run.weights import PolicyWeights
from dreamer_fast.agent.agent import Agent
from dreamer_fast.config import SIZES, AgentConfig, Config
from dreamer_fast.checks import ConfigError
from dreamer_fast.envs.base import ActSpace
from dreamer_fast.run.learner import annotate
from dreamer_fast.data.limiter import RateLimiter
from dreamer_fast.data.ring import Ring

N, D = 4, 3


class CountingPolicy:
    """deter = sum of obs["vector"] since the env's last is_first (so each env's carry is its
    own running sum); action = one-hot of the env's id parity."""

    net = None

    def initial_carry(self, n):
        return {"deter": torch.zeros(n, D), "stoch": torch.zeros(n, 2, 2),
                "action": torch.zeros(n, 2)}

    def policy_step(self, carry, obs, greedy=False):
        keep = (~obs["is_first"]).float()[:, None]
        deter = carry["deter"] * keep + obs["vector"]
        action = F.one_hot(obs["vector"][:, 0].long() % 2, 2).float()
        latent = {"deter": deter.bfloat16(),
                  "stoch": torch.zeros(len(deter), 2, dtype=torch.int16)}
        return action, {"deter": deter, "stoch": carry["stoch"], "action": action}, latent


class ScriptedEnv:
    """An async-style VecEnv: each recv returns a scripted subset of env ids, in any order.
    Env j observes vector [j, t, 1] at its t-th step; is_last is scripted."""

    num_envs, batch_size = N, 2
    obs_space = {"vector": ((D,), np.float32)}
    act_space = ActSpace(True, 2)

    def __init__(self, script):
        self.script, self.t = list(script), np.zeros(N, int)
        self.sent: list = []

    def start(self):
        pass

    def recv(self):
        ids, last = self.script.pop(0)
        ids = np.array(ids, np.int32)
        first = self.t[ids] == 0
        vec = np.stack([ids, self.t[ids], np.ones(len(ids))], 1).astype(np.float32)
        self.t[ids] += 1
        self.t[ids[np.array(last, bool)]] = 0
        return {"vector": vec, "reward": np.ones(len(ids), np.float32), "is_first": first,
                "is_last": np.array(last, bool), "is_terminal": np.array(last, bool),
                "env_id": ids}

    def send(self, action, env_id):
        self.sent.append((np.asarray(action).copy(), np.asarray(env_id).copy()))


class StubWeights:
    def __init__(self, policy):
        self.copies, self.lock = [policy], threading.Lock()

    def acquire(self):
        self.lock.acquire()
        return self.copies[0], self.lock


def make_ring(capacity=4 * 64):
    spec = {"vector": ((D,), torch.float32), "action": ((2,), torch.float32),
            "reward": ((), torch.float32), "is_first": ((), torch.bool),
            "is_last": ((), torch.bool), "is_terminal": ((), torch.bool),
            "deter": ((D,), torch.bfloat16), "stoch": ((2,), torch.int16)}
    return Ring(spec, N, capacity, length=5)


def test_policy_act_gathers_and_scatters_carries_by_env_id():
    policy = CountingPolicy()
    carry = policy.initial_carry(N)
    carry["deter"][:] = torch.arange(N, dtype=torch.float32)[:, None] * 10  # tag rows
    obs = {"vector": torch.tensor([[3, 0, 1], [1, 0, 1]], dtype=torch.float32),
           "is_first": np.array([False, False]), "is_last": np.array([False, True]),
           "env_id": np.array([3, 1])}
    action, latent = policy_act(policy, carry, obs, ["vector"], torch.device("cpu"))
    # Rows 3 and 1 were gathered (their tags 30 and 10 carried over) and scattered back.
    assert carry["deter"][:, 0].tolist() == [0, 10 + 1, 20, 30 + 3]
    assert latent["deter"][:, 0].float().tolist() == [33, 11]
    # env 3: parity 1 -> one-hot [0, 1]; env 1 is_last -> zero action, also in its carry.
    assert action.tolist() == [[0, 1], [0, 0]]
    assert carry["action"].tolist() == [[0, 0], [0, 0], [0, 0], [0, 1]]


def test_actor_stores_per_stream_steps_and_zero_action_at_is_last():
    script = [([2, 0], [0, 0]), ([1, 3], [0, 1]), ([0, 2], [0, 1]), ([3, 1], [0, 0]),
              ([2, 0], [0, 0]), ([1, 3], [0, 0])]
    env, ring = ScriptedEnv(script), make_ring()
    limiter = RateLimiter(1.0, 1, min_inserts=10**9)  # warm-up forever: the actor never waits
    actor = Actor(env, ring, limiter, StubWeights(CountingPolicy()), torch.device("cpu"), 12)
    for _ in script:
        assert actor.step()
    assert ring.inserted == 12 and ring._count.tolist() == [3, 3, 3, 3]
    store = ring._storage
    # Stream j holds env j's steps in order: vector[:, 0] == j everywhere.
    assert (store["vector"][:, :3, 0] == torch.arange(N)[:, None]).all()
    # Env 2 ended at its 2nd step, env 3 at its 1st: stored actions there are zero.
    assert store["is_last"][:, :3].tolist() == [[False] * 3, [False] * 3,
                                                [False, True, False], [True, False, False]]
    assert (store["action"][2, 1] == 0).all() and (store["action"][3, 0] == 0).all()
    parity = F.one_hot(torch.arange(N) % 2, 2).float()
    keep = ~store["is_last"][:, :3]
    assert torch.equal(store["action"][:, :3], parity[:, None] * keep[..., None])
    # Latents restart after an episode end: env 3's 2nd step is is_first -> sum restarts.
    assert store["is_first"][3, 1] and store["deter"][3, 1].float().tolist() == [3, 0, 1]
    assert store["deter"][0, :3, 1].float().tolist() == [0, 1, 3]  # 0, 0+1, 0+1+2
    # Discrete actions reach the env as int64 indices, routed to the right env ids.
    action, ids = env.sent[0]
    assert action.dtype == np.int64 and ids.tolist() == [2, 0] and action.tolist() == [0, 0]
    assert list(actor.episodes) == [(0.0, 0), (1.0, 1)]  # env 3 then env 2 (reward 0 on first)


def small_agent():
    net = dataclasses.replace(SIZES["debug"], deter=16, hidden=8, units=8, blocks=2)
    return Agent({"vector": ((D,), np.float32)}, ActSpace(True, 2), net,
                 AgentConfig(batch_size=2, batch_length=4, imag_horizon=2), "cpu")


def test_policy_weights_publish_flips_and_never_writes_a_copy_in_use():
    agent = small_agent()
    weights = PolicyWeights(agent)
    with torch.no_grad():
        for p in agent.pol.parameters():
            p.add_(1.0)
    active, lock = weights.acquire()
    assert active is weights.copies[0]
    assert weights.publish() and weights.index == 1  # wrote copy 1 while copy 0 is read
    new = weights.copies[1]
    assert all(torch.equal(a, b) for a, b in zip(new.pol.parameters(), agent.pol.parameters()))
    assert not weights.publish() and weights.skipped == 1  # copy 0 still held by the actor
    assert not all(torch.equal(a, b) for a, b in zip(active.pol.parameters(),
                                                     agent.pol.parameters()))
    lock.release()
    assert weights.publish() and weights.index == 0
    carry = weights.copies[0].initial_carry(3)
    obs = {"vector": torch.zeros(3, D), "is_first": torch.ones(3, dtype=torch.bool)}
    action, _, latent = weights.copies[0].policy_step(carry, obs)
    assert action.shape == (3, 2) and latent["stoch"].dtype == torch.int16


def test_annotate_marks_is_last_before_is_first():
    batch = {"is_first": torch.tensor([[True, False, True, False, True]]),
             "is_last": torch.tensor([[False, False, False, False, False]])}
    annotate(batch)
    assert batch["is_last"].tolist() == [[False, True, False, True, False]]


def test_config_diff_names_fields_and_ignores_runtime_ones():
    cfg = Config()
    saved = checkpoint.config_json(cfg)
    same = dataclasses.replace(cfg, steps=5, logdir="x", log_every=1.0)
    checkpoint.check_compatible({"config": saved}, same, "f")
    other = dataclasses.replace(cfg, net=SIZES["size1m"], model="size1m")
    with pytest.raises(ConfigError, match=r"differs in model, net\.classes, .*net\.deter: 8192 -> 512"):
        checkpoint.check_compatible({"config": saved}, other, "f")
    assert checkpoint.config_from_dict(dataclasses.asdict(other)) == other
