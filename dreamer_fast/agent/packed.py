"""Packed seeds: N independent agents trained by ONE update, their tensors stacked on a
leading seed dimension.

Why torch.func.vmap over the agent, and not batched layers: vmap runs the agent's own loss
code (agent.py, losses.py, imagine.py) unchanged, so the packed update cannot drift from the
solo one; batched layers would need a seed dimension in every layer, reduction and loss.
Measured on 2 CPU cores (bench/packed.py, bench/results/summary-packed.md): the vmapped update
of N seeds costs 7-51% more than one solo update of an N times larger batch, the most that
batching could give, so on a CPU packing gains little; the GPU, where small updates are bound
by kernel launches, is what it is for (one update of 16 size1m seeds launches 1.1-1.2 times
the kernels of one solo update with the same ops: bench/kernel_count.py --seeds). The packed
update runs any of the agent's ops, in float32 or under bfloat16 autocast: the reference ops,
the CPU fast path's fused ops (kernels/fused.py generates their vmap rules) or the Triton
kernels (kernels/launch.py gives each op a vmap rule: the seeds fold into its rows, one
launch; a norm takes one scale row per seed). Deferred weight gradients (agent/deferred.py) stay off packed: their stash
lives outside the transform, so the scans take autograd's per-step weight gradients.

Independence: every tensor of seed i (parameters, optimizer moments, return normaliser,
non-finite flags) is row i of a stacked tensor, and nothing in the update reduces over the
seed dimension (vmap maps the loss per seed; the optimizer's clipping norms are taken per seed,
optim.LaProp(seeds=N)). Randomness: 'different' draws independent noise per seed (training);
'same' gives every seed the noise a solo update would draw from the same generator, which is
how tests/test_packed.py proves that seed i packed equals seed i alone.

Capture: the update does nothing a CUDA graph capture rejects (tests/test_packed.py traces it
under tests/capture.py's rules on the CPU and on fake tensors standing in for the GPU). A run
with --seeds N (run/packed.py) trains with it, captured by graphs.GraphedTrainStep on CUDA.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dreamer_fast.agent.agent import TRAINED, Agent
from dreamer_fast.agent.optim import LaProp
from dreamer_fast.checks import ConfigError


class _Loss(nn.Module):
    """The agent's loss as a module call, so torch.func.functional_call can swap its tensors."""

    def __init__(self, agent: Agent):
        super().__init__()
        self.agent = agent

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.agent.loss(batch)


