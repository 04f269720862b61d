"""The learner's update on CUDA, checked once before training, with a fallback ladder:

    graph+triton  (one CUDA graph, Triton kernels: the default on CUDA)
    -> graph      (one CUDA graph, the reference PyTorch ops)
    -> eager      (no graph, the reference ops)

Before the threads start, the update of each rung is built (the graph captured) and run once
on a synthetic batch from the model's current state, and so is the eager reference update
(reference ops, no graph, the same imagination schedule and random draws) from the same state,
seed and batch; the state is restored after each. The rung is kept when every loss term and
the parameter deltas agree within `TOLERANCE` of the run's precision; an exception (a capture the
driver rejects, a kernel that fails to compile) or a mismatch moves one rung down, with one
line naming what failed and the flag that selects the next rung directly. The mode that runs
is returned for the start line and metrics.jsonl. With several processes, every rank takes the
lowest rung any rank needed (they must run the same collectives).

Tolerances, per precision (`TOLERANCE`), measured on the CPU with the Triton kernels
interpreted against the references (debug model, B4 x T16, H5, image+vector discrete and vector
continuous, 5 seeds: `fastpath.check`). float32: the losses agree to 1.3e-7 relative and the
deltas' cosine is 1.0000. bfloat16 (the GPU's matmuls): fused kernels round once where the
reference ops round per op, so a few latent samples flip near their category boundaries and
the losses move by up to 1.0e-2 relative; LaProp's first update is about lr * sign(gradient)
per weight, so the sign of a near-zero gradient that flips flips a delta: cosine 0.95-0.98.
Injected errors caught under bfloat16: RMSNorm's scale 5% off (losses 8.8e-2, cosine 0.87),
the twohot loss 10% off (1.0e-1), the latent sampler's noise mirrored (cosine 0.62-0.67); a
GRU state 5% off or the joined norms 5% off stay within bfloat16's spread (float32 sees the
GRU: 9e-3, cosine 0.95). The kernels' own agreement tests (tests/test_kernels.py, run natively
by bench/gpu_session.sh) hold each op to 1e-5 (float32) and 1e-2 (bfloat16); this check guards
the whole graphed update of a user's run against what those cannot see (a capture the driver
rejects, a kernel wrong on this GPU). bench/gpu_session.sh records the GPU's own figures.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from dreamer_fast.agent.agent import LOSSES, set_kernels
from dreamer_fast.data.synthetic import make_batch
from dreamer_fast.run import distributed as D
from dreamer_fast.run.graphs import GraphedTrainStep, Snapshot, state_tensors

TOLERANCE = {"float32": (1e-3, 0.99), "bfloat16": (0.05, 0.85)}
"""precision -> (largest relative difference of any loss term, smallest cosine similarity of
the parameter deltas as one vector) between a rung's update and the eager reference's."""
SEED = 12345

RUNGS = ("graph+triton", "graph", "eager")
KERNELS = {"graph+triton": "triton", "graph": "ref", "eager": None}
FLAGS = {"graph+triton": "--graphs on --agent.kernels triton",
         "graph": "--graphs on --agent.kernels ref", "eager": "--graphs off"}


@dataclasses.dataclass
class Update:
    """The learner's update as chosen: `graph` (None = eager agent.train_step), the rung
    that runs, and the check's figures per rung tried (rung -> dict)."""
    graph: GraphedTrainStep | None
    mode: str
    checks: dict


def prepare(agent, example: dict[str, torch.Tensor], graphs: bool,
            say: Callable[[str], None] = print) -> Update:
    """The run's update: without graphs the eager one as configured (named by its kernels:
    'eager', 'eager+fused', 'eager+triton'); with graphs the first rung of the ladder that
    passes its check (`choose`), starting from the configured kernels."""
    start = planned(graphs, agent.ops.impl)
    if not graphs:
        return Update(None, start, {})
    return choose(agent, example, start, synthetic_batch(agent, example), say=say)


def planned(graphs: bool, impl: str) -> str:
    """The update mode a run starts from (the start line): its rung of the ladder with
    graphs, else 'eager' (reference ops), 'eager+fused' or 'eager+triton'."""
    if graphs:
        return "graph+triton" if impl == "triton" else "graph"
    return "eager" if impl == "ref" else f"eager+{impl}"


