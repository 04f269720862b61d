"""Categorical latents: unimix, and the straight-through sample (`latent_sample`); the KL
free-bits losses of the same distributions are kernels/kl.py's.

Each public op has a `<name>_ref` with the identical signature. The Triton versions do each
op in one kernel per pass over a row of S groups of K classes (eager PyTorch runs ~15 launches
forward and ~25 backward for the KL, ~10 and ~8 for the sample). Sampling takes its uniform
noise as a device tensor from torch.rand, which a CUDA graph redraws on every replay, so the
kernel needs no seed of its own and matches the reference draw for draw.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import differentiable, kernel_op, launch, row_tiling


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 math for float32/bfloat16 inputs; float64 stays (the tests' exact reference)."""
    return x if x.dtype == torch.float64 else x.float()


def unimix_logprobs(logits: torch.Tensor, unimix: float) -> torch.Tensor:
    """log((1 - unimix) * softmax(logits) + unimix / K) over the last axis, in float32."""
    probs = torch.softmax(_upcast(logits), -1)
    if unimix > 0:
        probs = (1.0 - unimix) * probs + unimix / logits.shape[-1]
    return torch.log(probs)


def latent_sample_ref(logits: torch.Tensor, unimix: float, noise: torch.Tensor,
                      keep: torch.Tensor | None = None, head: torch.Tensor | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Straight-through one-hot sample of unimix categoricals by inverse CDF.

    logits: (..., S, K); noise: (..., S) uniform in [0, 1) (from torch.rand, which a CUDA graph
    redraws on every replay). The class is the first k with cumsum(probs)_k > noise. Returns
    (..., S, K) in logits.dtype equal to the one-hot sample in value, with the gradient of the
    unimix probabilities (z = onehot + probs - sg(probs)).
    keep (...) or (..., 1) of 0/1 (the next step's reset, as mask_rows takes it): returns
    (z, z with the rows of keep 0 zeroed, logits), the sample, the next step's carry and the
    logits passed through (for the losses: so that the two readers' gradients of the logits
    meet in the sample's backward, not in an addition). head (..., D) (with keep): the
    masked sample comes flat after head's columns, cat([head, masked.flatten(-2)], -1) in
    head.dtype (the next step's input of the two embeddings that read h and z, one matmul).
    """
    probs = unimix_logprobs(logits, unimix).exp()
    cdf = probs.detach().cumsum(-1)
    index = (cdf <= noise[..., None].to(cdf.dtype)).sum(-1).clamp(max=logits.shape[-1] - 1)
    onehot = (index[..., None] == torch.arange(logits.shape[-1], device=index.device)
              ).to(probs.dtype)  # F.one_hot would sync on CPU
    z = (onehot + (probs - probs.detach())).to(logits.dtype)
    if keep is None:
        return z
    masked = z * keep.reshape(*z.shape[:-2], 1, 1).to(z.dtype)
    if head is not None:
        masked = torch.cat([head, masked.flatten(-2).to(head.dtype)], -1)
    return z, masked, logits


# ----------------------------------------------------------------------------- shared math

@triton.jit
def _unimix(ptr, g, k, groups, K, s_g, s_k, unimix):
    """Tiles of (BLOCK_G groups, BLOCK_K classes) logits -> softmax s and unimix probs pi.

    Padding lanes (k >= K) hold s = pi = 0; whole padding groups hold a uniform row.
    """
    kmask = k < K
    x = tl.load(ptr + g * s_g + k * s_k, mask=(g < groups) & kmask, other=0.0).to(tl.float32)
    x = tl.where(kmask, x, float("-inf"))
    ex = tl.exp(x - tl.max(x, 1)[:, None])
    s = ex / tl.sum(ex, 1)[:, None]
    pi = tl.where(kmask, (1.0 - unimix) * s + unimix / K, 0.0)
    return s, pi


# --------------------------------------------------------------------------- latent_sample

@triton.jit
def _sample_fwd_kernel(logits_ptr, noise_ptr, keep_ptr, head_ptr, out_ptr, masked_ptr, copy_ptr,
                       groups, S, K, D, s_g, s_k, s_n, s_keep, sh_r, sh_c, unimix,
                       BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, KEEP: tl.constexpr,
                       HEAD: tl.constexpr):
    """Programs 0..cdiv(groups, BLOCK_G)-1 sample; with HEAD, the ones after copy head into
    the masked output's first D columns (its rows are D + S * K long)."""
    main = tl.cdiv(groups, BLOCK_G)
    if HEAD:
        if tl.program_id(0) >= main:
            rows = groups // S
            idx = ((tl.program_id(0) - main).to(tl.int64) * (BLOCK_G * BLOCK_K)
                   + tl.arange(0, BLOCK_G * BLOCK_K))
            row = idx // D
            j = idx - row * D
            m = idx < rows * D
            v = tl.load(head_ptr + row * sh_r + j * sh_c, mask=m, other=0.0)
            tl.store(masked_ptr + row * (D + S * K) + j, v.to(masked_ptr.dtype.element_ty),
                     mask=m)
        else:
            _sample_fwd_main(logits_ptr, noise_ptr, keep_ptr, out_ptr, masked_ptr, copy_ptr,
                             groups, S, K, D + S * K, D, s_g, s_k, s_n, s_keep, unimix, BLOCK_G,
                             BLOCK_K, KEEP)
    else:
        _sample_fwd_main(logits_ptr, noise_ptr, keep_ptr, out_ptr, masked_ptr, copy_ptr,
                         groups, S, K, S * K, 0, s_g, s_k, s_n, s_keep, unimix, BLOCK_G,
                         BLOCK_K, KEEP)


@triton.jit
def _sample_fwd_main(logits_ptr, noise_ptr, keep_ptr, out_ptr, masked_ptr, copy_ptr, groups,
                     S, K, sm_r, m_off, s_g, s_k, s_n, s_keep, unimix, BLOCK_G: tl.constexpr,
                     BLOCK_K: tl.constexpr, KEEP: tl.constexpr):
    g1 = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    g = g1.to(tl.int64)[:, None]
    k = tl.arange(0, BLOCK_K)[None, :]
    _, pi = _unimix(logits_ptr, g, k, groups, K, s_g, s_k, unimix)
    noise = tl.load(noise_ptr + g1.to(tl.int64) * s_n, mask=g1 < groups, other=0.0)
    cdf = tl.cumsum(pi, 1)
    below = (k < K) & (cdf <= noise.to(tl.float32)[:, None])
    index = tl.minimum(tl.sum(below.to(tl.int32), 1), K - 1)[:, None]
    mask = (g < groups) & (k < K)
    onehot = (k == index).to(tl.float32)
    tl.store(out_ptr + g * K + k, onehot.to(out_ptr.dtype.element_ty), mask=mask)
    if KEEP:  # the next step's carry: the rows (of S groups each) of keep 0 zeroed
        keep = tl.load(keep_ptr + (g // S) * s_keep, mask=g < groups, other=0.0)
        row = g // S
        tl.store(masked_ptr + row * sm_r + m_off + (g - row * S) * K + k,
                 (onehot * keep.to(tl.float32)).to(masked_ptr.dtype.element_ty), mask=mask)
        tl.store(copy_ptr + g * K + k, tl.load(logits_ptr + g * s_g + k * s_k, mask=mask),
                 mask=mask)


@triton.jit
def _sample_bwd_kernel(dz_ptr, dm_ptr, dc_ptr, keep_ptr, logits_ptr, dlogits_ptr, groups, S,
                       K, s_g, s_k, sd_r, sd_s, sd_k, sm_r, sm_s, sm_k, sc_r, sc_s, sc_k,
                       s_keep, unimix, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
                       KEEP: tl.constexpr):
    """d/dlogits of sum(dz * pi) = s * (a - sum(s * a)) with a = (1 - unimix) * dz (with keep,
    dz + keep * the masked copy's gradient, and the logits copy's gradient added). Group g is
    group g % S of row g // S of the gradients (strided by row, group and class)."""
    g = (tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)).to(tl.int64)[:, None]
    k = tl.arange(0, BLOCK_K)[None, :]
    mask = (g < groups) & (k < K)
    row = g // S
    grp = g - row * S
    s, _ = _unimix(logits_ptr, g, k, groups, K, s_g, s_k, unimix)
    dz = tl.load(dz_ptr + row * sd_r + grp * sd_s + k * sd_k, mask=mask,
                 other=0.0).to(tl.float32)
    if KEEP:
        keep = tl.load(keep_ptr + row * s_keep, mask=g < groups, other=0.0)
        dz += keep.to(tl.float32) * tl.load(dm_ptr + row * sm_r + grp * sm_s + k * sm_k,
                                            mask=mask, other=0.0).to(tl.float32)
    a = (1.0 - unimix) * dz
    d = s * (a - tl.sum(s * a, 1)[:, None])
    if KEEP:
        d += tl.load(dc_ptr + row * sc_r + grp * sc_s + k * sc_k, mask=mask,
                     other=0.0).to(tl.float32)
    tl.store(dlogits_ptr + g * K + k, d.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _sample_launch(logits, noise, keep, S, outs, unimix, head=None):
    groups, K = logits.shape
    if groups:
        masked = keep is not None
        block_g, block_k, num_warps = row_tiling(groups, K)
        keep = keep if masked else noise
        D = 0 if head is None else head.shape[1]
        grid = triton.cdiv(groups, block_g) + triton.cdiv((groups // S) * D, block_g * block_k)
        head_ = logits if head is None else head  # a placeholder when there is no head
        launch(_sample_fwd_kernel)[(grid,)](
            logits, noise, keep, head_, outs[0], outs[1 if masked else 0], outs[-1], groups,
            S, K, max(D, 1), logits.stride(0), logits.stride(1), noise.stride(0),
            keep.stride(0), head_.stride(0), head_.stride(1), unimix, BLOCK_G=block_g,
            BLOCK_K=block_k, KEEP=masked, HEAD=head is not None, num_warps=num_warps)
    return outs


def _sample_fake(logits, unimix, noise):
    return logits.new_empty(logits.shape)


@kernel_op("latent_sample", _sample_fake, fold=True)
def _sample_fwd(logits: torch.Tensor, unimix: float, noise: torch.Tensor) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return _sample_launch(logits, noise, None, 1, (out,), unimix)[0]


def _sample_keep_outputs(logits, head):
    N, S, K = logits.shape
    masked = (torch.empty((N, S, K), dtype=logits.dtype, device=logits.device) if head is None
              else torch.empty((N, head.shape[1] + S * K), dtype=head.dtype,
                               device=head.device))
    return (torch.empty((N, S, K), dtype=logits.dtype, device=logits.device), masked,
            torch.empty((N, S, K), dtype=logits.dtype, device=logits.device))


def _sample_keep_fake(logits, unimix, noise, keep, head):
    return _sample_keep_outputs(logits, head)


@kernel_op("latent_sample_keep", _sample_keep_fake, fold=True)
def _sample_keep_fwd(logits: torch.Tensor, unimix: float, noise: torch.Tensor,
                     keep: torch.Tensor, head: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, S, K) (3-d, so that the gradients reach the backward kernel with their own
    strides, never copied), noise (N * S,), keep (N,), head (N, D) or None."""
    N, S, K = logits.shape
    outs = _sample_keep_outputs(logits, head)
    _sample_launch(logits.reshape(N * S, K), noise, keep, S,
                   [outs[0].view(N * S, K), outs[1], outs[2].view(N * S, K)], unimix, head)
    return outs


def _sample_bwd_launch(dz, dm, dc, keep, logits, unimix):
    """dz, dm, dc: (N, S, K) of any strides; logits (N * S, K)."""
    groups, K = logits.shape
    S = dz.shape[1]
    dlogits = torch.empty((groups, K), dtype=logits.dtype, device=logits.device)
    if groups:
        masked = keep is not None
        dm, dc, keep = (dm, dc, keep) if masked else (dz, dz, logits)  # placeholders: not read
        block_g, block_k, num_warps = row_tiling(groups, K)
        launch(_sample_bwd_kernel)[(triton.cdiv(groups, block_g),)](
            dz, dm, dc, keep, logits, dlogits, groups, S, K, logits.stride(0),
            logits.stride(1), *dz.stride(), *dm.stride(), *dc.stride(), keep.stride(0),
            unimix, BLOCK_G=block_g,
            BLOCK_K=block_k, KEEP=masked, num_warps=num_warps)
    return dlogits


def _sample_bwd_fake(dz, logits, unimix):
    return logits.new_empty(logits.shape)


@kernel_op("latent_sample_bwd", _sample_bwd_fake, fold=True)
def _sample_bwd(dz: torch.Tensor, logits: torch.Tensor, unimix: float) -> torch.Tensor:
    return _sample_bwd_launch(dz[:, None], None, None, None, logits, unimix)


def _sample_keep_bwd_fake(dz, dm, dc, keep, logits, unimix):
    return logits.new_empty(logits.shape)


@kernel_op("latent_sample_keep_bwd", _sample_keep_bwd_fake, fold=True)
def _sample_keep_bwd(dz: torch.Tensor, dm: torch.Tensor, dc: torch.Tensor, keep: torch.Tensor,
                     logits: torch.Tensor, unimix: float) -> torch.Tensor:
    N, S, K = logits.shape
    return _sample_bwd_launch(dz, dm, dc, keep, logits.reshape(N * S, K), unimix).view(N, S, K)


def _sample_setup(ctx, inputs, output):
    logits, unimix, _ = inputs
    ctx.save_for_backward(logits)
    ctx.unimix = unimix


def _sample_backward(ctx, dz):
    logits, = ctx.saved_tensors
    return _sample_bwd(dz, logits, ctx.unimix), None, None


def _sample_keep_setup(ctx, inputs, output):
    logits, unimix, _, keep, head = inputs
    ctx.save_for_backward(logits, keep)
    ctx.unimix, ctx.head = unimix, None if head is None else (head.shape[1], head.dtype)


def _sample_keep_backward(ctx, dz, dm, dc):
    logits, keep = ctx.saved_tensors
    dhead = None
    if ctx.head is not None and dm is not None:  # [head | masked]: split (views)
        D, dtype = ctx.head
        dhead, dm = dm[:, :D].to(dtype), dm[:, D:].view(logits.shape)
    dz, dm, dc = (torch.zeros_like(logits) if g is None else g for g in (dz, dm, dc))
    return _sample_keep_bwd(dz, dm, dc, keep, logits, ctx.unimix), None, None, None, dhead


_sample_fwd = differentiable(_sample_fwd, _sample_backward, _sample_setup)
_sample_keep_fwd = differentiable(_sample_keep_fwd, _sample_keep_backward,
                                  _sample_keep_setup)


def latent_sample(logits: torch.Tensor, unimix: float, noise: torch.Tensor,
                  keep: torch.Tensor | None = None, head: torch.Tensor | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Straight-through one-hot sample of unimix categoricals by inverse CDF. Triton.

    logits: (..., S, K) float32/bfloat16, any strides; noise: (..., S) uniform in [0, 1), a
    device tensor (torch.rand: a CUDA graph redraws it on every replay). The class is the first
    k with cumsum(probs)_k > noise, probs = (1 - unimix) * softmax(logits) + unimix / K.
    Returns (..., S, K) in logits.dtype, the one-hot sample in value (exact in any float
    dtype: a bfloat16 one-hot feeds the next matmul without a cast); backward gives logits the
    gradient of probs (z = onehot + probs - sg(probs)), in logits.dtype. keep (...): also the
    sample with the rows of keep 0 zeroed and a copy of the logits, from the same launch,
    whose gradients the backward kernel adds; head (..., D): the masked sample written flat
    after a copy of head (latent_sample_ref).
    """
    S, K = logits.shape[-2:]
    if noise.shape != logits.shape[:-1]:
        raise ValueError(f"latent_sample: logits {tuple(logits.shape)} need noise "
                         f"{tuple(logits.shape[:-1])}, got {tuple(noise.shape)}")
    flat = logits.reshape(-1, K), float(unimix), noise.reshape(-1)
    if keep is None:
        return _sample_fwd(*flat).reshape(logits.shape)
    if keep.numel() != flat[0].shape[0] // S:
        raise ValueError(f"latent_sample: keep {tuple(keep.shape)} needs one value per row of "
                         f"logits {tuple(logits.shape)}")
    if head is not None:
        if head.shape[:-1] != logits.shape[:-2]:
            raise ValueError(f"latent_sample: head {tuple(head.shape)} needs the rows of "
                             f"logits {tuple(logits.shape)}")
        head = head.reshape(-1, head.shape[-1])
    outs = _sample_keep_fwd(logits.reshape(-1, S, K), flat[1], flat[2], keep.reshape(-1),
                            head)
    return tuple(o.reshape(*logits.shape[:-2], *o.shape[1:]) for o in outs)
