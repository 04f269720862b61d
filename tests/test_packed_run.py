"""Packed seeds in a run (`--seeds N`, run/packed.py): the files a researcher gets, resume
packed and alone, eval per seed and pooled, a non-finite seed named, refusals in one line."""

from __future__ import annotations

import json
import re
import signal
from types import SimpleNamespace

import pytest
import torch

from dreamer_fast.agent.agent import Agent
from dreamer_fast.agent.packed import PackedAgents
from dreamer_fast.checks import ConfigError, RunError
from dreamer_fast.config import SIZES, AgentConfig, Config, EnvConfig
from dreamer_fast.data.synthetic import VECTOR, ActSpace
from procs import load, run, start, wait_for

PACKED = ["--env", "CartPole-v1", "--preset", "debug", "--steps", "700", "--train-ratio", "16",
          "--seed", "3", "--seeds", "2", "--log-every", "1", "--save-every", "2"]


def test_a_packed_run_saves_resumes_packed_and_alone_and_evaluates(tmp_path):
    logdir = tmp_path / "packed"
    proc = start(PACKED, logdir)
    wait_for(lambda: load(logdir)["counters"]["updates"] > 0, proc, 180)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    top = load(logdir)
    assert top["packed"] == 2 and len(top["seeds"]) == 2
    for i in range(2):  # each seed a run of its own, at most one save behind (a kill)
        assert (logdir / f"seed{i}" / "replay" / "manifest.json").exists()
        if not (logdir / f"seed{i}" / "checkpoint.pt").exists():
            assert top["save_id"] == 1  # killed between the two writes of the first save
            continue
        own = load(logdir / f"seed{i}")
        assert json.loads(own["config"])["seed"] == 3 + i
        assert json.loads(own["config"])["seeds"] == 1
        assert top["save_id"] - 1 <= own["save_id"] <= top["save_id"]
    a, b = (s["agent"]["pol.out.weight"] if "pol.out.weight" in s["agent"] else
            next(v for k, v in s["agent"].items() if k.startswith("pol.")) for s in top["seeds"])
    assert not torch.equal(a, b)  # two agents, not one

    # A kill between the packed checkpoint and seed 1's own at the first save (as if): seed 1
    # alone says how to get it, and the packed resume writes it again.
    (logdir / "seed1" / "checkpoint.pt").unlink(missing_ok=True)
    code, out = run(["--eval", "--episodes", "1", "--videos", "0"], logdir / "seed1", timeout=60)
    assert code != 0 and "stopped before writing this seed's own; resume it once" in out, out
    code, out = run(PACKED, logdir)  # the same command resumes packed, to the end
    assert code == 0, out
    assert re.search(r"seed1/checkpoint.pt was missing .* written again from", out), out
    m = re.search(r"resumed from .*2 seeds\): ([\d,]+) agent steps", out)
    assert m and int(m.group(1).replace(",", "")) == top["counters"]["steps"], out
    assert "2 seeds packed (--seed 3..4" in out and re.search(r"final: 2/2 seeds: IQM", out)
    final = load(logdir)
    assert final["counters"]["steps"] >= 700 and final["save_id"] > top["save_id"]
    pooled = [json.loads(line) for line in open(logdir / "metrics.jsonl")]
    assert any("pooled/return_iqm_lo" in r for r in pooled)
    for i in range(2):
        rows = [json.loads(line) for line in open(logdir / f"seed{i}" / "metrics.jsonl")]
        assert any("episode/return" in r for r in rows) and any("loss/policy" in r for r in rows)
        assert load(logdir / f"seed{i}")["save_id"] == final["save_id"]

    code, out = run(PACKED[:-6] + ["--seeds", "3"], logdir, timeout=60)
    assert code != 0 and "holds 2 packed seed(s), this run has 3; rerun with --seeds 2" in out

    code, out = run(["--eval", "--episodes", "2", "--videos", "0"], logdir, timeout=120)
    assert code == 0 and re.search(r"2 seeds, IQM of their mean returns", out), out
    pooled_eval = json.load(open(logdir / "eval" / "returns.json"))
    assert len(pooled_eval["seeds"]) == 2 and pooled_eval["pooled"]["runs"] == 2

    # Seed 1 (--seed 4) resumes alone from its folder, as a run of one seed.
    alone = ["--env", "CartPole-v1", "--preset", "debug", "--steps", "800", "--train-ratio",
             "16", "--seed", "4"]
    code, out = run(alone, logdir / "seed1")
    assert code == 0 and "resumed from" in out and "saved" in out, out
    assert load(logdir / "seed1")["counters"]["steps"] >= 800


def small_run(tmp_path, **kw):
    from dreamer_fast.run.packed import open_run

    cfg = Config(env="CartPole-v1", num_envs=2, steps=10_000, seeds=2, net=SIZES["debug"],
                 agent=AgentConfig(batch_size=2, batch_length=8, imag_horizon=3),
                 env_opts=EnvConfig(), logdir=str(tmp_path / "run"), device="cpu", **kw)
    run = open_run(cfg)
    run.resume()
    return run


def test_a_non_finite_seed_stops_the_run_naming_that_seed(tmp_path):
    run = small_run(tmp_path, seed=5)
    run.start()
    run.stop(finished=False)
    assert run.nonfinite() == {}
    with torch.no_grad():
        run.packed.tensors()["agent.nonfinite"][1, 2] = True  # seed 1's third loss
    bad = run.nonfinite()
    assert list(bad) == [1]
    with pytest.raises(RunError, match=r"non-finite seed 1 \(--seed 6\): \w+ by update"):
        run.save()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing saved


