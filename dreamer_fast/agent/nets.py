"""Building blocks: fan-in truncated-normal Linear, BlockLinear, RMSNorm+SiLU, MLP.

Every hidden layer is Linear -> RMSNorm -> SiLU (no residuals). The norm+activation goes through
`ops.rms_silu` so the Triton kernel and its reference share one call site.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def init_trunc_normal_(weight: torch.Tensor, fan_in: int, outscale: float = 1.0) -> None:
    """Truncated normal cut at +-2 std, scaled to std 1/sqrt(fan_in) (1.1368 undoes the cut)."""
    with torch.no_grad():
        nn.init.trunc_normal_(weight, 0.0, 1.0, -2.0, 2.0)
        weight.mul_(1.1368 / math.sqrt(fan_in) * outscale)


class DeferredWeightGrads:
    """Weight gradients of the layers a scan applies once per step, computed once per update.

    Autograd computes a layer's weight gradient at every step it was applied and adds it to
    .grad: for T steps, T small GEMMs (plus a bias sum) and T - 1 additions, about 4 kernels
    per layer per step. Inside `with deferred(...)`, Linear and BlockLinear layers keep the
    step's input and output gradient instead (their backward computes only the input
    gradient), and `flush()`, called after the backward pass, computes each weight's
    gradient as one GEMM over all steps' rows. The sum is the same; only the order of the
    floating-point additions differs. Used on the GPU path (`--agent.kernels triton`), whose
    update is bound by its number of kernels (bench/kernel_count.py).
    """

    def __init__(self):
        self.active = False
        self.pending: dict[nn.Module, list[tuple[torch.Tensor, ...]]] = {}

    def __call__(self, on: bool = True):
        return _Deferring(self, on)

    def stash(self, module: nn.Module, *tensors: torch.Tensor) -> None:
        self.pending.setdefault(module, []).append(tensors)

    def flush(self) -> None:
        """Add every stashed gradient to its parameters' .grad (call after backward)."""
        pending, self.pending = self.pending, {}
        for module, items in pending.items():
            grads = module.deferred_grads(items)
            for param, grad in zip((module.weight, module.bias), grads):
                grad = grad.to(param.dtype)
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)


class _Deferring:
    def __init__(self, owner: DeferredWeightGrads, on: bool):
        self.owner, self.on = owner, on

    def __enter__(self):
        self.previous, self.owner.active = self.owner.active, self.on and torch.is_grad_enabled()

    def __exit__(self, *exc):
        self.owner.active = self.previous


