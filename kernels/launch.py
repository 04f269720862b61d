"""How the Triton kernels become torch ops: registration, launch grids, tile sizes.

On a GPU every op is a `torch.library.triton_op`, so torch.compile sees the kernels
and CUDA graphs capture them. Under `TRITON_INTERPRET=1` (CPU tests) `triton.jit` returns an
interpreted function that torch.compile cannot trace (it would run it on fake tensors), so there
the same function becomes an opaque `torch.library.custom_op` with an explicit fake (shape) rule.
So it does on a machine without CUDA, where no kernel can run (a triton_op imports inductor:
about 1 s at every start). Set DREAMER_FAST_OPAQUE_KERNELS=1 to take the opaque path on a GPU
too.

Under torch.func transforms (vmap over packed seeds, grad): every op has a vmap rule, and each
differentiable op pair is also an autograd.Function in setup_context style (`differentiable`),
which torch.func requires and the op's own autograd registration is not. A row-wise op
(`fold=True`) folds the vmapped dimension into its rows: one launch for every seed; a norm
takes one scale row per seed (`grouped`). The GRU cell (its bias per seed; only the deferred
path calls it) launches once per seed.
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
from typing import Callable

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
OPAQUE = (INTERPRET or os.environ.get("DREAMER_FAST_OPAQUE_KERNELS") == "1"
          or not torch.cuda.is_available())
NAMESPACE = "dreamer_fast"

# Elements per program tile. On a GPU 4096 fp32 values keep a tile in registers with 4-8 warps;
# the interpreter pays per program in Python, so it gets bigger tiles.
TILE = 1 << 14 if INTERPRET else 4096

# How often each op ran under vmap, and how: {(name, "fold" or "loop"): calls} (tests read it).
VMAPPED: collections.Counter = collections.Counter()


def kernel_op(name: str, fake: Callable, fold: bool = False, shared: tuple[str, ...] = (),
              grouped: tuple[str, ...] = (), grouped_out: tuple[int, ...] = ()) -> Callable:
    """Decorator: register fn as the op `dreamer_fast::<name>` (see the module docstring).

    fake(*args) returns empty outputs of the right shapes and dtypes (used only on the opaque
    path; a triton_op derives its own by tracing fn). Its vmap rule: with fold, every tensor
    argument but those named in `shared` (constants such as the twohot bins) or `grouped`
    holds rows along its first axis and every output but those in `grouped_out` too, so the
    vmapped dimension folds into the rows (one launch) while the shared ones are not vmapped.
    A grouped argument is a per-row-group parameter: a vmapped (C,) one is passed as (N, C),
    the op giving each of the N groups of folded rows its own row (a grouped output, e.g.
    that parameter's gradient, comes back (N, C)). Otherwise one launch per vmapped slice.
    """
    def register(fn):
        qualname = f"{NAMESPACE}::{name}"
        if OPAQUE:
            op = torch.library.custom_op(qualname, mutates_args=())(fn)
            op.register_fake(fake)
        else:
            op = torch.library.triton_op(qualname, mutates_args=())(fn)
        names = list(inspect.signature(fn).parameters)
        spec = ({names.index(n) for n in shared}, {names.index(n) for n in grouped},
                set(grouped_out))
        op.register_vmap(functools.partial(_fold_rule if fold else _loop_rule, name, op, spec))
        return op
    return register


def _tensors(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _loop_rule(name, op, spec, info, in_dims, *args):
    """vmap rule: the op once per slice of the vmapped dimension, outputs stacked."""
    VMAPPED[name, "loop"] += 1
    outs = []
    for i in range(info.batch_size):
        outs.append(op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))))
    if isinstance(outs[0], tuple):
        stacked = tuple(torch.stack(parts) for parts in zip(*outs))
        return stacked, (0,) * len(stacked)
    return torch.stack(outs), 0


def _fold_rule(name, op, spec, info, in_dims, *args):
    """vmap rule of a row-wise op: the vmapped dimension folded into every row argument's
    rows (an unmapped one repeated), a grouped argument one row per group, one launch,
    outputs unfolded."""
    shared, grouped, grouped_out = spec
    if any(in_dims[i] is not None for i in shared) or any(
            isinstance(args[i], torch.Tensor) and args[i].dim() != 1 + (in_dims[i] is not None)
            for i in grouped):  # a shared constant vmapped, or a parameter already grouped
        return _loop_rule(name, op, spec, info, in_dims, *args)
    VMAPPED[name, "fold"] += 1
    n = info.batch_size
    folded = []
    for i, (a, d) in enumerate(zip(args, in_dims)):
        if isinstance(a, torch.Tensor) and i not in shared:
            a = a.movedim(d, 0) if d is not None else a.expand(n, *a.shape)
            if i in grouped:  # (N, C): one row per group
                a = a.contiguous()
            else:
                a = a.reshape(n * a.shape[1], *a.shape[2:])
        folded.append(a)
    out = op(*folded)
    unfolded = tuple(o if j in grouped_out else o.unflatten(0, (n, o.shape[0] // n))
                     for j, o in enumerate(_tensors(out)))
    if isinstance(out, tuple):
        return unfolded, (0,) * len(unfolded)
    return unfolded[0], 0


def differentiable(op, backward: Callable, setup_context: Callable) -> Callable:
    """Register op's autograd formula (backward, setup_context as for register_autograd) and
    return the op to call: op itself, or under a torch.func transform the same formula as a
    setup_context-style autograd.Function with a generated vmap rule (its forward and backward
    run the ops' own vmap rules)."""
    op.register_autograd(backward, setup_context=setup_context)

    def backward_once(ctx, *grads):  # no double backward: the backward ops untracked
        with torch.no_grad():
            return backward(ctx, *grads)

    function = type(f"{op._name.split('::')[-1]}_function", (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(lambda *args: op(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward_once)})

    def call(*args):
        if torch._C._are_functorch_transforms_active():
            return function.apply(*args)
        return op(*args)
    call.op = op
    return call


def launch(kernel):
    """The kernel in a form a triton_op may launch (`wrap_triton`; the kernel itself if opaque)."""
    return kernel if OPAQUE else torch.library.wrap_triton(kernel)


def row_tiling(rows: int, cols: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) for kernels that reduce over a row of `cols` values.

    A program holds BLOCK_R whole rows (BLOCK_C = next power of two >= cols), about TILE values.
    """
    block_c = triton.next_power_of_2(cols)
    block_r = max(1, min(TILE // block_c, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_c, warps(block_r * block_c)


def warps(elements: int) -> int:
    """Warps for a tile of `elements` fp32 values: about 16 values per thread, 4 to 16 warps."""
    return max(4, min(16, elements // 512))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def max_programs(device: torch.device) -> int:
    """Programs worth launching for a persistent (looping) kernel: 2 per SM; 4 when interpreted."""
    if device.type != "cuda":
        return 4
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
