"""Packed seeds (agent/packed.py): N agents trained by one vmapped update are N independent
agents. Seed i packed must equal seed i trained alone, within the end-to-end kernel agreement
tolerance of tests/test_kernels.py (float32: 1e-4 relative on losses, 1e-5 on parameters)."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from dreamer_fast.agent.agent import Agent
from dreamer_fast.agent.packed import PackedAgents
from dreamer_fast.checks import ConfigError
from dreamer_fast.config import SIZES, AgentConfig
from dreamer_fast.data.synthetic import IMAGE, VECTOR, ActSpace, make_batch

CFG = dict(batch_size=2, batch_length=8, imag_horizon=3, precision="float32", kernels="ref")
SPACES = {"vector-discrete": (VECTOR, ActSpace(True, 3)),
          "image+vector-continuous": ({**VECTOR, **IMAGE}, ActSpace(False, 2))}


def seeds(obs, act, n, **cfg):
    """n agents initialised from seeds 0..n-1, and one batch per seed."""
    agents, batches = [], []
    for i in range(n):
        torch.manual_seed(i)
        agents.append(Agent(obs, act, SIZES["debug"], AgentConfig(**{**CFG, **cfg})))
        batches.append(make_batch(obs, act, SIZES["debug"], B=2, L=9, seed=i))
    return agents, batches


def stack(batches):
    return {k: torch.stack([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("space,kernels", [
    (space, kernels) for space in SPACES for kernels in ("ref", "fused")] + [
    ("image+vector-continuous", "triton")])
def test_one_packed_update_computes_each_seeds_own_gradients(space, kernels):
    """From the same state and noise, the vmapped gradients of 3 seeds (different weights,
    different batches) equal each seed's solo gradients, tensor by tensor (1e-4 of the
    tensor's largest entry; measured: 3e-6, the rounding of batched matmuls and convs), and
    the losses agree to 1e-4 relative. randomness='same' gives every seed the draws a solo
    update takes from the same generator state. Both sides run ATen's convolutions: oneDNN's
    first-layer weight gradient (a float32 sum over B x T x 64 x 64 positions) lands up to
    5e-3 of its largest entry away from ATen's on some batches, solo as well as vmapped
    (its summation order), which would hide a real difference. The Triton kernels run under
    vmap by their own rules (kernels/launch.py; the solo update defers its scans' weight
    gradients, the packed one takes autograd's: the same sums in another order)."""
    from dreamer_fast.kernels.launch import VMAPPED

    obs, act = SPACES[space]
    agents, batches = seeds(obs, act, 3, kernels=kernels)
    VMAPPED.clear()
    packed = PackedAgents([copy.deepcopy(a) for a in agents], randomness="same")
    torch.manual_seed(5)
    with torch.backends.mkldnn.flags(enabled=False):
        grads, (metrics, latents) = packed.grads(stack(batches))
    assert latents["deter"].shape == (3, 2, 8, SIZES["debug"].deter)
    assert latents["deter"].dtype == torch.bfloat16 and latents["stoch"].dtype == torch.int16
    if kernels == "triton":  # the kernels ran, every seed's rows in one launch where they fold
        assert VMAPPED["twohot_loss", "fold"] and VMAPPED["gru_update_bwd", "fold"], VMAPPED
    for i, agent in enumerate(agents):
        torch.manual_seed(5)
        agent.zero_grad()
        with torch.backends.mkldnn.flags(enabled=False):
            loss, want_metrics, _ = agent.loss(batches[i])
            loss.backward()
            agent.deferral.flush()
        for key, want in want_metrics.items():
            if key.startswith("loss/"):
                got = metrics[key][i].item()
                assert abs(got - want.item()) <= 1e-4 * (abs(want.item()) + 1e-3), (
                    f"seed {i} {key}: packed {got:.9g} alone {want.item():.9g}")
        for name, param in agent.named_parameters():
            if param.grad is None:
                continue
            got, want = grads[f"agent.{name}"][i], param.grad
            err = (got - want).abs().max().item()
            assert err <= 1e-4 * want.abs().max().item() + 1e-12, f"seed {i} {name}: {err:.3g}"


def test_packed_bfloat16_gradients_are_each_seeds_own():
    """bfloat16 autocast runs packed as alone: from the same state and noise, every seed's
    losses agree to 1e-3 relative, each gradient tensor to 2^-4 of its largest entry (a
    weight gradient of a bfloat16 matmul or conv is rounded to 8 bits and the batched one sums
    in another order: measured 1.6% on the MLPs, 3.5% on the first conv, a sum over 64 x 64
    positions per image) and all of a seed's gradients as one vector to a cosine of 0.9999
    (another seed's gradients would be near 0)."""
    obs, act = SPACES["image+vector-continuous"]
    agents, batches = seeds(obs, act, 2, kernels="fused", precision="bfloat16")
    packed = PackedAgents([copy.deepcopy(a) for a in agents], randomness="same")
    torch.manual_seed(5)
    with torch.backends.mkldnn.flags(enabled=False):
        grads, (metrics, _) = packed.grads(stack(batches))
    for i, agent in enumerate(agents):
        torch.manual_seed(5)
        agent.zero_grad()
        with torch.backends.mkldnn.flags(enabled=False), agent.autocast():
            loss, want_metrics, _ = agent.loss(batches[i])
        loss.backward()
        for key, want in want_metrics.items():
            if key.startswith("loss/"):
                got = metrics[key][i].item()
                assert abs(got - want.item()) <= 1e-3 * (abs(want.item()) + 1e-3), (
                    f"seed {i} {key}: packed {got:.9g} alone {want.item():.9g}")
        got, want = [], []
        for name, param in agent.named_parameters():
            if param.grad is not None:
                err = (grads[f"agent.{name}"][i] - param.grad).abs().max().item()
                assert err <= 2**-4 * param.grad.abs().max().item() + 1e-12, (
                    f"seed {i} {name}: {err:.3g}")
                got.append(grads[f"agent.{name}"][i].flatten())
                want.append(param.grad.flatten())
        cos = torch.nn.functional.cosine_similarity(torch.cat(got), torch.cat(want), dim=0)
        assert cos.item() >= 0.9999, f"seed {i}: cosine {cos.item():.6f}"


def test_the_packed_optimizer_steps_each_seed_as_its_own():
    """LaProp(seeds=N) on stacked tensors equals N solo LaProps (AGC norms per seed):
    three steps from random gradients, one seed's gradients 100x larger (clipped) so a shared
    norm would show."""
    from dreamer_fast.agent.optim import LaProp
    from dreamer_fast.config import OptimConfig

    cfg = OptimConfig(lr=1e-3, warmup=2)
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), (2, 3, 4)]
    solo = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    packed = [torch.stack([seed[j] for seed in solo]) for j in range(len(shapes))]
    opts = [LaProp(seed, cfg) for seed in solo]
    popt = LaProp(packed, cfg, seeds=3)
    for step in range(3):
        grads = [[torch.randn(s, generator=gen) * (100.0 if i == 1 else 1.0) for s in shapes]
                 for i in range(3)]
        for i, opt in enumerate(opts):
            for p, g in zip(opt.params, grads[i]):
                p.grad = g
            want = opt.step()
        for j, p in enumerate(packed):
            p.grad = torch.stack([grads[i][j] for i in range(3)])
        got = popt.step()
        for key in want:
            assert got[key].shape == (3,), key
    assert got["opt/clipped"][1] > 0
    for i, opt in enumerate(opts):
        for p, q in zip(opt.params + opt.nu + opt.mu, packed + popt.nu + popt.mu):
            torch.testing.assert_close(q[i], p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("space,kernels", [("vector-discrete", "ref"),
                                           ("image+vector-continuous", "fused")])
def test_seed_i_packed_equals_seed_i_alone(space, kernels):
    """Three updates of 3 packed seeds against each seed's own three solo updates, at the
    presets' learning-rate warmup, compared as test_kernels compares the fast path with the
    references after its updates (parameters to 1e-5, losses to 1e-4). With a large step
    size an exact comparison stops making sense after the first update: LaProp's first steps
    are nearly sign(g), so a gradient entry that is zero up to rounding moves a full step
    either way, and a latent sample at a class boundary can flip."""
    obs, act = SPACES[space]
    agents, batches = seeds(obs, act, 3, kernels=kernels)
    solo = [copy.deepcopy(a) for a in agents]
    packed = PackedAgents(agents, randomness="same")
    solo_metrics = [[] for _ in solo]
    packed_metrics = []
    for step in range(3):
        for i, agent in enumerate(solo):
            torch.manual_seed(100 + step)
            solo_metrics[i].append(agent.train_step(batches[i])[0])
        torch.manual_seed(100 + step)
        packed_metrics.append(packed.train_step(stack(batches))[0])
    for i, agent in enumerate(solo):
        for step in range(3):
            for key, want in solo_metrics[i][step].items():
                got = packed_metrics[step][key][i]
                assert got.shape == want.shape, key
                if key.startswith("loss/"):
                    assert abs(got.item() - want.item()) <= 1e-4 * (abs(want.item()) + 1e-3), (
                        f"seed {i} step {step} {key}: packed {got.item():.9g} "
                        f"alone {want.item():.9g}")
        mine = packed.unpack(i, copy.deepcopy(agents[0]))
        theirs = dict(agent.named_parameters())
        for name, param in mine.named_parameters():
            err = (param - theirs[name]).abs().max().item()
            assert err <= 1e-5 * (1 + theirs[name].abs().max().item()), (
                f"seed {i} {name}: {err:.3g}")
        for name in ("retnorm_lo", "retnorm_hi"):
            torch.testing.assert_close(getattr(mine, name), getattr(agent, name),
                                       rtol=1e-5, atol=1e-6)
        assert torch.equal(mine.opt.count, agent.opt.count)


def test_a_nan_in_one_seed_stays_in_that_seed():
    """A non-finite batch in seed 1 flags seed 1 only and leaves the others' updates
    finite (nothing reduces over the seed dimension, the clipping norms included)."""
    obs, act = SPACES["vector-discrete"]
    agents, batches = seeds(obs, act, 3)
    batches[1]["vector"][:] = float("nan")
    packed = PackedAgents(agents)
    metrics, _ = packed.train_step(stack(batches))
    assert packed.nonfinite().tolist() == [False, True, False]
    for k, v in packed.trained.items():
        assert torch.isfinite(v[[0, 2]]).all(), k
    assert np.isfinite(metrics["opt/grad_norm"][[0, 2]].numpy()).all()


def test_packing_refuses_what_it_cannot_pack():
    obs, act = SPACES["vector-discrete"]
    a, _ = seeds(obs, act, 1)
    b, _ = seeds(obs, act, 1, imag_horizon=4)
    with pytest.raises(ConfigError, match="one config"):
        PackedAgents(a + b)
    c, _ = seeds(obs, ActSpace(True, 5), 1)
    with pytest.raises(ConfigError, match="one config and one env"):
        PackedAgents(a + c)


@pytest.mark.parametrize("space,device,kernels", [
    (space, device, "ref") for space in SPACES for device in ("cpu", "stand-in")] + [
    ("vector-discrete", "cpu", "triton")])
def test_the_packed_update_is_capture_safe(space, device, kernels):
    """The packed update does nothing a CUDA graph capture rejects (tests/capture.py's
    rules: no host reads, no host-to-device copies, no reseeding or syncs) and changes no
    Python state, traced after a warm-up as run/graphs.py captures the solo update; on the
    stand-in (fake meta tensors for the GPU) a tensor left on the host shows too. What the
    CPU cannot check: that vmap's batched kernels capture on a real GPU."""
    from capture import CaptureCheck, fake, python_state, stand_in

    obs, act = SPACES[space]
    agents, batches = seeds(obs, act, 2, kernels=kernels)
    packed = PackedAgents(agents)
    batch = stack(batches)
    if device == "stand-in":
        for group in (packed.trained, packed.frozen, packed.buffers_):
            for k in group:
                group[k] = fake(group[k])
        opt = packed.opt
        opt.params = list(packed.trained.values())
        opt.count, opt.lr = fake(opt.count), fake(opt.lr)
        opt.nu, opt.mu = [fake(t) for t in opt.nu], [fake(t) for t in opt.mu]
        packed.slow = [(packed.frozen[k], packed.trained[k.replace(".slowval.", ".val.")])
                       for k in packed.frozen if ".slowval." in k]
        batch = {k: fake(v) for k, v in batch.items()}
    with stand_in() if device == "stand-in" else contextlib.nullcontext():
        packed.train_step(batch)  # warm-up, as before a capture
        before = python_state(packed)
        with CaptureCheck():
            metrics, latents = packed.train_step(batch)
        assert python_state(packed) == before
    assert latents["deter"].shape[:2] == (2, 2) and metrics["loss/policy"].shape == (2,)


def test_the_vmapped_quantile_is_torch_quantile_per_seed():
    """losses.quantile under vmap (out of place, batched) gives each seed exactly what
    torch.quantile gives it alone, ties, an even count and a NaN included."""
    from torch.func import vmap

    from dreamer_fast.agent.losses import quantile

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1001, generator=gen)
    x[1, :500] = 0.5  # ties
    x[3, 7] = float("nan")
    q = torch.tensor([0.05, 0.95])
    got = vmap(quantile, in_dims=(0, None))(x, q)
    for i in range(4):
        want = torch.quantile(x[i], q)
        assert torch.equal(got[i], want) or (want.isnan().all() and got[i].isnan().all()), i
    even = torch.randn(3, 64, generator=gen)
    got = vmap(quantile, in_dims=(0, None))(even, q)
    assert all(torch.equal(got[i], torch.quantile(even[i], q)) for i in range(3))
