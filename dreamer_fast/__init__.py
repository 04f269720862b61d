"""dreamer_fast: DreamerV3 with an asynchronous actor-learner per device.

The folders follow the architecture, each importing only those above it in this list:

- `config.py`  every setting (tyro dataclasses) and the named presets.
- `agent/`     the algorithm: world model, actor-critic, losses, optimizer (pure math).
- `envs/`      one adapter per environment suite behind `make_env`; the step format.
- `data/`      replay storage (the lock-free ring), the train-ratio limiter, synthetic batches.
- `run/`       the system around the algorithm: actor and learner threads, CUDA graphs, data
               parallel, the run loop, checkpoints, logging, evaluation.

`kernels/` (top level) holds the fused ops the agent calls, each beside its reference.
"""
