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


class Linear(nn.Linear):
    """y = xW + b with the fan-in init; outscale multiplies the initial W (0 gives W = 0)."""

    def __init__(self, inp: int, out: int, outscale: float = 1.0):
        super().__init__(inp, out)
        init_trunc_normal_(self.weight, inp, outscale)
        nn.init.zeros_(self.bias)


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
        lead = x.shape[:-1]
        x = x.reshape(-1, self.blocks, x.shape[-1] // self.blocks).transpose(0, 1)
        y = torch.bmm(x, self.weight.to(x.dtype)).transpose(0, 1)
        return y.reshape(*lead, -1) + self.bias.to(y.dtype)

    def forward_shared(self, own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """forward() of the input whose block g is concat(own_g, shared), without building it.

        own: (..., G * n) split into G chunks of n; shared: (..., m) seen by every block, with
        n + m = inp / G. Block g's matrix splits into rows for own_g and rows for shared; the
        shared rows of all blocks form one (m, out) matrix, so the repeated input (G copies of
        shared: 12,800 wide per step at paper-S) becomes one dense GEMM. Same parameters.
        """
        G, lead = self.blocks, own.shape[:-1]
        n = own.shape[-1] // G
        w = self.weight.to(own.dtype)
        y = torch.bmm(own.reshape(-1, G, n).transpose(0, 1), w[:, :n]).transpose(0, 1)
        w_shared = w[:, n:].transpose(0, 1).reshape(shared.shape[-1], -1)
        y = y.reshape(*lead, -1) + shared @ w_shared
        return y + self.bias.to(y.dtype)


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
