"""Lambda-returns: the backward recursion over a trajectory as one kernel.

The recursion runs once per step of the trajectory, so eager PyTorch launches ~3 kernels per
step (64 steps for the replayed sequence, 15 for imagination: ~250 per update); the Triton
op runs the whole scan in one launch, one program per tile of rows, each row's steps in
registers. Returns carry no gradient in DreamerV3 (rewards, continuation and values enter
them detached), so the Triton op is forward only. `lambda_return_ref` beside it has the
identical signature.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import kernel_op, launch


def lambda_return_ref(last: torch.Tensor, term: torch.Tensor, rew: torch.Tensor,
                      boot: torch.Tensor, disc: float, lam: float) -> torch.Tensor:
    """Lambda-returns of trajectories (N, L) -> (N, L - 1).

    R_{L-1} = boot_{L-1};
    R_t = rew_{t+1} + disc (1 - term_{t+1}) [(1 - lam_{t+1}) boot_{t+1} + lam_{t+1} R_{t+1}]
    with lam_{t+1} = lam (1 - last_{t+1}). Rewards at t+1 are received on arriving at t+1.
    last, term: bool or float (a probability of termination); rew, boot: float.
    """
    live = (1.0 - term[:, 1:].float()) * disc
    cont = (1.0 - last[:, 1:].float()) * lam
    interm = rew[:, 1:] + (1.0 - cont) * live * boot[:, 1:]
    rets = [boot[:, -1]]
    for t in reversed(range(live.shape[1])):
        rets.append(interm[:, t] + live[:, t] * cont[:, t] * rets[-1])
    return torch.stack(rets[::-1][:-1], 1)


@triton.jit
def _lambda_return_kernel(last_ptr, term_ptr, rew_ptr, boot_ptr, out_ptr, N, L,
                          s_last_n, s_last_t, s_term_n, s_term_t, s_rew_n, s_rew_t,
                          s_boot_n, s_boot_t, disc, lam, BLOCK_N: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < N
    n = n.to(tl.int64)
    ret = tl.load(boot_ptr + n * s_boot_n + (L - 1) * s_boot_t, mask=mask, other=0.0)
    ret = ret.to(tl.float32)
    for j in range(L - 1):
        i = L - 1 - j  # the step whose reward, continuation and value enter R_{i-1}
        last = tl.load(last_ptr + n * s_last_n + i * s_last_t, mask=mask, other=0).to(tl.float32)
        term = tl.load(term_ptr + n * s_term_n + i * s_term_t, mask=mask, other=0).to(tl.float32)
        rew = tl.load(rew_ptr + n * s_rew_n + i * s_rew_t, mask=mask, other=0.0).to(tl.float32)
        boot = tl.load(boot_ptr + n * s_boot_n + i * s_boot_t, mask=mask, other=0.0)
        live = (1.0 - term) * disc
        cont = (1.0 - last) * lam
        interm = rew + (1.0 - cont) * live * boot.to(tl.float32)
        ret = interm + live * cont * ret
        tl.store(out_ptr + n * (L - 1) + (i - 1), ret, mask=mask)


def _lambda_return_fake(last, term, rew, boot, disc, lam):
    return rew.new_empty((rew.shape[0], rew.shape[1] - 1), dtype=torch.float32)


def _as_loadable(x: torch.Tensor) -> torch.Tensor:
    """bool as uint8 (a view, no copy): the kernel converts every input to float32."""
    return x.view(torch.uint8) if x.dtype == torch.bool else x


@kernel_op("lambda_return", _lambda_return_fake, fold=True)
def _lambda_return(last: torch.Tensor, term: torch.Tensor, rew: torch.Tensor,
                   boot: torch.Tensor, disc: float, lam: float) -> torch.Tensor:
    N, L = rew.shape
    out = torch.empty((N, L - 1), dtype=torch.float32, device=rew.device)
    if N and L > 1:
        block_n = min(1024, triton.next_power_of_2(N))
        launch(_lambda_return_kernel)[(triton.cdiv(N, block_n),)](
            last, term, rew, boot, out, N, L, last.stride(0), last.stride(1), term.stride(0),
            term.stride(1), rew.stride(0), rew.stride(1), boot.stride(0), boot.stride(1),
            disc, lam, BLOCK_N=block_n, num_warps=4)
    return out


def lambda_return(last: torch.Tensor, term: torch.Tensor, rew: torch.Tensor,
                  boot: torch.Tensor, disc: float, lam: float) -> torch.Tensor:
    """lambda_return_ref in one Triton launch; same arguments, any strides, (N, L - 1) float32.

    Forward only: an input that requires grad (with grad enabled) is refused, since the
    kernel has no backward (DreamerV3's returns are computed from detached values).
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (last, term, rew, boot)):
        raise ValueError("lambda_return (Triton) has no backward; pass detached inputs or "
                         "use lambda_return_ref")
    shape = rew.shape
    if rew.dim() != 2 or any(x.shape != shape for x in (last, term, boot)):
        raise ValueError(f"lambda_return: last, term, rew and boot must all be (N, L); got "
                         f"{[tuple(x.shape) for x in (last, term, rew, boot)]}")
    return _lambda_return(_as_loadable(last), _as_loadable(term), rew, boot, float(disc),
                          float(lam))
