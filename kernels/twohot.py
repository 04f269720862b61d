"""Symexp twohot heads: the loss against raw targets and the symmetric expectation.

Bins are symexp(linspace(-20, 20, K)) built from the negative half and its mirror, so they are
exactly symmetric with a bin at 0. Targets are interpolated in raw space; beyond the ends all
mass goes to the end bin. Each public op has a `<name>_ref` with the identical signature.

The Triton loss reads each row of logits once: it finds the target's two bins, the log-softmax,
the loss and the logits gradient in the same pass and keeps the gradient for backward, which
only scales it by the upstream gradient (Liger-Kernel's loss-and-grad-in-forward pattern,
without its host sync). Eager PyTorch needs ~25 launches for the same loss and backward.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import differentiable, kernel_op, launch, row_tiling


@functools.lru_cache(maxsize=None)
def _bins_cpu(num_bins: int) -> torch.Tensor:
    half = torch.linspace(-20.0, 0.0, (num_bins + 1) // 2, dtype=torch.float64)
    half = torch.sign(half) * torch.expm1(half.abs())
    return torch.cat([half, -half[:-1].flip(0)]).float()


_BINS: dict[tuple[int, torch.device], torch.Tensor] = {}


def symexp_bins(num_bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The K bin locations (float32), cached per device (first call copies: not in a capture)."""
    key = (num_bins, torch.device(device))
    if key not in _BINS:
        _BINS[key] = _bins_cpu(num_bins).to(device)
    return _BINS[key]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 math for float32/bfloat16 inputs; float64 stays (the tests' exact reference)."""
    return x if x.dtype == torch.float64 else x.float()


def twohot_loss_ref(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a symexp-twohot head against raw targets.

    logits: (..., K) float32/bfloat16; target: (...) raw value (no symlog). Returns (...) float32
    loss = -sum_i w_i * log_softmax(logits)_i with the two-hot weights w of the target.
    """
    K = logits.shape[-1]
    logits = _upcast(logits)
    bins = symexp_bins(K, logits.device).to(logits.dtype)
    target = target.to(logits.dtype)
    below = (bins <= target[..., None]).sum(-1) - 1
    above = K - (bins > target[..., None]).sum(-1)
    below, above = below.clamp(0, K - 1), above.clamp(0, K - 1)
    equal = below == above
    dist_below = torch.where(equal, 1.0, (bins[below] - target).abs())
    dist_above = torch.where(equal, 1.0, (bins[above] - target).abs())
    total = dist_below + dist_above
    logp = torch.log_softmax(logits, -1)
    lp_below = logp.gather(-1, below[..., None])[..., 0]
    lp_above = logp.gather(-1, above[..., None])[..., 0]
    return -(dist_above / total * lp_below + dist_below / total * lp_above)


def twohot_mean_ref(logits: torch.Tensor) -> torch.Tensor:
    """Expected raw value sum_i softmax(logits)_i * bins_i, summed symmetrically.

    The negative half is paired with the positive half before summing and the middle bin is
    added separately, so uniform probabilities (a zero-initialised head) give exactly 0.
    logits: (..., K). Returns (...) float32.
    """
    K = logits.shape[-1]
    m = (K - 1) // 2
    logits = _upcast(logits)
    bins = symexp_bins(K, logits.device).to(logits.dtype)
    probs = torch.softmax(logits, -1)
    pairs = (probs[..., :m] * bins[:m]).flip(-1) + probs[..., m + 1:] * bins[m + 1:]
    return probs[..., m] * bins[m] + pairs.sum(-1)


# ---------------------------------------------------------------------------- twohot_loss

@triton.jit
def _softmax_rows(ptr, r, k, rows, K, s_r, s_k):
    """Rows of logits (BLOCK_R, BLOCK_K) in float32, -inf past K; their max and sum(exp)."""
    kmask = k < K
    x = tl.load(ptr + r * s_r + k * s_k, mask=(r < rows) & kmask, other=0.0).to(tl.float32)
    x = tl.where(kmask, x, float("-inf"))
    top = tl.max(x, 1)[:, None]
    ex = tl.exp(x - top)
    return x, top, ex, tl.sum(ex, 1)[:, None]


@triton.jit
def _twohot_loss_fwd_kernel(logits_ptr, target_ptr, bins_ptr, loss_ptr, grad_ptr, rows, K,
                            s_r, s_k, s_t, WITH_GRAD: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r1 = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r1 < rows
    r = r1.to(tl.int64)[:, None]
    k = tl.arange(0, BLOCK_K)[None, :]
    kmask = k < K
    x, top, ex, total_ex = _softmax_rows(logits_ptr, r, k, rows, K, s_r, s_k)
    t = tl.load(target_ptr + r1.to(tl.int64) * s_t, mask=rmask, other=0.0).to(tl.float32)
    t2 = t[:, None]
    bins = tl.load(bins_ptr + k, mask=kmask, other=0.0)
    # Neighbour bins exactly as the reference counts them (clamped to the ends).
    below = tl.sum((kmask & (bins <= t2)).to(tl.int32), 1) - 1
    above = K - tl.sum((kmask & (bins > t2)).to(tl.int32), 1)
    below = tl.minimum(tl.maximum(below, 0), K - 1)[:, None]
    above = tl.minimum(tl.maximum(above, 0), K - 1)[:, None]
    at_below, at_above = k == below, k == above
    equal = below == above
    bin_below = tl.sum(tl.where(at_below, bins, 0.0), 1)[:, None]
    bin_above = tl.sum(tl.where(at_above, bins, 0.0), 1)[:, None]
    dist_below = tl.where(equal, 1.0, tl.abs(bin_below - t2))
    dist_above = tl.where(equal, 1.0, tl.abs(bin_above - t2))
    dist = dist_below + dist_above
    w_below, w_above = dist_above / dist, dist_below / dist
    lse = top + tl.log(total_ex)
    x_below = tl.sum(tl.where(at_below, x, 0.0), 1)[:, None]
    x_above = tl.sum(tl.where(at_above, x, 0.0), 1)[:, None]
    loss = -(w_below * (x_below - lse) + w_above * (x_above - lse))
    tl.store(loss_ptr + r1, tl.sum(loss, 1), mask=rmask)
    if WITH_GRAD:
        # d loss / d logits = softmax * sum(w) - w (sum(w) is 1 up to rounding, kept as autograd).
        w = tl.where(at_below, w_below, 0.0) + tl.where(at_above, w_above, 0.0)
        grad = ex / total_ex * (w_below + w_above) - w
        tl.store(grad_ptr + r * K + k, grad, mask=(r < rows) & kmask)


@triton.jit
def _scale_rows_kernel(grad_ptr, dloss_ptr, out_ptr, rows, K, s_d,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = grad * dloss[:, None] in out's dtype."""
    r1 = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = r1.to(tl.int64)[:, None]
    k = tl.arange(0, BLOCK_K)[None, :]
    mask = (r < rows) & (k < K)
    d = tl.load(dloss_ptr + r1.to(tl.int64) * s_d, mask=r1 < rows, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + r * K + k, mask=mask, other=0.0)
    tl.store(out_ptr + r * K + k, (g * d[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def _twohot_loss_fake(logits, target, bins, with_grad):
    rows, K = logits.shape
    grad = logits.new_empty((rows, K) if with_grad else (0,), dtype=torch.float32)
    return logits.new_empty((rows,), dtype=torch.float32), grad


@kernel_op("twohot_loss", _twohot_loss_fake, fold=True, shared=("bins",))
def _twohot_loss_fwd(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor,
                     with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, K = logits.shape
    loss = torch.empty((rows,), dtype=torch.float32, device=logits.device)
    grad = torch.empty((rows, K) if with_grad else (0,), dtype=torch.float32,
                       device=logits.device)
    if rows:
        block_r, block_k, num_warps = row_tiling(rows, K)
        launch(_twohot_loss_fwd_kernel)[(triton.cdiv(rows, block_r),)](
            logits, target, bins, loss, grad, rows, K, logits.stride(0), logits.stride(1),
            target.stride(0), WITH_GRAD=with_grad, BLOCK_R=block_r, BLOCK_K=block_k,
            num_warps=num_warps)
    return loss, grad


def _scale_rows_fake(grad, dloss, dtype):
    return grad.new_empty(grad.shape, dtype=dtype)


@kernel_op("twohot_loss_bwd", _scale_rows_fake, fold=True)
def _scale_rows(grad: torch.Tensor, dloss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, K = grad.shape
    out = torch.empty((rows, K), dtype=dtype, device=grad.device)
    if rows:
        block_r, block_k, num_warps = row_tiling(rows, K)
        launch(_scale_rows_kernel)[(triton.cdiv(rows, block_r),)](
            grad, dloss, out, rows, K, dloss.stride(0), BLOCK_R=block_r, BLOCK_K=block_k,
            num_warps=num_warps)
    return out


def _twohot_loss_setup(ctx, inputs, output):
    logits, _, _, with_grad = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the non-differentiable one
    ctx.save_for_backward(output[1])
    ctx.with_grad, ctx.dtype = with_grad, logits.dtype


def _twohot_loss_backward(ctx, dloss, _):
    if not ctx.with_grad:
        raise RuntimeError("twohot_loss ran without its gradient (grad mode off or logits "
                           "not requiring grad at forward) but a backward reached it")
    grad, = ctx.saved_tensors
    if dloss is None:
        return None, None, None, None
    return _scale_rows(grad, dloss, ctx.dtype), None, None, None


_twohot_loss_fwd = differentiable(_twohot_loss_fwd, _twohot_loss_backward, _twohot_loss_setup)


def twohot_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a symexp-twohot head against raw targets. Triton, one pass.

    logits: (..., K) float32/bfloat16, any odd K >= 3, any strides; target: (...) float raw value
    (no symlog; no gradient flows to it). Returns (...) float32 loss = -sum_i w_i *
    log_softmax(logits)_i with the two-hot weights w of the target. With grad enabled and
    logits requiring grad, the forward also writes d loss / d logits, (..., K) float32, that
    backward scales by the upstream gradient into logits.dtype.
    """
    K = logits.shape[-1]
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"twohot_loss: logits {tuple(logits.shape)} need target "
                         f"{tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _ = _twohot_loss_fwd(logits.reshape(-1, K), target.detach().reshape(-1),
                               symexp_bins(K, logits.device), with_grad)
    return loss.reshape(target.shape)


# ---------------------------------------------------------------------------- twohot_mean

@triton.jit
def _twohot_mean_fwd_kernel(logits_ptr, bins_ptr, out_ptr, rows, K, s_r, s_k,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r1 = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = r1.to(tl.int64)[:, None]
    k = tl.arange(0, BLOCK_K)[None, :]
    mid = (K - 1) // 2
    x, top, ex, total_ex = _softmax_rows(logits_ptr, r, k, rows, K, s_r, s_k)
    bins = tl.load(bins_ptr + k, mask=k < K, other=0.0)
    # Lane k < mid also holds its mirror K-1-k, so each pair is summed before the row sum.
    low = k < mid
    x_mirror = tl.load(logits_ptr + r * s_r + (K - 1 - k) * s_k, mask=(r < rows) & low,
                       other=0.0).to(tl.float32)
    bins_mirror = tl.load(bins_ptr + K - 1 - k, mask=low, other=0.0)
    p = ex / total_ex
    p_mirror = tl.exp(x_mirror - top) / total_ex
    pairs = tl.where(low, p * bins + p_mirror * bins_mirror, 0.0)
    middle = tl.sum(tl.where(k == mid, p * bins, 0.0), 1)
    tl.store(out_ptr + r1, middle + tl.sum(pairs, 1), mask=r1 < rows)


@triton.jit
def _twohot_mean_bwd_kernel(dout_ptr, logits_ptr, bins_ptr, mean_ptr, dlogits_ptr, rows, K,
                            s_r, s_k, s_d, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """d mean / d logits_i = p_i * (bins_i - mean)."""
    r1 = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = r1.to(tl.int64)[:, None]
    k = tl.arange(0, BLOCK_K)[None, :]
    x, top, ex, total_ex = _softmax_rows(logits_ptr, r, k, rows, K, s_r, s_k)
    bins = tl.load(bins_ptr + k, mask=k < K, other=0.0)
    mean = tl.load(mean_ptr + r1, mask=r1 < rows, other=0.0)[:, None]
    d = tl.load(dout_ptr + r1.to(tl.int64) * s_d, mask=r1 < rows, other=0.0)[:, None]
    dlogits = d * (ex / total_ex) * (bins - mean)
    tl.store(dlogits_ptr + r * K + k, dlogits.to(dlogits_ptr.dtype.element_ty),
             mask=(r < rows) & (k < K))


def _twohot_mean_fake(logits, bins):
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


@kernel_op("twohot_mean", _twohot_mean_fake, fold=True, shared=("bins",))
def _twohot_mean_fwd(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    rows, K = logits.shape
    out = torch.empty((rows,), dtype=torch.float32, device=logits.device)
    if rows:
        block_r, block_k, num_warps = row_tiling(rows, K)
        launch(_twohot_mean_fwd_kernel)[(triton.cdiv(rows, block_r),)](
            logits, bins, out, rows, K, logits.stride(0), logits.stride(1),
            BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps)
    return out


def _twohot_mean_bwd_fake(dout, logits, bins, mean):
    return logits.new_empty(logits.shape)


@kernel_op("twohot_mean_bwd", _twohot_mean_bwd_fake, fold=True, shared=("bins",))
def _twohot_mean_bwd(dout: torch.Tensor, logits: torch.Tensor, bins: torch.Tensor,
                     mean: torch.Tensor) -> torch.Tensor:
    rows, K = logits.shape
    dlogits = torch.empty((rows, K), dtype=logits.dtype, device=logits.device)
    if rows:
        block_r, block_k, num_warps = row_tiling(rows, K)
        launch(_twohot_mean_bwd_kernel)[(triton.cdiv(rows, block_r),)](
            dout, logits, bins, mean, dlogits, rows, K, logits.stride(0), logits.stride(1),
            dout.stride(0), BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps)
    return dlogits


def _twohot_mean_setup(ctx, inputs, output):
    logits, bins = inputs
    ctx.save_for_backward(logits, bins, output)


def _twohot_mean_backward(ctx, dout):
    logits, bins, mean = ctx.saved_tensors
    return _twohot_mean_bwd(dout, logits, bins, mean), None


_twohot_mean_fwd = differentiable(_twohot_mean_fwd, _twohot_mean_backward, _twohot_mean_setup)


def twohot_mean(logits: torch.Tensor) -> torch.Tensor:
    """Expected raw value sum_i softmax(logits)_i * bins_i, summed symmetrically. Triton.

    Negative and positive halves are paired before summing and the middle bin added separately,
    so uniform probabilities (a zero-initialised head) give exactly 0. logits: (..., K)
    float32/bfloat16, any odd K >= 3, any strides. Returns (...) float32; backward gives
    d/dlogits = upstream * softmax * (bins - mean) in logits.dtype.
    """
    K = logits.shape[-1]
    out = _twohot_mean_fwd(logits.reshape(-1, K), symexp_bins(K, logits.device))
    return out.reshape(logits.shape[:-1])
