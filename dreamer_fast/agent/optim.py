"""AGC -> LaProp -> momentum -> warmed-up lr, capturable: all state on the device.

Step count and learning rate are device tensors updated by foreach ops, with no host sync
and no data-dependent Python control flow, so a CUDA graph can capture `step` unchanged.
"""

from __future__ import annotations

import torch

from dreamer_fast.config import OptimConfig


class LaProp:
    """One optimizer over a list of parameters.

    Per step t (from 1): g <- g * min(1, agc * max(pmin, |p|) / |g|) (per tensor);
    nu <- b2 nu + (1 - b2) g^2; u = g / (sqrt(nu / (1 - b2^t)) + eps);
    mu <- m mu + (1 - m) u; p <- p - lr * lr_scale * min(1, t / warmup) * mu / (1 - m^t).
    lr_scale is sqrt(world size) under data parallel, 1 otherwise; a Python
    float read on every step, so set it before a CUDA graph captures `step`.

    seeds N > 0: every tensor holds N independent seeds' parameters stacked on dim 0 (packed
    seeds, agent/packed.py); the clipping norms are then taken per seed, so no seed's
    gradients touch another's update, and the metrics are (N,) per seed. The step count is
    shared (packed seeds step together).
    """

    def __init__(self, params: list[torch.nn.Parameter], cfg: OptimConfig,
                 lr_scale: float = 1.0, seeds: int = 0):
        self.params = list(params)
        self.cfg = cfg
        self.lr_scale = lr_scale
        self.seeds = seeds
        device = self.params[0].device
        self.count = torch.zeros((), dtype=torch.float32, device=device)
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.nu = [torch.zeros_like(p) for p in self.params]
        self.mu = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> dict[str, torch.Tensor]:
        """Apply one update from the params' .grad; returns 0-d metrics (no host sync)."""
        c = self.cfg
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.count.add_(1.0)
        gnorm, pnorm = self._norms(grads), self._norms(self.params)
        limit = torch._foreach_mul(torch._foreach_clamp_min(pnorm, c.pmin), c.agc)
        ratio = torch._foreach_clamp_max(torch._foreach_div(limit, gnorm), 1.0)
        grads = (torch._foreach_mul(grads, ratio) if not self.seeds else
                 [g * r for g, r in zip(grads, ratio)])  # (N, 1, ...) per seed
        torch._foreach_mul_(self.nu, c.beta2)
        torch._foreach_addcmul_(self.nu, grads, grads, 1.0 - c.beta2)
        nu_corr = 1.0 - torch.pow(c.beta2, self.count)
        denom = torch._foreach_sqrt(torch._foreach_div(self.nu, nu_corr))
        torch._foreach_add_(denom, c.eps)
        updates = torch._foreach_div(grads, denom)
        torch._foreach_mul_(self.mu, c.momentum)
        torch._foreach_add_(self.mu, updates, alpha=1.0 - c.momentum)
        mu_corr = 1.0 - torch.pow(c.momentum, self.count)
        warm = (self.count / c.warmup).clamp(max=1.0) if c.warmup else torch.ones_like(self.count)
        self.lr.copy_(c.lr * self.lr_scale * warm)
        torch._foreach_add_(self.params, torch._foreach_mul(self.mu, -self.lr / mu_corr))
        if self.seeds:
            gnorm, ratio = [g.flatten() for g in gnorm], [r.flatten() for r in ratio]
            return {"opt/grad_norm": torch.linalg.vector_norm(torch.stack(gnorm), dim=0),
                    "opt/lr": self.lr.expand(self.seeds).clone(),
                    "opt/clipped": (torch.stack(ratio) < 1).float().mean(0)}
        return {"opt/grad_norm": torch.linalg.vector_norm(torch.stack(gnorm)),
                "opt/lr": self.lr.clone(), "opt/clipped": (torch.stack(ratio) < 1).float().mean()}

    def _norms(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor's norm (0-d), or with seeds each seed's norm (N, 1, ...)."""
        if not self.seeds:
            return torch._foreach_norm(tensors)
        return [t.abs() if t.ndim == 1 else  # a stacked scalar (dim=() would reduce all)
                torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)
                for t in tensors]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"count": self.count, "nu": self.nu, "mu": self.mu}

    def load_state_dict(self, state: dict) -> None:
        if len(state["nu"]) != len(self.params) or any(
                a.shape != p.shape for a, p in zip(state["nu"], self.params)):
            raise ValueError("optimizer state does not match the model's parameters "
                             "(different model size or observation/action space)")
        self.count.copy_(state["count"])
        for dst, src in zip(self.nu + self.mu, state["nu"] + state["mu"]):
            dst.copy_(src)
