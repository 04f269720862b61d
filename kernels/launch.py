"""How the Triton kernels become torch ops: registration, launch grids, tile sizes.

On a GPU every op is a `torch.library.triton_op`, so torch.compile sees the kernels
and CUDA graphs capture them. Under `TRITON_INTERPRET=1` (CPU tests) `triton.jit` returns an
interpreted function that torch.compile cannot trace (it would run it on fake tensors), so there
the same function becomes an opaque `torch.library.custom_op` with an explicit fake (shape) rule.
Set DREAMER_FAST_OPAQUE_KERNELS=1 to take the opaque path on a GPU too.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
OPAQUE = INTERPRET or os.environ.get("DREAMER_FAST_OPAQUE_KERNELS") == "1"
NAMESPACE = "dreamer_fast"

# Elements per program tile. On a GPU 4096 fp32 values keep a tile in registers with 4-8 warps;
# the interpreter pays per program in Python, so it gets bigger tiles.
TILE = 1 << 14 if INTERPRET else 4096


def kernel_op(name: str, fake: Callable) -> Callable:
    """Decorator: register fn as the op `dreamer_fast::<name>` (see the module docstring).

    fake(*args) returns empty outputs of the right shapes and dtypes (used only on the opaque
    path; a triton_op derives its own by tracing fn).
    """
    def register(fn):
        qualname = f"{NAMESPACE}::{name}"
        if OPAQUE:
            op = torch.library.custom_op(qualname, mutates_args=())(fn)
            op.register_fake(fake)
        else:
            op = torch.library.triton_op(qualname, mutates_args=())(fn)
        return op
    return register


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
