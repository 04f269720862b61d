"""Deferred weight gradients: the scans' layers get their weight gradients once per update.

Autograd computes a layer's weight gradient at every step it was applied and adds it to
.grad: for T steps, T small GEMMs (plus a bias sum) and T - 1 additions, about 4 kernels per
layer per step (a norm's scale: T - 1 additions). Inside a scope of a `DeferredWeightGrads`,
Linear and BlockLinear layers keep each step's input and output gradient instead (their
backward computes only the input gradient), and `flush()`, called after the backward pass,
computes each weight's gradient as one GEMM over all steps' rows (NormAct: its scale's, in one
backward pass). The sum is the same; only the order of the floating-point additions differs.
Used on the GPU path (`--agent.kernels triton`), whose update is bound by its number of
kernels (bench/kernel_count.py).

Inside a scope the weights cannot change, so each layer also prepares its weights once per
scope (`cached`: the autocast dtype cast, BlockLinear's shared-input matrix) instead of once
per step, and BlockLinear writes its blocks' outputs in place (no transposing copies). Layers
called without gradient inside the scope (the imagination rollout) take the same path, without
the stash. JoinedLinears (two Linear layers as one block-diagonal matmul) and norm_cat (several
norms in one op) defer their weights' and scales' gradients the same way.

Threads: a scope is open on the thread that entered it only (`current()`), so the actor's and
the periodic evaluation's policy steps, which run the same layer classes on other threads,
never take the deferred path while the learner's update does. The stash and the cache belong
to the `DeferredWeightGrads` object (one per Agent), which every autograd Function records in
its context at forward: a backward that runs on another thread (PyTorch runs CUDA backward
functions on its own device threads) stashes into the right object.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
import torch.nn.functional as F

_local = threading.local()


def current() -> "DeferredWeightGrads | None":
    """The scope open on this thread (None outside one)."""
    return getattr(_local, "scope", None)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives x's matmuls (x.dtype without autocast)."""
    kind = x.device.type
    if not torch.amp.is_autocast_available(kind):  # e.g. the meta device of the capture check
        return x.dtype
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class DeferredWeightGrads:
    """The stash of one model's deferred weight gradients and its per-scope weight casts.

    `with deferral(on):` opens a scope on this thread (on=False: none, the plain layers);
    `flush()` after the backward adds every stashed gradient to its parameters' .grad.
    """

    def __init__(self):
        self.pending: dict[object, list[tuple[torch.Tensor, ...]]] = {}
        self.cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, on: bool = True):
        return _Scope(self, on)

    def cached(self, key: tuple, make) -> torch.Tensor:
        """make() once per scope under key (e.g. (module, "weight", dtype))."""
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = make()
        return value

    def stash(self, module, *tensors: torch.Tensor) -> None:
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


class _Scope:
    def __init__(self, owner: DeferredWeightGrads, on: bool):
        self.owner, self.on = owner, on

    def __enter__(self):
        self.previous = current()
        _local.scope = self.owner if self.on else None
        if self.on and self.previous is None:
            self.owner.cache = {}

    def __exit__(self, *exc):
        _local.scope = self.previous
        if self.previous is None:
            self.owner.cache = {}


def cast(module: nn.Module, name: str, dtype: torch.dtype,
         scope: DeferredWeightGrads) -> torch.Tensor:
    """module.<name> in dtype, cast once per scope (a no-op when it already is)."""
    param = getattr(module, name)
    if param.dtype == dtype:
        return param.detach()
    return scope.cached((module, name, dtype), lambda: param.detach().to(dtype))


def scan_linear(module: nn.Module, x: torch.Tensor, scope: DeferredWeightGrads) -> torch.Tensor:
    """Linear forward inside a scope, no autograd: weights cast once per scope."""
    dtype = compute_dtype(x)
    return F.linear(x.to(dtype), cast(module, "weight", dtype, scope),
                    cast(module, "bias", dtype, scope))


class LinearFn(torch.autograd.Function):
    """y = x W^T + b whose backward returns dx only and stashes (x, dy) for flush."""

    @staticmethod
    def forward(ctx, x, weight, bias, module, scope):
        ctx.save_for_backward(x)
        ctx.module, ctx.scope, ctx.dtype = module, scope, compute_dtype(x)
        return scan_linear(module, x, scope)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        ctx.scope.stash(ctx.module, x, grad)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        weight = cast(ctx.module, "weight", ctx.dtype, ctx.scope)
        return grad.to(ctx.dtype) @ weight, None, None, None, None


