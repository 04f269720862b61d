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
import os

import torch
from torch import nn
import torch.nn.functional as F

from dreamer_fast.agent import losses as L
from dreamer_fast.agent import parallel
from dreamer_fast.agent.dists import one_hot
from dreamer_fast.agent.heads import Actor, ContinueHead, TwohotHead
from dreamer_fast.agent import deferred
from dreamer_fast.agent.optim import LaProp
from dreamer_fast.agent.rssm import RSSM, Decoder, Encoder
from dreamer_fast.config import AgentConfig, ConfigError, NetConfig, match_keys
from dreamer_fast.kernels import get_ops

LOSSES = tuple(f.name for f in dataclasses.fields(AgentConfig().loss))
TRAINED = ("enc", "dyn", "dec", "rew", "con", "pol", "val")


def select_keys(obs_space: dict, pattern: str, name: str) -> dict:
    """The entries of obs_space whose key matches `pattern` in full; ConfigError if none."""
    return {k: obs_space[k] for k in match_keys(obs_space, pattern, name)}


def resolve_kernels(impl: str, device: torch.device) -> str:
    """'auto' -> triton on CUDA, fused elsewhere; triton off CUDA needs TRITON_INTERPRET=1."""
    if impl == "auto":
        return "triton" if device.type == "cuda" else "fused"
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("invalid config: agent.kernels='triton' on a non-CUDA device; allowed: "
                          "fused, ref or auto (or set TRITON_INTERPRET=1 to run kernels "
                          "interpreted)")
    return impl


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for matmuls/convs: 'auto' -> bfloat16 on CUDA, none elsewhere."""
    if precision == "auto":
        precision = "bfloat16" if device.type == "cuda" else "float32"
    return torch.bfloat16 if precision == "bfloat16" else None


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
        self.ops = ops = get_ops(resolve_kernels(cfg.kernels, device))
        self.autocast_dtype = resolve_precision(cfg.precision, device)
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
        return self._total(losses, metrics), metrics, latents

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
        losses, metrics = self._world_losses(batch, obs, deters, stochs, post, feat)
        with self.deferral(self.defer):  # weights cast and laid out once for the whole rollout
            imag_feat, logp, ent = self.imagine(
                deters.detach().reshape(B * T, n.deter),
                stochs.detach().reshape(B * T, n.stoch, n.classes))
        losses["policy"], losses["value"], ret0 = self._imag_losses(imag_feat, logp, ent,
                                                                    metrics)
        losses["repval"] = self._repval_loss(batch, feat, ret0.reshape(B, T))
        latents = {"deter": deters.detach().to(torch.bfloat16),
                   "stoch": stochs.detach().argmax(-1).to(torch.int16)}
        return losses, metrics, latents

    def _world_losses(self, batch, obs, deters, stochs, post, feat):
        """Per-step world-model losses (rec per key, rew, con, dyn, rep), averaged."""
        n, cfg = self.net, self.cfg
        dyn, rep = self.ops.kl_free(post, self.dyn.prior_logits(deters), n.unimix,
                                    cfg.free_nats)
        recs = self.dec.loss(self.dec(deters, stochs), obs)
        rew = self.rew.loss(self.rew(feat), batch["reward"][:, 1:])
        con_target = (~batch["is_terminal"][:, 1:]).float() * cfg.discount
        con = F.binary_cross_entropy_with_logits(self.con(feat), con_target, reduction="none")
        metrics = {f"loss/rec/{k}": v.mean().detach() for k, v in recs.items()}
        losses = {"rec": sum(v.mean() for v in recs.values()), "rew": rew.mean(),
                  "con": con.mean(), "dyn": dyn.mean(), "rep": rep.mean()}
        return losses, metrics

    def imagine(self, deter: torch.Tensor, stoch: torch.Tensor,
                noise: dict[str, torch.Tensor] | None = None):
        """Roll out H steps of the prior under the policy from N (detached) start states.

        Returns feats (N, H+1, F) including the start, without gradient, and the log-prob and
        entropy (N, H) of the action sampled in each of the first H states, with gradient to
        the actor only (the world model gets none from imagination, as in the paper). Two
        schedules with the same values (tested): per step, the distribution that samples the
        rollout's action also gives its log-prob (one actor pass per state: the fewest FLOPs,
        the CPU's); or, with `batch_actor` (the GPU path), the rollout samples without
        gradient and the actor is evaluated again over all N x H states in one pass, as the
        official imagination loss does (`self.pol(sg(inp), 2)` in dreamerv3/agent.py): a
        second actor forward (about 10% more FLOPs per update at paper-S, 502 vs 458 GFLOP),
        but one batched backward instead of H, far fewer kernels.

        noise: the rollout's random draws, {"act": (H, N, A) standard normal (continuous) or
        (H, N, 1) uniform (discrete), "lat": (H, N, S) uniform} (`rollout_noise`); None: the
        per-step schedule draws as it goes, the batched one draws them all first.
        """
        if self.batch_actor:
            return self._imagine_batched(deter, stoch, noise or self.rollout_noise(len(deter)))
        feats, acts, logps, ents = [], [], [], []
        for t in range(self.cfg.imag_horizon):
            feats.append(self.feat(deter, stoch))
            dist = self.pol(feats[-1])
            act = dist.sample(None if noise is None else noise["act"][t])  # detached
            logps.append(dist.log_prob(act))
            ents.append(dist.entropy())
            acts.append(act)
            with torch.no_grad():
                deter, stoch = self.dyn.img_step(deter, stoch, act,
                                                 None if noise is None else noise["lat"][t])
        feats.append(self.feat(deter, stoch))
        return torch.stack(feats, 1), torch.stack(logps, 1), torch.stack(ents, 1)

    def rollout_noise(self, n: int) -> dict[str, torch.Tensor]:
        """All random draws of an H-step rollout from n states, in two launches (see
        imagine)."""
        H, A, S = self.cfg.imag_horizon, self.act_space.size, self.net.stoch
        act = (torch.rand(H, n, 1, device=self.device) if self.act_space.discrete else
               torch.randn(H, n, A, device=self.device))
        return {"act": act, "lat": torch.rand(H, n, S, device=self.device)}

    def _imagine_batched(self, deter, stoch, noise):
        """imagine's batched schedule. Each state enters the matmuls through one cast (the
        policy's input is built in the matmul dtype, where the reference casts feat's deter
        and stoch the same way), and feats are built once from the stacked states."""
        deter_in = self.dyn.compute(deter)
        with torch.no_grad():
            if deferred.current() is not None and self.net.prior_layers and self.net.actor_layers:
                deters, stochs, acts = self._rollout_joined(deter, stoch, deter_in, noise)
            else:
                deters, stochs, acts = self._rollout(deter, stoch, deter_in, noise)
        feat = self.feat(torch.stack(deters, 1), torch.stack(stochs, 1))
        dist = self.pol(feat[:, :-1])
        return feat, dist.log_prob(torch.stack(acts, 1)), dist.entropy()

    def _rollout(self, deter, stoch, deter_in, noise):
        """_imagine_batched's rollout, layer by layer: the lists of deters, stochs (with the
        start's) and actions."""
        deters, stochs, acts = [deter], [stoch], []
        for t in range(self.cfg.imag_horizon):
            flat = stoch.reshape(*stoch.shape[:-2], -1)
            act, act_in = self.pol.sample(torch.cat([deter_in, flat.to(deter_in.dtype)], -1),
                                          noise["act"][t])
            acts.append(act)
            deter, stoch, deter_in = self.dyn.img_step_in(deter, stoch, act_in, deter_in,
                                                          noise["lat"][t])
            deters.append(deter)
            stochs.append(stoch)
        return deters, stochs, acts

    def _rollout_joined(self, deter, stoch, deter_in, noise):
        """_imagine_batched's rollout inside a deferral scope (the GPU path), with the layers
        that read the same state as one matmul: the state h feeds the prior's first layer,
        the actor's first layer (its h columns) and dynin0, so one matmul of their weights
        stacked (biases included); the sample z feeds the actor's first layer (its z columns)
        and dynin1, another. The actor's first norm adds its two halves (ops.rms_silu_add);
        dynin0/1/2 are normalised and concatenated in one op (ops.rms_silu_cat). The same
        dot products as _rollout's, summed in another order; under bfloat16 autocast the
        actor's first layer also rounds its two halves to bf16 before adding them (tested
        against a float32 rollout: as close as _rollout). 21 kernels per step instead of 24.
        Returns what _rollout does."""
        dyn, pol, ops, H = self.dyn, self.pol, self.ops, self.cfg.imag_horizon
        D, dtype = dyn.deter, deter_in.dtype
        a1, a_norm = pol.mlp.layers[0], pol.mlp.layers[1]
        p1, p_norm = dyn.prior[0].layers[0], dyn.prior[0].layers[1]
        norms = (dyn.dynin0[1], dyn.dynin1[1], dyn.dynin2[1])
        P, U = p1.out_features, a1.out_features

        def joined(name, parts):
            return self.deferral.cached((self, name, dtype),
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

    def _imag_losses(self, feat, logp, ent, metrics):
        """Actor and critic losses on imagined trajectories.

        Returns (policy loss, value loss, lambda-return R_0 of every start (N,)).
        """
        cfg = self.cfg
        with torch.no_grad():
            rew = self.rew.mean(self.rew(feat))
            con = torch.sigmoid(self.con(feat))
            slowval = self.slowval.mean(self.slowval(feat))
        val_logits = self.val(feat)
        val = self.val.mean(val_logits).detach()
        weight = torch.cumprod(con, 1)[:, :-1]
        ret = self.ops.lambda_return(torch.zeros_like(con), 1.0 - con, rew, val, 1.0, cfg.lam)
        # Data parallel: percentiles of the global batch, so every rank normalises alike.
        all_ret = parallel.all_gather(ret) if self.reducer is not None else ret
        scale = L.percentile_scale(all_ret, self.retnorm_lo, self.retnorm_hi, cfg.retnorm_rate,
                                   self.retnorm_q, cfg.retnorm_limit)
        adv = (ret - val[:, :-1]) / scale
        policy = L.policy_loss(logp, ent, adv, weight, cfg.actent)
        value = L.value_loss(self.val.loss(val_logits[:, :-1], ret),
                             self.val.loss(val_logits[:, :-1], slowval[:, :-1]), weight,
                             cfg.slowreg)
        metrics.update({"imag/ret": ret.mean(), "imag/adv": adv.abs().mean(),
                        "imag/ent": ent.mean().detach(), "imag/val": val.mean(),
                        "imag/rew": rew.mean(), "imag/con": con.mean(),
                        "retnorm/lo": self.retnorm_lo.clone(), "retnorm/hi": self.retnorm_hi.clone()})
        return policy, value, ret[:, 0]

    def _repval_loss(self, batch, feat, boot):
        """Critic loss on the replayed sequence, bootstrapped by imagined returns."""
        cfg = self.cfg
        last, term = batch["is_last"][:, 1:], batch["is_terminal"][:, 1:]
        ret = self.ops.lambda_return(last, term, batch["reward"][:, 1:], boot.detach(),
                                     cfg.discount, cfg.lam)
        logits = self.val(feat)[:, :-1]
        with torch.no_grad():
            slowval = self.slowval.mean(self.slowval(feat[:, :-1]))
        weight = (~last[:, :-1]).float()
        return L.value_loss(self.val.loss(logits, ret), self.val.loss(logits, slowval), weight,
                            cfg.slowreg)

    def _total(self, losses, metrics):
        """Weighted sum of the named losses; flags non-finite ones without a host sync."""
        assert tuple(losses) == LOSSES, f"loss keys {tuple(losses)} != loss scales {LOSSES}"
        stacked = torch.stack([losses[k] for k in LOSSES])
        with torch.no_grad():
            self.nonfinite |= ~torch.isfinite(stacked.detach())
        metrics.update({f"loss/{k}": v.detach() for k, v in zip(LOSSES, stacked)})
        # One multiply and one sum (2 kernels each way, not 2 per loss); each loss's gradient
        # is its scale exactly, as with the sum of the scaled terms.
        return (stacked * self.loss_scales.to(stacked.dtype)).sum()

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

