"""Imagination: H steps of the prior under the policy from every posterior state, and the
rollout schedules that compute it (Hafner et al. 2025, "imagination training"; the official
`imagine` in dreamerv3/agent.py).

Three schedules, one result (tests/test_kernels.py: `test_imagination_schedules_agree`,
`test_joined_rollout_equals_the_layered_one`):
- per step (`imagine` without `batch_actor`): the actor samples each state's action and gives
  its log-prob in the same pass. The plain schedule, the reference of the other two; the
  fewest FLOPs (the CPU's).
- batched (`imagine_batched` with `rollout`): the rollout samples without gradient from noise
  drawn first (`rollout_noise`), then the actor is evaluated once over all N x H states (the
  official imagination loss's `self.pol(sg(inp), 2)`): one batched backward instead of H.
- joined (`rollout_joined`, inside a deferral scope, the GPU path): the batched rollout with
  the layers that read one state as one matmul. Speed only; the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dreamer_fast.agent import deferred


def imagine(agent, deter: torch.Tensor, stoch: torch.Tensor,
            noise: dict[str, torch.Tensor] | None = None):
    """Roll out H steps of the prior under the policy from N (detached) start states.

    Returns feats (N, H+1, F) including the start, without gradient, and the log-prob and
    entropy (N, H) of the action sampled in each of the first H states, with gradient to
    the actor only (the world model gets none from imagination, as in the paper). Two
    schedules with the same values (tested): per step, the distribution that samples the
    rollout's action also gives its log-prob (one actor pass per state: the fewest FLOPs,
    the CPU's); or, with `batch_actor` (the GPU path), the rollout samples without
    gradient and the actor is evaluated again over all N x H states in one pass, as the
    official imagination loss does (`agent.pol(sg(inp), 2)` in dreamerv3/agent.py): a
    second actor forward (about 10% more FLOPs per update at paper-S, 502 vs 458 GFLOP),
    but one batched backward instead of H, far fewer kernels.

    noise: the rollout's random draws, {"act": (H, N, A) standard normal (continuous) or
    (H, N, 1) uniform (discrete), "lat": (H, N, S) uniform} (`rollout_noise`); None: the
    per-step schedule draws as it goes, the batched one draws them all first.
    """
    if agent.batch_actor:
        return imagine_batched(agent, deter, stoch, noise or rollout_noise(agent, len(deter)))
    feats, acts, logps, ents = [], [], [], []
    for t in range(agent.cfg.imag_horizon):
        feats.append(agent.feat(deter, stoch))
        dist = agent.pol(feats[-1])
        act = dist.sample(None if noise is None else noise["act"][t])  # detached
        logps.append(dist.log_prob(act))
        ents.append(dist.entropy())
        acts.append(act)
        with torch.no_grad():
            deter, stoch = agent.dyn.img_step(deter, stoch, act,
                                             None if noise is None else noise["lat"][t])
    feats.append(agent.feat(deter, stoch))
    return torch.stack(feats, 1), torch.stack(logps, 1), torch.stack(ents, 1)


def rollout_noise(agent, n: int) -> dict[str, torch.Tensor]:
    """All random draws of an H-step rollout from n states, in two launches (see
    imagine)."""
    H, A, S = agent.cfg.imag_horizon, agent.act_space.size, agent.net.stoch
    act = (torch.rand(H, n, 1, device=agent.device) if agent.act_space.discrete else
           torch.randn(H, n, A, device=agent.device))
    return {"act": act, "lat": torch.rand(H, n, S, device=agent.device)}


def imagine_batched(agent, deter, stoch, noise):
    """imagine's batched schedule. Each state enters the matmuls through one cast (the
    policy's input is built in the matmul dtype, where the reference casts feat's deter
    and stoch the same way), and feats are built once from the stacked states."""
    deter_in = agent.dyn.compute(deter)
    with torch.no_grad():
        if deferred.current() is not None and agent.net.prior_layers and agent.net.actor_layers:
            deters, stochs, acts = rollout_joined(agent, deter, stoch, deter_in, noise)
        else:
            deters, stochs, acts = rollout(agent, deter, stoch, deter_in, noise)
    feat = agent.feat(torch.stack(deters, 1), torch.stack(stochs, 1))
    dist = agent.pol(feat[:, :-1])
    return feat, dist.log_prob(torch.stack(acts, 1)), dist.entropy()


def rollout(agent, deter, stoch, deter_in, noise):
    """imagine_batched's rollout, layer by layer: the lists of deters, stochs (with the
    start's) and actions."""
    deters, stochs, acts = [deter], [stoch], []
    for t in range(agent.cfg.imag_horizon):
        flat = stoch.reshape(*stoch.shape[:-2], -1)
        act, act_in = agent.pol.sample(torch.cat([deter_in, flat.to(deter_in.dtype)], -1),
                                      noise["act"][t])
        acts.append(act)
        deter, stoch, deter_in = agent.dyn.img_step_in(deter, stoch, act_in, deter_in,
                                                      noise["lat"][t])
        deters.append(deter)
        stochs.append(stoch)
    return deters, stochs, acts