DEFER = DeferredWeightGrads()
"""The deferral the scans enter (one per process: an update runs on one thread at a time)."""


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b whose backward returns dx only and stashes (x, dy) for DEFER.flush."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):
        dtype = _compute_dtype(x)
        ctx.save_for_backward(x, weight)
        ctx.module, ctx.dtype = module, dtype
        return F.linear(x.to(dtype), weight.to(dtype), bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        DEFER.stash(ctx.module, x, grad)
        dx = grad.to(ctx.dtype) @ weight.to(ctx.dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None, None


class Linear(nn.Linear):
    """y = xW + b with the fan-in init; outscale multiplies the initial W (0 gives W = 0)."""

    def __init__(self, inp: int, out: int, outscale: float = 1.0):
        super().__init__(inp, out)
        init_trunc_normal_(self.weight, inp, outscale)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if DEFER.active and torch.is_grad_enabled() and self.weight.requires_grad:
            return _LinearFn.apply(x, self.weight, self.bias, self)
        return super().forward(x)

    def deferred_grads(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW, db) over every stashed (x, dy): one GEMM and one sum."""
        gs = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in items])
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in items]).to(gs.dtype)
        return gs.t() @ xs, gs.sum(0)


class BlockLinear(nn.Module):
    """Block-diagonal linear: the input's G contiguous chunks each get their own matrix.

    x: (..., inp) -> (..., out), outputs concatenated in block order, one bias of size out.
    Init uses the full fan-in `inp`, not inp / G.
    """

    def __init__(self, inp: int, out: int, blocks: int, outscale: float = 1.0):
        super().__init__()
        if inp % blocks or out % blocks:
            raise ValueError(f"BlockLinear sizes {inp}->{out} not divisible by blocks={blocks}")
        self.blocks = blocks
        self.weight = nn.Parameter(torch.empty(blocks, inp // blocks, out // blocks))
        self.bias = nn.Parameter(torch.zeros(out))
        init_trunc_normal_(self.weight, inp, outscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if DEFER.active and torch.is_grad_enabled() and self.weight.requires_grad:
            return _BlockFn.apply(x, None, self.weight, self.bias, self)
        return self._forward(x, None, self.weight, self.bias)

    def _forward(self, own, shared, weight, bias) -> torch.Tensor:
        """forward (shared None) or forward_shared with explicit parameters."""
        G, lead = self.blocks, own.shape[:-1]
        n = own.shape[-1] // G
        w = weight.to(own.dtype)
        y = torch.bmm(own.reshape(-1, G, n).transpose(0, 1), w[:, :n]).transpose(0, 1)
        y = y.reshape(*lead, -1)
        if shared is not None:
            y = y + shared @ w[:, n:].transpose(0, 1).reshape(shared.shape[-1], -1)
        return y + bias.to(y.dtype)

    def deferred_grads(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW, db) over every stashed (own, shared, dy): one batched GEMM per input part."""
        G = self.blocks
        gs = torch.cat([g.reshape(-1, g.shape[-1]) for *_, g in items])
        own = torch.cat([o.reshape(-1, o.shape[-1]) for o, *_ in items]).to(gs.dtype)
        gb = gs.reshape(len(gs), G, -1).transpose(0, 1)  # (G, N, m)
        dw = torch.bmm(own.reshape(len(own), G, -1).permute(1, 2, 0), gb)  # (G, n, m)
        if items[0][1] is not None:
            shared = torch.cat([s.reshape(-1, s.shape[-1]) for _, s, _ in items]).to(gs.dtype)
            dws = (shared.t() @ gs).reshape(shared.shape[-1], G, -1).transpose(0, 1)
            dw = torch.cat([dw, dws], 1)
        return dw, gs.sum(0)

    def forward_shared(self, own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """forward() of the input whose block g is concat(own_g, shared), without building it.

        own: (..., G * n) split into G chunks of n; shared: (..., m) seen by every block, with
        n + m = inp / G. Block g's matrix splits into rows for own_g and rows for shared; the
        shared rows of all blocks form one (m, out) matrix, so the repeated input (G copies of
        shared: 12,800 wide per step at paper-S) becomes one dense GEMM. Same parameters.
        """
        if DEFER.active and torch.is_grad_enabled() and self.weight.requires_grad:
            return _BlockFn.apply(own, shared, self.weight, self.bias, self)
        return self._forward(own, shared, self.weight, self.bias)


class _BlockFn(torch.autograd.Function):
    """BlockLinear forward / forward_shared whose backward returns the input gradients only
    and stashes (own, shared, dy) for DEFER.flush."""

    @staticmethod
    def forward(ctx, own, shared, weight, bias, module):
        dtype = _compute_dtype(own)
        ctx.save_for_backward(own, shared, weight)
        ctx.module, ctx.dtype = module, dtype
        return module._forward(own.to(dtype), None if shared is None else shared.to(dtype),
                               weight.to(dtype), bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        own, shared, weight = ctx.saved_tensors
        DEFER.stash(ctx.module, own, shared, grad)
        G, dtype = ctx.module.blocks, ctx.dtype
        n = own.shape[-1] // G
        w, g = weight.to(dtype), grad.to(dtype)
        rows = g.reshape(-1, g.shape[-1])
        d_own = d_shared = None
        if ctx.needs_input_grad[0]:
            d_own = torch.bmm(rows.reshape(len(rows), G, -1).transpose(0, 1),
                              w[:, :n].transpose(1, 2)).transpose(0, 1).reshape(own.shape)
        if shared is not None and ctx.needs_input_grad[1]:
            w_shared = w[:, n:].transpose(0, 1).reshape(shared.shape[-1], -1)
            d_shared = (rows @ w_shared.t()).reshape(shared.shape)
        return d_own, d_shared, None, None, None


class NormAct(nn.Module):
    """SiLU(RMSNorm(x)) over the last axis; learnable scale, no bias, eps 1e-4, float32 math."""

    def __init__(self, size: int, ops, eps: float = 1e-4):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_silu(x, self.scale, self.eps)


class NormAct2d(NormAct):
    """NormAct over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MLP(nn.Module):
    """`layers` x [Linear(units) -> RMSNorm -> SiLU]; with 0 layers it is the identity."""

    def __init__(self, inp: int, units: int, layers: int, ops):
        super().__init__()
        mods = []
        for i in range(layers):
            mods += [Linear(inp if i == 0 else units, units), NormAct(units, ops)]
        self.layers = nn.Sequential(*mods)
        self.out_size = units if layers else inp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Conv(nn.Conv2d):
    """5x5 'same' convolution, stride 1, bias, fan-in init over 5*5*C_in (NCHW)."""

    def __init__(self, inp: int, out: int, outscale: float = 1.0):
        super().__init__(inp, out, 5, padding=2)
        init_trunc_normal_(self.weight, 25 * inp, outscale)
        nn.init.zeros_(self.bias)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of an NCHW map."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


class StridedConv(Conv):
    """5x5 convolution, stride 2, 'same' padding as XLA pads it (1 before, 2 after on even
    sides), so an H x W map becomes H/2 x W/2: the official strided encoder layer."""

    def __init__(self, inp: int, out: int, outscale: float = 1.0):
        super().__init__(inp, out, outscale)
        self.stride, self.padding = (2, 2), (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (1, 2, 1, 2)))


class StridedConvT(Conv):
    """Fractionally strided 5x5 convolution (H x W -> 2H x 2W): the official decoder's `transp`
    layer, which places input pixel (i, j) at (2i+1, 2j+1) of a zero map and applies a 'same'
    stride-1 convolution (`reference`). Computed as one transposed convolution of the flipped
    kernel, which skips the zeros (4x fewer multiply-adds); same parameters as Conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.flip(2, 3).transpose(0, 1)
        y = F.conv_transpose2d(x, w, self.bias, stride=2, padding=1)
        return y[..., :-1, :-1]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        up = x.new_zeros(*x.shape[:-2], 2 * x.shape[-2], 2 * x.shape[-1])
        up[..., 1::2, 1::2] = x
        return F.conv2d(up, self.weight, self.bias, padding=2)
