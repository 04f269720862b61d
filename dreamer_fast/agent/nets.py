"""Building blocks: fan-in truncated-normal Linear, BlockLinear, RMSNorm+SiLU, MLP.

Every hidden layer is Linear -> RMSNorm -> SiLU (no residuals). The norm+activation goes through
`ops.rms_silu` (or, for several norms read together, `ops.rms_silu_cat` via `norm_cat`) so the
Triton kernel and its reference share one call site.
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
    per layer per step (a norm's scale: T - 1 additions). Inside `with deferred(...)`, Linear and BlockLinear layers keep the
    step's input and output gradient instead (their backward computes only the input
    gradient), and `flush()`, called after the backward pass, computes each weight's
    gradient as one GEMM over all steps' rows (NormAct: its scale's, in one backward pass). The sum is the same; only the order of the
    floating-point additions differs. Used on the GPU path (`--agent.kernels triton`), whose
    update is bound by its number of kernels (bench/kernel_count.py).

    Inside the scope the weights cannot change, so each layer also prepares its weights once
    per scope (`cached`: the autocast dtype cast, BlockLinear's shared-input matrix) instead of
    once per step, and BlockLinear writes its blocks' outputs in place (no transposing copies).
    Layers called without gradient inside the scope (the imagination rollout) take the same
    path, without the stash. JoinedLinears (two Linear layers as one block-diagonal matmul)
    and norm_cat (several norms in one op) defer their weights' and scales' gradients the
    same way.
    """

    def __init__(self):
        self.active = False
        self.pending: dict[nn.Module, list[tuple[torch.Tensor, ...]]] = {}
        self.cache: dict[tuple, torch.Tensor] = {}

    def cached(self, key: tuple, make) -> torch.Tensor:
        """make() once per scope under key (e.g. (module, "weight", dtype))."""
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = make()
        return value

    def __call__(self, on: bool = True):
        return _Deferring(self, on)

    def stash(self, module: nn.Module, *tensors: torch.Tensor) -> None:
        self.pending.setdefault(module, []).append(tensors)

    def flush(self) -> None:
        """Add every stashed gradient to its parameters' .grad (call after backward)."""
        pending, self.pending = self.pending, {}
        self.cache = {}  # the backward's casts; the optimizer changes the weights next
        for module, items in pending.items():
            grads = module.deferred_grads(items)
            for param, grad in zip(module.deferred_params(), grads):
                grad = grad.to(param.dtype)
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)


class _Deferring:
    def __init__(self, owner: DeferredWeightGrads, on: bool):
        self.owner, self.on = owner, on

    def __enter__(self):
        self.previous, self.owner.active = self.owner.active, self.on
        if self.on and not self.previous:
            self.owner.cache = {}

    def __exit__(self, *exc):
        self.owner.active = self.previous
        if not self.previous:
            self.owner.cache = {}


DEFER = DeferredWeightGrads()
"""The deferral the scans enter (one per process: an update runs on one thread at a time)."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives x's matmuls (x.dtype without autocast)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _cast(module: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """module.<name> in dtype, cast once per DEFER scope (a no-op when it already is)."""
    param = getattr(module, name)
    if param.dtype == dtype:
        return param.detach()
    return DEFER.cached((module, name, dtype), lambda: param.detach().to(dtype))


def _scan_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Linear forward inside a DEFER scope, no autograd: weights cast once per scope."""
    dtype = compute_dtype(x)
    return F.linear(x.to(dtype), _cast(module, "weight", dtype), _cast(module, "bias", dtype))


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b whose backward returns dx only and stashes (x, dy) for DEFER.flush."""

    @staticmethod
    def forward(ctx, x, weight, bias, module):
        ctx.save_for_backward(x)
        ctx.module, ctx.dtype = module, compute_dtype(x)
        return _scan_linear(module, x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        DEFER.stash(ctx.module, x, grad)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight = _cast(ctx.module, "weight", ctx.dtype)
        return grad.to(ctx.dtype) @ weight, None, None, None


class Linear(nn.Linear):
    """y = xW + b with the fan-in init; outscale multiplies the initial W (0 gives W = 0)."""

    def __init__(self, inp: int, out: int, outscale: float = 1.0):
        super().__init__(inp, out)
        init_trunc_normal_(self.weight, inp, outscale)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if DEFER.active:
            if torch.is_grad_enabled() and self.weight.requires_grad:
                return _LinearFn.apply(x, self.weight, self.bias, self)
            if not torch.is_grad_enabled():
                return _scan_linear(self, x)
        return super().forward(x)

    def deferred_params(self) -> tuple[nn.Parameter, ...]:
        return self.weight, self.bias

    def deferred_grads(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW, db) over every stashed (x, dy): one GEMM and one sum (in the bias's dtype)."""
        gs = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in items])
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in items]).to(gs.dtype)
        return gs.t() @ xs, gs.sum(0, dtype=self.bias.dtype)


