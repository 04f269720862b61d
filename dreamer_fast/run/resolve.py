"""One resolve step: what the user typed, the env and the machine -> a frozen, fully concrete
config, before anything heavy is built.

    choose(argv)            the domain preset from the env's suite (never its name) and the
                            model (the preset's; size1m without a GPU), one note each
    flags.parse(argv, ..)   the user's config: the preset's defaults with every flag applied
    resolve(cfg, spec)      every "auto" settled (device, graphs, kernels, precision, by
                            machine.py's settle_* functions, the one place each is decided),
                            the logdir named and checked, and the replay capacity sized from
                            what the env's spaces store per step (`spec`) and the machine's
                            memory (session.open_run builds the env, then calls it once)

The result is what config.json holds and the start line prints; nothing downstream decides any
of it again (the run reads cfg.device, cfg.graphs, cfg.agent.kernels and cfg.agent.precision
as they are).
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from dreamer_fast.config import CONTROL_DMC_RATIO, Config

from dreamer_fast.checks import ConfigError
from dreamer_fast.flags import Choice, _flag, default_choice
from dreamer_fast.machine import settle
from dreamer_fast.data.capacity import replay_capacity
from dreamer_fast.data.ring import RING_MARGIN
from dreamer_fast.data.files import DiskFull, atomic_write
from dreamer_fast.run import checkpoint
from dreamer_fast.run import distributed as D
from dreamer_fast.run.estimate import update_memory
from dreamer_fast.run.logger import check_wandb

CPU_REPLAY_STEPS = 200_000
"""The automatic replay's ceiling on a CPU: a CPU trains tens of agent steps per second at
best (2 cores: ~90/s on CartPole, a few per second from images), so a longer replay would
hold memory the run does not reach in a day."""
REPLAY_RAM_SHARE = {True: 0.75, False: 0.4}
"""Share of the RAM left after the training memory an automatic replay may take, with a GPU
(True) and on a CPU (False); the --replay.capacity help states both."""


def choose(argv: list[str]) -> Choice:
    """The preset (`--preset`, else from the env's suite) and the model (config.default_choice),
    with a note on each choice made for the user; an unknown env id is one ConfigError line
    naming the closest ids."""
    from dreamer_fast.envs import preset_for, suite_of

    env = _flag(argv, "env") or Config.env
    preset = why = None
    ratio = None
    if _flag(argv, "preset") is None:
        pixels = any(f"--env-opts.{name}" in argv or _flag(argv, f"env-opts.{name}") == "True"
                     for name in ("pixels", "render-image"))
        try:
            preset, why = preset_for(env, pixels)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from e
    try:
        if suite_of(env) == "dmc":
            ratio = CONTROL_DMC_RATIO  # the control preset on EnvPool DMC
    except ValueError:
        pass
    return default_choice(argv, preset, why, ratio, "the control preset on DMC")


def resolve(cfg: Config, spec: dict | None) -> Config:
    """The run's frozen, concrete config: every "auto" settled, the logdir named and checked,
    the replay capacity sized from `spec` (data/capacity.replay_spec of the env; None for an
    offline run, whose replay is its dataset). Only the env exists when it runs: a bad flag, a
    replay too small for one window per stream, a logdir that is a file or cannot be written
    each fail in one line before the agent or the replay is allocated."""
    cfg = settle(cfg)
    now = time.time()
    if cfg.logdir is None and D.world_size() > 1:  # one folder: rank 0's clock names it
        now = float(D.control_all_gather(torch.tensor([now], dtype=torch.float64))[0, 0])
    stamp = time.strftime('%Y%m%d-%H%M%S', time.localtime(now))
    name = (cfg.name or cfg.env).replace(":", "_").replace("/", "_")
    logdir = cfg.logdir or os.path.join("logdir", f"{name}-{stamp}")
    if cfg.track:
        check_wandb()
    need = (cfg.agent.batch_length + 1 + RING_MARGIN) * cfg.num_envs
    if 0 < cfg.replay.capacity < need:
        raise ConfigError(
            f"invalid config: replay.capacity={cfg.replay.capacity}; allowed: 0 (automatic) or "
            f">= {need:,} ({cfg.num_envs} envs x (batch_length {cfg.agent.batch_length} + 1 + "
            f"{RING_MARGIN} margin steps) per env stream)")
    if D.rank() == 0:
        check_logdir(logdir)
    cfg = dataclasses.replace(cfg, logdir=logdir)
    return cfg if spec is None else _with_replay(cfg, spec)


def _with_replay(cfg: Config, spec: dict) -> Config:
    """cfg with its replay capacity concrete: the saved one on a resume, else automatic (the
    official 5M steps, or what fits in the RAM left after the training memory, at most this
    process's share of --steps, and at most CPU_REPLAY_STEPS on a CPU), or the user's if it
    fits. Every rank of a data-parallel world takes the smallest."""
    budget = -(-cfg.steps // D.world_size())  # each actor stops at its share
    cuda = cfg.device.startswith("cuda")
    local = D.local_world_size()
    capacity = replay_capacity(
        spec, cfg.replay.capacity, checkpoint.saved_capacity(cfg.logdir),
        # CPU: the page cache, the envs and the update's peaks need slack beyond the
        # estimate (Pong, size1m, 64 envs: 15.2 GB peak RSS with half the RAM as replay)
        REPLAY_RAM_SHARE[cuda] / local, reserve=update_memory(cfg, spec) * local * cfg.seeds,
        steps=budget, minimum=cfg.num_envs * (cfg.agent.batch_length + 1 + RING_MARGIN),
        ceiling=None if cuda else CPU_REPLAY_STEPS, copies=cfg.seeds)
    if D.world_size() > 1:  # ranks measure free RAM at slightly different moments: agree
        capacity = int(D.control_all_gather(
            torch.tensor([capacity], dtype=torch.float64))[:, 0].min())
    return dataclasses.replace(cfg, replay=dataclasses.replace(cfg.replay, capacity=capacity))


def check_logdir(logdir: str) -> None:
    """A run folder this process can create and write, with room for a file, checked before
    anything is built: else one ConfigError line naming the problem and the fix."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        what = ("a checkpoint file" if os.path.basename(logdir) == checkpoint.CHECKPOINT
                else "a file")
        raise ConfigError(f"--logdir {logdir} is {what}, not a run folder: pass the folder "
                          f"that holds it (--logdir {os.path.dirname(logdir) or '.'}) to resume "
                          "that run, or a new folder for a new run")
    probe = os.path.join(logdir, ".write-test")
    made, folder = [], os.path.abspath(logdir)
    while not os.path.exists(folder):  # the folders this check creates, and removes again
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(logdir, exist_ok=True)
        atomic_write(probe, lambda f: f.write(b"x" * 4096), 4096)
        os.remove(probe)
        for folder in made:  # a run that fails before it starts leaves no folder behind
            os.rmdir(folder)
    except DiskFull as e:
        raise ConfigError(f"no space left on the device of --logdir {logdir} ({e.free:,} bytes "
                          "free): free some space, or use a --logdir on another disk") from None
    except PermissionError:
        raise ConfigError(f"cannot write to --logdir {logdir}: permission denied; use a folder "
                          "you can write to (e.g. --logdir ~/runs/NAME)") from None
    except OSError as e:
        raise ConfigError(f"cannot write to --logdir {logdir}: {e.strerror or e}; use another "
                          "--logdir") from None
