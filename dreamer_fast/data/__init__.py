"""Replay storage and its flow control, between the actor (writer) and the learner (reader).

ring (the lock-free per-stream ring buffer with latent write-back), capacity (what a step
holds and how many steps the replay gets), limiter (the samples-per-insert rate limiter that
holds the train ratio), store (the replay on disk), files (atomic writes, full disks, dead
writers' temp files), datasets (fixed datasets for offline training: replay
folders and Minari), synthetic (random batches in the learner's input layout, for tests and
benches).

May import: torch, numpy, `dreamer_fast.config` and `.checks`, `dreamer_fast.envs.base` (the step format)
and `dreamer_fast.envs.spaces` (the observation and action space rules).
Imports nothing of `agent` or `run`.
"""
