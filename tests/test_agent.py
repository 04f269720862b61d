"""Agent structure: exact parameter counts, step functions, reset handling, gradient flow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamer_fast.data.synthetic import IMAGE, VECTOR, ActSpace, make_batch
from dreamer_fast.agent.agent import Agent
from dreamer_fast.config import SIZES, AgentConfig
from dreamer_fast.checks import ConfigError

SMALL = AgentConfig(batch_size=2, batch_length=8, imag_horizon=3)


@pytest.mark.parametrize("size,obs,act,want", [
    ("size1m", {"vector": ((24,), np.float32)}, ActSpace(False, 6), 640_867),
    ("size12m", IMAGE, ActSpace(True, 18), 10_498_772),
    ("size50m", IMAGE, ActSpace(True, 18), 41_659_284),
    ("size200m", IMAGE, ActSpace(True, 18), 165_967_124),
])
def test_parameter_counts_match_official(size, obs, act, want):
    agent = Agent(obs, act, SIZES[size], AgentConfig(), device="meta")
    assert sum(p.numel() for p in agent.trained_parameters()) == want
    # The slow critic is an extra critic-sized copy, excluded from the optimizer.
    assert sum(p.numel() for p in agent.slowval.parameters()) == sum(
        p.numel() for p in agent.val.parameters())


def test_output_inits():
    agent = Agent(VECTOR, ActSpace(True, 4), SIZES["debug"], SMALL)
    for head in (agent.rew, agent.val):
        assert head.out.weight.abs().max() == 0 and head.out.bias.abs().max() == 0
    feat = torch.randn(5, agent.feat_size)
    assert torch.equal(agent.rew.mean(agent.rew(feat)), torch.zeros(5))
    # Actor output x0.01: logits are tiny, so the initial policy is nearly uniform.
    probs = agent.pol(feat).probs
    assert (probs - 0.25).abs().max() < 0.01
    for a, b in zip(agent.val.parameters(), agent.slowval.parameters()):
        assert torch.equal(a, b)


def test_linear_init_std():
    from dreamer_fast.agent.nets import BlockLinear, Linear
    torch.manual_seed(0)
    lin = Linear(1000, 500)
    assert abs(lin.weight.std().item() * np.sqrt(1000) - 1.0) < 0.02
    assert lin.weight.abs().max() <= 2 * 1.1368 / np.sqrt(1000) + 1e-6
    block = BlockLinear(1024, 512, 8)  # full fan-in 1024, not 128
    assert abs(block.weight.std().item() * np.sqrt(1024) - 1.0) < 0.03


def test_reset_zeros_state_then_applies_cell():
    agent = Agent(VECTOR, ActSpace(False, 3), SIZES["debug"], SMALL)
    n = SIZES["debug"]
    with torch.no_grad():  # at init f(0, 0, 0) = 0 because biases are 0; make them not
        for name, p in agent.dyn.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    deter, stoch = torch.randn(2, n.deter), torch.rand(2, n.stoch, n.classes)
    action, tokens = torch.randn(2, 3), torch.randn(2, agent.enc.out_size)
    is_first = torch.tensor([True, False])
    out, _, _ = agent.dyn.obs_step(deter, stoch, action, tokens, is_first)
    fresh = agent.dyn.core(torch.zeros(1, n.deter), torch.zeros(1, n.stoch, n.classes),
                           torch.zeros(1, 3))
    assert torch.allclose(out[0], fresh[0], atol=1e-6)
    assert fresh.abs().sum() > 0  # f(0, 0, 0) is not 0
    kept = agent.dyn.core(deter[1:], stoch[1:], action[1:])
    assert torch.allclose(out[1], kept[0], atol=1e-6)


def test_gru_block_layout():
    """Each block sees its own slice of h; gates are laid out per block as [r, c, u]."""
    from dreamer_fast.kernels.gru import gru_update_ref
    D, G = 12, 3
    gates, h = torch.randn(4, 3 * D), torch.randn(4, D)
    out = gru_update_ref(gates, h, G)
    for g in range(G):
        r, c, u = gates[:, g * 12:(g + 1) * 12].split(4, -1)
        hg = h[:, g * 4:(g + 1) * 4]
        r = torch.sigmoid(r)
        c = torch.tanh(r * c)
        u = torch.sigmoid(u - 1)
        assert torch.allclose(out[:, g * 4:(g + 1) * 4], u * c + (1 - u) * hg, atol=1e-6)


@pytest.mark.parametrize("obs,act", [(IMAGE, ActSpace(True, 5)), (VECTOR, ActSpace(False, 3))],
                         ids=["image-discrete", "vector-continuous"])
def test_step_functions_shapes(obs, act):
    torch.manual_seed(0)
    n = SIZES["debug"]
    agent = Agent(obs, act, n, SMALL)
    batch = make_batch(obs, act, n)
    metrics, latents = agent.train_step(batch)
    assert latents["deter"].shape == (2, 8, n.deter) and latents["deter"].dtype == torch.bfloat16
    assert latents["stoch"].shape == (2, 8, n.stoch) and latents["stoch"].dtype == torch.int16
    assert all(v.dim() == 0 for v in metrics.values())
    assert agent.nonfinite_losses() == []
    carry = agent.initial_carry(3)
    step = {k: batch[k][:, 0].repeat(2, *[1] * (batch[k].dim() - 2))[:3] for k in obs}
    step["is_first"] = torch.ones(3, dtype=torch.bool)
    action, carry, latent = agent.policy_step(carry, step)
    assert action.shape == (3, act.size)
    if act.discrete:
        assert torch.equal(action.sum(-1), torch.ones(3))
    assert latent["stoch"].shape == (3, n.stoch) and latent["deter"].dtype == torch.bfloat16
    report = agent.report_step(batch)
    key = next(iter(obs))
    assert report[key][0].shape == report[key][1].shape == batch[key][:, 1:].shape
    assert torch.isfinite(report[f"openloop/{key}"])


def _grads(agent, loss):
    names = ("enc", "dyn", "dec", "rew", "con", "pol", "val")
    params = {(m, n): p for m in names for n, p in getattr(agent, m).named_parameters()}
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True,
                                allow_unused=True)
    moved = {}
    for (m, n), g in zip(params, grads):
        if g is not None and g.abs().sum() > 0:
            moved.setdefault(m, set()).add(n)
    return moved


def test_gradient_flow():
    torch.manual_seed(0)
    n = SIZES["debug"]
    agent = Agent(IMAGE, ActSpace(True, 4), n, SMALL)
    batch = make_batch(IMAGE, ActSpace(True, 4), n, L=4)
    batch["is_last"][:] = False
    # Every step resets the carry, so a posterior sample cannot reach a later prior through
    # the recurrence: the only path from dyn/rep to posterior/prior is through the KL.
    batch["is_first"][:] = True
    # Non-zero critic/reward weights so every path carries a gradient.
    for p in list(agent.val.out.parameters()) + list(agent.rew.out.parameters()):
        torch.nn.init.normal_(p, std=0.1)
    losses, _, _ = agent.losses(batch)
    assert set(_grads(agent, losses["policy"])) == {"pol"}
    assert set(_grads(agent, losses["value"])) == {"val"}
    assert set(_grads(agent, losses["repval"])) == {"val", "enc", "dyn"}
    dyn, rep = _grads(agent, losses["dyn"]), _grads(agent, losses["rep"])
    assert not any(n.startswith("post.") for n in dyn.get("dyn", ()))
    assert any(n.startswith("prior.") for n in dyn["dyn"])
    assert not any(n.startswith("prior.") for n in rep["dyn"])
    assert any(n.startswith("post.") for n in rep["dyn"]) and "enc" in rep
    assert set(_grads(agent, losses["rec"])) == {"enc", "dyn", "dec"}
    assert set(_grads(agent, losses["rew"])) == {"enc", "dyn", "rew"}


def test_nonfinite_loss_is_flagged_by_name():
    n = SIZES["debug"]
    agent = Agent(VECTOR, ActSpace(True, 3), n, SMALL)
    batch = make_batch(VECTOR, ActSpace(True, 3), n)
    batch["reward"][0, 3] = float("nan")
    agent.train_step(batch)
    assert isinstance(agent.nonfinite, torch.Tensor)  # a device flag, read at log time
    assert "rew" in agent.nonfinite_losses()


def test_bad_observation_space_is_rejected():
    n = SIZES["debug"]
    with pytest.raises(ValueError, match="H == W divisible by 16"):
        Agent({"image": ((3, 60, 60), np.uint8)}, ActSpace(True, 3), n, SMALL)
    with pytest.raises(ValueError, match="allowed: float vectors"):
        Agent({"grid": ((4, 4), np.float32)}, ActSpace(True, 3), n, SMALL)
    with pytest.raises(ConfigError, match="size=0"):
        Agent(VECTOR, ActSpace(True, 0), n, SMALL)


def test_block_linear_shared_input_equals_repeated_concat():
    from dreamer_fast.agent.nets import BlockLinear
    torch.manual_seed(0)
    G, n, m = 4, 6, 10
    layer = BlockLinear(G * (n + m), 20, G)
    own, shared = torch.randn(3, 5, G * n), torch.randn(3, 5, m)
    full = torch.cat([own.reshape(3, 5, G, n), shared[..., None, :].expand(3, 5, G, m)], -1)
    assert torch.allclose(layer.forward_shared(own, shared), layer(full.reshape(3, 5, -1)),
                          atol=1e-5)


def test_bf16_autocast_matmuls_with_float32_params_and_losses():
    """precision=bfloat16: matmuls/convs in bf16, parameters/norm outputs/losses in float32."""
    n, act = SIZES["debug"], ActSpace(True, 4)
    batch = make_batch(IMAGE, act, n)
    results = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        agent = Agent(IMAGE, act, n, AgentConfig(batch_size=2, batch_length=8, imag_horizon=3,
                                                 precision=precision))
        seen = []
        agent.dyn.dynin0[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        torch.manual_seed(1)
        metrics, _ = agent.train_step(batch)
        results[precision] = metrics
        want = torch.bfloat16 if precision == "bfloat16" else torch.float32
        assert seen and set(seen) == {want}
        assert all(p.dtype == torch.float32 for p in agent.parameters())
        assert all(v.dtype == torch.float32 for k, v in metrics.items() if k.startswith("loss/"))
        assert agent.nonfinite_losses() == []
    for key in ("loss/rec", "loss/dyn", "loss/value", "loss/repval"):
        a, b = results["float32"][key], results["bfloat16"][key]
        assert abs(a - b) <= 0.02 * abs(a), (key, a, b)


@pytest.mark.parametrize("impl", ["ref", "fused"])
def test_actor_sample_is_the_policy_distribution(impl):
    """The imagination rollout's discrete sampler (inverse CDF through the latent sampler)
    draws from the same unimix categorical as the policy distribution it replaces."""
    from dreamer_fast.agent.heads import Actor
    from dreamer_fast.kernels import get_ops
    torch.manual_seed(0)
    actor = Actor(8, 16, 2, 5, True, 0.01, 0.1, 1.0, get_ops(impl))
    with torch.no_grad():
        actor.mean.weight.normal_()  # a peaked policy (the init's outscale 0.01 is flat)
    feat = torch.randn(2, 8).repeat_interleave(20000, 0)
    probs = actor(feat[[0, 20000]]).probs
    sample, sample_in = actor.sample(feat, torch.rand(40000, 1))
    assert sample.shape == (40000, 5) and torch.equal(sample.sum(-1), torch.ones(40000))
    assert torch.equal(sample_in, sample)  # a one-hot enters the RSSM as it is
    freq = sample.float().reshape(2, 20000, 5).mean(1)
    assert probs.max() > 0.5 and (freq - probs).abs().max() < 0.015, (freq, probs)
    # Continuous: the policy's mean + std * noise, and its RSSM input a / max(1, |a|).
    actor = Actor(8, 16, 2, 3, False, 0.01, 0.1, 1.0, get_ops(impl))
    noise = 3 * torch.randn(40, 3)
    act, act_in = actor.sample(feat[:40], noise)
    dist = actor(feat[:40])
    assert torch.allclose(act, dist.mean + dist.std * noise, atol=1e-6)
    assert torch.allclose(act_in, act / act.abs().clamp(min=1.0)) and act.abs().max() > 1