def synthetic_batch(agent, example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random windows in valid ranges with example's keys, shapes and dtypes (on the host)."""
    B, L = example["reward"].shape[:2]
    made = make_batch(agent.obs_space, agent.act_space, agent.net, B, L, seed=SEED)
    return {k: made[k].to(v.dtype) if k in made else torch.zeros_like(v, device="cpu")
            for k, v in example.items()}


def choose(agent, example: dict[str, torch.Tensor], start: str,
           check_batch: dict[str, torch.Tensor], build: Callable = GraphedTrainStep,
           say: Callable[[str], None] = print) -> Update:
    """Build the update of rung `start` and check it, moving down the ladder until one
    passes (eager always does: it is what the others are checked against).

    example: the static batch the graph is captured for (shapes and dtypes of every batch);
    check_batch: the synthetic batch the check trains on (the same keys, shapes, dtypes).
    build(agent, example) captures a graph (a parameter so the tests can inject failures).
    """
    checks = {}
    rungs = RUNGS[RUNGS.index(start):]
    for i, rung in enumerate(rungs):
        if rung == "eager":
            return Update(None, rung, checks)
        set_kernels(agent, KERNELS[rung])
        try:
            graph = build(agent, example)
            checks[rung] = check(agent, graph, check_batch)
            failure = checks[rung].get("failure")
        except Exception as e:  # noqa: BLE001 (any failure of the fast path falls back)
            graph, failure = None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            checks[rung] = {"failure": failure}
        failure = _agree(failure)
        if failure is None:
            return Update(graph, rung, checks)
        nxt = rungs[i + 1]
        say(f"the {rung} update {failure}; running {nxt} instead ({FLAGS[nxt]} selects it "
            "directly and skips this check)")
        if nxt == "eager":
            set_kernels(agent, "ref")
    raise AssertionError("unreachable: the eager rung always returns")


def _agree(failure: str | None) -> str | None:
    """Every rank's verdict: a failure anywhere is a failure everywhere (same collectives)."""
    if D.world_size() <= 1:
        return failure
    flags = D.control_all_gather(torch.tensor([0.0 if failure is None else 1.0]))
    if failure is None and bool(flags.max() > 0):
        return "failed its check on another rank"
    return failure


def check(agent, step: Callable, batch: dict[str, torch.Tensor]) -> dict:
    """One update by `step` and one by the eager reference from the same state, seed and batch
    (the state restored after each): {'loss_rtol': worst relative loss difference,
    'delta_cos': cosine of the parameter deltas, 'failure': None or why}."""
    batch = {k: v.to(agent.device) for k, v in batch.items()}
    losses, deltas = _one_update(agent, step, batch)
    impl, batched = agent.ops.impl, agent.batch_actor
    set_kernels(agent, "ref")
    agent.batch_actor = batched  # the candidate's imagination schedule: the same random draws
    try:
        ref_losses, ref_deltas = _one_update(agent, agent.train_step, batch)
    finally:
        set_kernels(agent, impl)
    precision = "float32" if agent.autocast_dtype is None else "bfloat16"
    return compare(losses, deltas, ref_losses, ref_deltas, *TOLERANCE[precision])


def _one_update(agent, step: Callable, batch: dict) -> tuple[dict[str, float], torch.Tensor]:
    params = agent.trained_parameters()
    snap = Snapshot(state_tensors(agent, agent.opt))
    before = [p.detach().clone() for p in params]
    torch.manual_seed(SEED)
    metrics, _ = step(batch)
    losses = {k: float(metrics[f"loss/{k}"]) for k in LOSSES}  # deliberate host sync
    deltas = torch.cat([(p.detach() - b).flatten().float() for p, b in zip(params, before)])
    snap.restore()
    return losses, deltas


def compare(losses: dict, deltas: torch.Tensor, ref_losses: dict, ref_deltas: torch.Tensor,
            loss_rtol: float, delta_cos: float) -> dict:
    """The check's figures and verdict (see the module docstring for the tolerances)."""
    worst, name = 0.0, None
    for k, ref in ref_losses.items():
        got = losses[k]
        if not (torch.isfinite(torch.tensor(got)) and torch.isfinite(torch.tensor(ref))):
            worst, name = float("inf"), k
            break
        err = abs(got - ref) / (abs(ref) + 1e-3)
        if err > worst:
            worst, name = err, k
    cos = float(torch.nn.functional.cosine_similarity(deltas, ref_deltas, dim=0, eps=1e-30))
    failure = None
    if worst > loss_rtol:
        failure = (f"disagrees with the eager reference: loss/{name} {losses[name]:.6g} vs "
                   f"{ref_losses[name]:.6g} (relative {worst:.2g} > {loss_rtol})")
    elif not cos >= delta_cos:
        failure = (f"disagrees with the eager reference: parameter deltas' cosine {cos:.3f} "
                   f"< {delta_cos}")
    return {"loss_rtol": worst, "delta_cos": cos, "failure": failure}
