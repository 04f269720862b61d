"""Runs saved by older layouts of the package still load and train on (checkpoint keys are
module attribute names; moving modules must not change them). The fixtures are tiny CartPole
runs: one saved by commit 66b07c6, before the package split (one replay.pt), and one by
4f677bc, before the restructuring of 2026-12-04 (a replay folder); their READMEs say how."""

import dataclasses
import json
import pathlib
import shutil

import pytest
import torch

from dreamer_fast.data.store import list_replay, load_stream
from dreamer_fast.run import checkpoint
from dreamer_fast.run.loop import train
from dreamer_fast.run.session import open_run

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
OLD = [pytest.param(FIXTURES / name, id=name) for name in ("ckpt-66b07c6", "ckpt-4f677bc")]


def saved_config(logdir):
    ckpt = checkpoint.load_checkpoint(str(logdir / checkpoint.CHECKPOINT))
    cfg = checkpoint.config_from_dict(json.loads(ckpt["config"]))
    return ckpt, dataclasses.replace(cfg, logdir=str(logdir), device="cpu")


@pytest.mark.parametrize("fixture", OLD)
def test_old_checkpoint_restores_exactly(tmp_path, fixture):
    logdir = tmp_path / "run"
    shutil.copytree(fixture, logdir)
    ckpt, cfg = saved_config(logdir)
    run = open_run(cfg)
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


@pytest.mark.parametrize("fixture", OLD)
def test_old_checkpoint_trains_on(tmp_path, fixture):
    logdir = tmp_path / "run"
    shutil.copytree(fixture, logdir)
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
