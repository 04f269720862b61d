"""The DreamerV3 agent: world model, actor, critic, one loss, one optimizer.

Pure step functions on tensors: `policy_step` (acting with a carried latent),
`train_step` (one update on 65-step windows, returns metrics and fresh latents) and
`report_step` (open-loop predictions). Metrics are detached 0-d device tensors (no sync).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import torch
from torch import nn

from dreamer_fast.agent import losses as L
from dreamer_fast.agent import parallel
from dreamer_fast.agent.dists import one_hot
from dreamer_fast.agent.heads import Actor, ContinueHead, TwohotHead
from dreamer_fast.agent import deferred, imagine
from dreamer_fast.agent.optim import LaProp
from dreamer_fast.agent.rssm import RSSM, Decoder, Encoder
from dreamer_fast.config import AgentConfig, NetConfig
from dreamer_fast.checks import ConfigError, match_keys
from dreamer_fast.machine import settle_kernels, settle_precision
from dreamer_fast.kernels import get_ops

LOSSES = L.LOSSES
TRAINED = ("enc", "dyn", "dec", "rew", "con", "pol", "val")


def select_keys(obs_space: dict, pattern: str, name: str) -> dict:
    """The entries of obs_space whose key matches `pattern` in full; ConfigError if none."""
    return {k: obs_space[k] for k in match_keys(obs_space, pattern, name)}


def set_kernels(module: nn.Module, impl: str) -> None:
    """Switch an Agent's (or a policy copy's) ops to impl ('ref', 'fused', 'triton') in place:
    every submodule calls its ops through a shared namespace, updated here. An Agent also
    takes impl's schedule: deferred weight gradients and the batched actor with 'triton'."""
    fresh, seen = vars(get_ops(impl)), set()
    for m in module.modules():
        ops = getattr(m, "ops", None)
        if ops is not None and id(ops) not in seen:
            seen.add(id(ops))
            vars(ops).update(fresh)
    if isinstance(module, Agent):
        module.defer = module.batch_actor = impl == "triton"


