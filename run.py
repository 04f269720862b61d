"""dreamer_fast: train DreamerV3, or evaluate a trained run.

    python run.py --env Pong-v5 --num-envs 64              # train (resumes an existing --logdir)
    torchrun --nproc-per-node 2 run.py --env Pong-v5       # data parallel: one process per GPU,
                                                           # each with its own envs and replay
    python run.py --offline SOURCE --env CartPole-v1 [--updates N]   # train from a fixed
                                                           # dataset (a replay folder, Minari)
    python run.py --eval --logdir DIR [--episodes 10] [--greedy] [--seed 0]
    python run.py --eval --help                            # evaluation's flags
    python run.py --help                                   # every flag, with its default
"""

from __future__ import annotations

import os
import sys

from dreamer_fast.config import ConfigError, choose, parse


def main(argv: list[str]) -> None:
    try:
        if "--eval" in argv:
            from dreamer_fast.config import parse_eval
            from dreamer_fast.run.evaluate import evaluate

            if evaluate(parse_eval([a for a in argv if a != "--eval"]))["interrupted"]:
                sys.exit(130)
        else:
            choice = choose(argv, route, suite)
            cfg = parse(argv, choice=choice)
            if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks
                for note in choice.notes:
                    print(note, flush=True)
            if cfg.offline is not None:
                from dreamer_fast.run.offline import train_offline

                train_offline(cfg)
            else:
                from dreamer_fast.run.loop import train

                train(cfg)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def route(env_id: str, pixels: bool) -> tuple[str, str]:
    """The preset from the env's suite; an unknown id fails naming the closest ones."""
    from dreamer_fast.envs import preset_for

    try:
        return preset_for(env_id, pixels)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def suite(env_id: str) -> str | None:
    """The env's suite, None for an id no suite knows (route names the fix for those)."""
    from dreamer_fast.envs import suite_of

    try:
        return suite_of(env_id)
    except ValueError:
        return None


if __name__ == "__main__":
    main(sys.argv[1:])
