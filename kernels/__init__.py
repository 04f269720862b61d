"""Fused ops of the learner hot path, each with a plain-PyTorch reference.

`get_ops("ref")` returns the references (CPU, tests); `get_ops("triton")` the Triton kernels
once they exist for an op (falling back to the reference op by op). The agent calls ops only
through the namespace it got here, so both implementations share one call site.
"""

from __future__ import annotations

from types import SimpleNamespace

from kernels import categorical, rssm_step, twohot

OPS = ("rms_silu", "gru_update", "twohot_loss", "twohot_mean", "latent_sample", "kl_free")
_MODULES = {"rms_silu": rssm_step, "gru_update": rssm_step, "twohot_loss": twohot,
            "twohot_mean": twohot, "latent_sample": categorical, "kl_free": categorical}


def get_ops(impl: str) -> SimpleNamespace:
    """Namespace of the ops for impl 'ref' or 'triton'."""
    if impl not in ("ref", "triton"):
        raise ValueError(f"unknown kernels impl {impl!r}; allowed: ref, triton")
    ops = {}
    for name in OPS:
        module = _MODULES[name]
        fast = getattr(module, name, None) if impl == "triton" else None
        ops[name] = fast or getattr(module, f"{name}_ref")
    ops["impl"] = impl
    return SimpleNamespace(**ops)
