"""The CPU fast path: PyTorch ops with hand-written backwards (no Triton, no compiler).

Autograd through the references stores and re-reads every intermediate of a pointwise chain;
on a CPU these chains are memory-bound, and at paper-S they cost more than the GEMMs. Here
each op saves only what its backward needs and the backward runs in few passes, in place
where it can. Same signatures as the references (`kernels/*_ref`); tests/test_kernels.py
checks values and gradients against them. `get_ops("fused")`; `--agent.kernels auto` picks it
on CPU.

Each Function keeps forward and setup_context apart and lets PyTorch generate its vmap rule
(`generate_vmap_rule`), so torch.func transforms (packed seeds: agent/packed.py) run them: the
tensors backward needs leave forward as extra outputs, marked non-differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .twohot import symexp_bins, twohot_loss_ref


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _transformed() -> bool:
    """Whether a torch.func transform (vmap, grad: packed seeds) is running this code."""
    return torch._C._are_functorch_transforms_active()


class _RmsSilu(torch.autograd.Function):
    """y = x * r * scale with r = 1/sqrt(mean(x^2) + eps); out = silu(y).

    Backward, with a = silu'(y) * g * scale and xhat = x * r:
    dscale = sum_rows(silu'(y) * g * xhat); dx = r * (a - xhat * mean(a * xhat)).
    Saves xhat, r (one value per row) and y.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale, eps):
        xf = _upcast(x)
        # square() out of place: vmap has no batching rule for pow_ (a per-seed loop)
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square()
                        .div_(xf.shape[-1]).add_(eps))
        xhat = xf * r
        y = xhat * _upcast(scale)
        return F.silu(y).to(x.dtype), xhat, r, y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, _ = inputs
        _, xhat, r, y = output
        ctx.save_for_backward(xhat, r, scale, y)
        ctx.mark_non_differentiable(xhat, r, y)
        ctx.set_materialize_grads(False)  # no zero gradients made for the helper outputs
        ctx.dtypes = (x.dtype, scale.dtype)

    @staticmethod
    def backward(ctx, grad, *_):
        xhat, r, scale, y = ctx.saved_tensors
        sf = _upcast(scale)
        gy = torch.ops.aten.silu_backward(_upcast(grad), y)
        lead = tuple(range(gy.dim() - 1))
        dscale = (gy * xhat).sum(lead) if ctx.needs_input_grad[1] else None
        a = gy.mul_(sf)
        m = torch.linalg.vecdot(a, xhat).unsqueeze_(-1).div_(-xhat.shape[-1])
        # In place, except under vmap (packed seeds), which has no batching rule for addcmul_
        # and would loop per seed; the same kernel either way.
        dx = (torch.addcmul(a, xhat, m) if _transformed() else a.addcmul_(xhat, m)).mul_(r)
        return (dx.to(ctx.dtypes[0]),
                dscale.to(ctx.dtypes[1]) if dscale is not None else None, None)


