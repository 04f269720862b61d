"""LaProp + AGC against a float64 step-by-step reference of SPEC 3's formulas."""

from __future__ import annotations

import torch

from dreamer_fast.config import OptimConfig
from dreamer_fast.agent.optim import LaProp


def _reference(params, grads_per_step, cfg):
    """Plain float64 loop over tensors, written from SPEC 3."""
    p = [x.double().clone() for x in params]
    nu = [torch.zeros_like(x) for x in p]
    mu = [torch.zeros_like(x) for x in p]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.double()
            limit = cfg.agc * max(cfg.pmin, p[i].norm().item())
            g = g * min(1.0, limit / g.norm().item())
            nu[i] = cfg.beta2 * nu[i] + (1 - cfg.beta2) * g * g
            u = g / ((nu[i] / (1 - cfg.beta2 ** t)).sqrt() + cfg.eps)
            mu[i] = cfg.momentum * mu[i] + (1 - cfg.momentum) * u
            lr = cfg.lr * min(1.0, t / cfg.warmup)
            p[i] = p[i] - lr * mu[i] / (1 - cfg.momentum ** t)
    return p


def test_laprop_matches_float64_reference():
    torch.manual_seed(0)
    cfg = OptimConfig(lr=1e-2, warmup=3)
    shapes = [(5, 4), (7,), (1,), (3, 2, 2)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    params[2].data.zero_()  # exercises the pmin floor of AGC
    init = [p.detach().clone() for p in params]
    steps = [[torch.randn(s) * (10.0 if i == 0 else 0.01) for i, s in enumerate(shapes)]
             for _ in range(6)]
    opt = LaProp(params, cfg)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        metrics = opt.step()
    want = _reference(init, steps, cfg)
    for got, ref, start in zip(params, want, init):
        moved, ref_moved = got.detach().double() - start.double(), ref - start.double()
        # float32 state vs float64 reference: the displacement agrees to ~1e-5 relative.
        assert (moved - ref_moved).norm() <= 1e-4 * ref_moved.norm(), (moved, ref_moved)
    assert opt.count.item() == 6 and torch.allclose(opt.lr, torch.tensor(1e-2))
    assert metrics["opt/clipped"] > 0  # the large gradients were clipped


def test_warmup_and_state_on_device_tensors():
    p = torch.nn.Parameter(torch.ones(3))
    opt = LaProp([p], OptimConfig(lr=1.0, warmup=4))
    for t in range(1, 6):
        p.grad = torch.ones(3)
        opt.step()
        assert torch.allclose(opt.lr, torch.tensor(min(1.0, t / 4)))
    assert isinstance(opt.count, torch.Tensor) and isinstance(opt.lr, torch.Tensor)
    state = opt.state_dict()
    other = LaProp([torch.nn.Parameter(torch.ones(3))], OptimConfig(lr=1.0, warmup=4))
    other.load_state_dict(state)
    assert other.count.item() == 5