def test_the_packed_policy_step_acts_as_each_seed_alone():
    """Actions, latents and carries of the vmapped policy step equal each seed's own policy
    step from the same random draws (randomness='same'): the stacked tensors map to the
    right modules of the right seed, and the carries' gather and scatter to the right rows."""
    from dreamer_fast.run.actor import policy_core
    from dreamer_fast.run.packed import PackedWeights, packed_act
    from dreamer_fast.run.weights import Policy

    act = ActSpace(True, 3)
    agents = []
    for i in range(3):
        torch.manual_seed(i)
        agents.append(Agent(VECTOR, act, SIZES["debug"], AgentConfig(
            batch_size=2, batch_length=8, kernels="fused", precision="float32")))
    packed = PackedAgents([a for a in agents])
    weights = PackedWeights(packed, agents[0], randomness="same")
    policy = weights.copies[0]
    carry = policy.initial_carry(4)
    gen = torch.Generator().manual_seed(0)
    obs = [{"vector": torch.randn(4, *VECTOR["vector"][0], generator=gen).numpy(),
            "is_first": torch.tensor([True, False, True, False]).numpy(),
            "is_last": torch.tensor([False, False, False, True]).numpy(),
            "env_id": torch.randperm(4, generator=gen).numpy()} for _ in range(3)]
    torch.manual_seed(7)
    action, latent = packed_act(policy, carry, obs, ["vector"], torch.device("cpu"))
    for i, agent in enumerate(agents):
        solo = Policy(agent)
        own = solo.initial_carry(4)
        inp = {k: torch.as_tensor(v) for k, v in obs[i].items()}
        torch.manual_seed(7)
        a, lat = policy_core(solo, own, inp, ["vector"])
        torch.testing.assert_close(action[i], a, rtol=1e-5, atol=1e-6)
        for k in lat:
            torch.testing.assert_close(latent[k][i].float(), lat[k].float())
        for k in own:
            torch.testing.assert_close(carry[k][i], own[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags, says", [
    (dict(compile=True), "--compile"),
    (dict(seeds=0), "seeds=0")])
def test_packed_seeds_refuse_what_they_cannot_run_in_one_line(flags, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        Config(**{"seeds": 2, **flags})


def test_packed_seeds_under_torchrun_are_refused_before_anything_is_built(monkeypatch):
    from dreamer_fast.run import packed

    monkeypatch.setattr(packed.D, "world_size", lambda: 2)
    monkeypatch.setattr(packed, "make_env", lambda *a, **k: pytest.fail("built an env"))
    with pytest.raises(ConfigError, match="packed seeds run in one process"):
        packed.open_run(Config(env="CartPole-v1", seeds=2))


def test_packed_seeds_settle_auto_to_what_vmap_runs(monkeypatch):
    from dreamer_fast.machine import settle

    cfg = settle(Config(env="CartPole-v1", seeds=2, device="cpu"))
    assert (cfg.agent.kernels, cfg.agent.precision) == ("fused", "float32")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    cfg = settle(Config(env="CartPole-v1", seeds=2, device="cuda"))
    assert (cfg.agent.kernels, cfg.agent.precision, cfg.graphs) == ("fused", "bfloat16", "on")


def test_the_plot_pools_a_packed_runs_seeds(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from dreamer_fast.plot import main

    logdir = tmp_path / "packed"
    for i, base in enumerate((10.0, 30.0)):
        folder = logdir / f"seed{i}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"env": "CartPole-v1", "seeds": 1}))
        rows = [{"step": s, "time": s, "episode/return": base + s} for s in (0, 10, 20)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (logdir / "config.json").write_text(json.dumps({"env": "CartPole-v1", "seeds": 2}))
    main([str(logdir), "--out", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert "CartPole-v1 (2 runs)" in out and "mean 40.0" in out


class _Rows:
    """A Logger that keeps its rows."""

    def __init__(self):
        self.rows = []

    def scalars(self, step, values):
        self.rows.append((step, dict(values)))

    def video(self, *args, **kwargs):
        pass


def test_periodic_evals_log_per_seed_and_pool_once_every_seed_has_one():
    import threading

    from dreamer_fast.run.packed_loop import Logs

    results = {0: [{"step": 100, "returns": [10.0, 20.0], "lengths": [5, 6], "frames": None}],
               1: [], 2: [{"step": 100, "returns": [30.0], "lengths": [7], "frames": None}]}
    evaluators = [SimpleNamespace(pop=lambda i=i: results[i], trigger=None) for i in range(3)]
    logs = Logs.__new__(Logs)
    logs.run = SimpleNamespace(evaluators=evaluators, n=3, learner=SimpleNamespace(
        lock=threading.Lock()))
    logs.seeds, logs.pool, logs.evals = [_Rows() for _ in range(3)], _Rows(), {}
    logs.evaluation(None)
    assert logs.seeds[0].rows == [(100, {"eval/return": 15.0, "eval/return_std": 5.0,
                                         "eval/length": 5.5, "eval/episodes": 2})]
    assert logs.pool.rows == []  # seed 1's eval of step 100 has not finished
    results[0], results[2] = [], []
    results[1] = [{"step": 100, "returns": [50.0], "lengths": [9], "frames": None}]
    logs.evaluation(None)
    (step, row), = logs.pool.rows
    assert step == 100 and row["pooled/eval_return_mean"] == pytest.approx(95 / 3)
    assert row["pooled/eval_seeds"] == 3 and row["pooled/eval_return_iqm"] == pytest.approx(95 / 3)
    assert row["pooled/eval_return_iqm_lo"] <= 95 / 3 <= row["pooled/eval_return_iqm_hi"]
    assert logs.evals == {}  # a pooled trigger is forgotten
