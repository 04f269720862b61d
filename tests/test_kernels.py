"""Triton kernels against their references, and the agent with kernels on vs off.

Every op runs on random inputs in its valid domain; the reference is the `<name>_ref` run on
float64 copies of the same values. One backward with random upstream gradients for every
output, then outputs and every input gradient are compared by name with a per-dtype tolerance
(fp32 1e-5, bf16 1e-2, relative to the value plus the tensor's largest value). On CPU the
kernels run under TRITON_INTERPRET=1 (tests/conftest.py); on a GPU the same tests run natively.
"""

from __future__ import annotations

import os

import pytest
import torch

from dreamer_fast.data.synthetic import IMAGE, VECTOR, ActSpace, make_batch
from dreamer_fast.agent import imagine as schedules
from dreamer_fast.agent.agent import Agent
from dreamer_fast.config import SIZES, AgentConfig
from dreamer_fast.kernels import (OPS, categorical, fused, get_ops, gru, kl, norms, policy,
                                  resets, returns, twohot)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it on a CPU)")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE, dtype)


def leaves(*tensors):
    """Fresh leaves: the inputs as given (kernel) and their float64 copies (reference)."""
    return ([t.detach().clone().requires_grad_() for t in tensors],
            [t.detach().double().requires_grad_() for t in tensors])


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, scale=None) -> None:
    """|out - ref| <= tol * (|ref| + scale) elementwise, tol by out's dtype; scale defaults to
    max |ref| (an absolute floor at the tensor's magnitude). Reports the worst element."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = TOL[out.dtype]
    ref = ref.detach().double()
    err = (out.detach().double() - ref).abs()
    scale = ref.abs().max() if scale is None else scale
    bound = tol * (ref.abs() + scale)
    ratio = torch.nan_to_num(err / bound.clamp(min=1e-30), nan=float("inf"))
    if ratio.numel() and ratio.max() > 1:
        i = tuple(int(j) for j in torch.unravel_index(ratio.argmax().cpu(), ratio.shape))
        pytest.fail(f"{name} ({out.dtype}): worst index {i}: got {out[i].item():.9g}, want "
                    f"{ref[i].item():.9g}, err {err[i].item():.3g} > bound {bound[i].item():.3g}"
                    f" ({int((ratio > 1).sum())} of {ratio.numel()} elements out)")


def check(fn, ref_fn, inputs: dict, grads: tuple[str, ...], seed=1, scales=None) -> None:
    """Run fn on the inputs and ref_fn on float64 copies; backward with the same random
    upstream gradients; compare every output and the gradient of each input named in grads."""
    names = list(inputs)
    (xs, refs) = leaves(*inputs.values())
    for i, name in enumerate(names):
        if name not in grads:
            xs[i].requires_grad_(False)
            refs[i].requires_grad_(False)
    outs, ref_outs = fn(*xs), ref_fn(*refs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    ups = [randn(*o.shape, dtype=o.dtype, seed=seed + j) for j, o in enumerate(outs)]
    torch.autograd.backward(outs, ups)
    torch.autograd.backward(ref_outs, [u.double() for u in ups])
    scales = scales or {}
    for j, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert_close(f"output {j}", out, ref, scales.get(j))
    for i, name in enumerate(names):
        if name in grads:
            assert xs[i].grad is not None, f"no gradient reached {name}"
            assert xs[i].grad.dtype == xs[i].dtype, f"d{name} dtype {xs[i].grad.dtype}"
            assert_close(f"d{name}", xs[i].grad, refs[i].grad, scales.get(name))


# --------------------------------------------------------------------------------- rms_silu

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,strided", [
    ((1, 32), False), ((7, 500), False), ((63, 257), False), ((3, 21, 64), False),
    ((7, 500), True),
], ids=["rows1-C32", "rows7-C500", "rows63-C257", "lead3x21-C64", "rows7-C500-strided"])
@pytest.mark.parametrize("op", [norms.rms_silu, fused.rms_silu_fused],
                         ids=["triton", "fused"])
def test_rms_silu(op, shape, strided, dtype):
    """The Triton kernel and the CPU fast path (hand-written backward) against the reference."""
    x = randn(*shape, dtype=dtype, scale=2.0) + 0.5
    if strided:  # a transposed view: row stride 1, column stride rows
        x = randn(*shape[::-1], dtype=dtype, scale=2.0).t()
    scale = randn(shape[-1], scale=0.5, seed=2) + 1.0
    check(lambda a, b: op(a, b, 1e-4), lambda a, b: norms.rms_silu_ref(a, b, 1e-4),
          {"x": x, "scale": scale}, grads=("x", "scale"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_silu_with_a_scale_per_row_group(dtype):
    """scale (G, C): each of G groups of consecutive rows with its own scale row, and its own
    scale gradient (how packed seeds fold into one launch: kernels/launch.py); 600 rows per
    group: several backward programs per group, the last tile partly masked."""
    G, R, C = 2, 600, 40
    grouped = lambda x, s: norms.rms_silu(x, s)
    per_group = lambda x, s: torch.cat([norms.rms_silu_ref(x[g * R:(g + 1) * R], s[g])
                                        for g in range(G)])
    check(grouped, per_group, {"x": randn(G * R, C, dtype=dtype, scale=2.0),
                               "scale": randn(G, C, scale=0.5, seed=5) + 1.0},
          grads=("x", "scale"))
    with pytest.raises(ValueError, match="scale groups"):
        norms.rms_silu(randn(5, C), randn(2, C))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [16, 600], ids=["rows16", "rows600"])
@pytest.mark.parametrize("norm_c,joined", [(True, False), (False, False), (False, True)],
                         ids=["three-norms", "tail", "tail-a-and-b-joined"])
def test_rms_silu_cat(norm_c, joined, rows, dtype):
    """The RSSM core's input in one op: two (or three) norms and the concatenation, with a
    strided part (b) and parts of different widths, against the reference; joined: a and b
    as the two column ranges of one strided tensor (one matmul's output), one gradient.
    600 rows: several backward programs (their partial scale gradients summed)."""
    a, b = randn(rows, 40, dtype=dtype, scale=2.0), randn(48, rows, dtype=dtype, seed=3).t()
    c = randn(rows, 24, dtype=dtype, seed=4)
    sa, sb, sc = (randn(n, scale=0.5, seed=5 + n) + 1.0 for n in (40, 48, 24))
    inputs = {"a": a, "b": b, "c": c, "sa": sa, "sb": sb}
    if joined:
        inputs = {"ab": randn(rows, 100, dtype=dtype, scale=2.0, seed=7)[:, 6:94], "c": c,
                  "sa": sa, "sb": sb}
    if norm_c:
        inputs["sc"] = sc

    def run(op):
        if joined:
            return lambda ab, c, sa, sb: op(ab, None, c, sa, sb, None, 1e-4)
        return lambda *xs: op(*xs[:5], xs[5] if norm_c else None, 1e-4)
    check(run(norms.rms_silu_cat), run(norms.rms_silu_cat_ref), inputs,
          grads=tuple(inputs))
    if joined:
        with pytest.raises(ValueError, match="columns"):
            norms.rms_silu_cat(inputs["ab"][:, 1:], None, c, sa, sb, None)
    else:
        with pytest.raises(ValueError, match="rows"):
            norms.rms_silu_cat(a, b[:-1], c, sa, sb, None)
        with pytest.raises(ValueError, match="scale"):
            norms.rms_silu_cat(a, b, c, sa[:-1], sb, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_silu_add(dtype):
    """A norm over the sum of two column slices (a layer's matmul split in two), against the
    reference; its backward too."""
    x = randn(16, 70, dtype=dtype, scale=2.0)[:, 10:50]
    y = randn(40, 16, dtype=dtype, seed=3).t()
    check(lambda a, b, s: norms.rms_silu_add(a, b, s, 1e-4),
          lambda a, b, s: norms.rms_silu_add_ref(a, b, s, 1e-4),
          {"x": x, "y": y, "scale": randn(40, scale=0.5, seed=5) + 1.0},
          grads=("x", "y", "scale"))
    with pytest.raises(ValueError, match="differ"):
        norms.rms_silu_add(x, y[:, :3], torch.ones(40))


def test_get_ops_impls():
    assert get_ops("fused").rms_silu is fused.rms_silu_fused
    assert get_ops("fused").twohot_loss is fused.twohot_loss_fused
    assert get_ops("fused").gru_update is gru.gru_update_ref  # no fused version: the ref
    with pytest.raises(ValueError, match="allowed: ref, triton, fused"):
        get_ops("cuda")


# ------------------------------------------------------------------------------- gru_update

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (7,), (63,), (3, 5)], ids=lambda s: "rows" + "x".join(
    map(str, s)))
@pytest.mark.parametrize("D,blocks", [(500, 4), (64, 8)], ids=["D500-G4", "D64-G8"])
def test_gru_update(D, blocks, lead, dtype):
    gates = randn(*lead, 3 * D, dtype=dtype, scale=3.0)
    deter = randn(*lead, D, dtype=dtype, seed=3)
    check(lambda g, h: gru.gru_update(g, h, blocks),
          lambda g, h: gru.gru_update_ref(g, h, blocks),
          {"gates": gates, "deter": deter}, grads=("gates", "deter"))


def test_gru_update_mixed_dtypes_and_strides():
    """bf16 gates from a bf16 GEMM, fp32 carried state; gates a column slice of a wider
    buffer and deter a transposed view."""
    D, blocks = 500, 4
    gates = randn(7, 3 * D + 9, dtype=torch.bfloat16, scale=3.0)[:, 5:5 + 3 * D]
    deter = randn(D, 7, seed=3).t()
    check(lambda g, h: gru.gru_update(g, h, blocks),
          lambda g, h: gru.gru_update_ref(g, h, blocks),
          {"gates": gates, "deter": deter}, grads=("gates", "deter"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_cell(dtype):
    """The GRU step of the GPU path: the layer's bias, the gate math, the update and the
    state's bf16 copy in one launch; both outputs' gradients summed in one backward launch;
    gates a column slice, deter a transposed view, the bias's gradient too."""
    D, blocks = 500, 4
    gates = randn(7, 3 * D + 9, dtype=dtype, scale=3.0)[:, 5:5 + 3 * D]
    inputs = {"gates": gates, "bias": randn(3 * D, seed=4), "deter": randn(D, 7, seed=3).t()}
    op = lambda g, b, h: gru.gru_cell(g, b, h, blocks, torch.bfloat16)
    ref = lambda g, b, h: gru.gru_cell_ref(g, b, h, blocks, torch.float64)
    # The bias's gradient sums the gates' gradients, which are in the gates' dtype.
    check(op, ref, inputs, grads=("gates", "deter") + (("bias",) * (dtype == torch.float32)))
    if dtype == torch.bfloat16:
        (g, b, h), (g64, b64, h64) = leaves(*inputs.values())
        for fn, args in ((op, (g, b, h)), (ref, (g64, b64, h64))):
            out, low = fn(*args)
            (out.sum() + 2 * low.sum()).backward()
        assert_close("dbias", b.grad.bfloat16(), b64.grad)
    with pytest.raises(ValueError, match="blocks=3"):
        gru.gru_cell(randn(2, 12), randn(12), randn(2, 4), 3, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_cell_with_the_next_steps_reset(dtype):
    """gru_cell with keep (the observe scan on the GPU path): also the copies masked by the
    next step's reset (the matmul-dtype one twice, one per reader), from the same launch; the
    five outputs' gradients (the masked ones masked) summed in one backward launch."""
    D, blocks, N = 96, 4, 9
    keep = (torch.arange(N, device=DEVICE) % 3 != 1).to(dtype)[:, None]
    inputs = {"gates": randn(N, 3 * D, dtype=dtype, scale=3.0), "bias": randn(3 * D, seed=4),
              "deter": randn(D, N, seed=3).t()}
    op = lambda g, b, h: gru.gru_cell(g, b, h, blocks, torch.bfloat16, keep)
    ref = lambda g, b, h: gru.gru_cell_ref(g, b, h, blocks, torch.float64, keep.double())
    check(op, ref, inputs, grads=("gates", "deter") + (("bias",) * (dtype == torch.float32)))
    out, low, masked, masked_low, masked_low2 = op(*inputs.values())
    assert masked.dtype == out.dtype and masked_low.dtype == masked_low2.dtype == torch.bfloat16
    assert torch.equal(masked_low, masked_low2) and masked_low2 is not masked_low
    assert torch.equal(masked, out * keep.to(out.dtype)) and not masked[1].any()
    with pytest.raises(ValueError, match="keep"):
        gru.gru_cell(*inputs.values(), blocks, torch.bfloat16, keep[:-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_keep", [False, True], ids=["no-keep", "keep"])
def test_gru_cell_with_a_tail(with_keep, dtype):
    """gru_cell with tail (the observe scan's posterior input): the matmul-dtype copy is
    [state, tail]; tail a strided slice (one step of (N, T, E) tokens), its gradient the
    copy's last columns, the state's the rest (summed with the others in the kernel)."""
    D, blocks, N, E = 96, 4, 9, 300  # N * E: several tail-copy programs
    keep = (torch.arange(N, device=DEVICE) % 3 != 1).to(dtype)[:, None] if with_keep else None
    inputs = {"gates": randn(N, 3 * D, dtype=dtype, scale=3.0), "bias": randn(3 * D, seed=4),
              "deter": randn(D, N, seed=3).t(),
              "tail": randn(N, 3, E, dtype=dtype, seed=6)[:, 1]}
    op = lambda g, b, h, x: gru.gru_cell(g, b, h, blocks, torch.bfloat16, keep, x)
    ref = lambda g, b, h, x: gru.gru_cell_ref(
        g, b, h, blocks, torch.float64, None if keep is None else keep.double(), x)
    check(op, ref, inputs, grads=("gates", "deter", "tail"))
    outs = op(*inputs.values())
    assert outs[1].shape == (N, D + E) and outs[1].dtype == torch.bfloat16
    plain = gru.gru_cell(*list(inputs.values())[:3], blocks, torch.bfloat16, keep)
    assert all(torch.equal(a, b) for a, b in zip(outs[2:], plain[2:]))
    assert torch.equal(outs[0], plain[0]) and torch.equal(outs[1][:, :D], plain[1])
    if dtype == torch.bfloat16:  # copied as it is (a float32 tail is rounded: `check` above)
        assert torch.equal(outs[1][:, D:], inputs["tail"])
    with pytest.raises(ValueError, match="tail"):
        gru.gru_cell(*list(inputs.values())[:3], blocks, torch.bfloat16, keep,
                           inputs["tail"][:-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_latent_sample_with_a_head(dtype):
    """latent_sample with keep and head (the observe scan's next input of dynin0 and dynin1,
    one matmul): the masked sample written flat after a copy of head (a strided view); head's
    gradient is the output's first columns, the sample's the rest."""
    N, S, K, D = 7, 5, 6, 200  # N * D: several head-copy programs
    keep = (torch.arange(N, device=DEVICE) % 3 != 1).to(dtype)[:, None]
    noise = torch.rand(N, S, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    inputs = {"logits": randn(N, S, K, dtype=dtype, scale=2.0),
              "head": randn(D, N, dtype=dtype, seed=4).t()}
    check(lambda a, h: categorical.latent_sample(a, 0.01, noise, keep, h),
          lambda a, h: categorical.latent_sample_ref(a, 0.01, noise.double(), keep.double(),
                                                     h),
          inputs, grads=("logits", "head"))
    z, joined, _ = categorical.latent_sample(*[inputs["logits"], 0.01, noise, keep,
                                               inputs["head"]])
    assert joined.shape == (N, D + S * K) and torch.equal(joined[:, :D], inputs["head"])
    assert torch.equal(joined[:, D:], (z * keep[..., None]).flatten(-2))
    with pytest.raises(ValueError, match="head"):
        categorical.latent_sample(inputs["logits"], 0.01, noise, keep, inputs["head"][:-1])


def test_gru_update_rejects_bad_shapes():
    with pytest.raises(ValueError, match="blocks=3"):
        gru.gru_update(randn(2, 12), randn(2, 4), 3)


# ---------------------------------------------------------------------------------- twohot

def twohot_targets(rows: int, K: int) -> torch.Tensor:
    """Raw targets: 0, both ends and beyond, exactly at bins, between bins, typical values."""
    bins = twohot.symexp_bins(K).double()
    g = torch.Generator().manual_seed(4)
    index = torch.randint(0, K - 1, (rows,), generator=g)
    frac = torch.rand(rows, generator=g, dtype=torch.float64)
    between = bins[index] + frac * (bins[index + 1] - bins[index])
    typical = torch.sign(torch.randn(rows, generator=g)) * torch.expm1(
        3 * torch.rand(rows, generator=g, dtype=torch.float64))
    kind = torch.arange(rows) % 3
    target = torch.where(kind == 0, bins[index], torch.where(kind == 1, between, typical))
    special = torch.tensor([0.0, 1e10, -1e10, bins[-1], bins[0], 1.5 * bins[-2],
                            -0.5 * bins[-2]], dtype=torch.float64)
    n = min(rows, len(special))
    target[:n] = special[:n]
    return target.float().to(DEVICE)


TWOHOT_SHAPES = [((1,), 255), ((7,), 255), ((63,), 255), ((7,), 5), ((63,), 5), ((3, 5), 255)]
TWOHOT_IDS = ["rows1-K255", "rows7-K255", "rows63-K255", "rows7-K5", "rows63-K5",
              "lead3x5-K255"]


TWOHOT_LOSS = [pytest.param(twohot.twohot_loss, id="triton"),
               pytest.param(fused.twohot_loss_fused, id="fused")]
TWOHOT_MEAN = [pytest.param(twohot.twohot_mean, id="triton"),
               pytest.param(fused.twohot_mean_fused, id="fused")]


@pytest.mark.parametrize("op", TWOHOT_LOSS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K", TWOHOT_SHAPES, ids=TWOHOT_IDS)
def test_twohot_loss(lead, K, dtype, op):
    logits = randn(*lead, K, dtype=dtype, scale=3.0)
    target = twohot_targets(logits[..., 0].numel(), K).reshape(lead)
    check(op, twohot.twohot_loss_ref, {"logits": logits, "target": target}, grads=("logits",))


@pytest.mark.parametrize("op", TWOHOT_LOSS)
def test_twohot_loss_strided_and_without_grad(op):
    K = 255
    logits = randn(K, 7, scale=3.0).t()  # column stride 7
    target = twohot_targets(7, K)
    check(op, twohot.twohot_loss_ref, {"logits": logits, "target": target}, grads=("logits",))
    with torch.no_grad():
        loss = op(logits.requires_grad_(), target)
    assert_close("loss (no grad)", loss, twohot.twohot_loss_ref(logits.double(), target))
    # Rows of a wider (B, T+1, K) head output sliced to T steps, as the critic loss reads them.
    wide = randn(3, 6, K, scale=3.0)
    target = twohot_targets(15, K).reshape(3, 5)
    check(lambda x, t: op(x[:, :-1], t), lambda x, t: twohot.twohot_loss_ref(x[:, :-1], t),
          {"logits": wide, "target": target}, grads=("logits",))


def test_twohot_loss_fused_nan_target_and_target_gradient():
    """A NaN target gives a NaN loss as in the reference (the non-finite check sees it); a
    target that requires grad gets the reference's gradient."""
    logits = randn(3, 255, scale=3.0)
    target = torch.tensor([float("nan"), float("inf"), 2.5], device=DEVICE)
    got, want = fused.twohot_loss_fused(logits, target), twohot.twohot_loss_ref(logits, target)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    assert_close("finite rows", got[1:], want[1:])
    check(fused.twohot_loss_fused, twohot.twohot_loss_ref,
          {"logits": logits, "target": torch.tensor([0.3, -2.7, 11.0], device=DEVICE)},
          grads=("logits", "target"))


@pytest.mark.parametrize("op", TWOHOT_MEAN)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K", TWOHOT_SHAPES, ids=TWOHOT_IDS)
def test_twohot_mean(lead, K, dtype, op):
    logits = randn(*lead, K, dtype=dtype, scale=3.0)
    # The mean adds terms up to |bins| ~ 5e8 that cancel: its error scales with sum |p * bins|.
    p = torch.softmax(logits.double(), -1)
    scale = (p * twohot.symexp_bins(K, DEVICE).double().abs()).sum(-1)
    check(op, twohot.twohot_mean_ref, {"logits": logits}, grads=("logits",),
          scales={0: scale})


@pytest.mark.parametrize("op", TWOHOT_MEAN)
@pytest.mark.parametrize("K", [255, 5])
def test_twohot_mean_zero_logits_exactly_zero(K, op):
    zeros = torch.zeros(7, K, device=DEVICE)
    assert torch.equal(op(zeros), torch.zeros(7, device=DEVICE))
    assert torch.equal(op(zeros.bfloat16()), torch.zeros(7, device=DEVICE))


# ------------------------------------------------------------------------------ mask_rows

@pytest.mark.parametrize("N", [1, 16, 37])
def test_mask_rows(N):
    """The observe scan's reset of three tensors (float32 carry, bf16 copy, latent sample,
    one of them strided) in one launch, values and gradients."""
    keep = (torch.arange(N, device=DEVICE) % 3 != 1).float()[:, None]
    inputs = {"keep": keep, "a": randn(N, 40), "b": randn(N, 40, seed=2).bfloat16(),
              "c": randn(N, 3, 12, seed=3).transpose(1, 2)}
    check(resets.mask_rows, resets.mask_rows_ref, inputs, grads=("a", "b", "c"))
    with pytest.raises(ValueError, match="needs"):
        resets.mask_rows(keep[:-1], inputs["a"], inputs["b"], inputs["c"])


# --------------------------------------------------------------------------- action_sample

@pytest.mark.parametrize("N,A,dtype", [(1, 1, torch.float32), (37, 6, torch.bfloat16),
                                       (300, 17, torch.float32)])
def test_action_sample(N, A, dtype):
    """The rollout's bounded-normal sample and its scaled RSSM input in one launch, from the
    two halves of one (N, 2A) layer output (strided rows), large pre-activations included
    (tanh and sigmoid saturate; |a| > 1 is scaled back to 1)."""
    out = randn(N, 2 * A, dtype=dtype, scale=4.0)
    out[0, 0], out[-1, A - 1] = 60.0, -60.0  # saturated tanh
    mean, std, noise = out[:, :A], out[:, A:], randn(N, A, seed=5, scale=3.0)
    act, inp = policy.action_sample(mean, std, noise, 0.1, 1.0, dtype)
    ref_act, ref_inp = policy.action_sample_ref(mean.double(), std.double(), noise.double(),
                                                0.1, 1.0, torch.float64)
    assert act.dtype == torch.float32 and inp.dtype == dtype
    assert_close("action", act, ref_act)
    assert_close("input", inp, ref_inp.to(dtype).double())
    assert inp.float().abs().max() <= 1.0


def test_action_sample_refuses_gradients_and_bad_shapes():
    mean = randn(4, 3).requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        policy.action_sample(mean, mean, mean, 0.1, 1.0, torch.float32)
    with pytest.raises(ValueError, match=r"must all be \(N, A\)"):
        policy.action_sample(mean.detach(), mean.detach()[:, 1:], mean.detach(), 0.1, 1.0,
                             torch.float32)


# --------------------------------------------------------------------------- lambda_return

@pytest.mark.parametrize("N,L", [(1, 2), (7, 16), (1024, 16), (16, 65)],
                         ids=["N1-L2", "N7-L16", "N1024-L16", "N16-L65"])
def test_lambda_return(N, L):
    """Replayed (bool last/term, strided slices) and imagined (float termination
    probabilities) trajectories: the one-launch scan equals the reference loop."""
    g = torch.Generator().manual_seed(N + L)
    flags = lambda p: (torch.rand(N, L + 1, generator=g) < p).to(DEVICE)
    rew, boot = randn(N, L + 1, seed=3)[:, 1:], randn(N, L, seed=4, scale=10.0)
    last, term = flags(0.1)[:, 1:], flags(0.05)[:, 1:]
    assert N == 1 or not rew.is_contiguous()
    for args in [(last, term, rew, boot, 0.997, 0.95),
                 (torch.zeros_like(boot), torch.rand(N, L, generator=g).to(DEVICE),
                  rew.contiguous(), boot, 1.0, 0.95)]:
        out = returns.lambda_return(*args)
        ref = returns.lambda_return_ref(*[a.double() if torch.is_tensor(a) else a
                                          for a in args])
        assert out.dtype == torch.float32
        assert_close("returns", out, ref)


def test_lambda_return_refuses_gradients_and_bad_shapes():
    rew = randn(4, 8).requires_grad_()
    zeros = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="no backward"):
        returns.lambda_return(zeros, zeros, rew, zeros, 0.99, 0.95)
    with torch.no_grad():
        returns.lambda_return(zeros, zeros, rew, zeros, 0.99, 0.95)
    with pytest.raises(ValueError, match=r"must all be \(N, L\)"):
        returns.lambda_return(zeros, zeros[:, 1:], zeros, zeros, 0.99, 0.95)


# ----------------------------------------------------------------------------- categorical

LATENT_SHAPES = [(1, 32, 16), (7, 5, 7), (63, 3, 4), (3, 5, 2, 6)]
LATENT_IDS = ["rows1-S32-K16", "rows7-S5-K7", "rows63-S3-K4", "lead3x5-S2-K6"]


@pytest.mark.parametrize("unimix", [0.01, 0.0], ids=["unimix0.01", "unimix0"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=LATENT_IDS)
def test_latent_sample(shape, dtype, unimix):
    logits = randn(*shape, dtype=dtype, scale=2.0)
    g = torch.Generator().manual_seed(5)
    noise = torch.rand(shape[:-1], generator=g).to(DEVICE)
    noise.view(-1)[:3] = torch.tensor([0.0, 0.5, 1.0 - 2 ** -24])[:noise.numel()].to(DEVICE)
    z = categorical.latent_sample(logits, unimix, noise)
    z_ref = categorical.latent_sample_ref(logits.double(), unimix, noise.double())
    assert z.dtype == dtype  # one-hots are exact in any float dtype
    assert torch.equal(z.double(), z_ref), "the one-hot samples differ from the reference"
    check(lambda a: categorical.latent_sample(a, unimix, noise),
          lambda a: categorical.latent_sample_ref(a, unimix, noise.double()),
          {"logits": logits}, grads=("logits",))


@pytest.mark.parametrize("dtype", DTYPES)
def test_latent_sample_with_the_next_steps_reset(dtype):
    """latent_sample with keep: also the sample with the rows of keep 0 zeroed (the next
    step's carry) and the logits passed through, from the same launch; the three outputs'
    gradients summed in one backward."""
    N, S, K = 7, 5, 6
    logits = randn(N, S, K, dtype=dtype, scale=2.0)
    keep = (torch.arange(N, device=DEVICE) % 3 != 1).to(dtype)[:, None]
    noise = torch.rand(N, S, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    check(lambda a: categorical.latent_sample(a, 0.01, noise, keep),
          lambda a: categorical.latent_sample_ref(a, 0.01, noise.double(), keep.double()),
          {"logits": logits}, grads=("logits",))
    z, masked, copy = categorical.latent_sample(logits, 0.01, noise, keep)
    assert torch.equal(z, categorical.latent_sample(logits, 0.01, noise))
    assert torch.equal(copy, logits) and copy.data_ptr() != logits.data_ptr()
    assert torch.equal(masked, z * keep[..., None]) and not masked[1].any()
    with pytest.raises(ValueError, match="keep"):
        categorical.latent_sample(logits, 0.01, noise, keep[:-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LATENT_SHAPES, ids=LATENT_IDS)
def test_kl_free(shape, dtype):
    post = randn(*shape, dtype=dtype, scale=3.0)
    prior = randn(*shape, dtype=dtype, scale=3.0, seed=6)
    # Every other row: prior close to post, a KL far below the free bits (no gradient there).
    near = (post.double() + randn(*shape, scale=0.01, seed=7).double()).to(dtype)
    rows = torch.arange(post[..., 0, 0].numel(), device=DEVICE).reshape(shape[:-2])
    prior = torch.where((rows % 2 == 1)[..., None, None], near, prior)
    check(lambda q, p: kl.kl_free(q, p, 0.01, 1.0),
          lambda q, p: kl.kl_free_ref(q, p, 0.01, 1.0),
          {"post": post, "prior": prior}, grads=("post", "prior"))


def test_kl_free_gradient_routing():
    """dyn reaches only the prior, rep only the posterior (non-contiguous post)."""
    post = randn(7, 16, 5, scale=3.0).transpose(1, 2)
    prior = randn(7, 5, 16, scale=3.0, seed=6)
    (q, p), _ = leaves(post, prior)
    dyn, _ = kl.kl_free(q, p, 0.01, 1.0)
    dyn.sum().backward()
    assert q.grad.abs().max() == 0 and p.grad.abs().max() > 0
    (q, p), _ = leaves(post, prior)
    _, rep = kl.kl_free(q, p, 0.01, 1.0)
    rep.sum().backward()
    assert p.grad.abs().max() == 0 and q.grad.abs().max() > 0


# ------------------------------------------------------------- under vmap: a seed dimension

SEEDS = 3


def check_seeds(fn, ref_fn, inputs: dict, grads: tuple[str, ...], seed=1) -> None:
    """Every input has a leading seed dimension (packed seeds: agent/packed.py). fn under
    torch.func.vmap, its values and (vmap of grad) its gradients with per-seed upstream
    gradients, against ref_fn on each seed's float64 slice, as `check` compares them."""
    from torch.func import grad, vmap

    names, xs = list(inputs), list(inputs.values())
    as_tuple = lambda o: o if isinstance(o, tuple) else (o,)
    outs = as_tuple(vmap(fn)(*xs))
    ups = [randn(*o.shape, dtype=o.dtype, seed=seed + j) for j, o in enumerate(outs)]
    wrt = tuple(names.index(g) for g in grads)
    if wrt:
        def loss(*args):
            got = as_tuple(fn(*args[:len(xs)]))
            return sum((o.float() * u.float()).sum() for o, u in zip(got, args[len(xs):]))
        got_grads = vmap(grad(loss, argnums=wrt))(*xs, *ups)
    for s in range(SEEDS):
        refs = [x[s].detach().double().requires_grad_(name in grads)
                for name, x in zip(names, xs)]
        ref_outs = as_tuple(ref_fn(*refs))
        pairs = [(o, u[s].double()) for o, u in zip(ref_outs, ups) if o.requires_grad]
        if wrt:
            torch.autograd.backward([o for o, _ in pairs], [u for _, u in pairs])
        for j, (out, ref) in enumerate(zip(outs, ref_outs)):
            assert_close(f"seed {s} output {j}", out[s], ref)
        for k, i in enumerate(wrt):
            assert got_grads[k][s].dtype == xs[i].dtype
            assert_close(f"seed {s} d{names[i]}", got_grads[k][s], refs[i].grad)


def seeded(make, *shape, **kw):
    """SEEDS different tensors stacked: (SEEDS, *shape)."""
    return torch.stack([make(*shape, **{**kw, "seed": kw.get("seed", 0) + 10 * s})
                        for s in range(SEEDS)])


def _flags(*shape, p, seed):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p).to(DEVICE)


def _vmap_cases(dtype):
    """(name, op, reference, inputs with a seed dimension, grads, kernels and their vmap
    rule): each op as the agent calls it, per-seed parameters included."""
    r = lambda *shape, **kw: seeded(randn, *shape, dtype=dtype, **kw)
    r32 = lambda *shape, **kw: seeded(randn, *shape, **kw)
    keep = (seeded(lambda n, seed: _flags(n, 1, p=0.7, seed=seed), 7, seed=1)).to(dtype)
    D, blocks = 64, 8
    yield ("rms_silu", lambda x, s: norms.rms_silu(x, s), norms.rms_silu_ref,
           {"x": r(7, 40, scale=2.0), "scale": r32(40, scale=0.5) + 1.0}, ("x", "scale"),
           {"rms_silu": "fold", "rms_silu_bwd": "fold"})
    yield ("rms_silu_cat", lambda a, b, c, sa, sb, sc: norms.rms_silu_cat(a, b, c, sa, sb, sc),
           lambda a, b, c, sa, sb, sc: norms.rms_silu_cat_ref(a, b, c, sa, sb, sc),
           {"a": r(16, 40, scale=2.0), "b": r(16, 48, seed=3), "c": r(16, 24, seed=4),
            "sa": r32(40, seed=5) + 1.0, "sb": r32(48, seed=6) + 1.0,
            "sc": r32(24, seed=7) + 1.0}, ("a", "b", "c", "sa", "sb", "sc"),
           {"rms_silu_cat": "loop", "rms_silu_cat_bwd": "loop"})
    yield ("rms_silu_add", lambda x, y, s: norms.rms_silu_add(x, y, s, 1e-4),
           lambda x, y, s: norms.rms_silu_add_ref(x, y, s, 1e-4),
           {"x": r(16, 40, scale=2.0), "y": r(16, 40, seed=3),
            "scale": r32(40, scale=0.5, seed=5) + 1.0}, ("x", "y", "scale"),
           {"rms_silu_add": "fold", "rms_silu_bwd": "fold"})
    yield ("gru_update", lambda g, h: gru.gru_update(g, h, blocks),
           lambda g, h: gru.gru_update_ref(g, h, blocks),
           {"gates": r(7, 3 * D, scale=3.0), "deter": r(7, D, seed=3)}, ("gates", "deter"),
           {"gru_update": "fold", "gru_update_bwd": "fold"})
    yield ("gru_cell", lambda g, b, h, k, x: gru.gru_cell(g, b, h, blocks, torch.bfloat16, k, x),
           lambda g, b, h, k, x: gru.gru_cell_ref(g, b, h, blocks, torch.float64, k, x),
           {"gates": r(7, 3 * D, scale=3.0), "bias": r32(3 * D, seed=4),
            "deter": r32(7, D, seed=3), "keep": keep[..., None], "tail": r(7, 30, seed=6)},
           ("gates", "deter", "tail") + ("bias",) * (dtype == torch.float32),
           {"gru_cell_keep": "loop", "gru_cell_keep_bwd": "loop"})
    yield ("twohot_loss", twohot.twohot_loss, twohot.twohot_loss_ref,
           {"logits": r(7, 255, scale=2.0),
            "target": torch.stack([twohot_targets(7, 255).roll(s) for s in range(SEEDS)])},
           ("logits",), {"twohot_loss": "fold", "twohot_loss_bwd": "fold"})
    yield ("twohot_mean", twohot.twohot_mean, twohot.twohot_mean_ref,
           {"logits": r(7, 255, scale=2.0)}, ("logits",),
           {"twohot_mean": "fold", "twohot_mean_bwd": "fold"})
    noise = seeded(lambda *shape, seed: torch.rand(
        *shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE), 7, 5, seed=5)
    yield ("latent_sample", lambda a, n, k, h: categorical.latent_sample(a, 0.01, n, k, h),
           lambda a, n, k, h: categorical.latent_sample_ref(a, 0.01, n, k, h),
           {"logits": r(7, 5, 6, scale=2.0), "noise": noise, "keep": keep[..., None],
            "head": r(7, 20, seed=4)}, ("logits", "head"),
           {"latent_sample_keep": "fold", "latent_sample_keep_bwd": "fold"})
    yield ("kl_free", lambda q, p: kl.kl_free(q, p, 0.01, 1.0),
           lambda q, p: kl.kl_free_ref(q, p, 0.01, 1.0),
           {"post": r(7, 5, 7, scale=3.0), "prior": r(7, 5, 7, scale=3.0, seed=6)},
           ("post", "prior"), {"kl_free": "fold", "kl_free_bwd": "fold"})
    yield ("mask_rows", resets.mask_rows, resets.mask_rows_ref,
           {"keep": keep[..., None].float(), "a": r32(7, 40), "b": r(7, 12, seed=2),
            "c": r32(7, 3, 12, seed=3)}, ("a", "b", "c"), {"mask_rows": "fold"})
    yield ("action_sample",
           lambda m, s, n: policy.action_sample(m, s, n, 0.1, 1.0, dtype),
           lambda m, s, n: policy.action_sample_ref(m, s, n, 0.1, 1.0, torch.float64),
           {"mean": r(7, 6, scale=4.0), "std": r(7, 6, seed=2), "noise": r32(7, 6, seed=3)},
           (), {"action_sample": "fold"})
    yield ("lambda_return", lambda a, b, c, d: returns.lambda_return(a, b, c, d, 0.997, 0.95),
           lambda a, b, c, d: returns.lambda_return_ref(a, b, c, d, 0.997, 0.95),
           {"last": seeded(lambda *s, seed: _flags(*s, p=0.1, seed=seed), 7, 16, seed=1),
            "term": seeded(lambda *s, seed: _flags(*s, p=0.05, seed=seed), 7, 16, seed=2),
            "rew": r32(7, 16, seed=3), "boot": r32(7, 16, seed=4, scale=10.0)}, (),
           {"lambda_return": "fold"})


VMAP_OPS = [case[0] for case in _vmap_cases(torch.float32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", VMAP_OPS)
def test_ops_under_vmap_are_each_seeds_own(name, dtype):
    """The Triton ops under torch.func (packed seeds vmap the agent's update over a seed
    dimension): values and gradients of 3 seeds, each with its own inputs and parameters,
    against the reference per seed. A row-wise op folds the seeds into its rows (one launch),
    a norm with one scale row per seed; the GRU cell and the concatenating norm launch once
    per seed."""
    from dreamer_fast.kernels.launch import VMAPPED

    _, op, ref, inputs, grads, rules = next(c for c in _vmap_cases(dtype) if c[0] == name)
    VMAPPED.clear()
    check_seeds(op, ref, inputs, grads)
    for kernel, rule in rules.items():
        assert VMAPPED[kernel, rule] > 0, f"{kernel} did not run its {rule} rule: {VMAPPED}"


# ----------------------------------------------------------------------- registration, compile

def test_every_op_has_a_triton_kernel_and_a_custom_op():
    ops, refs = get_ops("triton"), get_ops("ref")
    for name in OPS:
        assert getattr(ops, name) is not getattr(refs, name), f"{name} falls back to its ref"
        assert hasattr(torch.ops.dreamer_fast, name), f"dreamer_fast::{name} not registered"


def test_ops_trace_under_torch_compile():
    """fullgraph compile (no graph breaks) through every op and its backward matches eager."""
    ops = get_ops("triton")

    def step(x, scale, gates, deter, logits, target, post, prior, noise):
        h = ops.gru_update(gates, deter, 4)
        h2, h2_low = ops.gru_cell(gates, scale.repeat(3), deter, 4, torch.bfloat16)
        act, act_in = ops.action_sample(x[:, :6].detach(), x[:, 6:12].detach(),
                                        deter[:, :6].detach(), 0.1, 1.0, torch.bfloat16)
        keep = (noise[:, 0] > 0.3).float()
        h3 = ops.gru_cell(gates, scale.repeat(3), deter, 4, torch.bfloat16, keep, x[:, :9])
        h3 = (h3[0], h3[1][:, :500] * h3[1][:, 500:].sum(), *h3[2:])
        h = h + h2 * h2_low + (act + act_in).sum() + h3[0] * h3[1] + h3[2] * h3[3] + 3 * h3[4]
        y = ops.rms_silu(x, scale)
        y = y + ops.rms_silu_cat(x[:, :100], x[:, 100:300], x[:, 300:], scale[:100],
                                 scale[100:300], scale[300:])
        y = y + ops.rms_silu_cat(x[:, :100], x[:, 100:300], x[:, 300:], scale[:100],
                                 scale[100:300], None)
        y = y + ops.rms_silu_add(x, deter, scale)
        y = y + ops.rms_silu_cat(x[:, :300], None, x[:, 300:], scale[:100], scale[100:300],
                                 None)
        z, z_next, post_copy = ops.latent_sample(post, 0.01, noise, keep)
        z = z + 2 * z_next + post_copy.square()
        _, joined, _ = ops.latent_sample(post, 0.01, noise, keep, x[:, :9])
        z = z + joined[:, 9:].reshape(z.shape) + joined[:, :9].sum()
        dyn, rep = ops.kl_free(post, prior, 0.01, 1.0)
        loss = ops.twohot_loss(logits, target) + ops.twohot_mean(logits)
        return h.sum() + y.square().sum() + (z * prior).sum() + (dyn + 2 * rep).sum() + loss.sum()

    inputs = [randn(7, 500), randn(500) + 1, randn(7, 1500), randn(7, 500), randn(7, 255),
              twohot_targets(7, 255), randn(7, 5, 7), randn(7, 5, 7, seed=8),
              torch.rand(7, 5, device=DEVICE)]
    grads = [i for i in range(len(inputs)) if i not in (5, 8)]
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"  # no C++ build on CPU
    results = []
    for fn in (step, torch.compile(step, backend=backend, fullgraph=True)):
        xs = [t.clone().requires_grad_(i in grads) for i, t in enumerate(inputs)]
        out = fn(*xs)
        out.backward()
        results.append([out] + [xs[i].grad for i in grads])
    for j, (a, b) in enumerate(zip(*results)):
        assert_close(f"compiled vs eager {j}", a, b)


# ------------------------------------------------------------------------------ end-to-end

@pytest.mark.parametrize("fast,discrete", [("triton", True), ("triton", False),
                                           ("fused", True)])
def test_agent_train_steps_match_with_kernels_on_and_off(fast, discrete):
    """Two train steps of the debug agent (image + vector) from the same weights and seeds
    give the same losses and parameters with the fast path (Triton kernels, or the CPU fused
    ops; both with the observe scan's hoisted action embedding, Triton with deferred weight
    gradients) and the references."""
    net, act, obs = SIZES["debug"], ActSpace(discrete, 3), {**VECTOR, **IMAGE}
    cfg = dict(batch_size=2, batch_length=8, imag_horizon=3, precision="float32")
    agents = {}
    for impl in ("ref", fast):
        torch.manual_seed(0)
        agents[impl] = Agent(obs, act, net, AgentConfig(**cfg, kernels=impl), device=DEVICE)
    agents[fast].load_state_dict(agents["ref"].state_dict())
    assert agents[fast].defer == (fast == "triton") and not agents["ref"].defer
    assert agents[fast].batch_actor == (fast == "triton") and not agents["ref"].batch_actor
    # The same imagination schedule on both sides (test_imagination_schedules_agree checks
    # the schedules against each other).
    agents["ref"].batch_actor = agents[fast].batch_actor
    batch = {k: v.to(DEVICE) for k, v in make_batch(obs, act, net, B=2, L=9).items()}
    metrics = {}
    for impl, agent in agents.items():
        metrics[impl] = []
        for step in range(2):
            torch.manual_seed(100 + step)  # latent noise (torch.rand), actions (multinomial)
            m, latents = agent.train_step(batch)
            metrics[impl].append(m)
        assert latents["deter"].dtype == torch.bfloat16 and latents["stoch"].dtype == torch.int16
    for step, (ref, out) in enumerate(zip(metrics["ref"], metrics[fast])):
        assert ref.keys() == out.keys()
        for key in ref:
            if key.startswith("loss/"):
                # Summed over a batch of float32 terms: 1e-4 relative (kernel rounding, 2 steps).
                err = abs(out[key].item() - ref[key].item())
                assert err <= 1e-4 * (abs(ref[key].item()) + 1e-3), (
                    f"step {step} {key}: {fast} {out[key].item():.9g} ref {ref[key].item():.9g}")
    ref_params = dict(agents["ref"].named_parameters())
    for name, param in agents[fast].named_parameters():
        err = (param - ref_params[name]).abs().max().item()
        assert err <= 1e-5 * (1 + ref_params[name].abs().max().item()), f"{name}: {err:.3g}"


@pytest.mark.parametrize("discrete", [False, True])
def test_imagination_schedules_agree(discrete):
    """The actor run per imagined step (CPU) and once over all imagined states (GPU path,
    `batch_actor`: pre-drawn noise, the fused action sample) give the same losses and
    updates, both rolling out with the same pre-drawn noise (`rollout_noise`)."""
    net, act, obs = SIZES["debug"], ActSpace(discrete, 3), dict(VECTOR)
    cfg = AgentConfig(batch_size=2, batch_length=8, imag_horizon=4, kernels="ref",
                      precision="float32")
    batch = {k: v.to(DEVICE) for k, v in make_batch(obs, act, net, B=2, L=9).items()}
    runs = {}
    for batched in (False, True):
        torch.manual_seed(0)
        agent = Agent(obs, act, net, cfg, device=DEVICE)
        agent.batch_actor = batched

        def imagine(deter, stoch, noise=None, agent=agent, method=agent.imagine):
            return method(deter, stoch, agent.rollout_noise(len(deter)))
        agent.imagine = imagine
        runs[batched] = [agent]
        for step in range(2):
            torch.manual_seed(100 + step)
            runs[batched].append(agent.train_step(batch)[0])
    for step in (1, 2):
        for key in ("loss/policy", "loss/value", "imag/ent", "imag/ret"):
            a, b = runs[False][step][key].item(), runs[True][step][key].item()
            assert abs(a - b) <= 1e-5 * (abs(a) + 1e-3), (step, key, a, b)
    params = dict(runs[False][0].named_parameters())
    for name, p in runs[True][0].named_parameters():
        err = (p - params[name]).abs().max().item()
        assert err <= 1e-5 * (1 + params[name].abs().max().item()), f"{name}: {err:.3g}"


def rollout_case(discrete: bool, horizon: int, n: int):
    """A GPU-path debug agent with trained-like weights (non-zero biases, larger actor
    outputs), n start states and the rollout's noise, for comparing rollout schedules."""
    net, act, obs = SIZES["debug"], ActSpace(discrete, 3), dict(VECTOR)
    torch.manual_seed(0)
    agent = Agent(obs, act, net, AgentConfig(imag_horizon=horizon, kernels="triton",
                                             precision="float32"), device=DEVICE)
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.2 * torch.randn_like(p))
    deter = randn(n, net.deter, seed=3)
    stoch = torch.nn.functional.one_hot(torch.randint(net.classes, (n, net.stoch)),
                                        net.classes).float().to(DEVICE)
    return agent, deter, stoch, agent.rollout_noise(n)


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])
def test_joined_rollout_equals_the_layered_one(discrete):
    """The GPU path's rollout (the layers reading one state as one matmul, rms_silu_add,
    rms_silu_cat) gives the layer-by-layer rollout's states and actions from the same noise."""
    agent, deter, stoch, noise = rollout_case(discrete, horizon=5, n=12)
    with torch.no_grad(), agent.deferral():
        joined = schedules.rollout_joined(agent, deter, stoch, deter, noise)
        layered = schedules.rollout(agent, deter, stoch, deter, noise)
    for name, a, b in zip(("deters", "stochs", "actions"), joined, layered):
        assert len(a) == len(b)
        for t, (x, y) in enumerate(zip(a, b)):
            assert_close(f"{name}[{t}]", x, y)


def test_joined_rollout_under_bfloat16_is_as_close_to_float32_as_the_layered_one():
    """Under bfloat16 autocast (the GPU's) the joined rollout also rounds the actor's two
    halves of its first layer before adding them: its first action and next state are as
    close to a float32 rollout's as the layer-by-layer rollout's are (continuous actions, so
    no sample can flip)."""
    agent, deter, stoch, noise = rollout_case(False, horizon=1, n=64)
    with torch.no_grad(), agent.deferral():
        ref = schedules.rollout(agent, deter, stoch, deter, noise)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            low = deter.to(torch.bfloat16)
            joined = schedules.rollout_joined(agent, deter, stoch, low, noise)
            layered = schedules.rollout(agent, deter, stoch, low, noise)
    for name, pick in (("next deter", lambda r: r[0][1]), ("action", lambda r: r[2][0])):
        err_joined = (pick(joined).double() - pick(ref).double()).abs().mean().item()
        err_layered = (pick(layered).double() - pick(ref).double()).abs().mean().item()
        assert err_joined <= 1.5 * err_layered + 1e-4, (name, err_joined, err_layered)


@pytest.mark.parametrize("impl,discrete,precision", [
    ("triton", False, "float32"), ("triton", True, "bfloat16")])
def test_deferred_weight_gradients_equal_autograds(impl, discrete, precision):
    """The scans' weight gradients computed once per update (agent/deferred.py) equal autograd's
    per-step ones, for every parameter; and deferral removes kernels from the backward.
    bfloat16 (the GPU's autocast): the scan layers' cached casts and in-place block GEMMs
    against autograd's, to bf16 rounding (one rounding of a sum vs a sum of roundings)."""
    from bench.kernel_count import KernelCount

    net, act, obs = SIZES["debug"], ActSpace(discrete, 3), {**VECTOR, **IMAGE}
    torch.manual_seed(0)
    agent = Agent(obs, act, net, AgentConfig(batch_size=2, batch_length=8, imag_horizon=3,
                                             kernels=impl, precision=precision), device=DEVICE)
    batch = {k: v.to(DEVICE) for k, v in make_batch(obs, act, net, B=2, L=9).items()}
    tol = 1e-5 if precision == "float32" else 2e-2
    grads, kernels = {}, {}
    for defer in (False, True):
        agent.defer = defer
        agent.zero_grad()
        torch.manual_seed(5)
        with agent.autocast():
            loss, _, _ = agent.loss(batch)
        with KernelCount() as count:
            loss.backward()
            agent.deferral.flush()
        assert not agent.deferral.pending
        kernels[defer] = sum(count.ops.values())
        if precision == "bfloat16":  # the deferred scan resets inside its GRU cells
            resets, cells = (count.ops[f"dreamer_fast::{op}"] for op in ("mask_rows",
                                                                        "gru_cell_keep_bwd"))
            assert (resets, cells) == ((0, 7) if defer else (7, 0)), (defer, resets, cells)
        grads[defer] = {n: p.grad.clone() for n, p in agent.named_parameters()
                        if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 50
    for name, g in grads[True].items():
        ref = grads[False][name]
        err = (g - ref).abs().max().item()
        assert err <= tol * (1 + ref.abs().max().item()), f"{name}: {err:.3g}"
    # Per scan layer and step a weight GEMM, a bias sum and two additions are gone.
    assert kernels[True] < kernels[False] - 4 * 8, kernels


def test_deferral_is_per_thread_and_its_backward_may_run_on_another():
    """An update defers its weight gradients on the learner's thread only: a policy step run
    on another thread while the update's scope is open (the actor, the periodic eval) gives
    bit for bit the step it gives alone, and the update the one it makes alone. The stash
    follows the update into a backward run on another thread (CUDA runs backward functions
    on PyTorch's device threads): the gradients equal a same-thread update's."""
    import threading

    from dreamer_fast.run.weights import Policy

    net, act, obs = SIZES["debug"], ActSpace(False, 3), {**VECTOR, **IMAGE}
    # bfloat16 (the GPU's precision): the deferred layers' arithmetic differs from the plain
    # ones' in rounding, so a policy step that took the deferred path would show.
    cfg = AgentConfig(batch_size=2, batch_length=8, imag_horizon=3, kernels="triton",
                      precision="bfloat16")
    agents = []
    for _ in range(2):
        torch.manual_seed(0)
        agents.append(Agent(obs, act, net, cfg, device=DEVICE))
    agent, alone = agents
    assert agent.defer
    batch = {k: v.to(DEVICE) for k, v in make_batch(obs, act, net, B=2, L=9).items()}
    policy = Policy(agent)
    step = {k: v[:, 0] for k, v in make_batch(obs, act, net, B=3, L=1, seed=7).items()
            if k in obs or k == "is_first"}

    def act_once():  # its own latent noise; the update's RNG stream left as it was
        rng = torch.get_rng_state()
        torch.manual_seed(11)
        carry = policy.initial_carry(3)
        action, carry, _ = policy.policy_step(carry, step, greedy=True)
        torch.set_rng_state(rng)
        return [action, *carry.values()]
    expected = act_once()

    deferred_ops = []  # the deferred path's joined norms: never on the actor's thread
    joined_norms = policy.dyn.ops.rms_silu_cat
    policy.dyn.ops.rms_silu_cat = lambda *a: deferred_ops.append(1) or joined_norms(*a)
    inside, go = threading.Event(), threading.Event()
    observe = agent.dyn.observe

    def paused_observe(*args, **kwargs):  # called inside the update's deferral scope
        inside.set()
        assert go.wait(60)
        return observe(*args, **kwargs)
    agent.dyn.observe = paused_observe
    torch.manual_seed(3)
    learner = threading.Thread(target=agent.train_step, args=(batch,))
    learner.start()
    assert inside.wait(60)
    got = act_once()
    go.set()
    learner.join()
    assert not deferred_ops, "the policy step took the update's deferred path"
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    torch.manual_seed(3)
    alone.train_step(batch)
    for (name, p), q in zip(agent.named_parameters(), alone.parameters()):
        assert torch.equal(p, q), name

    # Forward here, backward on another thread, flush here.
    grads = []
    for other_thread in (False, True):
        alone.zero_grad()
        torch.manual_seed(5)
        with alone.autocast():
            loss, _, _ = alone.loss(batch)
        if other_thread:
            worker = threading.Thread(target=loss.backward)
            worker.start()
            worker.join()
        else:
            loss.backward()
        alone.deferral.flush()
        grads.append({n: p.grad.clone() for n, p in alone.named_parameters()
                      if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name, g in grads[1].items():
        assert torch.equal(g, grads[0][name]), name
