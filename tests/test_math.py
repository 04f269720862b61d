"""Hand-checked values for the algorithm's math: symlog, twohot, KL, lambda-returns and the
return normaliser (Hafner et al. 2025; danijar/dreamerv3)."""

from __future__ import annotations

import math

import pytest
import torch

from dreamer_fast.agent.dists import BoundedNormal, OneHotCategorical, symexp, symlog
from dreamer_fast.agent.losses import lambda_return, percentile_scale
from dreamer_fast.kernels.categorical import latent_sample_ref, unimix_logprobs
from dreamer_fast.kernels.kl import kl_free_ref
from dreamer_fast.kernels.twohot import symexp_bins, twohot_loss_ref, twohot_mean_ref

E1 = math.e - 1


def test_symlog_symexp():
    x = torch.tensor([0.0, E1, -E1, math.e ** 3 - 1])
    assert torch.allclose(symlog(x), torch.tensor([0.0, 1.0, -1.0, 3.0]))
    y = torch.linspace(-30, 30, 101, dtype=torch.float64)
    assert torch.allclose(symlog(symexp(y)), y)


def test_bins_symmetric_with_zero():
    bins = symexp_bins(255)
    assert bins[127] == 0 and torch.equal(bins, -bins.flip(0))
    assert torch.allclose(bins[128].double(), torch.tensor(math.expm1(20 / 127), dtype=torch.float64))
    assert abs(bins[-1].item() - math.expm1(20)) / math.expm1(20) < 1e-6


def test_twohot_zero_head_predicts_exactly_zero():
    assert torch.equal(twohot_mean_ref(torch.zeros(4, 255)), torch.zeros(4))


def test_twohot_loss_hand_values():
    bins = symexp_bins(255)
    logits = torch.randn(3, 255)
    logp = torch.log_softmax(logits, -1)
    # On a bin: all weight there. Between bins 127 (=0) and 128: linear in raw space.
    mid = bins[128] * 0.25
    target = torch.tensor([bins[130].item(), mid.item(), 0.0])
    loss = twohot_loss_ref(logits, target)
    assert torch.allclose(loss[0], -logp[0, 130], atol=1e-5)
    assert torch.allclose(loss[1], -(0.75 * logp[1, 127] + 0.25 * logp[1, 128]), atol=1e-5)
    assert torch.allclose(loss[2], -logp[2, 127], atol=1e-5)


def test_twohot_targets_beyond_end_bins():
    logits = torch.randn(2, 255)
    logp = torch.log_softmax(logits, -1)
    loss = twohot_loss_ref(logits, torch.tensor([1e12, -1e12]))
    assert torch.allclose(loss, torch.stack([-logp[0, -1], -logp[1, 0]]), atol=1e-5)


@pytest.mark.parametrize("value", [0.3, -7.0, 123.4, -5000.0, 2.5e6])
def test_twohot_round_trip_within_bin_resolution(value):
    bins = symexp_bins(255)
    k = int((bins <= value).sum()) - 1
    # Logits that put the twohot target weights on the two neighbours (and ~0 elsewhere).
    w_hi = (value - bins[k]) / (bins[k + 1] - bins[k])
    logits = torch.full((255,), -1e4)
    logits[k], logits[k + 1] = torch.log(1 - w_hi), torch.log(w_hi)
    pred = twohot_mean_ref(logits[None])[0]
    assert abs(pred - value) <= 1e-4 * (bins[k + 1] - bins[k]) + 1e-6 * abs(value)
    # And the loss is minimal (equal to the target entropy) at exactly those weights.
    loss = twohot_loss_ref(logits[None], torch.tensor([value]))[0]
    ent = -(w_hi * torch.log(w_hi) + (1 - w_hi) * torch.log(1 - w_hi))
    assert torch.allclose(loss, ent, atol=1e-4)


def test_unimix_probabilities():
    logits = torch.tensor([[0.0, -1e9, -1e9, -1e9]])
    probs = unimix_logprobs(logits, 0.01).exp()
    assert torch.allclose(probs, torch.tensor([[0.9925, 0.0025, 0.0025, 0.0025]]))
    dist = OneHotCategorical(logits, 0.01)
    assert torch.allclose(dist.probs, probs)
    assert torch.allclose(dist.entropy(), -(probs * probs.log()).sum(-1))


