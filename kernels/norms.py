"""RMSNorm + SiLU, the chain after every projection: one op, its concatenating form (the
RSSM core's input embeddings) and its summing form (a layer applied in two halves).

The GEMMs stay in cuBLAS; these are the chains between them. Each public op has a
`<name>_ref` beside it with the identical signature: the plain-PyTorch math, used on CPU.
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

from .launch import differentiable, kernel_op, launch, max_programs, row_tiling


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


# ------------------------------------------------------------------------------- rms_silu

@triton.jit
def _rms_silu_tile(x, scale_ptr, c, C, eps):
    """silu(x * scale / sqrt(mean(x^2) + eps)) of a float32 tile of rows (c: its columns)."""
    scale = tl.load(scale_ptr + c, mask=c < C, other=0.0).to(tl.float32)
    a = x * tl.rsqrt(tl.sum(x * x, 1) / C + eps)[:, None] * scale
    return a * tl.sigmoid(a)


@triton.jit
def _group_rows(R, tiles, BLOCK_R: tl.constexpr):
    """This program's row tile when the rows form groups of R (one scale row per group, e.g.
    packed seeds), `tiles` programs per group: (group, rows (BLOCK_R, 1), their end)."""
    pid = tl.program_id(0)
    g = pid // tiles
    r = g * R + (pid % tiles) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    return g, r, (g + 1) * R


@triton.jit
def _rms_silu_fwd_kernel(x_ptr, scale_ptr, y_ptr, R, C, tiles, sx_r, sx_c, eps,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows in groups of R, each group with its scale row (one group: R = all rows)."""
    g, r, end = _group_rows(R, tiles, BLOCK_R)
    c = tl.arange(0, BLOCK_C)[None, :]
    mask = (r < end) & (c < C)
    r = r.to(tl.int64)
    x = tl.load(x_ptr + r * sx_r + c * sx_c, mask=mask, other=0.0).to(tl.float32)
    y = _rms_silu_tile(x, scale_ptr + g * C, c, C, eps)
    tl.store(y_ptr + r * C + c, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_silu_bwd_rows(dy_ptr, x_ptr, s_ptr, dx_ptr, ds_ptr, R, C, tiles, programs, sdy_r,
                       sdy_c, sx_r, sx_c, sdx_r, off, eps, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """rms_silu's backward over this program's `tiles` row tiles: dx (row stride sdx_r) from
    dy's columns off.. (one part of a concatenated output, or all of it with off 0), and the
    program's partial dscale row written at ds_ptr + off. The rows form groups of R, each
    with its scale row (C values) and `programs` programs (one group: R is every row)."""
    pid = tl.program_id(0)
    g = pid // programs
    pid = pid % programs
    start = g * R
    end = start + R
    c = tl.arange(0, BLOCK_C)[None, :]
    scale = tl.load(s_ptr + g * C + c, mask=c < C, other=0.0).to(tl.float32)
    dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(tiles):
        r = start + (pid * tiles + i) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        mask = (r < end) & (c < C)
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
def _rms_silu_bwd_kernel(dy_ptr, x_ptr, scale_ptr, dx_ptr, dscale_ptr, R, C, tiles, programs,
                         sdy_r, sdy_c, sx_r, sx_c, eps,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows in groups of R with `programs` programs each; each program loops over `tiles` row
    tiles of its group and writes its partial dscale row."""
    _rms_silu_bwd_rows(dy_ptr, x_ptr, scale_ptr, dx_ptr, dscale_ptr + tl.program_id(0) * C,
                       R, C, tiles, programs, sdy_r, sdy_c, sx_r, sx_c, C, 0, eps, BLOCK_R,
                       BLOCK_C)


def _rms_silu_fwd_fake(x, scale, eps):
    return x.new_empty(x.shape)


def _groups(rows: int, scale: torch.Tensor) -> tuple[int, int]:
    """(G, R): scale (C,) is one group of all rows; scale (G, C) gives each group of R =
    rows / G consecutive rows its own scale row (packed seeds fold their rows: launch.py)."""
    G = 1 if scale.dim() == 1 else scale.shape[0]
    if rows % G:
        raise ValueError(f"rms_silu: {rows} rows do not split into {G} scale groups")
    return G, rows // G


@kernel_op("rms_silu", _rms_silu_fwd_fake, fold=True, grouped=("scale",))
def _rms_silu_fwd(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    rows, C = x.shape
    y = torch.empty((rows, C), dtype=x.dtype, device=x.device)
    if rows:
        G, R = _groups(rows, scale)
        block_r, block_c, num_warps = row_tiling(R, C)
        tiles = triton.cdiv(R, block_r)
        launch(_rms_silu_fwd_kernel)[(G * tiles,)](
            x, scale, y, R, C, tiles, x.stride(0), x.stride(1), eps,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return y


def _rms_silu_bwd_fake(dy, x, scale, eps):
    return x.new_empty(x.shape), scale.new_empty(scale.shape)


@kernel_op("rms_silu_bwd", _rms_silu_bwd_fake, fold=True, grouped=("scale",),
           grouped_out=(1,))
def _rms_silu_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dscale); scale (G, C) (rows in G groups): dscale (G, C), each group's own."""
    rows, C = x.shape
    G, R = _groups(rows, scale)
    dx = torch.empty((rows, C), dtype=x.dtype, device=x.device)
    block_r, block_c, num_warps = row_tiling(R, C)
    programs = max(1, min(triton.cdiv(R, block_r), max_programs(x.device) // G))
    tiles = triton.cdiv(triton.cdiv(R, block_r), programs)
    partial = torch.empty((G * programs, C), dtype=torch.float32, device=x.device)
    launch(_rms_silu_bwd_kernel)[(G * programs,)](
        dy, x, scale, dx, partial, R, C, tiles, programs, dy.stride(0), dy.stride(1),
        x.stride(0), x.stride(1), eps, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    if G == 1:
        dscale = partial.sum(0) if programs > 1 else partial.view(C)
    else:
        dscale = partial.view(G, programs, C).sum(1) if programs > 1 else partial
    return dx, dscale.view(scale.shape).to(scale.dtype)


def _rms_silu_setup(ctx, inputs, output):
    x, scale, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps


def _rms_silu_backward(ctx, dy):
    x, scale = ctx.saved_tensors
    dx, dscale = _rms_silu_bwd(dy, x, scale, ctx.eps)
    return dx, dscale, None


_rms_silu_fwd = differentiable(_rms_silu_fwd, _rms_silu_backward, _rms_silu_setup)


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
                             programs, sdy_r, sdy_c, sa_r, sa_c, sb_r, sb_c, sc_r, sc_c, sda_r,
                             sdb_r, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (i, part): rows tiles i*tiles.. of part 0, 1 or 2 (2 only when c was
    normalised: the grid then has 3 parts); each writes its partial dscale row."""
    pid, part = tl.program_id(0), tl.program_id(1)
    ds_ptr = partial_ptr + pid * (Ca + Cb + Cc)
    if part == 0:
        _rms_silu_bwd_rows(dy_ptr, a_ptr, sa_ptr, da_ptr, ds_ptr, rows, Ca, tiles, programs,
                           sdy_r, sdy_c, sa_r, sa_c, sda_r, 0, eps, BLOCK_R, BLOCK_C)
    elif part == 1:
        _rms_silu_bwd_rows(dy_ptr, b_ptr, sb_ptr, db_ptr, ds_ptr, rows, Cb, tiles, programs,
                           sdy_r, sdy_c, sb_r, sb_c, sdb_r, Ca, eps, BLOCK_R, BLOCK_C)
    else:
        _rms_silu_bwd_rows(dy_ptr, c_ptr, sc_ptr, dc_ptr, ds_ptr, rows, Cc, tiles, programs,
                           sdy_r, sdy_c, sc_r, sc_c, Cc, Ca + Cb, eps, BLOCK_R, BLOCK_C)


def _cat_parts(a, b, sa):
    """(a, b): b None splits a's columns at len(sa) (views)."""
    return (a, b) if b is not None else (a[:, :sa.shape[0]], a[:, sa.shape[0]:])


def _rms_silu_cat_fake(a, b, c, sa, sb, sc, eps):
    return a.new_empty((a.shape[0], sa.shape[0] + sb.shape[0] + c.shape[1]))


@kernel_op("rms_silu_cat", _rms_silu_cat_fake, fold=True, shared=("sa", "sb", "sc"))
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
        Cc, tiles, programs, dy.stride(0), dy.stride(1), a.stride(0), a.stride(1), b.stride(0),
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


_rms_silu_cat_fwd = differentiable(_rms_silu_cat_fwd, _rms_silu_cat_backward,
                                   _rms_silu_cat_setup)


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
def _rms_silu_add_kernel(x_ptr, y_ptr, scale_ptr, out_ptr, R, C, tiles, sx_r, sx_c, sy_r,
                         sy_c, eps, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows in groups of R, each group with its scale row (one group: R = all rows)."""
    g, r, end = _group_rows(R, tiles, BLOCK_R)
    c = tl.arange(0, BLOCK_C)[None, :]
    mask = (r < end) & (c < C)
    r = r.to(tl.int64)
    x = tl.load(x_ptr + r * sx_r + c * sx_c, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(y_ptr + r * sy_r + c * sy_c, mask=mask, other=0.0).to(tl.float32)
    y = _rms_silu_tile(x, scale_ptr + g * C, c, C, eps)
    tl.store(out_ptr + r * C + c, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rms_silu_add_fake(x, y, scale, eps):
    return x.new_empty(x.shape)


@kernel_op("rms_silu_add", _rms_silu_add_fake, fold=True, grouped=("scale",))
def _rms_silu_add_fwd(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                      eps: float) -> torch.Tensor:
    rows, C = x.shape
    out = torch.empty((rows, C), dtype=x.dtype, device=x.device)
    if rows:
        G, R = _groups(rows, scale)
        block_r, block_c, num_warps = row_tiling(R, C)
        tiles = triton.cdiv(R, block_r)
        launch(_rms_silu_add_kernel)[(G * tiles,)](
            x, y, scale, out, R, C, tiles, x.stride(0), x.stride(1), y.stride(0),
            y.stride(1), eps, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
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


_rms_silu_add_fwd = differentiable(_rms_silu_add_fwd, _rms_silu_add_backward,
                                   _rms_silu_add_setup)


def rms_silu_add(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                 eps: float = 1e-4) -> torch.Tensor:
    """rms_silu_add_ref in one Triton launch: the sum and the norm. x, y: (..., C) of any
    strides (e.g. column slices of two matmuls' outputs); returns x.dtype, contiguous."""
    if x.shape != y.shape:
        raise ValueError(f"rms_silu_add: x {tuple(x.shape)} and y {tuple(y.shape)} differ")
    C = x.shape[-1]
    return _rms_silu_add_fwd(x.reshape(-1, C), y.reshape(-1, C), scale,
                             float(eps)).reshape(x.shape)