class PackedAgents:
    """N agents of one config, trained together: `train_step` is one vmapped update.

    agents: N Agents with the same spaces and config, any kernels, float32 or
    bfloat16 autocast (their tensors are copied; `unpack` writes seed i back into a solo
    Agent, e.g. to save or evaluate it).
    """

    def __init__(self, agents: list[Agent],
                 randomness: Literal["different", "same"] = "different"):
        first = agents[0]
        space = lambda a: (a.obs_space, a.act_space.discrete, a.act_space.size)
        for a in agents[1:]:
            if a.cfg != first.cfg or a.net != first.net or space(a) != space(first):
                raise ConfigError("packed seeds need one config and one env: every seed's "
                                  "agent must have the same spaces, net and agent settings")
        counts = {float(a.opt.count) for a in agents}
        if len(counts) > 1:
            raise ConfigError(f"packed seeds step together; their update counts differ: "
                              f"{sorted(counts)}")
        self.n = len(agents)
        self.randomness = randomness
        self.cfg = first.cfg
        self.template = _Loss(copy.deepcopy(first))  # its own tensors are never read
        # The Triton ops run under vmap by their vmap rules (kernels/launch.py); deferred
        # weight gradients do not (a stash outside the transform), so autograd's own.
        self.template.agent.defer = False
        for module in self.template.modules():  # vmap cannot clone into channels-last
            if hasattr(module, "memory_format"):
                module.memory_format = torch.contiguous_format
        # In Agent.trained_parameters' order, which the optimizer moments follow.
        trained = [n for m in TRAINED for n, _ in getattr(first, m).named_parameters(prefix=m)]
        named = [dict(a.named_parameters()) for a in agents]
        stack = lambda dicts, name: torch.stack([d[name].detach() for d in dicts])
        self.trained = {f"agent.{k}": stack(named, k) for k in trained}
        self.frozen = {f"agent.{k}": stack(named, k) for k in named[0] if k not in trained}
        bufs = [dict(a.named_buffers()) for a in agents]
        self.buffers_ = {f"agent.{k}": stack(bufs, k) for k in bufs[0]}
        self.opt = LaProp(list(self.trained.values()), first.cfg.optim, seeds=self.n)
        self.opt.count.copy_(first.opt.count)
        for i, a in enumerate(agents):
            for dst, src in zip(self.opt.nu + self.opt.mu, a.opt.nu + a.opt.mu):
                dst[i].copy_(src)
        # slowval.X follows val.X (the slow critic's EMA, as Agent.train_step)
        self.slow = [(self.frozen[k], self.trained[k.replace("agent.slowval.", "agent.val.")])
                     for k in self.frozen if k.startswith("agent.slowval.")]
        self._grads = vmap(self._seed_grads, randomness=randomness)

    def _seed_grads(self, trained, frozen, buffers, batch):
        """One seed's gradients (and metrics, latents): the solo loss on that seed's tensors.
        The buffers are an input (not captured) because the loss updates them in place."""
        def loss(tp, bufs):
            total, metrics, latents = functional_call(
                self.template, {**tp, **frozen, **bufs}, (batch,), strict=True)
            return total, (metrics, latents)
        return grad(loss, has_aux=True)(trained, buffers)

    def grads(self, batch: dict[str, torch.Tensor]):
        """Every seed's gradients from one vmapped loss (the return normaliser and non-finite
        flags updated in place, as the solo loss does). batch: as Agent.train_step's with a
        leading seed dim N. Returns ({trained name: (N, *shape)}, (metrics {name: (N,)},
        latents {deter (N, B, T, D) bf16, stoch (N, B, T, S) int16}))."""
        with self.template.agent.autocast():  # bfloat16 matmuls when configured, as solo
            return self._grads(self.trained, self.frozen, self.buffers_, batch)

    def train_step(self, batch: dict[str, torch.Tensor]):
        """One update of every seed (see grads): the optimizer per seed, then the slow
        critics' EMA. Returns (metrics {name: (N,)}, latents)."""
        grads, (metrics, latents) = self.grads(batch)
        for p, g in zip(self.trained.values(), grads.values()):
            p.grad = g
        metrics.update(self.opt.step())
        self.opt.zero_grad()
        with torch.no_grad():
            torch._foreach_lerp_([s for s, _ in self.slow], [v for _, v in self.slow],
                                 self.cfg.slow_rate)
        return metrics, latents

    @property
    def autocast_cache(self) -> bool:
        return self.template.agent.autocast_cache

    @autocast_cache.setter
    def autocast_cache(self, value: bool) -> None:  # graphs.py: off for a captured update
        self.template.agent.autocast_cache = value

    @property
    def device(self) -> torch.device:
        return self.opt.count.device

    def parameters(self) -> list[torch.Tensor]:
        """Every stacked parameter (trained, then frozen: the slow critics)."""
        return [*self.trained.values(), *self.frozen.values()]

    def buffers(self) -> list[torch.Tensor]:
        return list(self.buffers_.values())

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def tensors(self, prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """The stacked tensors {agent.<module>.<name>: (N, ...)} (parameters and buffers) of
        the modules named by `prefixes` (all when empty), e.g. the policy's enc, dyn, pol."""
        every = {**self.trained, **self.frozen, **self.buffers_}
        return {k: v for k, v in every.items()
                if not prefixes or k.split(".")[1] in prefixes}

    def nonfinite(self) -> torch.Tensor:
        """(N,) bool: seed i had a non-finite loss in some update (a host read when used)."""
        return self.buffers_["agent.nonfinite"].any(-1)

    def unpack(self, i: int, agent: Agent) -> Agent:
        """Write seed i's parameters, buffers and optimizer state into a solo `agent`."""
        with torch.no_grad():
            own = {**dict(agent.named_parameters()), **dict(agent.named_buffers())}
            for k, v in self.tensors().items():
                own[k.removeprefix("agent.")].copy_(v[i])
            agent.opt.count.copy_(self.opt.count)
            for dst, src in zip(agent.opt.nu + agent.opt.mu, self.opt.nu + self.opt.mu):
                dst.copy_(src[i])
        return agent