class _JoinedFn(torch.autograd.Function):
    """JoinedLinears' forward; backward returns dx only (one GEMM) and stashes (x, dy)."""

    @staticmethod
    def forward(ctx, x, w0, b0, w1, b1, joint, scope):
        ctx.save_for_backward(x)
        ctx.joint, ctx.scope, ctx.dtype = joint, scope, compute_dtype(x)
        weight, bias = joint.weights(ctx.dtype, scope)
        ctx.weight = weight  # the scope's block-diagonal matrix, kept for the backward
        return F.linear(x.to(ctx.dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        ctx.scope.stash(ctx.joint, x, grad)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        return grad.to(ctx.dtype) @ ctx.weight, None, None, None, None, None, None


class JoinedLinears:
    """Two Linear layers on two column ranges of one input as one matmul, inside a scope:
    y = [x[:, :n0] W0^T + b0 | x[:, n0:] W1^T + b1], with the block-diagonal weight (the
    zeros cost FLOPs, not launches) built once per scope. Its backward is one GEMM for dx;
    the weights' gradients are deferred (flush) like Linear's, one GEMM per layer over all
    steps' rows. Used where a scan applies both to the same step's state (the RSSM's dynin0
    on h and dynin1 on z)."""

    def __init__(self, first: nn.Linear, second: nn.Linear):
        self.layers = (first, second)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (a, b), scope = self.layers, current()
        if scope is None:
            raise ValueError("JoinedLinears needs a deferral scope")
        return _JoinedFn.apply(x, a.weight, a.bias, b.weight, b.bias, self, scope)

    def weights(self, dtype: torch.dtype, scope: DeferredWeightGrads
                ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.layers

        def make():
            (o0, n0), (o1, n1) = a.weight.shape, b.weight.shape
            weight = torch.zeros((o0 + o1, n0 + n1), dtype=dtype, device=a.weight.device)
            weight[:o0, :n0].copy_(a.weight.detach())
            weight[o0:, n0:].copy_(b.weight.detach())
            return weight, torch.cat([a.bias.detach(), b.bias.detach()]).to(dtype)
        return scope.cached((self, dtype), make)

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


class BlockFn(torch.autograd.Function):
    """BlockLinear forward / forward_shared whose backward returns the input gradients only
    and stashes (own, shared, dy) for flush."""

    @staticmethod
    def forward(ctx, own, shared, weight, bias, module, scope, add_bias=True):
        ctx.save_for_backward(own, shared)
        ctx.module, ctx.scope, ctx.dtype = module, scope, compute_dtype(own)
        return module.scan_forward(own, shared, scope, add_bias)

    @staticmethod
    def backward(ctx, grad):
        own, shared = ctx.saved_tensors
        module, dtype, scope = ctx.module, ctx.dtype, ctx.scope
        scope.stash(module, own, shared, grad)
        G, n = module.blocks, own.shape[-1] // module.blocks
        rows = grad.reshape(-1, grad.shape[-1]).to(dtype)
        N, m = rows.shape[0], rows.shape[1] // G
        d_own = d_shared = None
        # The backward runs after the scope closed: the casts are made once more, then kept
        # for every step's backward until flush().
        if ctx.needs_input_grad[0]:
            d_own = torch.empty(N, G * n, dtype=dtype, device=rows.device)
            torch.bmm(rows.view(N, G, m).transpose(0, 1),
                      module.own_rows(n, dtype, scope).transpose(1, 2),
                      out=d_own.view(N, G, n).transpose(0, 1))
            d_own = d_own.reshape(own.shape)
        if shared is not None and ctx.needs_input_grad[1]:
            d_shared = (rows @ module.shared_rows(n, dtype, scope).t()).reshape(shared.shape)
        return d_own, d_shared, None, None, None, None, None


class StashGrad(torch.autograd.Function):
    """Identity on y = layer(x) whose backward stashes (x, dy) for flush."""

    @staticmethod
    def forward(ctx, y, x, module, scope):
        ctx.save_for_backward(x)
        ctx.module, ctx.scope = module, scope
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        ctx.scope.stash(ctx.module, x, grad)
        return grad, None, None, None


class _StashGrads(torch.autograd.Function):
    """Identity on y = cat([norm_i(x_i)..., tail]) whose backward stashes (x_i, dy's columns of
    part i) for each norm's flush."""

    @staticmethod
    def forward(ctx, y, norms, scope, *xs):
        ctx.save_for_backward(*xs)
        ctx.norms, ctx.scope = norms, scope
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        start = 0
        for norm, x in zip(ctx.norms, ctx.saved_tensors):
            ctx.scope.stash(norm, x, grad[..., start:start + x.shape[-1]])
            start += x.shape[-1]
        return (grad, None, None) + (None,) * len(ctx.norms)


def norm_cat(norms: list, xs: list[torch.Tensor], tail: torch.Tensor | None = None
             ) -> torch.Tensor:
    """cat([norm(x) for norm, x in zip(norms, xs)] + [tail], -1): two norms and a tail
    already normalised, or three norms (nets.NormAct). Inside a scope one op
    (`ops.rms_silu_cat`) with the scales' gradients deferred like NormAct's; elsewhere the
    norms and a cat. xs of one tensor for two norms: the two inputs side by side
    (JoinedLinears' output; one gradient)."""
    joined = xs[0] if len(xs) == 1 and len(norms) == 2 else None
    if joined is not None:
        size = norms[0].scale.shape[0]
        xs = [joined[..., :size], joined[..., size:]]
    scope = current()
    if scope is None:
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
    return _StashGrads.apply(y, norms, scope, *xs) if grad else y
