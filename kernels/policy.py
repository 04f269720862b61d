"""The imagination rollout's continuous action sample as one kernel.

Each imagined step samples an action from the actor's bounded normal and feeds it to the
next RSSM step, scaled by 1 / max(1, |a|) and cast to the matmul dtype: eager PyTorch
launches ~13 kernels for that chain per step (tanh, sigmoid, the affine maps, the noise, the
scaling, the casts). The rollout runs without gradient (the actor's log-prob and entropy are
evaluated again over all imagined states, with gradient, afterwards), so the Triton op is
forward only. `action_sample_ref` beside it has the identical signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import kernel_op, launch


def action_sample_ref(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor,
                      minstd: float, maxstd: float, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample of the actor's bounded normal and the RSSM's input for it.

    mean, std: (N, A) pre-activations (the actor's two output layers); noise (N, A) standard
    normal. a = tanh(mean) + ((maxstd - minstd) sigmoid(std + 2) + minstd) noise, in float32
    (dists.BoundedNormal.sample with this noise); returns (a, (a / max(1, |a|)) in dtype),
    the second being what the RSSM's action embedding reads (rssm.RSSM.action_input).
    """
    loc = torch.tanh(mean.float())
    scale = (maxstd - minstd) * torch.sigmoid(std.float() + 2.0) + minstd
    action = loc + scale * noise
    return action, (action / action.abs().clamp(min=1.0)).to(dtype)


@triton.jit
def _action_sample_kernel(mean_ptr, std_ptr, noise_ptr, act_ptr, inp_ptr, N, A, s_mean,
                          s_std, s_noise, minstd, maxstd, BLOCK_N: tl.constexpr,
                          BLOCK_A: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    a = tl.arange(0, BLOCK_A)[None, :]
    mask = (n < N) & (a < A)
    n = n.to(tl.int64)
    m = tl.load(mean_ptr + n * s_mean + a, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(std_ptr + n * s_std + a, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(noise_ptr + n * s_noise + a, mask=mask, other=0.0).to(tl.float32)
    # tanh(m) = sign(m) (1 - e) / (1 + e), e = exp(-2|m|) <= 1: no overflow, exact +-1 limits.
    e2 = tl.exp(-2.0 * tl.abs(m))
    loc = (1.0 - e2) / (1.0 + e2)
    loc = tl.where(m < 0, -loc, loc)
    scale = (maxstd - minstd) * tl.sigmoid(s + 2.0) + minstd
    act = loc + scale * e
    tl.store(act_ptr + n * A + a, act, mask=mask)
    inp = act / tl.maximum(tl.abs(act), 1.0)
    tl.store(inp_ptr + n * A + a, inp.to(inp_ptr.dtype.element_ty), mask=mask)


def _action_sample_fake(mean, std, noise, minstd, maxstd, dtype):
    return (mean.new_empty(mean.shape, dtype=torch.float32),
            mean.new_empty(mean.shape, dtype=dtype))


@kernel_op("action_sample", _action_sample_fake, fold=True)
def _action_sample(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor, minstd: float,
                   maxstd: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    N, A = mean.shape
    act = torch.empty((N, A), dtype=torch.float32, device=mean.device)
    inp = torch.empty((N, A), dtype=dtype, device=mean.device)
    if N and A:
        block_a = triton.next_power_of_2(A)
        block_n = max(1, min(4096 // block_a, triton.next_power_of_2(N)))
        launch(_action_sample_kernel)[(triton.cdiv(N, block_n),)](
            mean, std, noise, act, inp, N, A, mean.stride(0), std.stride(0), noise.stride(0),
            minstd, maxstd, BLOCK_N=block_n, BLOCK_A=block_a, num_warps=4)
    return act, inp


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def action_sample(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor, minstd: float,
                  maxstd: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """action_sample_ref in one Triton launch; same arguments, (N, A) inputs of any row
    stride (e.g. the two halves of one (N, 2A) output).

    Forward only: an input that requires grad (with grad enabled) is refused, since the
    kernel has no backward (the rollout samples without gradient).
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (mean, std, noise)):
        raise ValueError("action_sample (Triton) has no backward; pass detached inputs or "
                         "use action_sample_ref")
    if mean.dim() != 2 or std.shape != mean.shape or noise.shape != mean.shape:
        raise ValueError(f"action_sample: mean, std and noise must all be (N, A); got "
                         f"{[tuple(x.shape) for x in (mean, std, noise)]}")
    return _action_sample(_unit_rows(mean), _unit_rows(std), _unit_rows(noise), float(minstd),
                          float(maxstd), dtype)
