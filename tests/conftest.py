"""Test-wide settings: CPU-only machines run Triton kernels in the interpreter and MuJoCo on EGL."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MUJOCO_GL", "egl")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