def rms_silu_fused(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """SiLU(RMSNorm(x)) over the last axis (as kernels.norms.rms_silu_ref)."""
    return _RmsSilu.apply(x, scale, eps)[0]


# ---------------------------------------------------------------------------- twohot

def _twohot_weights(bins: torch.Tensor, target: torch.Tensor):
    """The two bins around each target and their weights, as twohot_loss_ref finds them:
    below = #(bins <= t) - 1 and above = #(bins <= t), clamped to the ends (where both are the
    end bin, each weighs 1/2). A binary search instead of K comparisons per row."""
    K = bins.shape[0]
    above = torch.searchsorted(bins, target.contiguous(), right=True)
    below = (above - 1).clamp(0, K - 1)  # out of place: vmap loops per seed over clamp_
    above = above.clamp(max=K - 1)
    equal = below == above
    dist_below = torch.where(equal, 1.0, (bins[below] - target).abs())
    dist_above = torch.where(equal, 1.0, (bins[above] - target).abs())
    total = dist_below + dist_above
    return below, above, dist_above / total, dist_below / total


class _TwohotLoss(torch.autograd.Function):
    """loss = lse(x) * (w_b + w_a) - w_b * x_b - w_a * x_a (the twohot cross-entropy without
    materialising the log-softmax); d x = g * ((w_b + w_a) * softmax(x) - w_b e_b - w_a e_a).
    Saves the logits, one log-sum-exp per row and the two bins and weights."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target):
        x = _upcast(logits)
        bins = symexp_bins(x.shape[-1], x.device).to(x.dtype)
        t = target.to(x.dtype)
        below, above, w_below, w_above = _twohot_weights(bins, t)
        lse = torch.logsumexp(x, -1)
        x_below = x.gather(-1, below.unsqueeze(-1)).squeeze_(-1)
        x_above = x.gather(-1, above.unsqueeze(-1)).squeeze_(-1)
        loss = (lse - x_below).mul_(w_below).add_((lse - x_above).mul_(w_above))
        # A NaN target gives a NaN loss, as in the reference (the search would place it last).
        loss = torch.where(torch.isnan(t), t, loss)
        # The upcast logits for backward when upcasting made a copy (bf16 logits); float32
        # logits are saved as they are (an output may not be an input).
        upcast = x if x is not logits else torch.empty(0, dtype=x.dtype, device=x.device)
        return loss, lse, below, above, w_below, w_above, upcast

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, _ = inputs
        _, lse, below, above, w_below, w_above, upcast = output
        x = upcast if upcast.numel() or not logits.numel() else logits
        ctx.save_for_backward(x, lse, below, above, w_below, w_above)
        ctx.mark_non_differentiable(lse, below, above, w_below, w_above, upcast)
        ctx.set_materialize_grads(False)
        ctx.dtype = logits.dtype

    @staticmethod
    def backward(ctx, grad, *_):
        x, lse, below, above, w_below, w_above = ctx.saved_tensors
        g = _upcast(grad)
        dx = (x - lse.unsqueeze(-1)).exp_().mul_((g * (w_below + w_above)).unsqueeze(-1))
        dx.scatter_add_(-1, below.unsqueeze(-1), (-g * w_below).unsqueeze(-1))
        dx.scatter_add_(-1, above.unsqueeze(-1), (-g * w_above).unsqueeze(-1))
        return dx.to(ctx.dtype), None


def twohot_loss_fused(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Twohot cross-entropy (as kernels.twohot.twohot_loss_ref): one log-sum-exp pass forward,
    one softmax pass backward. The target gets no gradient (returns and rewards are data);
    a target that requires grad takes the reference."""
    if target.requires_grad and torch.is_grad_enabled():
        return twohot_loss_ref(logits, target)
    return _TwohotLoss.apply(logits, target)[0]


class _TwohotMean(torch.autograd.Function):
    """mean = sum_i e_i b_i / sum_i e_i with e = exp(x - max), the negative half of the bins
    paired with its mirror first: sum_{i>0} (e_{m+i} - e_{m-i}) b_{m+i} (the bins are exactly
    antisymmetric), so uniform logits give exactly 0; d x = g * p * (b - mean)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits):
        x = _upcast(logits)
        K = x.shape[-1]
        m = (K - 1) // 2
        bins = symexp_bins(K, x.device).to(x.dtype)
        e = (x - x.amax(-1, keepdim=True)).exp_()
        total = e.sum(-1)
        pairs = torch.sub(e[..., m + 1:], e[..., :m].flip(-1))
        mean = (pairs @ bins[m + 1:]).addcmul(e[..., m], bins[m]).div_(total)  # (as above)
        return mean, e, total

    @staticmethod
    def setup_context(ctx, inputs, output):
        mean, e, total = output
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(e, total, mean)
        ctx.mark_non_differentiable(e, total)
        ctx.set_materialize_grads(False)
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad, *_):
        e, total, mean = ctx.saved_tensors
        bins = symexp_bins(e.shape[-1], e.device).to(e.dtype)
        scale = _upcast(grad).div(total).unsqueeze_(-1)
        dx = (bins - mean.unsqueeze(-1)).mul_(e).mul_(scale)
        return dx.to(ctx.dtype)


def twohot_mean_fused(logits: torch.Tensor) -> torch.Tensor:
    """Expected raw value of a symexp twohot head (as kernels.twohot.twohot_mean_ref): one
    exp pass and a matrix-vector product instead of a softmax and three elementwise passes."""
    return _TwohotMean.apply(logits)[0]
