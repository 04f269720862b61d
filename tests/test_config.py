"""Config: presets, flags, and clear errors for bad values."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dreamer_fast.config import DOMAINS, SIZES, Config, ConfigError, NetConfig, parse


def test_env_picks_domain_and_model():
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


def test_presets_exist():
    assert set(DOMAINS) == {"atari", "atari100k", "dmc_proprio", "dmc_vision", "debug"}
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
    out = subprocess.run([sys.executable, "-c", "from dreamer_fast.config import parse; "
                          "parse(['--help'])"], capture_output=True, text=True)
    for flag in ("--env", "--num-envs", "--preset", "--model", "--net.deter",
                 "--agent.optim.lr", "--replay.capacity", "--env-opts.sticky"):
        assert flag in out.stdout
