"""The observe scan's reset on is_first: the carry (in float32 and in the matmul dtype) and the
latent sample zeroed for the rows of a new episode, in one launch (`mask_rows`, beside
`mask_rows_ref`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import differentiable, kernel_op, launch


# ------------------------------------------------------------------------------ mask_rows

def mask_rows_ref(keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a * keep, b * keep, c * keep), each row of a, b, c scaled by its row's keep.

    The observe scan's reset on is_first (keep 0/1): the carry in float32, the carry in the
    matmul dtype and the latent sample. keep: (N, 1); a, b, c: (N, ...) any float dtypes; each
    result in its input's dtype (exact for a 0/1 keep).
    """
    def scaled(x):
        return x * keep.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return scaled(a), scaled(b), scaled(c)


@triton.jit
def _mask_part(x_ptr, out_ptr, row, k, cols, s_r, BLOCK: tl.constexpr):
    for start in range(0, cols, BLOCK):
        col = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * s_r + col, mask=col < cols, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * cols + col, (x * k).to(out_ptr.dtype.element_ty),
                 mask=col < cols)


@triton.jit
def _mask_rows_kernel(keep_ptr, a_ptr, b_ptr, c_ptr, oa_ptr, ob_ptr, oc_ptr, ca, cb, cc,
                      sa, sb, sc, sk, BLOCK: tl.constexpr):
    """One program per row: the row's three slices scaled by its keep."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.load(keep_ptr + row * sk).to(tl.float32)
    _mask_part(a_ptr, oa_ptr, row, k, ca, sa, BLOCK)
    _mask_part(b_ptr, ob_ptr, row, k, cb, sb, BLOCK)
    _mask_part(c_ptr, oc_ptr, row, k, cc, sc, BLOCK)


def _mask_rows_fake(keep, a, b, c):
    return a.new_empty(a.shape), b.new_empty(b.shape), c.new_empty(c.shape)


@kernel_op("mask_rows", _mask_rows_fake, fold=True)
def _mask_rows(keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (a, b, c))
    if len(keep):
        launch(_mask_rows_kernel)[(len(keep),)](
            keep, a, b, c, *outs, a.shape[1], b.shape[1], c.shape[1], a.stride(0),
            b.stride(0), c.stride(0), keep.stride(0), BLOCK=1024, num_warps=4)
    return outs


def _mask_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _mask_rows_backward(ctx, da, db, dc):
    keep, = ctx.saved_tensors
    return (None, *_mask_rows(keep, *(_rows(g) for g in (da, db, dc))))


_mask_rows = differentiable(_mask_rows, _mask_rows_backward, _mask_rows_setup)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (N, cols) with unit column stride (a view when x allows it)."""
    x = x.reshape(len(x), -1)
    return x if x.stride(-1) == 1 else x.contiguous()


def mask_rows(keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mask_rows_ref in one launch (and one for the backward, the gradients masked alike).
    Triton. keep: (N, 1) (or (N,)); a, b, c: (N, ...) any float dtypes and strides."""
    N = keep.shape[0]
    if any(x.shape[0] != N for x in (a, b, c)) or keep.numel() != N:
        raise ValueError(f"mask_rows: keep {tuple(keep.shape)} needs (N, 1) for rows "
                         f"{[tuple(x.shape) for x in (a, b, c)]} of N = {N}")
    outs = _mask_rows(keep.reshape(N), _rows(a), _rows(b), _rows(c))
    return tuple(o.reshape(x.shape) for o, x in zip(outs, (a, b, c)))
