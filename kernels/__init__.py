"""Fused ops of the learner hot path, each with a plain-PyTorch reference.

`get_ops("ref")` returns the references (tests); `get_ops("triton")` the Triton kernels (GPU);
`get_ops("fused")` the CPU fast path: PyTorch ops with hand-written backwards (kernels/fused.py),
for the ops where that pays on a CPU. Both fall back to the reference op by op. The agent calls ops only
through the namespace it got here, so both implementations share one call site.
"""

from __future__ import annotations

from types import SimpleNamespace

from . import categorical, fused, gru, kl, norms, policy, resets, returns, twohot

IMPLS = ("ref", "triton", "fused")
OPS = ("rms_silu", "gru_update", "twohot_loss", "twohot_mean", "latent_sample", "kl_free",
       "lambda_return", "mask_rows", "action_sample", "gru_cell", "rms_silu_cat",
       "rms_silu_add")
_MODULES = {"rms_silu": norms, "gru_update": gru, "twohot_loss": twohot,
            "twohot_mean": twohot, "latent_sample": categorical, "kl_free": kl,
            "lambda_return": returns, "mask_rows": resets, "action_sample": policy,
            "gru_cell": gru, "rms_silu_cat": norms,
            "rms_silu_add": norms}


def get_ops(impl: str) -> SimpleNamespace:
    """Namespace of the ops for impl 'ref', 'triton' or 'fused'."""
    if impl not in IMPLS:
        raise ValueError(f"unknown kernels impl {impl!r}; allowed: {', '.join(IMPLS)}")
    ops = {}
    for name in OPS:
        module = _MODULES[name]
        fast = None
        if impl == "triton":
            fast = getattr(module, name, None)
        elif impl == "fused":
            fast = getattr(fused, f"{name}_fused", None)
        ops[name] = fast or getattr(module, f"{name}_ref")
    ops["impl"] = impl
    return SimpleNamespace(**ops)
