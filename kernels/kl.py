"""The dyn and rep losses of the RSSM: max(free nats, summed KL) of unimix categoricals
(`kl_free`, beside `kl_free_ref`), one kernel per pass over a row of S groups of K classes
(eager PyTorch runs ~15 launches forward and ~25 backward)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .categorical import _unimix, unimix_logprobs
from .launch import differentiable, kernel_op, launch, warps


def kl_free_ref(post: torch.Tensor, prior: torch.Tensor, unimix: float,
                free: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The dyn and rep losses: max(free, sum_groups KL(q || p)) of unimix categoricals.

    post, prior: (..., S, K) logits. Returns (dyn, rep), each (...) float32 with equal values;
    dyn's gradient reaches only `prior` (posterior stopped), rep's only `post` (prior stopped).
    """
    def kl(q_logits, p_logits):
        q = unimix_logprobs(q_logits, unimix)
        p = unimix_logprobs(p_logits, unimix)
        return (q.exp() * (q - p)).sum((-2, -1))

    dyn = kl(post.detach(), prior).clamp(min=free)
    rep = kl(post, prior.detach()).clamp(min=free)
    return dyn, rep


# --------------------------------------------------------------------------------- kl_free

@triton.jit
def _kl_rows(post_ptr, prior_ptr, row, g, k, S, K, sq_r, sq_s, sq_k, sp_r, sp_s, sp_k,
             unimix):
    """One row's S x K tile: softmaxes, unimix probs and log-probs, and the summed KL."""
    sq, q = _unimix(post_ptr + row * sq_r, g, k, S, K, sq_s, sq_k, unimix)
    sp, p = _unimix(prior_ptr + row * sp_r, g, k, S, K, sp_s, sp_k, unimix)
    valid = (g < S) & (k < K)
    lq = tl.log(tl.where(valid, q, 1.0))
    lp = tl.log(tl.where(valid, p, 1.0))
    kl = tl.sum(tl.sum(tl.where(valid, q * (lq - lp), 0.0), 1), 0)
    return sq, q, lq, sp, p, lp, kl


@triton.jit
def _kl_fwd_kernel(post_ptr, prior_ptr, dyn_ptr, rep_ptr, S, K, sq_r, sq_s, sq_k,
                   sp_r, sp_s, sp_k, unimix, free,
                   BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_S)[:, None]
    k = tl.arange(0, BLOCK_K)[None, :]
    sq, q, lq, sp, p, lp, kl = _kl_rows(post_ptr, prior_ptr, row, g, k, S, K, sq_r, sq_s,
                                        sq_k, sp_r, sp_s, sp_k, unimix)
    loss = tl.maximum(kl, free)
    tl.store(dyn_ptr + row, loss)
    tl.store(rep_ptr + row, loss)


