"""The system around the algorithm: one process per device, an actor and a learner thread.

session (`Run`: builds envs, agent, ring and limiter, resumes, starts and pauses the threads),
loop (`train`: the scheduler of clocks, single process and data parallel), stats (what a log
tick records, the report, the start line), actor, learner, graphs (CUDA graphs and compile of
the hot steps), distributed and replicas (torch.distributed process group, lockstep learners),
device (CPU threads, allocator), checkpoint, logger, evaluate.

May import everything else in the package: config, checks, machine, flags, agent, envs, data, kernels.
"""