def test_straight_through_sample():
    logits = torch.randn(3, 4, 5, requires_grad=True)
    noise = torch.tensor([[0.0, 0.5, 0.999, 0.3]] * 3)
    z = latent_sample_ref(logits, 0.01, noise)
    probs = unimix_logprobs(logits, 0.01).exp()
    cdf = probs.cumsum(-1)
    index = (cdf <= noise[..., None]).sum(-1)
    assert torch.equal(z.detach(), torch.nn.functional.one_hot(index, 5).float())
    up = torch.randn_like(z)
    g1, = torch.autograd.grad((z * up).sum(), logits)
    g2, = torch.autograd.grad((probs * up).sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_kl_free_bits_on_summed_kl():
    # Two groups, K = 2, no unimix: KL(q || p) per group, summed, then max(free, .).
    q = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]]).log().requires_grad_()
    p = torch.tensor([[[0.5, 0.5], [0.2, 0.8]]]).log().requires_grad_()
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))
    want = kl([0.9, 0.1], [0.5, 0.5]) + kl([0.5, 0.5], [0.2, 0.8])
    dyn, rep = kl_free_ref(q, p, 0.0, 0.1)
    assert torch.allclose(dyn, torch.tensor([want])) and torch.allclose(rep, dyn)
    gq_dyn, gp_dyn = torch.autograd.grad(dyn.sum(), (q, p), retain_graph=True, allow_unused=True)
    gq_rep, gp_rep = torch.autograd.grad(rep.sum(), (q, p), allow_unused=True)
    assert (gq_dyn is None or gq_dyn.abs().max() == 0) and gp_dyn.abs().max() > 0
    assert (gp_rep is None or gp_rep.abs().max() == 0) and gq_rep.abs().max() > 0
    # Below the free bits the loss is the constant and there is no gradient at all.
    dyn, rep = kl_free_ref(q, p, 0.0, 1.0)
    assert torch.equal(dyn, torch.tensor([1.0]))
    g, = torch.autograd.grad(rep.sum(), q)
    assert g.abs().max() == 0


def _lambda_loop(last, term, rew, boot, disc, lam):
    """Independent plain-Python definition: G_t = r_{t+1} + g_{t+1}((1-l)v_{t+1} + l G_{t+1})."""
    N, L = len(rew), len(rew[0])
    out = [[0.0] * (L - 1) for _ in range(N)]
    for n in range(N):
        G = boot[n][L - 1]
        for t in range(L - 2, -1, -1):
            g = disc * (1 - term[n][t + 1])
            lam_t = lam * (1 - last[n][t + 1])
            G = rew[n][t + 1] + g * ((1 - lam_t) * boot[n][t + 1] + lam_t * G)
            out[n][t] = G
    return out


def test_lambda_return_against_loop():
    torch.manual_seed(0)
    N, L = 5, 9
    last = (torch.rand(N, L) < 0.2).float()
    term = last * (torch.rand(N, L) < 0.5).float()
    rew, boot = torch.randn(N, L), torch.randn(N, L)
    got = lambda_return(last, term, rew, boot, 0.997, 0.95)
    want = _lambda_loop(last.tolist(), term.tolist(), rew.tolist(), boot.tolist(), 0.997, 0.95)
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def test_lambda_return_hand_values():
    rew = torch.tensor([[0.0, 1.0, 2.0]])
    boot = torch.tensor([[0.0, 10.0, 20.0]])
    zero = torch.zeros(1, 3)
    # lambda = 0: one-step TD targets r_{t+1} + g v_{t+1}.
    assert torch.allclose(lambda_return(zero, zero, rew, boot, 0.5, 0.0),
                          torch.tensor([[1 + 0.5 * 10, 2 + 0.5 * 20]]))
    # lambda = 1: discounted sum plus the bootstrap at the end.
    assert torch.allclose(lambda_return(zero, zero, rew, boot, 0.5, 1.0),
                          torch.tensor([[1 + 0.5 * (2 + 0.5 * 20), 2 + 0.5 * 20]]))
    # A terminal at t=2 cuts the bootstrap.
    term = torch.tensor([[0.0, 0.0, 1.0]])
    assert torch.allclose(lambda_return(zero, term, rew, boot, 0.5, 1.0),
                          torch.tensor([[1 + 0.5 * 2, 2.0]]))


def test_percentile_normaliser():
    lo, hi = torch.zeros(()), torch.zeros(())
    ret = torch.arange(101.0)  # p5 = 5, p95 = 95
    scale = percentile_scale(ret, lo, hi, 0.01, torch.tensor([0.05, 0.95]), 1.0)
    # Updated before use: lo = 0.05, hi = 0.95, so the scale is clipped at the limit 1.
    assert torch.allclose(lo, torch.tensor(0.05)) and torch.allclose(hi, torch.tensor(0.95))
    assert scale == 1.0
    for _ in range(2000):
        scale = percentile_scale(ret, lo, hi, 0.01, torch.tensor([0.05, 0.95]), 1.0)
    assert torch.allclose(scale, torch.tensor(90.0), rtol=1e-3)


def test_bounded_normal():
    mean, std = torch.zeros(2, 3), torch.zeros(2, 3)
    dist = BoundedNormal(mean, std, 0.1, 1.0)
    want_std = 0.9 * torch.sigmoid(torch.tensor(2.0)) + 0.1  # ~0.89 at init
    assert torch.allclose(dist.std, want_std.expand(2, 3))
    a = torch.randn(2, 3)
    ref = torch.distributions.Normal(dist.mean, dist.std)
    assert torch.allclose(dist.log_prob(a), ref.log_prob(a).sum(-1), atol=1e-5)
    assert torch.allclose(dist.entropy(), ref.entropy().sum(-1), atol=1e-5)
