"""The command line's flags -> a Config: the defaults of a chosen preset and model with every
flag applied (tyro), and the eval and export commands' flags. run/resolve.py chooses the preset
from the env and settles every "auto" of the result.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import tyro

from dreamer_fast.config import DOMAINS, SIZES, Config, EvalConfig, ExportConfig

from dreamer_fast.checks import ConfigError
from dreamer_fast.machine import CPU_MODEL, LARGE_DETER, settle_device


def _flag(argv: list[str], name: str) -> str | None:
    """Value of `--name X` or `--name=X` in argv (last one wins), without parsing the rest."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


@dataclass(frozen=True)
class Choice:
    """What the defaults were chosen from, for the start line."""

    preset: str
    model: str
    notes: tuple[str, ...]
    train_ratio: float | None = None
    """The preset's train_ratio for this env's suite where it differs (control on DMC)."""


def default_choice(argv: list[str], preset: str | None = None, why: str = "",
           train_ratio: float | None = None, ratio_why: str = "") -> Choice:
    """The Choice the defaults come from: the domain preset (`--preset`, else `preset`: the
    env's, picked by run/resolve.choose, with `why`) and the model (`--model`, else the
    preset's; without a GPU a model of deter >= LARGE_DETER becomes CPU_MODEL, so the first
    command runs where it is typed), with one note on each choice made for the user."""
    notes = []
    flag = _flag(argv, "preset")
    if flag is not None:
        preset = flag
    elif preset is None:
        raise ConfigError("no --preset given and no env to pick one from")
    else:
        notes.append(f"preset {preset} ({why}; --preset to change)")
    if preset not in DOMAINS:
        raise ConfigError(f"invalid config: preset={preset!r}; allowed: {', '.join(DOMAINS)}")
    model = _flag(argv, "model")
    if model is None:
        model = DOMAINS[preset].model
        device = settle_device(_flag(argv, "device") or Config.device)
        if SIZES[model].deter >= LARGE_DETER and not device.startswith("cuda"):
            notes.append(f"model {CPU_MODEL} instead of the preset's {model}: no GPU here, and "
                         f"a {model} update takes minutes on a CPU (--model {model} for the "
                         "paper's settings)")
            model = CPU_MODEL
    if model not in SIZES:
        raise ConfigError(f"invalid config: model={model!r}; allowed: {', '.join(SIZES)}")
    if train_ratio is not None and preset == "control":
        notes.append(f"train_ratio {train_ratio:g} ({ratio_why}; --train-ratio to change)")
    else:
        train_ratio = None
    return Choice(preset, model, tuple(notes), train_ratio)


def parse(argv: list[str] | None = None, choice: Choice | None = None,
          prog: str | None = None) -> Config:
    """The user's Config from command-line flags: the defaults of `choice` (the preset and
    model; run/resolve.choose picks them from the env, and without it `--preset` must be
    given), with every field overridable (`--net.deter 1024`, `--agent.lam 0.9`). Its "auto"
    values are settled by run/resolve.resolve."""
    argv = _normalise(sys.argv[1:] if argv is None else argv)
    choice = choice or default_choice(argv)
    env = _flag(argv, "env") or Config.env
    default = replace(DOMAINS[choice.preset], env=env, preset=choice.preset, model=choice.model,
                      net=SIZES[choice.model])
    if choice.train_ratio is not None:
        default = replace(default, train_ratio=choice.train_ratio)
    description = Config.__doc__
    if any(a in ("-h", "--help") for a in argv):  # which defaults the help shows
        shown = (f"the {choice.preset} preset's, model {choice.model}, for --env {env}" +
                 (" (the default env)" if _flag(argv, "env") is None else ""))
        description = (f"Defaults shown: {shown}. Each env has its preset's defaults: "
                       "python run.py --env CartPole-v1 --help shows them for that env.\n\n"
                       + description)
    return tyro.cli(Config, default=default, args=argv, description=description, prog=prog)


def parse_export(argv: list[str]) -> ExportConfig:
    """ExportConfig from the flags of `python -m dreamer_fast.export`."""
    return tyro.cli(ExportConfig, args=argv, prog="python -m dreamer_fast.export",
                    description=ExportConfig.__doc__)


def parse_eval(argv: list[str], prog: str = "run.py --eval") -> EvalConfig:
    """EvalConfig from the flags after `--eval` (tyro: `--help`, `--flag=value`)."""
    return tyro.cli(EvalConfig, args=argv, prog=prog, description=EvalConfig.__doc__)


def _normalise(argv: list[str]) -> list[str]:
    return [a.replace("--num_envs", "--num-envs").replace("--train_ratio", "--train-ratio")
            for a in argv]
