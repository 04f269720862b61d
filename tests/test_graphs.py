"""CUDA-graph readiness of the update and the policy step (DESIGN 3.1-3.5).

A CPU cannot capture a CUDA graph, so the CPU tests check what a capture relies on:
- no host sync inside train_step / policy_core (a dispatch mode fails on any op that reads
  a device value back to the host: .item(), tensor-valued `if`, nonzero, ...);
- no Python state changes during an update (a replay would not repeat it: rule 2);
- warm-up leaves the model exactly as it was (its updates are undone);
- the flags: graphs='on' off CUDA is a clear error.
With a GPU the last tests compare the graphed update and policy step with eager ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dreamer_fast.run.actor import Policy, PolicyWeights, policy_act, policy_core
from dreamer_fast.agent.agent import Agent
from dreamer_fast.config import SIZES, AgentConfig, ConfigError, OptimConfig, parse
from dreamer_fast.run.graphs import (GraphedPolicy, GraphedTrainStep, resolve_graphs, state_tensors,
                                 warm_up)
from dreamer_fast.data.synthetic import IMAGE, VECTOR, ActSpace, make_batch

SMALL = AgentConfig(batch_size=2, batch_length=8, imag_horizon=3,
                    optim=OptimConfig(warmup=10))
SYNC = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "_unique2",
        "unique_consecutive", "item"}
SPACES = [("vec-discrete", VECTOR, ActSpace(True, 3)), ("vec-continuous", VECTOR, ActSpace(False, 2)),
          ("img", IMAGE, ActSpace(True, 4))]


class NoHostSync(TorchDispatchMode):
    """Fails on every op whose result the host must wait for (a device->host read)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name in SYNC or bool_index:  # a boolean mask index runs nonzero on the device
            raise AssertionError(f"host sync inside a graphed step: {func}")
        return func(*args, **(kwargs or {}))


def _agent(obs, act, cfg=SMALL, device="cpu"):
    torch.manual_seed(0)
    return Agent(obs, act, SIZES["debug"], cfg, device)


def test_detector_catches_host_syncs():
    x = torch.ones(3)
    for bad in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: x.nonzero(),
                lambda: F.one_hot(torch.tensor([1]), 3), lambda: x[x > 0]):
        with pytest.raises(AssertionError, match="host sync"):
            with NoHostSync():
                bad()


@pytest.mark.parametrize("name,obs,act", SPACES, ids=[s[0] for s in SPACES])
def test_train_step_has_no_host_sync(name, obs, act):
    agent = _agent(obs, act)
    batch = make_batch(obs, act, agent.net, SMALL.batch_size, SMALL.batch_length + 1)
    with NoHostSync():
        for _ in range(2):  # the second also covers the state the first one created
            metrics, latents = agent.train_step(batch)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert latents["deter"].shape == (2, 8, agent.net.deter)


@pytest.mark.parametrize("name,obs,act", SPACES, ids=[s[0] for s in SPACES])
def test_policy_core_has_no_host_sync(name, obs, act):
    agent = _agent(obs, act)
    policy = Policy(agent)
    carry = policy.initial_carry(5)
    inp = {k: v[:, 0] for k, v in make_batch(obs, act, agent.net, 3, 1).items() if k in obs}
    inp.update(env_id=torch.tensor([4, 0, 2]), is_first=torch.tensor([True, False, True]),
               is_last=torch.tensor([False, True, False]))
    with NoHostSync():
        action, latent = policy_core(policy, carry, inp, list(obs))
    assert action.shape == (3, act.size) and (action[1] == 0).all()
    assert latent["stoch"].dtype == torch.int16


