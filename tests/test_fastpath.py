"""The fast-path check and its fallback ladder (dreamer_fast/run/fastpath.py), on the CPU.

A CPU cannot capture a CUDA graph, so a stand-in builder plays the graph: it returns the
agent's own eager update with whatever kernels the rung set, or raises as a capture the driver
rejects would. The ladder, the check against the eager reference and the lines are the code a
GPU run takes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dreamer_fast.agent.agent import Agent
from dreamer_fast.config import SIZES, AgentConfig
from dreamer_fast.data.synthetic import IMAGE, VECTOR, ActSpace, make_batch
from dreamer_fast.run import fastpath

CFG = AgentConfig(batch_size=2, batch_length=8, imag_horizon=3, kernels="triton",
                  precision="float32")
OBS, ACT = {**IMAGE, **VECTOR}, ActSpace(True, 3)


class EagerGraph:
    """Stands in for GraphedTrainStep: the agent's eager update, as built for the rung."""

    def __init__(self, agent, example):
        self.agent = agent

    def __call__(self, batch):
        return self.agent.train_step(batch)


def _setup(precision="float32"):
    torch.manual_seed(0)
    agent = Agent(OBS, ACT, SIZES["debug"], dataclasses.replace(CFG, precision=precision))
    example = {k: torch.zeros_like(v) for k, v in make_batch(OBS, ACT, agent.net, 2, 9).items()}
    return agent, example, fastpath.synthetic_batch(agent, example)


def _wrong_rms_silu(agent):
    right = agent.ops.rms_silu
    agent.ops.rms_silu = lambda x, scale, eps: right(x, scale * 1.05, eps)


def test_a_passing_graph_triton_update_is_kept():
    agent, example, batch = _setup()
    before = [p.detach().clone() for p in agent.parameters()]
    lines = []
    update = fastpath.choose(agent, example, "graph+triton", batch, build=EagerGraph,
                             say=lines.append)
    assert update.mode == "graph+triton" and isinstance(update.graph, EagerGraph) and not lines
    check = update.checks["graph+triton"]
    assert check["failure"] is None and check["loss_rtol"] < 1e-5 and check["delta_cos"] > 0.999
    assert agent.ops.impl == "triton" and agent.defer and agent.batch_actor
    # The check trained nothing: the state is as it was.
    assert all(torch.equal(p, q) for p, q in zip(agent.parameters(), before))
    assert float(agent.opt.count) == 0


def test_a_capture_failure_falls_back_to_the_graph_of_the_references():
    agent, example, batch = _setup()
    built = []

    def build(agent, example):
        built.append(agent.ops.impl)
        if agent.ops.impl == "triton":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return EagerGraph(agent, example)
    lines = []
    update = fastpath.choose(agent, example, "graph+triton", batch, build=build,
                             say=lines.append)
    assert built == ["triton", "ref"] and update.mode == "graph"
    assert agent.ops.impl == "ref" and not agent.defer and not agent.batch_actor
    assert len(lines) == 1
    assert lines[0].startswith("the graph+triton update failed: RuntimeError: CUDA error: "
                               "operation not permitted when stream is capturing; running graph")
    assert "--graphs on --agent.kernels ref selects it directly" in lines[0]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_wrong_kernel_is_caught_by_the_check(precision):
    agent, example, batch = _setup(precision)

    def build(agent, example):
        if agent.ops.impl == "triton":
            _wrong_rms_silu(agent)
        return EagerGraph(agent, example)
    lines = []
    update = fastpath.choose(agent, example, "graph+triton", batch, build=build,
                             say=lines.append)
    assert update.mode == "graph", lines
    failed = update.checks["graph+triton"]
    loss_rtol, _ = fastpath.TOLERANCE[precision]
    assert failed["loss_rtol"] > loss_rtol, failed
    assert lines[0].startswith("the graph+triton update disagrees with the eager reference: "
                               "loss/"), lines
    assert update.checks["graph"]["failure"] is None


def test_every_rung_failing_ends_eager_with_the_references():
    agent, example, batch = _setup()

    def build(agent, example):
        raise RuntimeError("capture failed")
    lines = []
    update = fastpath.choose(agent, example, "graph+triton", batch, build=build,
                             say=lines.append)
    assert update.mode == "eager" and update.graph is None and agent.ops.impl == "ref"
    assert [line.split(";")[1] for line in lines] == [" running graph instead (--graphs on "
                                                      "--agent.kernels ref selects it directly "
                                                      "and skips this check)",
                                                      " running eager instead (--graphs off "
                                                      "selects it directly and skips this "
                                                      "check)"]
    # ...and the eager update trains.
    metrics, _ = agent.train_step(batch)
    assert torch.isfinite(metrics["loss/rec"])


def test_without_graphs_nothing_is_checked():
    agent, example, _ = _setup()
    agent_fused = Agent(OBS, ACT, SIZES["debug"], dataclasses.replace(CFG, kernels="fused"))
    assert fastpath.prepare(agent_fused, example, graphs=False).mode == "eager+fused"
    update = fastpath.prepare(agent, example, graphs=False)
    assert update.mode == "eager+triton" and update.graph is None and update.checks == {}


def test_the_synthetic_batch_matches_the_example():
    agent, example, batch = _setup()
    assert batch.keys() == example.keys()
    for k, v in example.items():
        assert batch[k].shape == v.shape and batch[k].dtype == v.dtype, k
    assert batch["image"].float().std() > 10 and batch["is_first"].any()
