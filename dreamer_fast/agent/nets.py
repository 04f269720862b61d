"""Building blocks: fan-in truncated-normal Linear, BlockLinear, RMSNorm+SiLU, MLP.

Every hidden layer is Linear -> RMSNorm -> SiLU (no residuals). The norm+activation goes through
`ops.rms_silu` (or, for several norms read together, `ops.rms_silu_cat` via
`deferred.norm_cat`) so the Triton kernel and its reference share one call site. Inside a
deferral scope (agent/deferred.py, the GPU path) the layers defer their weight gradients.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from dreamer_fast.agent import deferred
from dreamer_fast.agent.deferred import compute_dtype  # noqa: F401 (re-export)


def init_trunc_normal_(weight: torch.Tensor, fan_in: int, outscale: float = 1.0) -> None:
    """Truncated normal cut at +-2 std, scaled to std 1/sqrt(fan_in) (1.1368 undoes the cut)."""
    with torch.no_grad():
        nn.init.trunc_normal_(weight, 0.0, 1.0, -2.0, 2.0)
        weight.mul_(1.1368 / math.sqrt(fan_in) * outscale)


class Linear(nn.Linear):
    """y = xW + b with the fan-in init; outscale multiplies the initial W (0 gives W = 0)."""

    def __init__(self, inp: int, out: int, outscale: float = 1.0):
        super().__init__(inp, out)
        init_trunc_normal_(self.weight, inp, outscale)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scope = deferred.current()
        if scope is not None:
            if torch.is_grad_enabled() and self.weight.requires_grad:
                return deferred.LinearFn.apply(x, self.weight, self.bias, self, scope)
            if not torch.is_grad_enabled():
                return deferred.scan_linear(self, x, scope)
        return super().forward(x)

    def deferred_params(self) -> tuple[nn.Parameter, ...]:
        return self.weight, self.bias

    def deferred_grads(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW, db) over every stashed (x, dy): one GEMM and one sum (in the bias's dtype)."""
        gs = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in items])
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in items]).to(gs.dtype)
        return gs.t() @ xs, gs.sum(0, dtype=self.bias.dtype)


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
        return self.forward_shared(x, None)

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

    def deferred_params(self) -> tuple[nn.Parameter, ...]:
        return self.weight, self.bias

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
        return dw, gs.sum(0, dtype=self.bias.dtype)

    def forward_shared(self, own: torch.Tensor, shared: torch.Tensor | None,
                       bias: bool = True) -> torch.Tensor:
        """forward() of the input whose block g is concat(own_g, shared), without building it.

        own: (..., G * n) split into G chunks of n; shared: (..., m) seen by every block, with
        n + m = inp / G. Block g's matrix splits into rows for own_g and rows for shared; the
        shared rows of all blocks form one (m, out) matrix, so the repeated input (G copies of
        shared: 12,800 wide per step at paper-S) becomes one dense GEMM. Same parameters.
        bias=False (inside a deferral scope only): the output without the bias, for an op that
        adds it (ops.gru_cell); the bias still gets its gradient at flush().
        """
        scope = deferred.current()
        if scope is not None:
            if torch.is_grad_enabled() and self.weight.requires_grad:
                return deferred.BlockFn.apply(own, shared, self.weight, self.bias, self, scope,
                                              bias)
            if not torch.is_grad_enabled():
                return self.scan_forward(own, shared, scope, bias)
        if not bias:
            raise ValueError("BlockLinear.forward_shared(bias=False) needs a deferral scope")
        return self._forward(own, shared, self.weight, self.bias)

    def scan_forward(self, own: torch.Tensor, shared: torch.Tensor | None,
                     scope: deferred.DeferredWeightGrads, bias: bool = True) -> torch.Tensor:
        """forward_shared inside a deferral scope, no autograd; 2 kernels and no copies.

        The shared part (with the bias) is one GEMM into the (N, out) output; each block's own
        part is then added in place by one batched GEMM that reads and writes the blocks as
        strided views of the rows ((G, N, n) with row stride G n: a layout cuBLAS takes as
        it is). Weights are cast and laid out once per scope. Without a shared input the
        batched GEMM writes the output alone (bias=False) or onto a copy of the bias.
        """
        G, lead = self.blocks, own.shape[:-1]
        dtype = compute_dtype(own)
        n, m = own.shape[-1] // G, self.weight.shape[-1]
        rows = own.reshape(-1, G * n).to(dtype)
        N = rows.shape[0]
        beta = 1.0
        if shared is not None:
            y = (torch.addmm(deferred.cast(self, "bias", dtype, scope),
                             shared.reshape(N, -1).to(dtype), self.shared_rows(n, dtype, scope))
                 if bias else shared.reshape(N, -1).to(dtype) @ self.shared_rows(n, dtype, scope))
        elif bias:
            y = deferred.cast(self, "bias", dtype, scope).expand(N, G * m).clone()
        else:  # beta 0: the uninitialised output is not read
            y, beta = torch.empty(N, G * m, dtype=dtype, device=rows.device), 0.0
        y.view(N, G, m).transpose(0, 1).baddbmm_(rows.reshape(N, G, n).transpose(0, 1),
                                                 self.own_rows(n, dtype, scope), beta=beta)
        return y.reshape(*lead, G * m)

    def own_rows(self, n: int, dtype: torch.dtype, scope) -> torch.Tensor:
        """Each block's rows for its own input chunk, (G, n, m) in dtype, once per scope."""
        return scope.cached((self, "own", n, dtype),
                            lambda: self.weight.detach()[:, :n].to(dtype))

    def shared_rows(self, n: int, dtype: torch.dtype, scope) -> torch.Tensor:
        """All blocks' rows for the shared input as one (inp / G - n, out) matrix in dtype,
        laid out once per scope (a copy: the blocks' columns are interleaved)."""
        G, m = self.blocks, self.weight.shape[-1]
        return scope.cached((self, "shared", n, dtype), lambda: self.weight.detach()[
            :, n:].transpose(0, 1).reshape(-1, G * m).to(dtype))


class NormAct(nn.Module):
    """SiLU(RMSNorm(x)) over the last axis; learnable scale, no bias, eps 1e-4, float32 math.

    Inside a deferral scope (agent/deferred.py) the scale's gradient is deferred like the
    weights' (autograd would add one per step into .grad): the op runs with the scale detached
    (its backward gives dx only) and flush() computes d scale once over all stashed rows."""

    def __init__(self, size: int, ops, eps: float = 1e-4):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scope = deferred.current()
        if scope is not None and torch.is_grad_enabled() and self.scale.requires_grad:
            return deferred.StashGrad.apply(self.ops.rms_silu(x, self.scale.detach(), self.eps),
                                            x, self, scope)
        return self.ops.rms_silu(x, self.scale, self.eps)

    def deferred_params(self) -> tuple[nn.Parameter, ...]:
        return (self.scale,)

    def deferred_grads(self, items) -> tuple[torch.Tensor]:
        """d scale over every stashed (x, dy): the op's backward once over all rows."""
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in items])
        gs = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in items])
        scale = self.scale.detach().requires_grad_()
        with torch.enable_grad():
            y = self.ops.rms_silu(xs, scale, self.eps)
        return torch.autograd.grad(y, scale, gs.to(y.dtype))


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