def _python_state(obj, seen=None, prefix="") -> dict:
    """Every non-tensor attribute reachable from obj (modules, optimizer, configs)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return {}
    seen.add(id(obj))
    out = {}
    attrs = vars(obj) if hasattr(obj, "__dict__") else {}
    for k, v in attrs.items():
        if k in ("_parameters", "_buffers", "_forward_pre_hooks", "_forward_hooks",
                 "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            continue
        if isinstance(v, torch.Tensor) or (isinstance(v, list) and v and
                                           isinstance(v[0], torch.Tensor)):
            continue
        if isinstance(v, dict) and k == "_modules":
            for name, m in v.items():
                out.update(_python_state(m, seen, f"{prefix}{name}."))
        elif isinstance(v, (torch.nn.Module,)) or type(v).__module__.startswith("dreamer_fast"):
            out.update(_python_state(v, seen, f"{prefix}{k}."))
        else:
            out[prefix + k] = repr(v)
    return out


def test_update_changes_no_python_state():
    """Rule 2: what changes between updates must live in device tensors; a CUDA graph would
    silently replay the captured Python values (lr warm-up, step count, return EMA...)."""
    obs, act = VECTOR, ActSpace(True, 3)
    agent = _agent(obs, act)
    batch = make_batch(obs, act, agent.net, SMALL.batch_size, SMALL.batch_length + 1)
    agent.train_step(batch)  # the first step may create state (e.g. .grad); later ones not
    before = _python_state(agent)
    assert "opt.lr_scale" in before and "cfg.batch_size" in before  # the walk reaches the optimizer
    lr0, count0, lo0 = agent.opt.lr.clone(), agent.opt.count.clone(), agent.retnorm_lo.clone()
    for _ in range(3):
        agent.train_step(batch)
    assert _python_state(agent) == before
    # ...while the device state did move on:
    assert agent.opt.count == count0 + 3 and agent.opt.lr > lr0 and agent.retnorm_lo != lo0


def test_warm_up_is_undone():
    obs, act = IMAGE, ActSpace(True, 4)
    agent = _agent(obs, act)
    batch = make_batch(obs, act, agent.net, SMALL.batch_size, SMALL.batch_length + 1)
    state = state_tensors(agent, agent.opt)
    before = [t.detach().clone() for t in state]
    warm_up(agent.train_step, (batch,), state, iters=2)
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    # ...and the next update is the one a fresh agent would make.
    fresh = _agent(obs, act)
    torch.manual_seed(1)
    m1, _ = agent.train_step(batch)
    torch.manual_seed(1)
    m2, _ = fresh.train_step(batch)
    for (n, p), q in zip(agent.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(m1["loss/rec"], m2["loss/rec"])


def test_graph_flags():
    cpu = torch.device("cpu")
    assert resolve_graphs("auto", cpu) is False and resolve_graphs("off", cpu) is False
    assert resolve_graphs("auto", torch.device("cuda")) is True
    with pytest.raises(ConfigError, match="graphs='on' needs a CUDA device"):
        resolve_graphs("on", cpu)
    cfg = parse(["--env", "CartPole-v1", "--preset", "debug", "--graphs", "off", "--compile"])
    assert cfg.graphs == "off" and cfg.compile is True
    with pytest.raises(SystemExit):
        parse(["--env", "CartPole-v1", "--preset", "debug", "--graphs", "maybe"])
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        GraphedTrainStep(_agent(VECTOR, ActSpace(True, 3)), {})


def test_categorical_sample_distribution():
    """The exponential-race sampler (no multinomial: capturable) samples the probabilities."""
    from dreamer_fast.agent.dists import OneHotCategorical

    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.1, 0.2, 0.7])
    dist = OneHotCategorical(probs.log().expand(20000, 4).clone())
    freq = dist.sample().mean(0)
    assert freq[0] == 0 and torch.allclose(freq, probs, atol=0.015)


# ------------------------------------------------------------------------ GPU only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
@pytest.mark.parametrize("name,obs,act", SPACES, ids=[s[0] for s in SPACES])
def test_graphed_update_matches_eager(name, obs, act):
    cfg = dataclasses.replace(SMALL, precision="float32")
    eager, graphed = _agent(obs, act, cfg, "cuda"), _agent(obs, act, cfg, "cuda")
    step = GraphedTrainStep(graphed, make_batch(obs, act, eager.net, 2, 9))
    for i in range(3):
        batch = {k: v.cuda() for k, v in make_batch(obs, act, eager.net, 2, 9, seed=i).items()}
        torch.manual_seed(10 + i)
        m1, l1 = eager.train_step(batch)
        torch.manual_seed(10 + i)
        m2, l2 = step(batch)
        for k in ("loss/rec", "loss/dyn", "opt/lr"):
            torch.testing.assert_close(m2[k], m1[k], rtol=1e-3, atol=1e-5, msg=k)
    assert step.replays == 3
    for (n, p), q in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=n)
    torch.testing.assert_close(graphed.opt.count, eager.opt.count)


@cuda
def test_graphed_policy_matches_eager():
    obs, act = IMAGE, ActSpace(True, 4)
    agent = _agent(obs, act, SMALL, "cuda")
    weights = PolicyWeights(agent)
    carry_e, carry_g = agent.initial_carry(6), agent.initial_carry(6)
    graph = GraphedPolicy(weights.copies, carry_g, {"image": ((3, 64, 64), torch.uint8)}, 3,
                          greedy=True)
    rng = np.random.default_rng(0)
    for t in range(4):
        step = {"image": rng.integers(0, 256, (3, 3, 64, 64), dtype=np.uint8),
                "env_id": rng.permutation(6)[:3].astype(np.int32),
                "is_first": np.array([t == 0] * 3), "is_last": np.array([False, t == 2, False])}
        a1, l1 = policy_act(weights.copies[t % 2], carry_e, step, list(obs), agent.device, True)
        a2, l2 = graph(t % 2, step)
        torch.testing.assert_close(a2, a1)
        torch.testing.assert_close(l2["deter"].float(), l1["deter"].float(), rtol=2e-2, atol=1e-2)
    for k in carry_e:
        torch.testing.assert_close(carry_g[k], carry_e[k], rtol=1e-3, atol=1e-4)


def test_gpu_path_update_has_no_host_sync_and_keeps_python_state():
    """The path a GPU graph captures (Triton kernels, deferred weight gradients): no host
    sync, and the deferral leaves no Python state behind between updates."""
    import dataclasses

    from dreamer_fast.agent.nets import DEFER

    obs, act = VECTOR, ActSpace(False, 2)
    agent = _agent(obs, act, dataclasses.replace(SMALL, kernels="triton"))
    assert agent.defer
    batch = make_batch(obs, act, agent.net, SMALL.batch_size, SMALL.batch_length + 1)
    agent.train_step(batch)
    before = _python_state(agent)
    with NoHostSync():
        for _ in range(2):
            agent.train_step(batch)
    assert _python_state(agent) == before
    assert not DEFER.active and not DEFER.pending
