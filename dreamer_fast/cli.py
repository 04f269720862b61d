"""One command line: `dreamer-fast SUBCOMMAND [flags]` (installed by pyproject), and run.py.

    dreamer-fast train --env CartPole-v1     # = python run.py --env CartPole-v1
    dreamer-fast eval --logdir DIR           # = python run.py --eval --logdir DIR
    dreamer-fast export --logdir DIR --minari NAME
    dreamer-fast plot LOGDIR [LOGDIR ...]
    dreamer-fast replay REPLAY_FOLDER        # what a replay folder holds
    dreamer-fast SUBCOMMAND --help           # its flags

The first word picks the subcommand; each parses its own flags (train, eval and export with
tyro from config.py's dataclasses, plot and replay with argparse) exactly as its older entry
point does: `python run.py ...`, `python -m dreamer_fast.export`, `python -m
dreamer_fast.plot` and `python -m dreamer_fast.data.store` keep working.
"""

from __future__ import annotations

import os
import sys

from dreamer_fast.checks import ConfigError
from dreamer_fast.flags import parse


def train(argv: list[str], prog: str = "dreamer-fast train") -> None:
    """Train, resume or train offline (`--offline`): the flags of `python run.py`."""
    from dreamer_fast.run.resolve import choose

    choice = choose(argv)
    cfg = parse(argv, choice=choice, prog=prog)
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks
        for note in choice.notes:
            print(note, flush=True)
    if cfg.offline is not None and cfg.seeds > 1:
        from dreamer_fast.run.packed_offline import train as train_packed_offline

        train_packed_offline(cfg)
    elif cfg.offline is not None:
        from dreamer_fast.run.offline import train_offline

        train_offline(cfg)
    elif cfg.seeds > 1:
        from dreamer_fast.run.packed_loop import train as train_packed

        train_packed(cfg)
    else:
        from dreamer_fast.run.loop import train as train_online

        train_online(cfg)


def evaluate(argv: list[str], prog: str = "dreamer-fast eval") -> None:
    """Evaluate a run's checkpoint: the flags of `python run.py --eval`."""
    from dreamer_fast.flags import parse_eval
    from dreamer_fast.run.evaluate import evaluate as run_eval

    if run_eval(parse_eval(argv, prog))["interrupted"]:
        sys.exit(130)


def export(argv: list[str]) -> None:
    """Write a run's replay as a Minari dataset."""
    from dreamer_fast.export import main

    main(argv)


def plot(argv: list[str]) -> None:
    """Learning curves of run folders."""
    from dreamer_fast.plot import main

    main(argv)


def replay(argv: list[str]) -> None:
    """What a replay folder holds: run id, streams, keys, chunk files, save points."""
    from dreamer_fast.data.store import main

    main(argv)


SUBCOMMANDS = {"train": train, "eval": evaluate, "export": export, "plot": plot,
               "replay": replay}


def usage() -> str:
    lines = ["usage: dreamer-fast {" + ",".join(SUBCOMMANDS) + "} [flags]", "",
             "DreamerV3 with an asynchronous actor-learner per device.", "", "subcommands:"]
    lines += [f"  {name:<8} {fn.__doc__.splitlines()[0]}" for name, fn in SUBCOMMANDS.items()]
    lines += ["", "dreamer-fast SUBCOMMAND --help lists a subcommand's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """The console script `dreamer-fast` (prog: the usage line's name, run.py's own)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        sys.exit(f"error: unknown subcommand {command!r}; choose one of "
                 f"{', '.join(SUBCOMMANDS)} (dreamer-fast --help)")
    try:
        if command in ("train", "eval"):
            SUBCOMMANDS[command](rest, prog or f"dreamer-fast {command}")
        else:
            SUBCOMMANDS[command](rest)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def run_py(argv: list[str]) -> None:
    """`python run.py [--eval] ...`: train, or evaluate with --eval."""
    if "--eval" in argv:
        main(["eval", *[a for a in argv if a != "--eval"]], "run.py --eval")
    else:
        main(["train", *argv], "run.py")
