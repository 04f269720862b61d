"""dreamer_fast: train DreamerV3, or evaluate a trained run.

    python run.py --env Pong-v5 --num-envs 64              # train (resumes an existing --logdir)
    torchrun --nproc-per-node 2 run.py --env Pong-v5       # data parallel: one process per GPU,
                                                           # each with its own envs and replay
    python run.py --offline SOURCE --env CartPole-v1 [--updates N]   # train from a fixed
                                                           # dataset (a replay folder, Minari)
    python run.py --eval --logdir DIR [--episodes 10] [--greedy] [--seed 0]
    python run.py --eval --help                            # evaluation's flags
    python run.py --help                                   # every flag, with its default

The same as the installed `dreamer-fast train ...` / `dreamer-fast eval ...`
(dreamer_fast/cli.py, which also has export, plot and replay).
"""

import sys

from dreamer_fast.cli import run_py

if __name__ == "__main__":
    run_py(sys.argv[1:])
