"""What the machine decides: each "auto" that depends on the device, settled in one place.

run/resolve.resolve applies `settle` to a run's config; the eval of a checkpoint applies it
again on the machine it runs on (a checkpoint's machine choices belong to the machine that
trained it), and the Agent applies settle_kernels / settle_precision to a library caller's
"auto" (tests, benches). flags.py reads CPU_MODEL and LARGE_DETER to pick a model a CPU can
train.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from dreamer_fast.config import Config

from dreamer_fast.checks import ConfigError


CPU_MODEL = "size1m"
"""The model a preset's GPU-sized model (deter >= LARGE_DETER) becomes without a GPU."""
LARGE_DETER = 2048
"""deter from which (size12m and up) a CPU update takes minutes: measured 77 s per size12m
image update and 1.3 s per size1m vector update on 2 cores (bench/learner.py)."""


def settle_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is visible, else 'cpu'; a CUDA device asked for
    where none is visible is a ConfigError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but no CUDA device is visible here; use "
                          "--device auto or --device cpu")
    return device


def settle_graphs(graphs: str, device: str) -> str:
    """'auto' -> 'on' with CUDA, 'off' elsewhere; 'on' off CUDA is a ConfigError."""
    kind = device.split(":")[0]
    if graphs not in ("auto", "on", "off"):
        raise ConfigError(f"invalid config: graphs={graphs!r}; allowed: auto, on, off")
    if graphs == "on" and kind != "cuda":
        raise ConfigError(f"invalid config: graphs='on' needs a CUDA device, got {kind!r}; "
                          "allowed there: auto or off")
    return graphs if graphs != "auto" else ("on" if kind == "cuda" else "off")


def settle_kernels(kernels: str, device: str) -> str:
    """'auto' -> 'triton' on CUDA, 'fused' elsewhere; 'triton' off CUDA needs the Triton
    interpreter (TRITON_INTERPRET=1), else a ConfigError."""
    kind = device.split(":")[0]
    if kernels == "auto":
        return "triton" if kind == "cuda" else "fused"
    if kernels == "triton" and kind != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("invalid config: agent.kernels='triton' on a non-CUDA device; allowed: "
                          "fused, ref or auto (or set TRITON_INTERPRET=1 to run kernels "
                          "interpreted)")
    return kernels


def settle_precision(precision: str, device: str) -> str:
    """'auto' -> 'bfloat16' matmuls on CUDA, 'float32' elsewhere."""
    if precision == "auto":
        return "bfloat16" if device.split(":")[0] == "cuda" else "float32"
    return precision


def settle(cfg: Config) -> Config:
    """cfg with every 'auto' of the machine settled: device, graphs, kernels, precision.
    Packed seeds (cfg.seeds > 1): kernels 'auto' is 'fused' on every device. The Triton
    kernels run under their torch.func.vmap (--agent.kernels triton), but no GPU has measured
    them packed yet, while the fused ops are what the packed CPU runs were measured with."""
    device = settle_device(cfg.device)
    packed = cfg.seeds > 1
    agent = replace(cfg.agent, kernels=settle_kernels(cfg.agent.kernels,
                                                      "cpu" if packed else device),
                    precision=settle_precision(cfg.agent.precision, device))
    return replace(cfg, device=device, graphs=settle_graphs(cfg.graphs, device), agent=agent)
