"""Write a run's replay as a Minari dataset, so data collected here can be shared.

    python -m dreamer_fast.export --logdir DIR --minari cartpole/dreamer-v0 [--env ID] [--jpeg]

Reads every stored step of DIR's replay folder(s) (what the run kept on disk: with
--replay.keep-chunks that is the whole run), cuts it into episodes and writes them to the
local Minari store (MINARI_DATASETS_PATH, default ~/.minari/datasets); the step-format
mapping is in dreamer_fast/data/datasets.py. `python run.py --offline cartpole/dreamer-v0
--env CartPole-v1` trains from it again.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

from dreamer_fast.config import ExportConfig

from dreamer_fast.checks import ConfigError
from dreamer_fast.flags import parse_export
from dreamer_fast.data import datasets


def env_spaces(env_id: str):
    """(Gymnasium id to record or None, observation space, action space) of the env: the
    spaces of a Gymnasium id (bounds and starts to keep), else None."""
    from dreamer_fast.envs import suite_of

    try:
        suite = suite_of(env_id)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if suite != "gymnasium":
        return None, None, None
    import gymnasium

    env = gymnasium.make(env_id)
    try:
        return env_id, env.observation_space, env.action_space
    finally:
        env.close()


def run_env(path: str) -> str | None:
    """The env id of the run whose replay is at path (its config.json), if there is one."""
    for folder in (path, os.path.dirname(os.path.abspath(path))):
        file = os.path.join(folder, "config.json")
        if os.path.isfile(file):
            with open(file) as f:
                return json.load(f).get("env")
    return None


def export(ecfg: ExportConfig):
    folders = datasets.replay_folders(ecfg.logdir)
    if not folders:
        raise ConfigError(f"{ecfg.logdir} holds no replay folder of this project (a logdir "
                          "with replay/ or replay-rank*/, or such a folder itself)")
    env_id = ecfg.env or run_env(ecfg.logdir)
    record, obs_space, act_space = env_spaces(env_id) if env_id else (None, None, None)
    from gymnasium import spaces

    if act_space is not None and not isinstance(act_space, (spaces.Discrete, spaces.Box)):
        act_space = None
    description = ecfg.description or (f"DreamerV3 replay of {env_id or 'an env'} exported by "
                                       f"dreamer_fast from {os.path.basename(os.path.abspath(ecfg.logdir))}")
    with warnings.catch_warnings():  # Minari asks for author and email fields we do not have
        warnings.filterwarnings("ignore", message=r"`(author|author_email|eval_env)` is set")
        dataset = datasets.export_minari(folders, ecfg.minari, act_space, record, obs_space,
                                         ecfg.jpeg, description)
    print(f"wrote Minari dataset {ecfg.minari}: {dataset.total_episodes:,} episodes, "
          f"{dataset.total_steps:,} steps from {', '.join(folders)} (env {env_id or 'unknown'})",
          flush=True)
    return dataset


def main(argv: list[str]) -> None:
    try:
        export(parse_export(argv))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except ValueError as e:  # Minari: the dataset id exists already, or is malformed
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