def rollout_joined(agent, deter, stoch, deter_in, noise):
    """imagine_batched's rollout inside a deferral scope (the GPU path), with the layers
    that read the same state as one matmul: the state h feeds the prior's first layer,
    the actor's first layer (its h columns) and dynin0, so one matmul of their weights
    stacked (biases included); the sample z feeds the actor's first layer (its z columns)
    and dynin1, another. The actor's first norm adds its two halves (ops.rms_silu_add);
    dynin0/1/2 are normalised and concatenated in one op (ops.rms_silu_cat). The same
    dot products as _rollout's, summed in another order; under bfloat16 autocast the
    actor's first layer also rounds its two halves to bf16 before adding them (tested
    against a float32 rollout: as close as _rollout). 21 kernels per step instead of 24.
    Returns what _rollout does."""
    dyn, pol, ops, H = agent.dyn, agent.pol, agent.ops, agent.cfg.imag_horizon
    D, dtype = dyn.deter, deter_in.dtype
    a1, a_norm = pol.mlp.layers[0], pol.mlp.layers[1]
    p1, p_norm = dyn.prior[0].layers[0], dyn.prior[0].layers[1]
    norms = (dyn.dynin0[1], dyn.dynin1[1], dyn.dynin2[1])
    P, U = p1.out_features, a1.out_features

    def joined(name, parts):
        return agent.deferral.cached((agent, name, dtype),
                            lambda: torch.cat([p.detach() for p in parts]).to(dtype))
    wy = joined("rollout_wy", [p1.weight, a1.weight[:, :D], dyn.dynin0[0].weight])
    by = joined("rollout_by", [p1.bias, a1.bias, dyn.dynin0[0].bias])
    wz = joined("rollout_wz", [a1.weight[:, D:], dyn.dynin1[0].weight])
    bz = joined("rollout_bz", [torch.zeros_like(a1.bias), dyn.dynin1[0].bias])
    bias = dyn.dyngru.bias.detach()

    def flat(z):
        return z.reshape(len(z), -1).to(dtype)
    y, yz = F.linear(deter_in, wy, by), F.linear(flat(stoch), wz, bz)
    deters, stochs, acts = [deter], [stoch], []
    for t in range(H):
        h = ops.rms_silu_add(y[:, P:P + U], yz[:, :U], a_norm.scale, a_norm.eps)
        act, act_in = pol.sample_hidden(pol.mlp.layers[2:](h), noise["act"][t])
        acts.append(act)
        shared = ops.rms_silu_cat(y[:, P + U:], yz[:, U:], dyn.dynin2[0](act_in),
                                  *(n.scale for n in norms), norms[0].eps)
        gates = dyn.gates_of(deter_in, shared, bias=False)
        deter, deter_in = ops.gru_cell(gates, bias, deter, dyn.blocks, dtype)
        y = F.linear(deter_in, wy, by)
        hidden = dyn.prior[0].layers[2:](ops.rms_silu(y[:, :P], p_norm.scale, p_norm.eps))
        logits = dyn.prior[1](hidden).reshape(len(deter), dyn.stoch, dyn.classes)
        stoch = dyn.sample(logits, noise["lat"][t])
        if t + 1 < H:
            yz = F.linear(flat(stoch), wz, bz)
        deters.append(deter)
        stochs.append(stoch)
    return deters, stochs, acts
