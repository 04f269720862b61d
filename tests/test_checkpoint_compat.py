"""A run saved by an older layout of the package still loads and trains on (checkpoint keys are
module attribute names; moving modules must not change them). The fixture is a tiny CartPole
run saved by commit 66b07c6, before the package split (tests/fixtures/ckpt-66b07c6/README.md)."""

import dataclasses
import json
import pathlib
import shutil

import torch

from dreamer_fast.data.store import list_replay, load_stream
from dreamer_fast.run import checkpoint
from dreamer_fast.run.loop import train
from dreamer_fast.run.session import Run

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "ckpt-66b07c6"


def saved_config(logdir):
    ckpt = checkpoint.load_checkpoint(str(logdir / checkpoint.CHECKPOINT))
    cfg = checkpoint.config_from_dict(json.loads(ckpt["config"]))
    return ckpt, dataclasses.replace(cfg, logdir=str(logdir), device="cpu")


def test_old_checkpoint_restores_exactly(tmp_path):
    logdir = tmp_path / "run"
    shutil.copytree(FIXTURE, logdir)
    ckpt, cfg = saved_config(logdir)
    run = Run(cfg)
    try:
        assert run.resume()
        state = run.agent.state_dict()
        assert state.keys() == ckpt["agent"].keys()
        for key, value in ckpt["agent"].items():
            assert torch.equal(state[key], value), key
        assert run.ring.inserted == 300 and run.counters["updates"] == 532
        assert run.limiter.state_dict() == ckpt["limiter"]
    finally:
        run.env.close()


def test_old_checkpoint_trains_on(tmp_path):
    logdir = tmp_path / "run"
    shutil.copytree(FIXTURE, logdir)
    _, cfg = saved_config(logdir)
    train(dataclasses.replace(cfg, steps=360))
    final = checkpoint.load_checkpoint(str(logdir / checkpoint.CHECKPOINT))
    assert final["counters"]["steps"] >= 360 and final["counters"]["updates"] > 532
    # The next saves write the replay folder (the old replay.pt is no longer read): all of
    # the fixture's steps and the new ones, readable as a dataset.
    folder = str(logdir / "replay")
    info = list_replay(folder)
    assert final["save_id"] in info["save_points"] and final["run_id"] == info["manifest"]["run_id"]
    streams = [load_stream(folder, j) for j in range(info["manifest"]["num_streams"])]
    assert sum(len(s["step"]) for s in streams) == final["counters"]["steps"]
    assert all((s["step"] == range(len(s["step"]))).all() for s in streams)