class Agent(nn.Module):
    """DreamerV3. obs_space: {key: (shape, dtype)}; act_space: has .discrete and .size."""

    def __init__(self, obs_space: dict, act_space, net: NetConfig, cfg: AgentConfig,
                 device: str | torch.device = "cpu"):
        super().__init__()
        device = torch.device(device)
        self.net, self.cfg, self.act_space = net, cfg, act_space
        # A run's config is concrete (run/resolve.py); "auto" (tests, benches) is settled by
        # the same machine.settle_* functions.
        self.ops = ops = get_ops(settle_kernels(cfg.kernels, device.type))
        precision = settle_precision(cfg.precision, device.type)
        self.autocast_dtype = torch.bfloat16 if precision == "bfloat16" else None
        self.autocast_cache = True  # graphs.py turns it off: cached casts outlive no replay
        # The GPU path defers the scans' weight gradients to one GEMM per layer per update
        # (agent/deferred.py: about 4 kernels fewer per layer and step); the others
        # keep autograd's own per-step gradients. graphs.compile_steps turns it off.
        self.defer = self.ops.impl == "triton"
        self.deferral = deferred.DeferredWeightGrads()  # its scopes: this thread's only
        # The GPU path also evaluates the actor once over all imagined states (see imagine).
        self.batch_actor = self.ops.impl == "triton"
        self.obs_space = {k: v for k, v in obs_space.items() if k not in
                          ("reward", "is_first", "is_last", "is_terminal")}
        self.enc_space = select_keys(self.obs_space, cfg.enc_keys, "agent.enc_keys")
        self.dec_space = select_keys(self.obs_space, cfg.dec_keys, "agent.dec_keys")
        if act_space.size <= 0:
            raise ConfigError(f"invalid action space: size={act_space.size}; allowed: >= 1")
        if net.classes > 32767:
            raise ConfigError(f"invalid config: net.classes={net.classes}; allowed: <= 32767")
        with torch.device(device):
            self._build(net, act_space, ops)
            self.register_buffer("retnorm_lo", torch.zeros(()))
            self.register_buffer("retnorm_hi", torch.zeros(()))
            self.register_buffer("retnorm_q", torch.tensor([cfg.perclo / 100, cfg.perchi / 100]),
                                 persistent=False)
            self.register_buffer("nonfinite", torch.zeros(len(LOSSES), dtype=torch.bool))
            scales = dataclasses.asdict(cfg.loss)
            self.register_buffer("loss_scales", torch.tensor([float(scales[k]) for k in LOSSES]),
                                 persistent=False)
            self.opt = LaProp(self.trained_parameters(), cfg.optim)
        self.reducer: parallel.GradReducer | None = None  # set by enable_data_parallel
        self.feat_size = net.deter + net.stoch * net.classes

    def _build(self, n: NetConfig, act, ops) -> None:
        self.enc = Encoder(self.enc_space, n.units, n.depth, n.enc_layers, ops, n.strided)
        self.dyn = RSSM(n.deter, n.hidden, n.stoch, n.classes, n.blocks, act.size,
                        self.enc.out_size, n.dyn_layers, n.prior_layers, n.post_layers,
                        n.unimix, not act.discrete, ops)
        latent, feat = n.stoch * n.classes, n.deter + n.stoch * n.classes
        self.dec = Decoder(self.dec_space, n.deter, latent, n.units, n.depth, n.blocks,
                           n.dec_layers, ops, n.strided)
        self.rew = TwohotHead(feat, n.units, n.rew_layers, n.bins, ops)
        self.con = ContinueHead(feat, n.units, n.con_layers, ops)
        self.pol = Actor(feat, n.units, n.actor_layers, act.size, act.discrete,
                         n.actor_unimix if act.discrete else 0.0, n.minstd, n.maxstd, ops)
        self.val = TwohotHead(feat, n.units, n.critic_layers, n.bins, ops)
        self.slowval = copy.deepcopy(self.val).requires_grad_(False)

    def trained_parameters(self) -> list[nn.Parameter]:
        """Every optimised parameter (all modules but the slow critic)."""
        return [p for name in TRAINED for p in getattr(self, name).parameters()]

    def enable_data_parallel(self) -> None:
        """Train as one replica of the torch.distributed world.

        Call on every rank after loading any checkpoint and before the first update (and
        before graph capture). Copies rank 0's parameters, buffers and optimizer state to all
        ranks; from then on train_step averages gradients with one all-reduce of a flat
        buffer before the optimizer, takes return percentiles over the all-gathered batch,
        and scales the learning rate (after warmup) by sqrt(world size).
        """
        parallel.broadcast_([*self.parameters(), *self.buffers(), self.opt.count, *self.opt.nu,
                      *self.opt.mu])
        self.reducer = parallel.GradReducer(self.trained_parameters())
        self.opt.lr_scale = math.sqrt(parallel.world_size())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; with a reducer attached, zero its buffer so the views stay alive."""
        if self.reducer is not None:
            self.reducer.zero_()
        else:
            super().zero_grad(set_to_none)

    @property
    def device(self) -> torch.device:
        return self.retnorm_lo.device

    def autocast(self):
        """bf16 matmuls/convs when configured; our ops upcast to float32 for norms and losses."""
        if self.autocast_dtype is None:  # float32: no autocast (any device, meta included)
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None,
                              cache_enabled=self.autocast_cache)

    def feat(self, deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
        return torch.cat([deter, stoch.reshape(*stoch.shape[:-2], -1)], -1)

    # ----------------------------------------------------------------- acting

    def initial_carry(self, n: int) -> dict[str, torch.Tensor]:
        """Zero latent and previous action for n envs (reset on is_first anyway)."""
        z = lambda *s: torch.zeros(n, *s, device=self.device)
        return {"deter": z(self.net.deter), "stoch": z(self.net.stoch, self.net.classes),
                "action": z(self.act_space.size)}

    @torch.no_grad()
    def policy_step(self, carry: dict, obs: dict, greedy: bool = False):
        """One acting step for N envs.

        carry: {deter (N, D), stoch (N, S, K), action (N, A)}; obs: {key: (N, *shape),
        is_first (N,) bool}. Returns (action (N, A) float: one-hot or raw continuous sample,
        new carry, latent {deter (N, D) bf16, stoch (N, S) int16} to store with this step).
        """
        with self.autocast():
            tokens = self.enc(obs)
            deter, stoch, _ = self.dyn.obs_step(carry["deter"], carry["stoch"],
                                                carry["action"], tokens, obs["is_first"])
            dist = self.pol(self.feat(deter, stoch))
        action = dist.mode() if greedy else dist.sample()
        latent = {"deter": deter.to(torch.bfloat16), "stoch": stoch.argmax(-1).to(torch.int16)}
        # The carry stays float32 (a sample is one-hot in the logits' dtype, bf16 on a GPU).
        return action, {"deter": deter, "stoch": stoch.float(), "action": action}, latent

    # --------------------------------------------------------------- training

    def train_step(self, batch: dict[str, torch.Tensor]):
        """One update on a batch of (B, T+1) windows.

        batch: obs keys (B, T+1, *shape), action (B, T+1, A), reward/is_first/is_last/
        is_terminal (B, T+1), deter (B, T+1, D) and stoch (B, T+1, S) stored latents; index 0
        is context (its latent and action start the scan). Returns (metrics {name: 0-d
        tensor}, latents {deter (B, T, D) bf16, stoch (B, T, S) int16} for steps 1..T).
        """
        self.zero_grad()
        with self.autocast():
            loss, metrics, latents = self.loss(batch)
        loss.backward()
        self.deferral.flush()  # the deferred weight gradients of the scans, if any
        if self.reducer is not None:
            self.reducer.all_reduce()
        metrics.update(self.opt.step())
        with torch.no_grad():
            torch._foreach_lerp_(list(self.slowval.parameters()), list(self.val.parameters()),
                                 self.cfg.slow_rate)
        return metrics, latents

    def loss(self, batch: dict[str, torch.Tensor]):
        """Total loss (one scalar), metrics and fresh latents for a batch (see train_step)."""
        losses, metrics, latents = self.losses(batch)
        return L.total_loss(self, losses, metrics), metrics, latents

    def losses(self, batch: dict[str, torch.Tensor]):
        """The named (unscaled, averaged) loss terms, metrics and fresh latents."""
        n = self.net
        obs = {k: batch[k][:, 1:] for k in self.obs_space}
        B, T = batch["reward"].shape[0], batch["reward"].shape[1] - 1
        stoch0 = one_hot(batch["stoch"][:, 0].long(), n.classes)
        tokens = self.enc(obs)
        with self.deferral(self.defer):
            deters, stochs, post = self.dyn.observe(
                batch["deter"][:, 0].float(), stoch0, batch["action"][:, :-1], tokens,
                batch["is_first"][:, 1:])
        feat = self.feat(deters, stochs)
        losses, metrics = L.world_losses(self, batch, obs, deters, stochs, post, feat)
        with self.deferral(self.defer):  # weights cast and laid out once for the whole rollout
            imag_feat, logp, ent = self.imagine(
                deters.detach().reshape(B * T, n.deter),
                stochs.detach().reshape(B * T, n.stoch, n.classes))
        losses["policy"], losses["value"], ret0 = L.imag_loss(self, imag_feat, logp, ent,
                                                              metrics)
        losses["repval"] = L.repl_loss(self, batch, feat, ret0.reshape(B, T))
        latents = {"deter": deters.detach().to(torch.bfloat16),
                   "stoch": stochs.detach().argmax(-1).to(torch.int16)}
        return losses, metrics, latents

    def imagine(self, deter: torch.Tensor, stoch: torch.Tensor,
                noise: dict[str, torch.Tensor] | None = None):
        """H imagined steps from N start states (agent/imagine.py: the schedules)."""
        return imagine.imagine(self, deter, stoch, noise)

    def rollout_noise(self, n: int) -> dict[str, torch.Tensor]:
        """All random draws of an H-step rollout from n states (imagine.py)."""
        return imagine.rollout_noise(self, n)

    def nonfinite_losses(self) -> list[str]:
        """Names of losses that were NaN/inf in any update so far (reads the flags: a sync)."""
        flags = self.nonfinite.cpu().tolist()  # deliberate host sync, called at log time
        return [k for k, bad in zip(LOSSES, flags) if bad]

    # ---------------------------------------------------------------- report

    @torch.no_grad()
    def report_step(self, batch: dict[str, torch.Tensor], context: int | None = None) -> dict:
        """Open-loop predictions: observe `context` steps, then imagine with the true actions.

        batch as in train_step. Returns {key: (truth, model)} each (B, T, *shape) in
        observation units (images uint8-scaled floats in [0, 1]; vectors symlog-decoded) and
        'openloop/<key>' mean squared errors of the imagined part.
        """
        n = self.net
        obs = {k: batch[k][:, 1:] for k in self.obs_space}
        T = batch["reward"].shape[1] - 1
        context = T // 2 if context is None else context
        stoch0 = one_hot(batch["stoch"][:, 0].long(), n.classes)
        deters, stochs, _ = self.dyn.observe(
            batch["deter"][:, 0].float(), stoch0, batch["action"][:, :context],
            self.enc({k: v[:, :context] for k, v in obs.items()}), batch["is_first"][:, 1:context + 1])
        deter, stoch = deters[:, -1], stochs[:, -1]
        img_d, img_s = [], []
        for t in range(context, T):
            deter, stoch = self.dyn.img_step(deter, stoch, batch["action"][:, t])
            img_d.append(deter)
            img_s.append(stoch)
        deters = torch.cat([deters, torch.stack(img_d, 1)], 1)
        stochs = torch.cat([stochs, torch.stack(img_s, 1)], 1)
        pred = self.dec(deters, stochs)
        out = {}
        for k in self.dec_space:
            truth = obs[k].float() / 255.0 if k in self.dec.keys.img else obs[k].float()
            model = self.dec.observation(k, pred[k])
            out[k] = (truth, model)
            out[f"openloop/{k}"] = (truth - model)[:, context:].square().mean()
        return out

