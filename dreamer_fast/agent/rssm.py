"""World model networks: Encoder, block-GRU RSSM, Decoder.

Observation spaces are dicts name -> (shape, dtype). Vector keys are rank-1 float arrays;
categorical keys rank-2 uint8 one-hots (G, K); image keys rank-3 uint8 arrays, channels first
(C, H, W), with H = W divisible by 16.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dreamer_fast.agent.dists import symexp, symlog
from dreamer_fast.agent import deferred
from dreamer_fast.agent.deferred import JoinedLinears, compute_dtype, norm_cat
from dreamer_fast.agent.nets import (MLP, BlockLinear, Conv, Linear, NormAct, NormAct2d,
                                     StridedConv, StridedConvT, upsample2)

RESERVED = ("reward", "is_first", "is_last", "is_terminal")
CHANNELS_LAST = torch.channels_last


class Keys:
    """The sorted keys of an observation space by kind; rejects what the nets can't read.

    vec: float vectors (D,); cat: uint8 one-hots (G, K) of categorical observations; img:
    uint8 images (C, H, W), H = W divisible by 16. `mlp` = vec + cat, sorted together.
    """

    def __init__(self, obs_space: dict):
        self.vec, self.cat, self.img = [], [], []
        for key, (shape, dtype) in sorted(obs_space.items()):
            dtype = np.dtype(dtype)
            if key in RESERVED:
                continue
            if len(shape) == 3 and dtype == np.uint8:
                if shape[1] != shape[2] or shape[1] % 16:
                    raise ValueError(f"observation {key!r} has shape {shape}; images must be "
                                     "(C, H, W) uint8 with H == W divisible by 16 (e.g. 64x64)")
                self.img.append(key)
            elif len(shape) == 2 and dtype == np.uint8:
                self.cat.append(key)
            elif len(shape) == 1 and np.issubdtype(dtype, np.floating):
                self.vec.append(key)
            else:
                raise ValueError(
                    f"observation {key!r} has shape {shape} and dtype {dtype}; allowed: float "
                    "vectors (D,), uint8 one-hots (G, K) or uint8 images (C, H, W)")
        self.mlp = sorted(self.vec + self.cat)
        if not self.mlp and not self.img:
            raise ValueError(f"observation space {obs_space} has no vector or image key")
        if self.img and len({obs_space[k][0][1:] for k in self.img}) > 1:
            raise ValueError(f"image observations {self.img} differ in size; they must share "
                             "H and W")


def mlp_input(obs: dict[str, torch.Tensor], keys: Keys) -> torch.Tensor:
    """Vector and categorical keys as one input (*lead, sum of sizes): symlog on float
    vectors, categorical one-hots as they are (the official DictConcat)."""
    parts = []
    for k in keys.mlp:
        x = obs[k]
        if k in keys.cat:
            parts.append(x.reshape(*x.shape[:-2], -1).float())
        else:
            parts.append(symlog(x.float()))
    return torch.cat(parts, -1)


class Encoder(nn.Module):
    """Observations -> tokens e_t: MLP on vectors and one-hots, CNN on the images (channels
    concatenated), outputs concatenated.

    strided: stride-2 convolutions instead of stride 1 + 2x2 max-pool (the official
    `enc.simple.strided`)."""

    memory_format = CHANNELS_LAST  # packed seeds (vmap) set contiguous_format on theirs

    def __init__(self, obs_space: dict, units: int, depth: int, enc_layers: int, ops,
                 strided: bool = False):
        super().__init__()
        self.keys = Keys(obs_space)
        self.out_size = 0
        if self.keys.mlp:
            inp = sum(int(np.prod(obs_space[k][0])) for k in self.keys.mlp)
            self.mlp = MLP(inp, units, enc_layers, ops)
            self.out_size += self.mlp.out_size
        if self.keys.img:
            chans = sum(obs_space[k][0][0] for k in self.keys.img)
            size = obs_space[self.keys.img[0]][0][1]
            stages = []
            for mult in (2, 3, 4, 4):
                if strided:
                    stages += [StridedConv(chans, mult * depth), NormAct2d(mult * depth, ops)]
                else:
                    stages += [Conv(chans, mult * depth), nn.MaxPool2d(2),
                               NormAct2d(mult * depth, ops)]
                chans = mult * depth
            self.cnn = nn.Sequential(*stages)
            self.out_size += chans * (size // 16) ** 2

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """obs[k]: (*lead, *shape) -> tokens (*lead, out_size)."""
        outs = []
        if self.keys.mlp:
            outs.append(self.mlp(mlp_input(obs, self.keys)))
        if self.keys.img:
            x = torch.cat([obs[k] for k in self.keys.img], -3)
            lead = x.shape[:-3]
            x = x.reshape(-1, *x.shape[-3:]).float() / 255.0 - 0.5
            # Channels-last maps: convs run ~2x faster on CPU (bench/throughput.py) and the
            # channel norm reads contiguous rows.
            x = self.cnn(x.contiguous(memory_format=self.memory_format))
            outs.append(x.permute(0, 2, 3, 1).reshape(*lead, -1))
        return torch.cat(outs, -1)


class RSSM(nn.Module):
    """Block-GRU recurrent state-space model.

    State: deter h (N, D) and stoch z (N, S, K) one-hot (straight-through). Actions arrive as
    vectors (one-hot for discrete); continuous ones are scaled by 1/max(1, |a|) here.
    """

    def __init__(self, deter: int, hidden: int, stoch: int, classes: int, blocks: int,
                 act_size: int, token_size: int, dyn_layers: int, prior_layers: int,
                 post_layers: int, unimix: float, continuous: bool, ops):
        super().__init__()
        self.deter, self.stoch, self.classes, self.blocks = deter, stoch, classes, blocks
        self.unimix, self.continuous, self.ops = unimix, continuous, ops
        self.dynin0 = nn.Sequential(Linear(deter, hidden), NormAct(hidden, ops))
        self.dynin1 = nn.Sequential(Linear(stoch * classes, hidden), NormAct(hidden, ops))
        self.dynin2 = nn.Sequential(Linear(act_size, hidden), NormAct(hidden, ops))
        inp = deter + 3 * blocks * hidden
        hid = []
        for _ in range(dyn_layers):
            hid += [BlockLinear(inp, deter, blocks), NormAct(deter, ops)]
            inp = deter
        self.dynhid = nn.Sequential(*hid)
        self.dyngru = BlockLinear(inp, 3 * deter, blocks)
        self.prior = nn.Sequential(MLP(deter, hidden, prior_layers, ops),
                                   Linear(hidden if prior_layers else deter, stoch * classes))
        self.post = nn.Sequential(MLP(deter + token_size, hidden, post_layers, ops),
                                  Linear(hidden if post_layers else deter + token_size,
                                         stoch * classes))

    def action_input(self, action: torch.Tensor) -> torch.Tensor:
        if self.continuous:
            return action / action.detach().abs().clamp(min=1.0)
        return action

    def core(self, deter: torch.Tensor, stoch: torch.Tensor, action: torch.Tensor | None,
             x2: torch.Tensor | None = None, deter_in: torch.Tensor | None = None
             ) -> torch.Tensor:
        """One GRU step h' = f(h, z, a); deter (N, D), stoch (N, S, K), action (N, A) (or
        x2, its embedding dynin2(action_input(action)), computed beforehand). deter_in: deter
        in the matmul dtype (`compute`), when the caller has it; the state update itself uses
        deter as it is (float32)."""
        deter_in = deter if deter_in is None else deter_in
        return self.ops.gru_update(self._gates(deter_in, stoch, action, x2), deter, self.blocks)

    def core_in(self, deter, stoch, action, x2, deter_in, action_in=None):
        """core() and the new state in the matmul dtype (`compute`). Inside a deferral scope (the
        GPU path) the GRU layer's bias, the gate math, the update and the cast are one op
        (ops.gru_cell, which also sums the two results' gradients). action_in: the action
        already through action_input (instead of action or x2; deferral scope only)."""
        if not deferred.current() is not None:
            deter = self.core(deter, stoch, action, x2, deter_in)
            return deter, self.compute(deter)
        gates = self._gates(deter_in, stoch, action, x2, bias=False, action_in=action_in)
        return self.ops.gru_cell(gates, self.dyngru.bias.detach(), deter, self.blocks,
                                 compute_dtype(deter_in))

    def _gates(self, deter_in, stoch, action, x2, bias=True, action_in=None):
        """The GRU layer's output (with its bias, or without: bias=False in a deferral scope)."""
        stoch = stoch.reshape(*stoch.shape[:-2], -1)
        norms = [self.dynin0[1], self.dynin1[1]]
        if deferred.current() is not None:  # the two or three norms and the concatenation in one op
            xs = [self.dynin0[0](deter_in), self.dynin1[0](stoch)]
            if x2 is None:
                xs.append(self.dynin2[0](self.action_input(action) if action_in is None
                                         else action_in))
                norms.append(self.dynin2[1])
            shared = norm_cat(norms, xs, x2)
        else:
            x0, x1 = self.dynin0(deter_in), self.dynin1(stoch)
            if x2 is None:
                x2 = self.dynin2(self.action_input(action))
            shared = torch.cat([x0, x1, x2], -1)
        return self.gates_of(deter_in, shared, bias)

    def gates_of(self, deter_in, shared, bias=True):
        """The block layers on the embedded inputs shared = [x0, x1, x2]: block g sees
        [h_g, x0, x1, x2]; forward_shared computes that without G copies."""
        if len(self.dynhid):
            x = self.dynhid[1:](self.dynhid[0].forward_shared(deter_in, shared))
            return self.dyngru.forward_shared(x, None, bias)
        return self.dyngru.forward_shared(deter_in, shared, bias)

    @staticmethod
    def compute(x: torch.Tensor) -> torch.Tensor:
        """x in the dtype autocast gives matmuls (itself without autocast): one cast that
        every layer reading x shares, instead of one cast per layer (and per gradient)."""
        return x.to(compute_dtype(x))

    def prior_logits(self, deter: torch.Tensor) -> torch.Tensor:
        return self.prior(deter).reshape(*deter.shape[:-1], self.stoch, self.classes)

    def post_logits(self, deter: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.post(torch.cat([deter.to(tokens.dtype), tokens], -1))
        return x.reshape(*deter.shape[:-1], self.stoch, self.classes)

    def sample(self, logits: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.rand(logits.shape[:-1], device=logits.device)
        return self.ops.latent_sample(logits, self.unimix, noise)

    def obs_step(self, deter, stoch, action, tokens, is_first, noise=None):
        """Reset on is_first (zeros, then still apply f), h_t = f(...), posterior sample
        (noise: its uniform draws (N, S), default drawn here)."""
        keep = (~is_first).float()[..., None]
        deter = self.core(deter * keep, stoch * keep[..., None], action * keep)
        logits = self.post_logits(deter, tokens)
        return deter, self.sample(logits, noise), logits

    def observe(self, deter, stoch, actions, tokens, is_first):
        """Posterior scan over time.

        deter (B, D), stoch (B, S, K): carry before step 0; actions (B, T, A): the action taken
        before each step; tokens (B, T, E); is_first (B, T) bool. Returns deters (B, T, D),
        stochs (B, T, S, K) and posterior logits (B, T, S, K).
        """
        if self.ops.impl != "ref":
            return self._observe_hoisted(deter, stoch, actions, tokens, is_first)
        # All steps' latent noise in one draw, as the hoisted scan draws it: the same values
        # on every path and device (on a CUDA device T draws of (B, S) would give others).
        noise = torch.rand(tokens.shape[1], *stoch.shape[:-1], device=stoch.device)
        deters, stochs, logits = [], [], []
        for t in range(tokens.shape[1]):
            deter, stoch, logit = self.obs_step(deter, stoch, actions[:, t], tokens[:, t],
                                                is_first[:, t], noise[t])
            deters.append(deter)
            stochs.append(stoch)
            logits.append(logit)
        return torch.stack(deters, 1), torch.stack(stochs, 1), torch.stack(logits, 1)

    def _observe_hoisted(self, deter, stoch, actions, tokens, is_first):
        """observe() with the work that does not depend on the carry done once for all T
        steps: the reset masks, the latent noise and the action embedding
        dynin2(action_input(a * keep)), over T x B rows in one pass; the state enters the
        matmuls through one cast per step (`compute`). Each step's values are the reference
        loop's (the row-wise ops see the same rows); it saves ~15 kernels per step on the
        fast paths."""
        # 0/1 masks are exact in any dtype: in the matmul dtype, masking keeps each operand's.
        keep = (~is_first).to(compute_dtype(tokens)).transpose(0, 1).unsqueeze(-1)
        x2 = self.dynin2(self.action_input(actions.transpose(0, 1) * keep))  # (T, B, hidden)
        # All steps' latent noise in one draw (the same values as T draws of (B, S) on a CPU).
        noise = torch.rand(keep.shape[0], *stoch.shape[:-1], device=stoch.device)
        # unbind: the backward of all T slices is one stack, not T zero-filled selects.
        steps = zip(keep.unbind(0), x2.unbind(0), tokens.unbind(1), noise.unbind(0))
        deter_in = self.compute(deter)
        if deferred.current() is not None and deter_in is not deter:
            return self._observe_deferred(deter, deter_in, stoch, keep.unbind(0), x2.unbind(0),
                                          tokens.unbind(1), noise.unbind(0))
        deters, stochs, logits = [], [], []
        for k, x2_t, token, noise_t in steps:
            if deter_in is deter:  # no autocast: one mask, the reference's autograd graph
                masked = masked_in = deter * k
                masked_stoch = stoch * k[..., None]
            else:  # the carry in both dtypes and the sample, in one op
                masked, masked_in, masked_stoch = self.ops.mask_rows(k, deter, deter_in, stoch)
            deter, deter_in = self.core_in(masked, masked_stoch, None, x2_t, masked_in)
            logit = self.post_logits(deter_in, token)
            stoch = self.sample(logit, noise_t)
            deters.append(deter)
            stochs.append(stoch)
            logits.append(logit)
        return torch.stack(deters, 1), torch.stack(stochs, 1), torch.stack(logits, 1)

    def _observe_deferred(self, deter, deter_in, stoch, keep, x2, tokens, noise):
        """_observe_hoisted's loop inside a deferral scope (the GPU path; the per-step inputs as
        sequences over time): each step's GRU cell and latent sample also write the next
        step's carry, masked by its reset, so the reset costs no launch of its own (only the
        initial carry goes through mask_rows); the cell writes the posterior's input, the
        sample the next [h, z] for dynin0 and dynin1 (one matmul) and passes the logits
        through to the losses; each op's backward sums the gradients of its copies. The same
        values, 11 kernels per step forward and 11 backward."""
        masked, masked_in, masked_stoch = self.ops.mask_rows(keep[0], deter, deter_in, stoch)
        bias, dtype, T = self.dyngru.bias.detach(), compute_dtype(deter_in), len(keep)
        # dynin0 (on h) and dynin1 (on z) as one matmul over [h, z] (JoinedLinears), whose
        # input the latent sample writes from the next step on (its head: the cell's copy).
        dynin01, norms = JoinedLinears(self.dynin0[0], self.dynin1[0]), [self.dynin0[1],
                                                                          self.dynin1[1]]
        inp = torch.cat([masked_in, masked_stoch.flatten(-2).to(dtype)], -1)
        deters, stochs, logits = [], [], []
        for t in range(T):
            k_next = keep[t + 1] if t + 1 < T else None
            gates = self.gates_of(masked_in, norm_cat(norms, [dynin01(inp)], x2[t]), bias=False)
            # The cell also writes the posterior's input [h, tokens] (no concatenation).
            outs = self.ops.gru_cell(gates, bias, masked, self.blocks, dtype, k_next, tokens[t])
            deter, post_in = outs[:2]
            logit = self.post(post_in).reshape(*post_in.shape[:-1], self.stoch, self.classes)
            if k_next is None:
                stoch = self.sample(logit, noise[t])
            else:
                masked, masked_in, masked_in0 = outs[2:]
                stoch, inp, logit = self.ops.latent_sample(logit, self.unimix, noise[t],
                                                           k_next, masked_in0)
            deters.append(deter)
            stochs.append(stoch)
            logits.append(logit)
        return torch.stack(deters, 1), torch.stack(stochs, 1), torch.stack(logits, 1)

    def img_step(self, deter, stoch, action, noise=None):
        """One imagined step with the prior: returns the next deter and stoch (noise: the
        latent sample's uniform draws (N, S), default drawn here)."""
        deter = self.core(deter, stoch, action, deter_in=self.compute(deter))
        return deter, self.sample(self.prior_logits(self.compute(deter)), noise)

    def img_step_in(self, deter, stoch, action_in, deter_in, noise):
        """img_step from the action already scaled and cast (action_input(a) in the matmul
        dtype) and deter already in the matmul dtype; returns the next deter, stoch and deter
        in the matmul dtype (for the next step and the policy). The same values as
        img_step."""
        if deferred.current() is not None:  # dynin2's norm joins the other two in one op (norm_cat)
            deter, deter_in = self.core_in(deter, stoch, None, None, deter_in, action_in)
        else:
            deter, deter_in = self.core_in(deter, stoch, None, self.dynin2(action_in),
                                           deter_in)
        return deter, self.sample(self.prior_logits(deter_in), noise), deter_in


class Decoder(nn.Module):
    """Latent (deter, stoch) -> reconstructions: symlog vectors, categorical logits of the
    one-hot keys and sigmoid images (channels split back per key).

    strided: fractionally strided (transposed) convolutions instead of nearest 2x upsampling
    + stride-1 convolution (the official `dec.simple.strided`)."""

    memory_format = CHANNELS_LAST  # packed seeds (vmap) set contiguous_format on theirs

    def __init__(self, obs_space: dict, deter: int, latent: int, units: int, depth: int,
                 blocks: int, dec_layers: int, ops, strided: bool = False):
        super().__init__()
        self.keys = Keys(obs_space)
        self.shapes = {k: tuple(obs_space[k][0]) for k in self.keys.mlp + self.keys.img}
        self.strided = strided
        if self.keys.mlp:
            self.mlp = MLP(latent + deter, units, dec_layers, ops)
            self.heads = nn.ModuleDict({k: Linear(self.mlp.out_size, int(np.prod(self.shapes[k])))
                                        for k in self.keys.mlp})
        if self.keys.img:
            self.minres = obs_space[self.keys.img[0]][0][1] // 16
            self.depth, self.blocks = depth, blocks
            flat = self.minres ** 2 * 4 * depth
            self.proj_deter = BlockLinear(deter, flat, blocks)
            self.proj_stoch = nn.Sequential(Linear(latent, 2 * units), NormAct(2 * units, ops),
                                            Linear(2 * units, flat))
            self.proj_norm = NormAct2d(4 * depth, ops)
            up = StridedConvT if strided else Conv
            stages, chans = [], 4 * depth
            for mult in (4, 3, 2):
                stages += [up(chans, mult * depth), NormAct2d(mult * depth, ops)]
                chans = mult * depth
            self.stages = nn.ModuleList(stages)
            self.out = up(chans, sum(self.shapes[k][0] for k in self.keys.img))

    def forward(self, deter: torch.Tensor, stoch: torch.Tensor) -> dict[str, torch.Tensor]:
        """deter (*lead, D), stoch (*lead, S, K) -> {key: (*lead, *shape)} predictions.

        Vector predictions are in symlog space, categorical ones logits (*lead, G, K); images
        are in [0, 1].
        """
        stoch = stoch.reshape(*stoch.shape[:-2], -1)
        out = {}
        if self.keys.mlp:
            x = self.mlp(torch.cat([stoch, deter], -1))
            out.update({k: self.heads[k](x).reshape(*x.shape[:-1], *self.shapes[k])
                        for k in self.keys.mlp})
        if self.keys.img:
            out.update(self._images(deter, stoch))
        return out

    def _images(self, deter, stoch):
        lead, r, G, C = deter.shape[:-1], self.minres, self.blocks, 4 * self.depth
        deter, stoch = deter.reshape(-1, deter.shape[-1]), stoch.reshape(-1, stoch.shape[-1])
        # Each block of the deter projection is one (r, r, C/G) slab of the channels.
        a = self.proj_deter(deter).reshape(-1, G, r, r, C // G).permute(0, 1, 4, 2, 3)
        a = a.reshape(-1, C, r, r)
        b = self.proj_stoch(stoch).reshape(-1, r, r, C).permute(0, 3, 1, 2)
        x = self.proj_norm((a + b).contiguous(memory_format=self.memory_format))
        up = (lambda y: y) if self.strided else upsample2
        for i in range(0, len(self.stages), 2):
            x = self.stages[i + 1](self.stages[i](up(x)))
        x = torch.sigmoid(self.out(up(x)))
        x = x.reshape(*lead, *x.shape[1:])
        out, start = {}, 0
        for k in self.keys.img:
            out[k] = x[..., start:start + self.shapes[k][0], :, :]
            start += self.shapes[k][0]
        return out

    def loss(self, pred: dict[str, torch.Tensor], obs: dict[str, torch.Tensor]) -> dict:
        """Per-step losses (*lead), summed over each key's elements: squared error of vectors
        vs symlog(x) and images vs x/255; categorical keys the negative log-likelihood."""
        losses = {}
        for k in self.keys.vec:
            losses[k] = (pred[k] - symlog(obs[k].float())).square().sum(-1)
        for k in self.keys.cat:
            logp = torch.log_softmax(pred[k].float(), -1)
            losses[k] = -(logp * obs[k].float()).sum((-2, -1))
        for k in self.keys.img:
            losses[k] = (pred[k] - obs[k].float() / 255.0).square().sum((-3, -2, -1))
        return losses

    def observation(self, key: str, pred: torch.Tensor) -> torch.Tensor:
        """A prediction in observation units: vectors symexp'd, categorical keys as class
        probabilities, images as they are ([0, 1])."""
        if key in self.keys.vec:
            return symexp(pred)
        if key in self.keys.cat:
            return torch.softmax(pred.float(), -1)
        return pred
