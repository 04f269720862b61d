"""The DreamerV3 algorithm: the math of the world model and the actor-critic.

nets (layers, fan-in init), deferred (the scans' weight gradients once per update, the GPU
path; per thread), dists (symlog, twohot, categoricals), rssm (encoder, block-GRU RSSM,
decoder), heads (reward, continue, actor, critic), losses (the world-model, imagination and replay
losses as free functions, the return normaliser), imagine (imagination's rollout schedules),
optim (AGC -> LaProp), parallel (the gradient all-reduce and return all-gather the math needs
as one replica of several), agent (the `Agent` with its pure step functions: policy_step,
train_step, report_step).

May import: torch, numpy, `dreamer_fast.config` and `.checks`, `dreamer_fast.machine` (a
library caller's "auto" kernels and precision) and the `kernels` package. Imports nothing of
`envs`, `data` or `run`: the algorithm knows no threads, envs, files or devices beyond the
tensors it is given. Module attribute names here are checkpoint keys: keep them.
"""
