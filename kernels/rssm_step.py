"""Pointwise chains of the RSSM step: RMSNorm + SiLU after a projection, and the GRU gates.

The GEMMs stay in cuBLAS; these are the chains between them. Each public op has
a `<name>_ref` beside it with the identical signature: the plain-PyTorch math, used on CPU.
The Triton ops read and write each value once per pass: eager PyTorch runs ~10 launches for
either forward and ~20 for its backward, and at the observe scan's 16 rows launches are all
the cost. Backward passes recompute the cheap pointwise values from the saved inputs instead
of storing them (that would cost more memory traffic than it saves).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import kernel_op, launch, max_programs, row_tiling, warps


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 math for float32/bfloat16 inputs; float64 stays (the tests' exact reference)."""
    return x if x.dtype == torch.float64 else x.float()


def rms_silu_ref(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """SiLU(RMSNorm(x)) over the last axis: silu(x * scale / sqrt(mean(x^2) + eps)).

    x: (..., C) float32 or bfloat16; scale: (C,) float32. Math in float32; returns x.dtype.
    """
    xf = _upcast(x)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * _upcast(scale)
    return F.silu(y).to(x.dtype)


def gru_update_ref(gates: torch.Tensor, deter: torch.Tensor, blocks: int) -> torch.Tensor:
    """Block-GRU gate math and state update.

    gates: (..., 3D), the BlockLinear output laid out per block as [reset, cand, update] of
    D/blocks each; deter: (..., D) the previous state. Returns the new state (..., D):
    r = sigmoid(r), c = tanh(r * c), u = sigmoid(u - 1), h = u * c + (1 - u) * deter.
    Math in float32; returns deter.dtype.
    """
    lead, D = deter.shape[:-1], deter.shape[-1]
    g = _upcast(gates).reshape(*lead, blocks, 3, D // blocks)
    reset, cand, update = (g[..., i, :].reshape(*lead, D) for i in range(3))
    reset = torch.sigmoid(reset)
    cand = torch.tanh(reset * cand)
    update = torch.sigmoid(update - 1.0)
    return (update * cand + (1.0 - update) * _upcast(deter)).to(deter.dtype)


# ------------------------------------------------------------------------------- rms_silu

@triton.jit
def _rms_silu_tile(x, scale_ptr, c, C, eps):
    """silu(x * scale / sqrt(mean(x^2) + eps)) of a float32 tile of rows (c: its columns)."""
    scale = tl.load(scale_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    a = x * tl.rsqrt(tl.sum(x * x, 1) / C + eps)[:, None] * scale
    return a * tl.sigmoid(a)


@triton.jit
def _rms_silu_fwd_kernel(x_ptr, scale_ptr, y_ptr, rows, C, sx_r, sx_c, eps,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    mask = (r < rows) & (c < C)
    r = r.to(tl.int64)
    x = tl.load(x_ptr + r * sx_r + c * sx_c, mask=mask, other=0.0).to(tl.float32)
    y = _rms_silu_tile(x, scale_ptr, c, C, eps)
    tl.store(y_ptr + r * C + c, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_silu_bwd_rows(dy_ptr, x_ptr, s_ptr, dx_ptr, ds_ptr, rows, C, tiles, sdy_r, sdy_c,
                       sx_r, sx_c, sdx_r, off, eps, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """rms_silu's backward over this program's `tiles` row tiles: dx (row stride sdx_r) from
    dy's columns off.. (one part of a concatenated output, or all of it with off 0), and the
    program's partial dscale row written at ds_ptr + off."""
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)[None, :]
    scale = tl.load(s_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(tiles):
        r = (pid * tiles + i) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        mask = (r < rows) & (c < C)
        r = r.to(tl.int64)
        x = tl.load(x_ptr + r * sx_r + c * sx_c, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r * sdy_r + (off + c) * sdy_c, mask=mask,
                     other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 1) / C + eps)[:, None]
        n = x * rstd
        a = n * scale
        sig = tl.sigmoid(a)
        da = dy * sig * (1.0 + a * (1.0 - sig))
        dscale += tl.sum(da * n, 0)
        dn = da * scale
        dx = rstd * (dn - n * (tl.sum(dn * n, 1) / C)[:, None])
        tl.store(dx_ptr + r * sdx_r + c, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    cc = tl.arange(0, BLOCK_C)
    tl.store(ds_ptr + off + cc, dscale, mask=cc < C)


@triton.jit
def _rms_silu_bwd_kernel(dy_ptr, x_ptr, scale_ptr, dx_ptr, dscale_ptr, rows, C, tiles,
                         sdy_r, sdy_c, sx_r, sx_c, eps,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Each program loops over `tiles` row tiles and writes its partial dscale row."""
    _rms_silu_bwd_rows(dy_ptr, x_ptr, scale_ptr, dx_ptr, dscale_ptr + tl.program_id(0) * C,
                       rows, C, tiles, sdy_r, sdy_c, sx_r, sx_c, C, 0, eps, BLOCK_R, BLOCK_C)


def _rms_silu_fwd_fake(x, scale, eps):
    return x.new_empty(x.shape)


@kernel_op("rms_silu", _rms_silu_fwd_fake)
def _rms_silu_fwd(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    rows, C = x.shape
    y = torch.empty((rows, C), dtype=x.dtype, device=x.device)
    if rows:
        block_r, block_c, num_warps = row_tiling(rows, C)
        launch(_rms_silu_fwd_kernel)[(triton.cdiv(rows, block_r),)](
            x, scale, y, rows, C, x.stride(0), x.stride(1), eps,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return y


def _rms_silu_bwd_fake(dy, x, scale, eps):
    return x.new_empty(x.shape), scale.new_empty(scale.shape)


@kernel_op("rms_silu_bwd", _rms_silu_bwd_fake)
def _rms_silu_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, C = x.shape
    dx = torch.empty((rows, C), dtype=x.dtype, device=x.device)
    block_r, block_c, num_warps = row_tiling(rows, C)
    programs = max(1, min(triton.cdiv(rows, block_r), max_programs(x.device)))
    tiles = triton.cdiv(triton.cdiv(rows, block_r), programs)
    partial = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    launch(_rms_silu_bwd_kernel)[(programs,)](
        dy, x, scale, dx, partial, rows, C, tiles, dy.stride(0), dy.stride(1),
        x.stride(0), x.stride(1), eps, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    dscale = partial.sum(0) if programs > 1 else partial.view(C)
    return dx, dscale.to(scale.dtype)


def _rms_silu_setup(ctx, inputs, output):
    x, scale, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps


def _rms_silu_backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, dscale = _rms_silu_bwd(dy, x, scale, ctx.eps)
    return dx, dscale, None


_rms_silu_fwd.register_autograd(_rms_silu_backward, setup_context=_rms_silu_setup)


def rms_silu(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """SiLU(RMSNorm(x)) over the last axis: silu(x * scale / sqrt(mean(x^2) + eps)). Triton.

    x: (..., C) float32 or bfloat16, any strides; scale: (C,) float32. Math in float32; returns
    x.dtype (contiguous). Backward gives dx (x.dtype) and dscale (scale.dtype).
    """
    C = x.shape[-1]
    return _rms_silu_fwd(x.reshape(-1, C), scale, float(eps)).reshape(x.shape)


# --------------------------------------------------------------------------- rms_silu_cat

def rms_silu_cat_ref(a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor,
                     sa: torch.Tensor, sb: torch.Tensor, sc: torch.Tensor | None,
                     eps: float = 1e-4) -> torch.Tensor:
    """cat([rms_silu(a, sa), rms_silu(b, sb), rms_silu(c, sc) or c itself if sc is None], -1).

    The RSSM core's input (the official `_core`: x0, x1, x2 each Linear -> Norm -> act, then
    concatenated); sc None passes an already normalised c through (the observe scan computes
    the action part once for all steps). a, b, c: (..., Ci) of one dtype; returns that dtype.
    b None: a holds a and b side by side (len(sa) and len(sb) columns; one matmul's output),
    and gets one gradient.
    """
    if b is None:
        a, b = a[..., :sa.shape[0]], a[..., sa.shape[0]:]
    c = c if sc is None else rms_silu_ref(c, sc, eps)
    return torch.cat([rms_silu_ref(a, sa, eps), rms_silu_ref(b, sb, eps), c], -1)


@triton.jit
def _rms_cat_fwd_part(x_ptr, s_ptr, y_ptr, rows, C, sx_r, sx_c, sy_r, off, eps,
                      NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    mask = (r < rows) & (c < C)
    r = r.to(tl.int64)
    x = tl.load(x_ptr + r * sx_r + c * sx_c, mask=mask, other=0.0)
    if NORM:
        x = _rms_silu_tile(x.to(tl.float32), s_ptr, c, C, eps)
    tl.store(y_ptr + r * sy_r + off + c, x.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_silu_cat_fwd_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, sc_ptr, y_ptr, rows,
                             Ca, Cb, Cc, sa_r, sa_c, sb_r, sb_c, sc_r, sc_c, eps,
                             NORM_C: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """Program (i, part): row tile i of part 0 (a), 1 (b) or 2 (c) of the output."""
    part = tl.program_id(1)
    C = Ca + Cb + Cc
    if part == 0:
        _rms_cat_fwd_part(a_ptr, sa_ptr, y_ptr, rows, Ca, sa_r, sa_c, C, 0, eps, True,
                          BLOCK_R, BLOCK_C)
    elif part == 1:
        _rms_cat_fwd_part(b_ptr, sb_ptr, y_ptr, rows, Cb, sb_r, sb_c, C, Ca, eps, True,
                          BLOCK_R, BLOCK_C)
    else:
        _rms_cat_fwd_part(c_ptr, sc_ptr, y_ptr, rows, Cc, sc_r, sc_c, C, Ca + Cb, eps, NORM_C,
                          BLOCK_R, BLOCK_C)


@triton.jit
def _rms_silu_cat_bwd_kernel(dy_ptr, a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, sc_ptr, da_ptr,
                             db_ptr, dc_ptr, partial_ptr, rows, Ca, Cb, Cc, tiles,
                             sdy_r, sdy_c, sa_r, sa_c, sb_r, sb_c, sc_r, sc_c, sda_r, sdb_r,
                             eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (i, part): rows tiles i*tiles.. of part 0, 1 or 2 (2 only when c was
    normalised: the grid then has 3 parts); each writes its partial dscale row."""
    pid, part = tl.program_id(0), tl.program_id(1)
    ds_ptr = partial_ptr + pid * (Ca + Cb + Cc)
    if part == 0:
        _rms_silu_bwd_rows(dy_ptr, a_ptr, sa_ptr, da_ptr, ds_ptr, rows, Ca, tiles, sdy_r,
                          sdy_c, sa_r, sa_c, sda_r, 0, eps, BLOCK_R, BLOCK_C)
    elif part == 1:
        _rms_silu_bwd_rows(dy_ptr, b_ptr, sb_ptr, db_ptr, ds_ptr, rows, Cb, tiles, sdy_r,
                          sdy_c, sb_r, sb_c, sdb_r, Ca, eps, BLOCK_R, BLOCK_C)
    else:
        _rms_silu_bwd_rows(dy_ptr, c_ptr, sc_ptr, dc_ptr, ds_ptr, rows, Cc, tiles, sdy_r,
                          sdy_c, sc_r, sc_c, Cc, Ca + Cb, eps, BLOCK_R, BLOCK_C)


def _cat_parts(a, b, sa):
    """(a, b): b None splits a's columns at len(sa) (views)."""
    return (a, b) if b is not None else (a[:, :sa.shape[0]], a[:, sa.shape[0]:])


def _rms_silu_cat_fake(a, b, c, sa, sb, sc, eps):
    return a.new_empty((a.shape[0], sa.shape[0] + sb.shape[0] + c.shape[1]))


@kernel_op("rms_silu_cat", _rms_silu_cat_fake)
def _rms_silu_cat_fwd(a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor,
                      sa: torch.Tensor, sb: torch.Tensor, sc: torch.Tensor | None,
                      eps: float) -> torch.Tensor:
    a, b = _cat_parts(a, b, sa)
    rows, (Ca, Cb, Cc) = a.shape[0], (a.shape[1], b.shape[1], c.shape[1])
    y = torch.empty((rows, Ca + Cb + Cc), dtype=a.dtype, device=a.device)
    if rows:
        block_r, block_c, num_warps = row_tiling(rows, max(Ca, Cb, Cc))
        launch(_rms_silu_cat_fwd_kernel)[(triton.cdiv(rows, block_r), 3)](
            a, b, c, sa, sb, sa if sc is None else sc, y, rows, Ca, Cb, Cc, a.stride(0),
            a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), eps,
            NORM_C=sc is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return y


def _rms_silu_cat_bwd_fake(dy, a, b, c, sa, sb, sc, eps):
    db = a.new_empty((0, sb.shape[0])) if b is None else b.new_empty(b.shape)
    return (a.new_empty(a.shape), db, c.new_empty(c.shape if sc is not None else
                                                 (0, c.shape[1])),
            sa.new_empty((sa.shape[0] + sb.shape[0] + c.shape[1],)))


@kernel_op("rms_silu_cat_bwd", _rms_silu_cat_bwd_fake)
def _rms_silu_cat_bwd(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None,
                      c: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
                      sc: torch.Tensor | None, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(da, db, dc, dscales): dc and dscales' c part are only written when sc is given;
    dscales is (sa | sb | sc)'s gradient in one float32 row. b None: da is a's whole
    gradient (both parts) and db empty."""
    joined = b is None
    a, b = _cat_parts(a, b, sa)
    rows, (Ca, Cb, Cc) = a.shape[0], (a.shape[1], b.shape[1], c.shape[1])
    if joined:
        da = torch.empty((rows, Ca + Cb), dtype=a.dtype, device=a.device)
        da_, db_, db = da, da[:, Ca:], da.new_empty((0, Cb))
    else:
        da, db = torch.empty((rows, Ca), dtype=a.dtype, device=a.device), \
            torch.empty((rows, Cb), dtype=b.dtype, device=b.device)
        da_, db_ = da, db
    dc = torch.empty((rows, Cc) if sc is not None else (0, Cc), dtype=c.dtype, device=c.device)
    block_r, block_c, num_warps = row_tiling(rows, max(Ca, Cb, Cc))
    programs = max(1, min(triton.cdiv(rows, block_r), max_programs(a.device)))
    tiles = triton.cdiv(triton.cdiv(rows, block_r), programs)
    partial = torch.empty((programs, Ca + Cb + Cc), dtype=torch.float32, device=a.device)
    launch(_rms_silu_cat_bwd_kernel)[(programs, 2 if sc is None else 3)](
        dy, a, b, c, sa, sb, sa if sc is None else sc, da_, db_, dc, partial, rows, Ca, Cb,
        Cc, tiles, dy.stride(0), dy.stride(1), a.stride(0), a.stride(1), b.stride(0),
        b.stride(1), c.stride(0), c.stride(1), da_.stride(0), db_.stride(0), eps,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    dscales = partial.sum(0) if programs > 1 else partial.view(-1)
    return da, db, dc, dscales


def _rms_silu_cat_setup(ctx, inputs, output):
    a, b, c, sa, sb, sc, eps = inputs
    ctx.save_for_backward(a, b, c, sa, sb, sc)
    ctx.eps, ctx.norm_c, ctx.joined = eps, sc is not None, b is None


def _rms_silu_cat_backward(ctx, dy):
    a, b, c, sa, sb, sc = ctx.saved_tensors
    da, db, dc, ds = _rms_silu_cat_bwd(dy, a, b, c, sa, sb, sc, ctx.eps)
    Ca, Cb = sa.shape[0], sb.shape[0]
    db = None if ctx.joined else db
    if not ctx.norm_c:  # c passed through: its gradient is dy's columns (a view)
        dc = dy[:, Ca + Cb:]
    dsc = ds[Ca + Cb:].to(sc.dtype) if ctx.norm_c else None
    return (da, db, dc, ds[:Ca].to(sa.dtype), ds[Ca:Ca + Cb].to(sb.dtype), dsc, None)


_rms_silu_cat_fwd.register_autograd(_rms_silu_cat_backward, setup_context=_rms_silu_cat_setup)


def rms_silu_cat(a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor,
                 sa: torch.Tensor, sb: torch.Tensor, sc: torch.Tensor | None,
                 eps: float = 1e-4) -> torch.Tensor:
    """rms_silu_cat_ref in one Triton launch each way (instead of up to 3 norms, a
    concatenation and, backward, up to 3 norm backwards). a, b, c: (..., Ci), any strides
    (b None: a holds both, as in the reference); returns a.dtype, contiguous."""
    lead = a.shape[:-1]
    if b is None and a.shape[-1] != sa.shape[0] + sb.shape[0]:
        raise ValueError(f"rms_silu_cat: a {tuple(a.shape)} holds a and b: needs "
                         f"{sa.shape[0]} + {sb.shape[0]} columns")
    for name, x, scale in (("a", a, None if b is None else sa), ("b", b, sb), ("c", c, sc)):
        if x is None:
            continue
        if x.shape[:-1] != lead or x.dtype != a.dtype:
            raise ValueError(f"rms_silu_cat: {name} {tuple(x.shape)} {x.dtype} needs a's rows "
                             f"{tuple(lead)} and dtype {a.dtype}")
        if scale is not None and scale.shape != (x.shape[-1],):
            raise ValueError(f"rms_silu_cat: {name} has {x.shape[-1]} columns but its scale "
                             f"{tuple(scale.shape)}")
    flat = [None if x is None else x.reshape(-1, x.shape[-1]) for x in (a, b, c)]
    y = _rms_silu_cat_fwd(*flat, sa, sb, sc, float(eps))
    return y.reshape(*lead, y.shape[-1])


# --------------------------------------------------------------------------- rms_silu_add

def rms_silu_add_ref(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                     eps: float = 1e-4) -> torch.Tensor:
    """rms_silu(x + y, scale): a layer whose matmul was split in two (x and y, two parts of
    its input each through its own columns of the weight), the sum in float32; returns
    x.dtype."""
    return rms_silu_ref(_upcast(x) + _upcast(y), scale, eps).to(x.dtype)


@triton.jit
def _rms_silu_add_kernel(x_ptr, y_ptr, scale_ptr, out_ptr, rows, C, sx_r, sx_c, sy_r, sy_c,
                         eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.arange(0, BLOCK_C)[None, :]
    mask = (r < rows) & (c < C)
    r = r.to(tl.int64)
    x = tl.load(x_ptr + r * sx_r + c * sx_c, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(y_ptr + r * sy_r + c * sy_c, mask=mask, other=0.0).to(tl.float32)
    y = _rms_silu_tile(x, scale_ptr, c, C, eps)
    tl.store(out_ptr + r * C + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rms_silu_add_fake(x, y, scale, eps):
    return x.new_empty(x.shape)


@kernel_op("rms_silu_add", _rms_silu_add_fake)
def _rms_silu_add_fwd(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                      eps: float) -> torch.Tensor:
    rows, C = x.shape
    out = torch.empty((rows, C), dtype=x.dtype, device=x.device)
    if rows:
        block_r, block_c, num_warps = row_tiling(rows, C)
        launch(_rms_silu_add_kernel)[(triton.cdiv(rows, block_r),)](
            x, y, scale, out, rows, C, x.stride(0), x.stride(1), y.stride(0), y.stride(1), eps,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return out


def _rms_silu_add_setup(ctx, inputs, output):
    x, y, scale, eps = inputs
    ctx.save_for_backward(x, y, scale)
    ctx.eps = eps


def _rms_silu_add_backward(ctx, dout):
    """Recomputes the sum in float32 and runs rms_silu's backward on it (a few launches: the
    op serves the imagination rollout, which runs without gradient; this keeps it
    differentiable)."""
    x, y, scale = ctx.saved_tensors
    ds, dscale = _rms_silu_bwd(dout, x.float() + y.float(), scale, ctx.eps)
    return ds.to(x.dtype), ds.to(y.dtype), dscale, None


_rms_silu_add_fwd.register_autograd(_rms_silu_add_backward, setup_context=_rms_silu_add_setup)


def rms_silu_add(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                 eps: float = 1e-4) -> torch.Tensor:
    """rms_silu_add_ref in one Triton launch: the sum and the norm. x, y: (..., C) of any
    strides (e.g. column slices of two matmuls' outputs); returns x.dtype, contiguous."""
    if x.shape != y.shape:
        raise ValueError(f"rms_silu_add: x {tuple(x.shape)} and y {tuple(y.shape)} differ")
    C = x.shape[-1]
    return _rms_silu_add_fwd(x.reshape(-1, C), y.reshape(-1, C), scale,
                             float(eps)).reshape(x.shape)


# ----------------------------------------------------------------------------- gru_update

@triton.jit
def _tanh(x):
    """tanh to a few ulp (libdevice has no interpreter version): a series below 1/8, where
    (1 - e) / (1 + e) with e = exp(-2|x|) would lose digits to cancellation."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    x2 = x * x
    series = a * (1.0 + x2 * (-0.3333333333 + x2 * (0.1333333333 + x2 * (
        -0.05396825397 + x2 * 0.02186948854))))
    t = tl.where(a < 0.125, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _gru_index(BLOCK: tl.constexpr, total, D, Dg):
    """Flat element ids of this program -> (row, offset in the gates row of the reset gate)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = idx // D
    j = idx - row * D
    block = j // Dg
    return idx < total, row, j, block * 2 * Dg + j


@triton.jit
def _gru_fwd_kernel(gates_ptr, deter_ptr, out_ptr, total, D, Dg, sg_r, sg_c, sd_r, sd_c,
                    BLOCK: tl.constexpr):
    mask, row, j, gj = _gru_index(BLOCK, total, D, Dg)
    g = gates_ptr + row * sg_r + gj * sg_c
    r = tl.sigmoid(tl.load(g, mask=mask, other=0.0).to(tl.float32))
    c = tl.load(g + Dg * sg_c, mask=mask, other=0.0).to(tl.float32)
    u = tl.sigmoid(tl.load(g + 2 * Dg * sg_c, mask=mask, other=0.0).to(tl.float32) - 1.0)
    h = tl.load(deter_ptr + row * sd_r + j * sd_c, mask=mask, other=0.0).to(tl.float32)
    c = _tanh(r * c)
    out = u * c + (1.0 - u) * h
    tl.store(out_ptr + row * D + j, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_bwd_kernel(dout_ptr, gates_ptr, deter_ptr, dgates_ptr, ddeter_ptr, total, D, Dg,
                    so_r, so_c, sg_r, sg_c, sd_r, sd_c, BLOCK: tl.constexpr):
    mask, row, j, gj = _gru_index(BLOCK, total, D, Dg)
    g = gates_ptr + row * sg_r + gj * sg_c
    r = tl.sigmoid(tl.load(g, mask=mask, other=0.0).to(tl.float32))
    c_in = tl.load(g + Dg * sg_c, mask=mask, other=0.0).to(tl.float32)
    u = tl.sigmoid(tl.load(g + 2 * Dg * sg_c, mask=mask, other=0.0).to(tl.float32) - 1.0)
    h = tl.load(deter_ptr + row * sd_r + j * sd_c, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + row * so_r + j * so_c, mask=mask, other=0.0).to(tl.float32)
    c = _tanh(r * c_in)
    dpre = dout * u * (1.0 - c * c)  # gradient of the tanh's input r * c_in
    dg = dgates_ptr + row * 3 * D + gj
    ty = dgates_ptr.dtype.element_ty
    tl.store(dg, (dpre * c_in * r * (1.0 - r)).to(ty), mask=mask)
    tl.store(dg + Dg, (dpre * r).to(ty), mask=mask)
    tl.store(dg + 2 * Dg, (dout * (c - h) * u * (1.0 - u)).to(ty), mask=mask)
    tl.store(ddeter_ptr + row * D + j, (dout * (1.0 - u)).to(ddeter_ptr.dtype.element_ty),
             mask=mask)


_GRU_BLOCK = 1024


def _gru_fwd_fake(gates, deter, blocks):
    return deter.new_empty(deter.shape)


@kernel_op("gru_update", _gru_fwd_fake)
def _gru_fwd(gates: torch.Tensor, deter: torch.Tensor, blocks: int) -> torch.Tensor:
    rows, D = deter.shape
    out = torch.empty((rows, D), dtype=deter.dtype, device=deter.device)
    total = rows * D
    if total:
        launch(_gru_fwd_kernel)[(triton.cdiv(total, _GRU_BLOCK),)](
            gates, deter, out, total, D, D // blocks, gates.stride(0), gates.stride(1),
            deter.stride(0), deter.stride(1), BLOCK=_GRU_BLOCK, num_warps=warps(_GRU_BLOCK))
    return out


def _gru_bwd_fake(dout, gates, deter, blocks):
    return gates.new_empty(gates.shape), deter.new_empty(deter.shape)


@kernel_op("gru_update_bwd", _gru_bwd_fake)
def _gru_bwd(dout: torch.Tensor, gates: torch.Tensor, deter: torch.Tensor,
             blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, D = deter.shape
    dgates = torch.empty((rows, 3 * D), dtype=gates.dtype, device=gates.device)
    ddeter = torch.empty((rows, D), dtype=deter.dtype, device=deter.device)
    total = rows * D
    if total:
        launch(_gru_bwd_kernel)[(triton.cdiv(total, _GRU_BLOCK),)](
            dout, gates, deter, dgates, ddeter, total, D, D // blocks, dout.stride(0),
            dout.stride(1), gates.stride(0), gates.stride(1), deter.stride(0), deter.stride(1),
            BLOCK=_GRU_BLOCK, num_warps=warps(_GRU_BLOCK))
    return dgates, ddeter


def _gru_setup(ctx, inputs, output):
    gates, deter, blocks = inputs
    ctx.save_for_backward(gates, deter)
    ctx.blocks = blocks


def _gru_backward(ctx, dout):
    gates, deter = ctx.saved_tensors
    dgates, ddeter = _gru_bwd(dout, gates, deter, ctx.blocks)
    return dgates, ddeter, None


_gru_fwd.register_autograd(_gru_backward, setup_context=_gru_setup)


def gru_update(gates: torch.Tensor, deter: torch.Tensor, blocks: int) -> torch.Tensor:
    """Block-GRU gate math and state update. Triton, one pass each way.

    gates: (..., 3D) float32/bfloat16, the BlockLinear output laid out per block as
    [reset, cand, update] of D/blocks each; deter: (..., D) float32/bfloat16, the previous
    state; any strides. Returns the new state (..., D) in deter.dtype (contiguous):
    r = sigmoid(r), c = tanh(r * c), u = sigmoid(u - 1), h = u * c + (1 - u) * deter, math in
    float32. Backward gives dgates (gates.dtype) and ddeter (deter.dtype).
    """
    D = deter.shape[-1]
    if gates.shape[-1] != 3 * D or D % blocks or gates.shape[:-1] != deter.shape[:-1]:
        raise ValueError(f"gru_update: gates {tuple(gates.shape)} and deter "
                         f"{tuple(deter.shape)} do not fit blocks={blocks} (need (..., 3D), "
                         "(..., D), D % blocks == 0)")
    out = _gru_fwd(gates.reshape(-1, 3 * D), deter.reshape(-1, D), int(blocks))
    return out.reshape(deter.shape)


# ------------------------------------------------------------------------------ gru_cell

def gru_cell_ref(gates: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor, blocks: int,
                 dtype: torch.dtype, keep: torch.Tensor | None = None,
                 tail: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """gru_update of gates + bias (the GRU layer's output before its bias), returning the new
    state in deter.dtype and in `dtype` (the matmul dtype the next layers read it in).

    gates: (..., 3D) float32/bfloat16; bias: (3D,); deter: (..., D). The bias is added in
    float32. keep (..., 1) or (...,) of 0/1 (the next step's reset, as mask_rows takes it):
    also returns the copies with the rows of keep 0 zeroed (the next step's carry): in
    deter.dtype and twice in `dtype` (one for each layer that reads it: the input embedding
    dynin0 and the GRU's own block rows, so that their gradients meet in the backward kernel,
    not in an addition), five results in all. tail (..., E): the second result is
    cat([the state in `dtype`, tail in `dtype`], -1) (the posterior's input [h, tokens], so
    that it needs no concatenation of its own).
    """
    h = gru_update_ref(_upcast(gates) + _upcast(bias), deter, blocks)
    low = h.to(dtype) if tail is None else torch.cat([h.to(dtype), tail.to(dtype)], -1)
    if keep is None:
        return h, low
    k = keep.reshape(*h.shape[:-1], 1).to(h.dtype)
    return h, low, h * k, (h * k).to(dtype), (h * k).to(dtype)


@triton.jit
def _gru_cell_load(gates_ptr, bias_ptr, deter_ptr, total, D, Dg, sg_r, sg_c, sd_r, sd_c,
                   BLOCK: tl.constexpr):
    """This program's elements: (mask, row, j, gj, reset, candidate input, update, state),
    the gates with the bias added and the two sigmoids applied, in float32."""
    mask, row, j, gj = _gru_index(BLOCK, total, D, Dg)
    g = gates_ptr + row * sg_r + gj * sg_c
    b = bias_ptr + gj
    r = tl.load(g, mask=mask, other=0.0).to(tl.float32) + tl.load(b, mask=mask, other=0.0).to(
        tl.float32)
    c = tl.load(g + Dg * sg_c, mask=mask, other=0.0).to(tl.float32) + tl.load(
        b + Dg, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g + 2 * Dg * sg_c, mask=mask, other=0.0).to(tl.float32) + tl.load(
        b + 2 * Dg, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(deter_ptr + row * sd_r + j * sd_c, mask=mask, other=0.0).to(tl.float32)
    return mask, row, j, gj, tl.sigmoid(r), c, tl.sigmoid(u - 1.0), h


@triton.jit
def _gru_cell_fwd_kernel(gates_ptr, bias_ptr, deter_ptr, keep_ptr, tail_ptr, out_ptr, low_ptr,
                         mout_ptr, mlow_ptr, mlow2_ptr, total, D, Dg, E, sg_r, sg_c, sd_r, sd_c,
                         sk, st_r, st_c, BLOCK: tl.constexpr, KEEP: tl.constexpr,
                         TAIL: tl.constexpr):
    """Programs 0..cdiv(total, BLOCK)-1: the cell; with TAIL, the ones after copy tail into
    low's columns D.. (low's rows are D + E long)."""
    main = tl.cdiv(total, BLOCK)
    if TAIL:
        if tl.program_id(0) >= main:
            rows = total // D
            idx = (tl.program_id(0) - main).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            row = idx // E
            e = idx - row * E
            m = idx < rows * E
            v = tl.load(tail_ptr + row * st_r + e * st_c, mask=m, other=0.0)
            tl.store(low_ptr + row * (D + E) + D + e, v.to(low_ptr.dtype.element_ty), mask=m)
        else:
            _gru_cell_fwd_main(gates_ptr, bias_ptr, deter_ptr, keep_ptr, out_ptr, low_ptr,
                               mout_ptr, mlow_ptr, mlow2_ptr, total, D, Dg, D + E, sg_r, sg_c,
                               sd_r, sd_c, sk, BLOCK, KEEP)
    else:
        _gru_cell_fwd_main(gates_ptr, bias_ptr, deter_ptr, keep_ptr, out_ptr, low_ptr, mout_ptr,
                           mlow_ptr, mlow2_ptr, total, D, Dg, D, sg_r, sg_c, sd_r, sd_c, sk,
                           BLOCK, KEEP)


@triton.jit
def _gru_cell_fwd_main(gates_ptr, bias_ptr, deter_ptr, keep_ptr, out_ptr, low_ptr, mout_ptr,
                       mlow_ptr, mlow2_ptr, total, D, Dg, sl_r, sg_r, sg_c, sd_r, sd_c, sk,
                       BLOCK: tl.constexpr, KEEP: tl.constexpr):
    mask, row, j, gj, r, c, u, h = _gru_cell_load(gates_ptr, bias_ptr, deter_ptr, total, D, Dg,
                                                 sg_r, sg_c, sd_r, sd_c, BLOCK)
    out = u * _tanh(r * c) + (1.0 - u) * h
    tl.store(out_ptr + row * D + j, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(low_ptr + row * sl_r + j, out.to(low_ptr.dtype.element_ty), mask=mask)
    if KEEP:  # the next step's carry: rows of keep 0 zeroed
        out = out * tl.load(keep_ptr + row * sk, mask=mask, other=0.0).to(tl.float32)
        tl.store(mout_ptr + row * D + j, out.to(mout_ptr.dtype.element_ty), mask=mask)
        tl.store(mlow_ptr + row * D + j, out.to(mlow_ptr.dtype.element_ty), mask=mask)
        tl.store(mlow2_ptr + row * D + j, out.to(mlow2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gru_cell_bwd_kernel(dout_ptr, dlow_ptr, dmout_ptr, dmlow_ptr, dmlow2_ptr, keep_ptr,
                         gates_ptr, bias_ptr, deter_ptr, dgates_ptr, ddeter_ptr, total, D, Dg,
                         so_r, so_c, sl_r, sl_c, smo_r, smo_c, sml_r, sml_c, sm2_r, sm2_c, sk,
                         sg_r, sg_c, sd_r, sd_c,
                         BLOCK: tl.constexpr, KEEP: tl.constexpr):
    mask, row, j, gj, r, c_in, u, h = _gru_cell_load(gates_ptr, bias_ptr, deter_ptr, total, D, Dg,
                                                 sg_r, sg_c, sd_r, sd_c, BLOCK)
    # The outputs are copies of one state: their gradients add (the masked ones masked).
    dout = tl.load(dout_ptr + row * so_r + j * so_c, mask=mask, other=0.0).to(tl.float32)
    dout += tl.load(dlow_ptr + row * sl_r + j * sl_c, mask=mask, other=0.0).to(tl.float32)
    if KEEP:
        dm = tl.load(dmout_ptr + row * smo_r + j * smo_c, mask=mask, other=0.0).to(tl.float32)
        dm += tl.load(dmlow_ptr + row * sml_r + j * sml_c, mask=mask, other=0.0).to(tl.float32)
        dm += tl.load(dmlow2_ptr + row * sm2_r + j * sm2_c, mask=mask,
                      other=0.0).to(tl.float32)
        dout += dm * tl.load(keep_ptr + row * sk, mask=mask, other=0.0).to(tl.float32)
    c = _tanh(r * c_in)
    dpre = dout * u * (1.0 - c * c)
    dg = dgates_ptr + row * 3 * D + gj
    ty = dgates_ptr.dtype.element_ty
    tl.store(dg, (dpre * c_in * r * (1.0 - r)).to(ty), mask=mask)
    tl.store(dg + Dg, (dpre * r).to(ty), mask=mask)
    tl.store(dg + 2 * Dg, (dout * (c - h) * u * (1.0 - u)).to(ty), mask=mask)
    tl.store(ddeter_ptr + row * D + j, (dout * (1.0 - u)).to(ddeter_ptr.dtype.element_ty),
             mask=mask)


def _gru_cell_outputs(deter, dtype, n, tail=None):
    rows, D = deter.shape
    E = 0 if tail is None else tail.shape[1]
    return [torch.empty((rows, D + E * (i == 1)), dtype=t, device=deter.device)
            for i, t in enumerate((deter.dtype, dtype, deter.dtype, dtype, dtype)[:n])]


def _gru_cell_launch(gates, bias, deter, keep, tail, outs, blocks):
    rows, D = deter.shape
    total = rows * D
    if total:
        masked, E = keep is not None, 0 if tail is None else tail.shape[1]
        mout, mlow, mlow2 = outs[2:] if masked else (*outs, outs[1])
        keep = keep if masked else deter
        tail_ = deter if tail is None else tail  # a placeholder when there is no tail
        grid = triton.cdiv(total, _GRU_BLOCK) + triton.cdiv(rows * E, _GRU_BLOCK)
        launch(_gru_cell_fwd_kernel)[(grid,)](
            gates, bias, deter, keep, tail_, outs[0], outs[1], mout, mlow, mlow2, total, D,
            D // blocks, max(E, 1), gates.stride(0), gates.stride(1), deter.stride(0),
            deter.stride(1), keep.stride(0), tail_.stride(0), tail_.stride(1),
            BLOCK=_GRU_BLOCK, KEEP=masked, TAIL=tail is not None, num_warps=warps(_GRU_BLOCK))
    return tuple(outs)


def _gru_cell_bwd_launch(grads, keep, gates, bias, deter, blocks):
    rows, D = deter.shape
    dgates = torch.empty((rows, 3 * D), dtype=gates.dtype, device=gates.device)
    ddeter = torch.empty((rows, D), dtype=deter.dtype, device=deter.device)
    total = rows * D
    if total:
        masked = keep is not None
        dout, dlow, dmout, dmlow, dmlow2 = grads if masked else (*grads, *grads, grads[1])
        keep = keep if masked else deter
        launch(_gru_cell_bwd_kernel)[(triton.cdiv(total, _GRU_BLOCK),)](
            dout, dlow, dmout, dmlow, dmlow2, keep, gates, bias, deter, dgates, ddeter, total,
            D, D // blocks, dout.stride(0), dout.stride(1), dlow.stride(0), dlow.stride(1),
            dmout.stride(0), dmout.stride(1), dmlow.stride(0), dmlow.stride(1),
            dmlow2.stride(0), dmlow2.stride(1), keep.stride(0),
            gates.stride(0), gates.stride(1), deter.stride(0), deter.stride(1),
            BLOCK=_GRU_BLOCK, KEEP=masked, num_warps=warps(_GRU_BLOCK))
    return dgates, ddeter


def _gru_cell_fwd_fake(gates, bias, deter, blocks, dtype, tail):
    return tuple(_gru_cell_outputs(deter, dtype, 2, tail))


@kernel_op("gru_cell", _gru_cell_fwd_fake)
def _gru_cell_fwd(gates: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor, blocks: int,
                  dtype: torch.dtype, tail: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return _gru_cell_launch(gates, bias, deter, None, tail,
                            _gru_cell_outputs(deter, dtype, 2, tail), blocks)


def _gru_cell_keep_fake(gates, bias, deter, keep, blocks, dtype, tail):
    return tuple(_gru_cell_outputs(deter, dtype, 5, tail))


@kernel_op("gru_cell_keep", _gru_cell_keep_fake)
def _gru_cell_keep_fwd(gates: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor,
                       keep: torch.Tensor, blocks: int, dtype: torch.dtype,
                       tail: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    return _gru_cell_launch(gates, bias, deter, keep, tail,
                            _gru_cell_outputs(deter, dtype, 5, tail), blocks)


def _gru_cell_bwd_fake(dout, dlow, gates, bias, deter, blocks):
    return gates.new_empty(gates.shape), deter.new_empty(deter.shape)


@kernel_op("gru_cell_bwd", _gru_cell_bwd_fake)
def _gru_cell_bwd(dout: torch.Tensor, dlow: torch.Tensor, gates: torch.Tensor,
                  bias: torch.Tensor, deter: torch.Tensor,
                  blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _gru_cell_bwd_launch((dout, dlow), None, gates, bias, deter, blocks)


def _gru_cell_keep_bwd_fake(dout, dlow, dmout, dmlow, dmlow2, keep, gates, bias, deter,
                            blocks):
    return gates.new_empty(gates.shape), deter.new_empty(deter.shape)


@kernel_op("gru_cell_keep_bwd", _gru_cell_keep_bwd_fake)
def _gru_cell_keep_bwd(dout: torch.Tensor, dlow: torch.Tensor, dmout: torch.Tensor,
                       dmlow: torch.Tensor, dmlow2: torch.Tensor, keep: torch.Tensor,
                       gates: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor,
                       blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _gru_cell_bwd_launch((dout, dlow, dmout, dmlow, dmlow2), keep, gates, bias, deter,
                                blocks)


def _gru_cell_setup(ctx, inputs, output):
    gates, bias, deter, blocks, dtype, tail = inputs
    ctx.save_for_backward(gates, bias, deter)
    ctx.blocks, ctx.tail_dtype = blocks, None if tail is None else tail.dtype


def _gru_cell_keep_setup(ctx, inputs, output):
    gates, bias, deter, keep, blocks, dtype, tail = inputs
    ctx.save_for_backward(gates, bias, deter, keep)
    ctx.blocks, ctx.tail_dtype = blocks, None if tail is None else tail.dtype


def _bias_grad(ctx, dgates, bias):
    if not ctx.needs_input_grad[1]:
        return None
    return dgates.reshape(-1, dgates.shape[-1]).sum(0).to(bias.dtype)


def _split_tail(ctx, grads, deter):
    """Zeros for the outputs without a gradient; the second output's gradient split into the
    state's columns (a view the kernel reads with its strides) and the tail's."""
    grads = list(grads)
    dtail = None
    if ctx.tail_dtype is not None and grads[1] is not None:
        D = deter.shape[1]
        grads[1], dtail = grads[1][:, :D], grads[1][:, D:].to(ctx.tail_dtype)
    return [torch.zeros_like(deter) if g is None else g for g in grads], dtail


def _gru_cell_backward(ctx, *grads):
    gates, bias, deter = ctx.saved_tensors
    grads, dtail = _split_tail(ctx, grads, deter)
    dgates, ddeter = _gru_cell_bwd(*grads, gates, bias, deter, ctx.blocks)
    return dgates, _bias_grad(ctx, dgates, bias), ddeter, None, None, dtail


def _gru_cell_keep_backward(ctx, *grads):
    gates, bias, deter, keep = ctx.saved_tensors
    grads, dtail = _split_tail(ctx, grads, deter)
    dgates, ddeter = _gru_cell_keep_bwd(*grads, keep, gates, bias, deter, ctx.blocks)
    return dgates, _bias_grad(ctx, dgates, bias), ddeter, None, None, None, dtail


_gru_cell_fwd.register_autograd(_gru_cell_backward, setup_context=_gru_cell_setup)
_gru_cell_keep_fwd.register_autograd(_gru_cell_keep_backward, setup_context=_gru_cell_keep_setup)


def gru_cell(gates: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor, blocks: int,
             dtype: torch.dtype, keep: torch.Tensor | None = None,
             tail: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """gru_cell_ref in one Triton launch each way: the GRU layer's bias, the gate math, the
    state update and the state's copy in the matmul dtype (with keep, also the copies
    masked for the next step, the matmul-dtype one twice; with tail, the matmul-dtype copy
    extended by tail's columns: the posterior's input); the outputs' gradients are summed
    inside the backward kernel. gates (..., 3D) and deter (..., D) of any strides; the
    outputs contiguous. A bias
    gradient, when asked for, costs one extra sum."""
    D = deter.shape[-1]
    if (gates.shape[-1] != 3 * D or D % blocks or gates.shape[:-1] != deter.shape[:-1]
            or bias.shape != (3 * D,)):
        raise ValueError(f"gru_cell: gates {tuple(gates.shape)}, bias {tuple(bias.shape)} and "
                         f"deter {tuple(deter.shape)} do not fit blocks={blocks} (need (..., "
                         "3D), (3D,), (..., D), D % blocks == 0)")
    args = gates.reshape(-1, 3 * D), bias.contiguous(), deter.reshape(-1, D)
    if tail is not None:
        if tail.shape[:-1] != deter.shape[:-1]:
            raise ValueError(f"gru_cell: tail {tuple(tail.shape)} needs the rows of deter "
                             f"{tuple(deter.shape)}")
        tail = tail.reshape(-1, tail.shape[-1])
    if keep is None:
        outs = _gru_cell_fwd(*args, int(blocks), dtype, tail)
    else:
        if keep.numel() != args[2].shape[0]:
            raise ValueError(f"gru_cell: keep {tuple(keep.shape)} needs one value per row of "
                             f"deter {tuple(deter.shape)}")
        outs = _gru_cell_keep_fwd(*args, keep.reshape(-1), int(blocks), dtype, tail)
    return tuple(o.reshape(*deter.shape[:-1], o.shape[-1]) for o in outs)


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


@kernel_op("mask_rows", _mask_rows_fake)
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


_mask_rows.register_autograd(_mask_rows_backward, setup_context=_mask_rows_setup)


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
