"""dreamer_fast: train DreamerV3, or evaluate a trained run.

    python run.py --env Pong-v5 --num-envs 64              # train (resumes an existing --logdir)
    torchrun --nproc-per-node 2 run.py --env Pong-v5       # data parallel: one process per GPU,
                                                           # each with its own envs and replay
    python run.py --eval --logdir DIR [--episodes 10] [--greedy]
    python run.py --help                                   # every flag, with its default
"""

from __future__ import annotations

import sys

import os

from dreamer_fast.config import ConfigError, choose, parse


def main(argv: list[str]) -> None:
    try:
        if "--eval" in argv:
            from dreamer_fast.run.evaluate import evaluate

            args = _eval_args(argv)
            evaluate(args["logdir"], args["episodes"], args["greedy"], args["device"])
        else:
            from dreamer_fast.run.loop import train

            choice = choose(argv, route)
            cfg = parse(argv, choice=choice)
            if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks
                for note in choice.notes:
                    print(note, flush=True)
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


def _eval_args(argv: list[str]) -> dict:
    args = {"logdir": None, "episodes": "10", "device": "auto", "greedy": False}
    rest = [a for a in argv if a != "--eval"]
    while rest:
        arg = rest.pop(0)
        key = arg.lstrip("-").replace("-", "_")
        if key == "greedy":
            args["greedy"] = True
        elif key in args and rest:
            args[key] = rest.pop(0)
        else:
            raise ConfigError(f"--eval takes --logdir DIR, --episodes N, --greedy, --device; "
                              f"got {arg!r}")
    if not args["logdir"]:
        raise ConfigError("--eval needs --logdir (a run folder or a checkpoint file)")
    return {**args, "episodes": int(args["episodes"])}


if __name__ == "__main__":
    main(sys.argv[1:])