@triton.jit
def _kl_bwd_kernel(ddyn_ptr, drep_ptr, post_ptr, prior_ptr, dpost_ptr, dprior_ptr, S, K,
                   sq_r, sq_s, sq_k, sp_r, sp_s, sp_k, s_dd, s_dr, unimix, free,
                   BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr):
    """Recomputes the row's KL (bit-identical to forward) for the free-bits mask, then
    d rep / d post = s_q * (b - sum(s_q * b)), b = (1 - unimix) * (log q - log p), and
    d dyn / d prior = -(a - s_p * sum(a)), a = (1 - unimix) * q * s_p / p."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_S)[:, None]
    k = tl.arange(0, BLOCK_K)[None, :]
    sq, q, lq, sp, p, lp, kl = _kl_rows(post_ptr, prior_ptr, row, g, k, S, K, sq_r, sq_s,
                                        sq_k, sp_r, sp_s, sp_k, unimix)
    valid = (g < S) & (k < K)
    active = (kl >= free).to(tl.float32)
    ddyn = tl.load(ddyn_ptr + row * s_dd).to(tl.float32) * active
    drep = tl.load(drep_ptr + row * s_dr).to(tl.float32) * active
    b = (1.0 - unimix) * sq * (lq - lp)
    dpost = drep * (b - sq * tl.sum(b, 1)[:, None])
    a = (1.0 - unimix) * q * sp / tl.where(valid, p, 1.0)
    dprior = -ddyn * (a - sp * tl.sum(a, 1)[:, None])
    out = row * S * K + g * K + k
    tl.store(dpost_ptr + out, dpost.to(dpost_ptr.dtype.element_ty), mask=valid)
    tl.store(dprior_ptr + out, dprior.to(dprior_ptr.dtype.element_ty), mask=valid)


def _kl_tiling(S: int, K: int) -> tuple[int, int, int]:
    block_s, block_k = triton.next_power_of_2(S), triton.next_power_of_2(K)
    return block_s, block_k, warps(block_s * block_k)


def _kl_fake(post, prior, unimix, free):
    rows = post.shape[0]
    return post.new_empty((rows,), dtype=torch.float32), post.new_empty((rows,),
                                                                         dtype=torch.float32)


@kernel_op("kl_free", _kl_fake, fold=True)
def _kl_fwd(post: torch.Tensor, prior: torch.Tensor, unimix: float,
            free: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, S, K = post.shape
    dyn = torch.empty((rows,), dtype=torch.float32, device=post.device)
    rep = torch.empty((rows,), dtype=torch.float32, device=post.device)
    if rows:
        block_s, block_k, num_warps = _kl_tiling(S, K)
        launch(_kl_fwd_kernel)[(rows,)](
            post, prior, dyn, rep, S, K, *post.stride(), *prior.stride(), unimix, free,
            BLOCK_S=block_s, BLOCK_K=block_k, num_warps=num_warps)
    return dyn, rep


def _kl_bwd_fake(ddyn, drep, post, prior, unimix, free):
    return post.new_empty(post.shape), prior.new_empty(prior.shape)


@kernel_op("kl_free_bwd", _kl_bwd_fake, fold=True)
def _kl_bwd(ddyn: torch.Tensor, drep: torch.Tensor, post: torch.Tensor, prior: torch.Tensor,
            unimix: float, free: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, S, K = post.shape
    dpost = torch.empty((rows, S, K), dtype=post.dtype, device=post.device)
    dprior = torch.empty((rows, S, K), dtype=prior.dtype, device=prior.device)
    if rows:
        block_s, block_k, num_warps = _kl_tiling(S, K)
        launch(_kl_bwd_kernel)[(rows,)](
            ddyn, drep, post, prior, dpost, dprior, S, K, *post.stride(), *prior.stride(),
            ddyn.stride(0), drep.stride(0), unimix, free, BLOCK_S=block_s, BLOCK_K=block_k,
            num_warps=num_warps)
    return dpost, dprior


def _kl_setup(ctx, inputs, output):
    post, prior, unimix, free = inputs
    ctx.save_for_backward(post, prior)
    ctx.unimix, ctx.free = unimix, free


def _kl_backward(ctx, ddyn, drep):
    post, prior = ctx.saved_tensors
    dpost, dprior = _kl_bwd(ddyn, drep, post, prior, ctx.unimix, ctx.free)
    return dpost, dprior, None, None


_kl_fwd = differentiable(_kl_fwd, _kl_backward, _kl_setup)


def kl_free(post: torch.Tensor, prior: torch.Tensor, unimix: float,
            free: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The dyn and rep losses: max(free, sum_groups KL(q || p)) of unimix categoricals. Triton.

    post, prior: (..., S, K) float32/bfloat16 logits, any strides. Returns (dyn, rep), each
    (...) float32 with equal values; dyn's gradient reaches only `prior` (posterior stopped),
    rep's only `post` (prior stopped), both zero where the KL is below `free`. One kernel
    forward, one backward (it recomputes the KL from the saved logits).
    """
    if post.shape != prior.shape:
        raise ValueError(f"kl_free: post {tuple(post.shape)} and prior {tuple(prior.shape)} "
                         "differ")
    S, K = post.shape[-2:]
    dyn, rep = _kl_fwd(post.reshape(-1, S, K), prior.reshape(-1, S, K), float(unimix),
                       float(free))
    return dyn.reshape(post.shape[:-2]), rep.reshape(post.shape[:-2])
