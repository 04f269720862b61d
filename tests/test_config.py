"""Config: presets, flags, and clear errors for bad values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dreamer_fast.config import DOMAINS, SIZES, Config, NetConfig

from dreamer_fast.checks import ConfigError
from dreamer_fast.flags import parse as _parse
from dreamer_fast.run.resolve import choose


def parse(argv):
    return _parse(argv, choice=choose(argv))


# id -> preset; every one keeps the env's own time limit (0: the registered one; Atari's
# 27000 agent steps is EnvPool's own). The module:Env id is tests/image_envs.py.
ROUTES = [
    (["--env", "CartPole-v1"], "control"), (["--env", "Acrobot-v1"], "control"),
    (["--env", "MountainCarContinuous-v0"], "control"), (["--env", "HalfCheetah-v5"], "control"),
    (["--env", "Pong-v5"], "atari"), (["--env", "WalkerWalk-v1"], "dmc_proprio"),
    (["--env", "AcrobotSwingup-v1"], "dmc_proprio"),
    (["--env", "CartpoleBalance-v1"], "dmc_proprio"),
    (["--env", "CartpoleBalance-v1", "--env-opts.pixels"], "dmc_vision"),
    (["--env", "image_envs:TinyImage-v0"], "vision"),
    (["--env", "image_envs:BigImage-v0"], "vision"),
    (["--env", "image_envs:GrayImage-v0"], "vision"),
    (["--env", "image_envs:Mixed-v0"], "vision"), (["--env", "crafter"], "crafter"),
    (["--env", "CartPole-v1", "--env-opts.render-image"], "vision"),
]


@pytest.mark.parametrize("argv,preset", ROUTES,
                         ids=lambda a: " ".join(a) if isinstance(a, list) else a)
def test_preset_from_suite_never_from_name(argv, preset):
    choice = choose(argv)
    cfg = _parse(argv, choice=choice)
    assert cfg.preset == preset and choice.notes[0].startswith(f"preset {preset} (")
    assert "--preset to change" in choice.notes[0]
    assert cfg.env_opts.time_limit == (27000 if preset == "atari" else 0)
    assert cfg.preset != "debug"


def test_notes_name_the_suite_and_the_cpu_model(monkeypatch):
    choice = choose(["--env", "CartPole-v1"])
    assert choice.notes == ("preset control (Gymnasium, vector observations; --preset to "
                            "change)",)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    choice = choose(["--env", "Pong-v5", "--num-envs", "64"])
    assert choice.model == "size1m" and "--model size200m for the paper's settings" in (
        choice.notes[1])
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert choose(["--env", "Pong-v5"]).model == "size200m"  # a GPU: the paper's
    assert choose(["--env", "Pong-v5", "--device", "cuda"]).model == "size200m"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    # An explicit choice is kept, and so is a preset whose model is small already.
    assert choose(["--env", "Pong-v5", "--model", "size12m"]).model == "size12m"
    assert choose(["--env", "CartPole-v1"]).model == "size300k"


def test_env_picks_domain_and_model(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    cfg = parse(["--env", "Pong-v5", "--num-envs", "64"])
    assert (cfg.preset, cfg.model, cfg.num_envs) == ("atari", "size200m", 64)
    assert cfg.env_opts.gray and cfg.env_opts.image_size == 96 and cfg.train_ratio == 32
    cfg = parse(["--env", "WalkerWalk-v1"])
    assert (cfg.preset, cfg.model, cfg.train_ratio, cfg.env_opts.repeat) == (
        "dmc_proprio", "size1m", 1024, 1)
    cfg = parse(["--env", "Pong-v5", "--preset", "atari100k", "--model", "size12m",
                 "--net.units", "128", "--agent.lam", "0.9"])
    assert cfg.env_opts.sticky == 0 and cfg.net.deter == 2048 and cfg.net.units == 128
    assert cfg.agent.lam == 0.9 and cfg.train_ratio == 256


def test_control_preset_train_ratio_by_suite():
    # Gymnasium keeps the preset's 16; DMC under --preset control gets 32 and says so.
    assert parse(["--env", "CartPole-v1"]).train_ratio == 16
    choice = choose(["--env", "CartpoleBalance-v1", "--preset", "control"])
    assert choice.train_ratio == 32 and choice.notes == (
        "train_ratio 32 (the control preset on DMC; --train-ratio to change)",)
    cfg = _parse(["--env", "CartpoleBalance-v1", "--preset", "control"], choice=choice)
    assert (cfg.preset, cfg.model, cfg.train_ratio) == ("control", "size300k", 32)
    cfg = _parse(["--env", "CartpoleBalance-v1", "--preset", "control", "--train-ratio", "8"],
                 choice=choose(["--env", "CartpoleBalance-v1", "--preset", "control"]))
    assert cfg.train_ratio == 8  # a flag still wins
    assert choose(["--env", "CartPole-v1"]).train_ratio is None
    assert parse(["--env", "CartpoleBalance-v1"]).train_ratio == 1024  # dmc_proprio: unchanged


def test_help_choices_are_the_presets_and_sizes():
    from typing import get_args

    from dreamer_fast.config import Model, Preset

    assert set(get_args(Preset)) == set(DOMAINS) and set(get_args(Model)) == set(SIZES)


def test_presets_exist():
    assert set(DOMAINS) == {"atari", "atari100k", "dmc_proprio", "dmc_vision", "crafter",
                            "control", "vision", "debug"}
    crafter = DOMAINS["crafter"]  # the official crafter config
    assert (crafter.num_envs, crafter.train_ratio, crafter.steps, crafter.model) == (
        1, 512.0, 1_100_000, "size200m")
    assert {"size1m", "size12m", "size25m", "size50m", "size100m", "size200m",
            "size400m"} <= set(SIZES)
    assert SIZES["size12m"].deter == 2048 and SIZES["size400m"].classes == 96


@pytest.mark.parametrize("kwargs,field", [
    ({"deter": -8}, "net.deter"), ({"deter": 100, "blocks": 8}, "net.deter"),
    ({"bins": 254}, "net.bins"), ({"unimix": 1.5}, "net.unimix")])
def test_bad_net_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        NetConfig(**kwargs)


def test_unknown_presets_list_allowed_values():
    with pytest.raises(ConfigError, match="model='huge'.*size200m"):
        parse(["--model", "huge"])
    with pytest.raises(ConfigError, match="preset='nope'.*dmc_vision"):
        parse(["--preset", "nope"])
    with pytest.raises(ConfigError, match="num_envs=0"):
        Config(num_envs=0)


def test_help_documents_fields():
    out = subprocess.run([sys.executable, "run.py", "--help"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for flag in ("--env", "--num-envs", "--preset", "--model", "--net.deter",
                 "--agent.optim.lr", "--replay.capacity", "--env-opts.sticky"):
        assert flag in out.stdout