class _JoinedFn(torch.autograd.Function):
    """JoinedLinears' forward; backward returns dx only (one GEMM) and stashes (x, dy)."""

    @staticmethod
    def forward(ctx, x, w0, b0, w1, b1, joint):
        ctx.save_for_backward(x)
        ctx.joint, ctx.dtype = joint, compute_dtype(x)
        weight, bias = joint.weights(ctx.dtype)
        ctx.weight = weight  # the scope's block-diagonal matrix, kept for the backward
        return F.linear(x.to(ctx.dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        DEFER.stash(ctx.joint, x, grad)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        return grad.to(ctx.dtype) @ ctx.weight, None, None, None, None, None


class JoinedLinears:
    """Two Linear layers on two column ranges of one input as one matmul, in a DEFER scope:
    y = [x[:, :n0] W0^T + b0 | x[:, n0:] W1^T + b1], with the block-diagonal weight (the
    zeros cost FLOPs, not launches) built once per scope. Its backward is one GEMM for dx;
    the weights' gradients are deferred (DEFER.flush) like Linear's, one GEMM per layer over
    all steps' rows. Used where a scan applies both to the same step's state (the RSSM's
    dynin0 on h and dynin1 on z)."""

    def __init__(self, first: Linear, second: Linear):
        self.layers = (first, second)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (a, b) = self.layers
        return _JoinedFn.apply(x, a.weight, a.bias, b.weight, b.bias, self)

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.layers

        def make():
            (o0, n0), (o1, n1) = a.weight.shape, b.weight.shape
            weight = torch.zeros((o0 + o1, n0 + n1), dtype=dtype, device=a.weight.device)
            weight[:o0, :n0].copy_(a.weight.detach())
            weight[o0:, n0:].copy_(b.weight.detach())
            return weight, torch.cat([a.bias.detach(), b.bias.detach()]).to(dtype)
        return DEFER.cached((self, dtype), make)

    def deferred_params(self) -> tuple[nn.Parameter, ...]:
        a, b = self.layers
        return a.weight, a.bias, b.weight, b.bias

    def deferred_grads(self, items) -> tuple[torch.Tensor, ...]:
        """(dW0, db0, dW1, db1) over every stashed (x, dy): one GEMM and one sum per layer."""
        (o0, n0), bias_dtype = self.layers[0].weight.shape, self.layers[0].bias.dtype
        gs = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in items])
        xs = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in items]).to(gs.dtype)
        g0, g1 = gs[:, :o0], gs[:, o0:]
        return (g0.t() @ xs[:, :n0], g0.sum(0, dtype=bias_dtype), g1.t() @ xs[:, n0:],
                g1.sum(0, dtype=bias_dtype))


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
        bias=False (inside a DEFER scope only): the output without the bias, for an op that
        adds it (ops.gru_cell); the bias still gets its gradient at flush().
        """
        if DEFER.active:
            if torch.is_grad_enabled() and self.weight.requires_grad:
                return _BlockFn.apply(own, shared, self.weight, self.bias, self, bias)
            if not torch.is_grad_enabled():
                return self._scan_forward(own, shared, bias)
        if not bias:
            raise ValueError("BlockLinear.forward_shared(bias=False) needs a DEFER scope")
        return self._forward(own, shared, self.weight, self.bias)

    def _scan_forward(self, own: torch.Tensor, shared: torch.Tensor | None,
                      bias: bool = True) -> torch.Tensor:
        """forward_shared inside a DEFER scope, no autograd; 2 kernels and no copies.

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
            y = (torch.addmm(_cast(self, "bias", dtype), shared.reshape(N, -1).to(dtype),
                             self._shared_rows(n, dtype)) if bias else
                 shared.reshape(N, -1).to(dtype) @ self._shared_rows(n, dtype))
        elif bias:
            y = _cast(self, "bias", dtype).expand(N, G * m).clone()
        else:  # beta 0: the uninitialised output is not read
            y, beta = torch.empty(N, G * m, dtype=dtype, device=rows.device), 0.0
        y.view(N, G, m).transpose(0, 1).baddbmm_(rows.reshape(N, G, n).transpose(0, 1),
                                                 self._own_rows(n, dtype), beta=beta)
        return y.reshape(*lead, G * m)

    def _own_rows(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Each block's rows for its own input chunk, (G, n, m) in dtype, once per scope."""
        return DEFER.cached((self, "own", n, dtype),
                            lambda: self.weight.detach()[:, :n].to(dtype))

    def _shared_rows(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """All blocks' rows for the shared input as one (inp / G - n, out) matrix in dtype,
        laid out once per scope (a copy: the blocks' columns are interleaved)."""
        G, m = self.blocks, self.weight.shape[-1]
        return DEFER.cached((self, "shared", n, dtype), lambda: self.weight.detach()[
            :, n:].transpose(0, 1).reshape(-1, G * m).to(dtype))


class _BlockFn(torch.autograd.Function):
    """BlockLinear forward / forward_shared whose backward returns the input gradients only
    and stashes (own, shared, dy) for DEFER.flush."""

    @staticmethod
    def forward(ctx, own, shared, weight, bias, module, add_bias=True):
        ctx.save_for_backward(own, shared)
        ctx.module, ctx.dtype = module, compute_dtype(own)
        return module._scan_forward(own, shared, add_bias)

    @staticmethod
    def backward(ctx, grad):
        own, shared = ctx.saved_tensors
        module, dtype = ctx.module, ctx.dtype
        DEFER.stash(module, own, shared, grad)
        G, n = module.blocks, own.shape[-1] // module.blocks
        rows = grad.reshape(-1, grad.shape[-1]).to(dtype)
        N, m = rows.shape[0], rows.shape[1] // G
        d_own = d_shared = None
        # The backward runs after the scope closed: the casts are made once more, then kept
        # for every step's backward until flush().
        if ctx.needs_input_grad[0]:
            d_own = torch.empty(N, G * n, dtype=dtype, device=rows.device)
            torch.bmm(rows.view(N, G, m).transpose(0, 1),
                      module._own_rows(n, dtype).transpose(1, 2),
                      out=d_own.view(N, G, n).transpose(0, 1))
            d_own = d_own.reshape(own.shape)
        if shared is not None and ctx.needs_input_grad[1]:
            d_shared = (rows @ module._shared_rows(n, dtype).t()).reshape(shared.shape)
        return d_own, d_shared, None, None, None, None


class _StashGrad(torch.autograd.Function):
    """Identity on y = layer(x) whose backward stashes (x, dy) for DEFER.flush."""

    @staticmethod
    def forward(ctx, y, x, module):
        ctx.save_for_backward(x)
        ctx.module = module
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        DEFER.stash(ctx.module, x, grad)
        return grad, None, None


class NormAct(nn.Module):
    """SiLU(RMSNorm(x)) over the last axis; learnable scale, no bias, eps 1e-4, float32 math.

    Inside a DEFER scope the scale's gradient is deferred like the weights' (autograd would
    add one per step into .grad): the op runs with the scale detached (its backward gives dx
    only) and flush() computes d scale once over all stashed rows."""

    def __init__(self, size: int, ops, eps: float = 1e-4):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if DEFER.active and torch.is_grad_enabled() and self.scale.requires_grad:
            return _StashGrad.apply(self.ops.rms_silu(x, self.scale.detach(), self.eps), x,
                                    self)
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


class _StashGrads(torch.autograd.Function):
    """Identity on y = cat([norm_i(x_i)..., tail]) whose backward stashes (x_i, dy's columns of
    part i) for each norm's DEFER.flush."""

    @staticmethod
    def forward(ctx, y, norms, *xs):
        ctx.save_for_backward(*xs)
        ctx.norms = norms
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        start = 0
        for norm, x in zip(ctx.norms, ctx.saved_tensors):
            DEFER.stash(norm, x, grad[..., start:start + x.shape[-1]])
            start += x.shape[-1]
        return (grad, None) + (None,) * len(ctx.norms)


def norm_cat(norms: list[NormAct], xs: list[torch.Tensor],
             tail: torch.Tensor | None = None) -> torch.Tensor:
    """cat([norm(x) for norm, x in zip(norms, xs)] + [tail], -1): two norms and a tail
    already normalised, or three norms. Inside a DEFER scope one op (`ops.rms_silu_cat`)
    with the scales' gradients deferred like NormAct's; elsewhere the norms and a cat. xs of
    one tensor for two norms: the two inputs side by side (JoinedLinears' output; one
    gradient)."""
    joined = xs[0] if len(xs) == 1 and len(norms) == 2 else None
    if joined is not None:
        size = norms[0].scale.shape[0]
        xs = [joined[..., :size], joined[..., size:]]
    if not DEFER.active:
        return torch.cat([norm(x) for norm, x in zip(norms, xs)] +
                         ([] if tail is None else [tail]), -1)
    if len(norms) + (tail is not None) != 3 or len({n.eps for n in norms}) != 1:
        raise ValueError("norm_cat takes two norms and a tail, or three norms, of one eps")
    third = (xs[2], norms[2].scale) if tail is None else (tail, None)
    grad = torch.is_grad_enabled() and norms[0].scale.requires_grad
    scales = [n.scale.detach() if grad else n.scale for n in norms[:2]]
    third_scale = None if third[1] is None else (third[1].detach() if grad else third[1])
    first, second = (xs[0], xs[1]) if joined is None else (joined, None)
    y = norms[0].ops.rms_silu_cat(first, second, third[0], *scales, third_scale, norms[0].eps)
    return _StashGrads.apply(y, norms, *xs) if grad else y


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
