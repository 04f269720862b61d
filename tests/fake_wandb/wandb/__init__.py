"""A stand-in for the wandb package in tests (put tests/fake_wandb on PYTHONPATH): records
init, log and finish calls as JSON lines to $FAKE_WANDB_LOG instead of talking to W&B."""

import json
import os


def _record(**row):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


class Video:
    def __init__(self, data_or_path, fps=None, format=None):
        self.path, self.format = data_or_path, format

    def __str__(self):
        return f"Video({self.path}, {self.format})"


class Run:
    def log(self, values, step=None):
        _record(call="log", step=step, values={k: str(v) if isinstance(v, Video) else v
                                               for k, v in values.items()})

    def finish(self):
        _record(call="finish")


def init(**kwargs):
    _record(call="init", **{k: v for k, v in kwargs.items() if k != "config"},
            config_env=kwargs["config"]["env"])
    return Run()
