"""The block GRU's gate math and state update (`gru_update`), and the cell that also adds the
GRU layer's bias and writes the new state's copies its readers need (`gru_cell`), each beside
its `<name>_ref` with the identical signature. One launch each way replaces the ~10 / ~20 of
eager PyTorch; the backward recomputes the gates from the saved inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import differentiable, kernel_op, launch, warps

from .norms import _upcast


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
def _gru_grads(dout, r, c_in, u, h, dgates_ptr, ddeter_ptr, row, j, gj, D, Dg, mask):
    """Store the gate and state gradients of out = u * tanh(r * c_in) + (1 - u) * h, given
    d out (both GRU backward kernels: gru_update's and gru_cell's)."""
    c = _tanh(r * c_in)
    dpre = dout * u * (1.0 - c * c)  # gradient of the tanh's input r * c_in
    dg = dgates_ptr + row * 3 * D + gj
    ty = dgates_ptr.dtype.element_ty
    tl.store(dg, (dpre * c_in * r * (1.0 - r)).to(ty), mask=mask)
    tl.store(dg + Dg, (dpre * r).to(ty), mask=mask)
    tl.store(dg + 2 * Dg, (dout * (c - h) * u * (1.0 - u)).to(ty), mask=mask)
    tl.store(ddeter_ptr + row * D + j, (dout * (1.0 - u)).to(ddeter_ptr.dtype.element_ty),
             mask=mask)


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
    _gru_grads(dout, r, c_in, u, h, dgates_ptr, ddeter_ptr, row, j, gj, D, Dg, mask)


_GRU_BLOCK = 1024


def _gru_fwd_fake(gates, deter, blocks):
    return deter.new_empty(deter.shape)


@kernel_op("gru_update", _gru_fwd_fake, fold=True)
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


@kernel_op("gru_update_bwd", _gru_bwd_fake, fold=True)
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


_gru_fwd = differentiable(_gru_fwd, _gru_backward, _gru_setup)


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
    _gru_grads(dout, r, c_in, u, h, dgates_ptr, ddeter_ptr, row, j, gj, D, Dg, mask)


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


@kernel_op("gru_cell", _gru_cell_fwd_fake, fold=True, shared=("bias",))
def _gru_cell_fwd(gates: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor, blocks: int,
                  dtype: torch.dtype, tail: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    return _gru_cell_launch(gates, bias, deter, None, tail,
                            _gru_cell_outputs(deter, dtype, 2, tail), blocks)


def _gru_cell_keep_fake(gates, bias, deter, keep, blocks, dtype, tail):
    return tuple(_gru_cell_outputs(deter, dtype, 5, tail))


@kernel_op("gru_cell_keep", _gru_cell_keep_fake, fold=True, shared=("bias",))
def _gru_cell_keep_fwd(gates: torch.Tensor, bias: torch.Tensor, deter: torch.Tensor,
                       keep: torch.Tensor, blocks: int, dtype: torch.dtype,
                       tail: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    return _gru_cell_launch(gates, bias, deter, keep, tail,
                            _gru_cell_outputs(deter, dtype, 5, tail), blocks)


def _gru_cell_bwd_fake(dout, dlow, gates, bias, deter, blocks):
    return gates.new_empty(gates.shape), deter.new_empty(deter.shape)


@kernel_op("gru_cell_bwd", _gru_cell_bwd_fake, fold=True, shared=("bias",))
def _gru_cell_bwd(dout: torch.Tensor, dlow: torch.Tensor, gates: torch.Tensor,
                  bias: torch.Tensor, deter: torch.Tensor,
                  blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _gru_cell_bwd_launch((dout, dlow), None, gates, bias, deter, blocks)


def _gru_cell_keep_bwd_fake(dout, dlow, dmout, dmlow, dmlow2, keep, gates, bias, deter,
                            blocks):
    return gates.new_empty(gates.shape), deter.new_empty(deter.shape)


@kernel_op("gru_cell_keep_bwd", _gru_cell_keep_bwd_fake, fold=True, shared=("bias",))
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


_gru_cell_fwd = differentiable(_gru_cell_fwd, _gru_cell_backward, _gru_cell_setup)
_gru_cell_keep_fwd = differentiable(_gru_cell_keep_fwd, _gru_cell_keep_backward,
                                   _gru_cell_keep_setup)


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
