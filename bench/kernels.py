"""Time every fused op, forward / backward / both, as Triton vs its eager reference vs
torch.compile of the reference, on the size12m and size200m shapes.

    python bench/kernels.py                                  # GPU: size12m + size200m
    python bench/kernels.py --sizes size12m --iters 3        # CPU (interpreter; see below)
    python bench/kernels.py --cases rssm_core-obs twohot_loss-img --impls triton eager
    python bench/kernels.py --cases rms_silu-heads rms_silu-img-hidden --impls eager fused

Shapes (B16 x T64, H15): observe-scan rows = B = 16, imagination rows = B*T = 1024, heads over
imagined trajectories B*T*H = 15360; D / Hd / K per size preset, S = 32, 255 bins.
Impl `fused` is the CPU fast path (kernels/fused.py; the reference where an op has none).
`rssm_core-*` is one whole RSSM step (its GEMMs included) with each implementation's ops.
Prints a table and appends JSON lines (device, versions, commit, case, shapes, impl, mode,
p20/p50/p80 seconds after burn-in) to bench/results/kernels-<device>.jsonl.

Without a GPU the Triton kernels run in the Triton interpreter (TRITON_INTERPRET=1): those
numbers are NOT speed numbers, only a check that the bench runs; every row says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

if not torch.cuda.is_available():  # before kernels import triton (must precede triton.jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import append, catch_sigint, environment, percentiles  # noqa: E402
from dreamer_fast.config import SIZES  # noqa: E402
from dreamer_fast.run.device import keep_freed_memory  # noqa: E402
from dreamer_fast.agent.rssm import RSSM  # noqa: E402
from dreamer_fast.kernels import get_ops  # noqa: E402
from dreamer_fast.kernels.twohot import symexp_bins  # noqa: E402

B, T, H = 16, 64, 15
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
WARNING = ("TRITON_INTERPRET=1: Triton kernels ran in the CPU interpreter; these timings are "
           "NOT speed numbers")
MODES = ("fwd", "bwd", "both")
# The interpreter runs a program at a time in Python (~10 ms each): on CPU the default keeps the
# cases with few programs, so the run (with inductor compiles of the refs) takes minutes.
CPU_CASES = ("rms_silu-obs-hidden", "rms_silu-obs-deter", "gru_update-obs", "latent_sample-obs",
             "rssm_core-obs", "twohot_loss-img", "twohot_mean-img")
IMPLS = ("triton", "eager", "fused", "compile", "triton-graph", "eager-graph")
GPU_ONLY = ("triton-graph", "eager-graph")  # one CUDA graph per iteration: no launch overhead


@dataclass
class Case:
    """One benchmark: inputs(device) -> {name: tensor}; run(ops, inputs) -> output tensors."""

    name: str
    op: str
    size: str
    shapes: dict
    inputs: Callable
    run: Callable
    module: Callable | None = None  # builds per-impl state (rssm_core: the RSSM module)


def _t(*shape, device, grad=True, dtype=torch.float32, scale=1.0):
    x = scale * torch.randn(*shape, device=device, dtype=dtype)
    return x.requires_grad_(grad)


def cases(size: str, dtype: torch.dtype) -> list[Case]:
    """The benchmark cases for one size preset."""
    n = SIZES[size]
    D, Hd, S, K, G, U, bins = n.deter, n.hidden, n.stoch, n.classes, n.blocks, n.units, n.bins
    out = []
    for tag, rows in (("obs", B), ("img", B * T)):
        for width, what in ((Hd, "hidden"), (D, "deter")):
            out.append(Case(f"rms_silu-{tag}-{what}", "rms_silu", size, {"x": [rows, width]},
                            lambda d, r=rows, w=width: {"x": _t(r, w, device=d, dtype=dtype),
                                                        "scale": _t(w, device=d) + 1},
                            lambda ops, i: ops.rms_silu(i["x"], i["scale"], 1e-4)))
        out.append(Case(f"gru_update-{tag}", "gru_update", size,
                        {"gates": [rows, 3 * D], "deter": [rows, D], "blocks": G},
                        lambda d, r=rows: {"gates": _t(r, 3 * D, device=d, dtype=dtype),
                                           "deter": _t(r, D, device=d)},
                        lambda ops, i: ops.gru_update(i["gates"], i["deter"], G)))
        out.append(Case(f"latent_sample-{tag}", "latent_sample", size,
                        {"logits": [rows, S, K]},
                        lambda d, r=rows: {"logits": _t(r, S, K, device=d, dtype=dtype),
                                           "noise": torch.rand(r, S, device=d)},
                        lambda ops, i: ops.latent_sample(i["logits"], 0.01, i["noise"])))
        out.append(Case(f"rssm_core-{tag}", "rssm_core", size,
                        {"deter": [rows, D], "stoch": [rows, S, K], "action": [rows, 18],
                         "hidden": Hd, "blocks": G},
                        lambda d, r=rows: {"deter": _t(r, D, device=d),
                                           "stoch": _t(r, S, K, device=d),
                                           "action": _t(r, 18, device=d)},
                        lambda core, i: core(i["deter"], i["stoch"], i["action"]),
                        module=lambda ops, d: RSSM(D, Hd, S, K, G, 18, 64, 1, 2, 1, 0.01, False,
                                                   ops).to(d).core))
    out.append(Case("rms_silu-heads", "rms_silu", size, {"x": [B * T * H, U]},
                    lambda d: {"x": _t(B * T * H, U, device=d, dtype=dtype),
                               "scale": _t(U, device=d) + 1},
                    lambda ops, i: ops.rms_silu(i["x"], i["scale"], 1e-4)))
    out.append(Case("kl_free-img", "kl_free", size, {"post": [B * T, S, K]},
                    lambda d: {"post": _t(B * T, S, K, device=d, dtype=dtype),
                               "prior": _t(B * T, S, K, device=d, dtype=dtype)},
                    lambda ops, i: ops.kl_free(i["post"], i["prior"], 0.01, 1.0)))
    for tag, rows in (("img", B * T), ("heads", B * T * H)):
        out.append(Case(f"twohot_loss-{tag}", "twohot_loss", size, {"logits": [rows, bins]},
                        lambda d, r=rows: {"logits": _t(r, bins, device=d, dtype=dtype),
                                           "target": _t(r, device=d, grad=False, scale=30.0)},
                        lambda ops, i: ops.twohot_loss(i["logits"], i["target"])))
        out.append(Case(f"twohot_mean-{tag}", "twohot_mean", size, {"logits": [rows, bins]},
                        lambda d, r=rows: {"logits": _t(r, bins, device=d, dtype=dtype)},
                        lambda ops, i: ops.twohot_mean(i["logits"])))
    return out


class Timer:
    """Per-iteration seconds: CUDA events on a GPU (launch gaps included), perf_counter else."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((start, end))
        else:
            self.pending.append(time.perf_counter() - start)

    def times(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self.pending]
        return list(self.pending)


def _graphed(work: Callable, prepare: Callable | None = None) -> Callable:
    """work captured as one CUDA graph, after warm-ups (prepare + work) on a side stream that
    also compile the Triton kernels; prepare runs once more, uncaptured, before the capture.
    Returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            if prepare:
                prepare()
            work()
    torch.cuda.current_stream().wait_stream(stream)
    if prepare:
        prepare()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return graph.replay


def time_mode(fn: Callable, inputs: dict, params: list, mode: str, iters: int, burnin: int,
              device: torch.device, graph: bool = False) -> list[float]:
    """Seconds per iteration of forward, backward (after an untimed forward) or both; with
    graph=True the timed part is captured once and replayed (GPU only)."""
    leaves = [v for v in inputs.values() if v.requires_grad] + params
    outs = fn(inputs)
    ups = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
    state = {}

    def forward():
        for leaf in leaves:
            leaf.grad = None
        state["outs"] = fn(inputs)

    def backward():
        outs = state.pop("outs")
        torch.autograd.backward(outs if isinstance(outs, tuple) else (outs,), ups)

    untimed = forward if mode == "bwd" else None
    timed = {"fwd": forward, "bwd": backward, "both": lambda: (forward(), backward())}[mode]
    if graph:
        timed = _graphed(timed, untimed)
        untimed = None
    timer = Timer(device)
    for i in range(burnin + iters):
        if untimed:
            untimed()
        start = timer.start()
        timed()
        if i >= burnin:
            timer.stop(start)
        elif device.type == "cuda":
            torch.cuda.synchronize()
    return timer.times()


def bench_case(case: Case, impls, modes, iters, burnin, device) -> list[dict]:
    """Rows for one case: every impl x mode, or the impl's failure reason."""
    rows = []
    torch.manual_seed(0)
    inputs = case.inputs(device)
    for impl in impls:
        ops = get_ops("triton" if impl.startswith("triton") else
                      "fused" if impl == "fused" else "ref")
        target = case.module(ops, device) if case.module else ops
        params = list(target.__self__.parameters()) if case.module else []
        fn = lambda i, t=target: case.run(t, i)  # noqa: E731
        if impl == "compile":
            torch._dynamo.reset()
            fn = torch.compile(fn)
        for mode in modes:
            row = {"bench": "kernels", "case": case.name, "op": case.op, "size": case.size,
                   "shapes": case.shapes, "dtype": str(next(iter(inputs.values())).dtype),
                   "impl": impl, "mode": mode,
                   "interpreted": INTERPRETED and impl.startswith("triton")}
            if row["interpreted"]:
                row["note"] = WARNING
            try:
                row.update(percentiles(time_mode(fn, inputs, params, mode, iters, burnin, device,
                                                 graph=impl.endswith("-graph"))))
            except Exception as e:  # e.g. no C++ compiler for inductor on CPU: record, go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    """p50 per impl side by side; speed-ups of Triton over eager and compile (and graphed)."""
    by = {(r["size"], r["case"], r["mode"], r["impl"]): r.get("p50") for r in rows}
    impls = [i for i in IMPLS if any(k[3] == i for k in by)]
    keys = sorted({k[:3] for k in by}, key=lambda k: (k[0], k[1], MODES.index(k[2])))
    ratios = [(a, b) for a, b in (("eager", "triton"), ("compile", "triton"), ("eager", "fused"),
                                  ("eager-graph", "triton-graph")) if a in impls and b in impls]
    print(f"{'size':<9} {'case':<22} {'mode':<5}" + "".join(f" {i + ' us':>15}" for i in impls)
          + "".join(f" {a + '/' + b:>15}" for a, b in ratios))
    for k in keys:
        p50 = {i: by.get((*k, i)) for i in impls}
        cells = "".join(f" {p50[i] * 1e6:>15.1f}" if p50[i] else f" {'-':>15}" for i in impls)
        cells += "".join(f" {p50[a] / p50[b]:>15.2f}" if p50[a] and p50[b] else f" {'-':>15}"
                         for a, b in ratios)
        print(f"{k[0]:<9} {k[1]:<22} {k[2]:<5}{cells}")
    for r in rows:
        if "error" in r:
            print(f"  {r['size']} {r['case']} {r['impl']} {r['mode']}: {r['error']}")


def main() -> None:
    catch_sigint()
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["size12m", "size200m"] if cuda else
                        ["size12m"], choices=list(SIZES))
    parser.add_argument("--cases", nargs="+", default=None if cuda else list(CPU_CASES),
                        help="case names (default: all on GPU, a quick subset on CPU)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS,
                        default=[i for i in IMPLS if cuda or i not in GPU_ONLY])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--iters", type=int, default=100 if cuda else 3)
    parser.add_argument("--burnin", type=int, default=20 if cuda else 1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="activation dtype (GEMM outputs, logits); states stay float32")
    parser.add_argument("--out", default=None, help="results file (default per device)")
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        keep_freed_memory()  # as run.py does on CPU
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  "
          f"cuda {env['cuda']}  commit {env['commit']}")
    if INTERPRETED:
        print(f"!!! {WARNING} !!!")
    tag = "cpu" if not cuda else env["device"].replace(" ", "-").lower()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"kernels-{tag}.jsonl")
    rows = []
    try:
        for size in args.sizes:
            symexp_bins(SIZES[size].bins, device)  # cached before any compile traces it
            for case in cases(size, getattr(torch, args.dtype)):
                if args.cases and case.name not in args.cases:
                    continue
                start = time.perf_counter()
                new = [{**env, **r} for r in bench_case(case, args.impls, args.modes,
                                                        args.iters, args.burnin, device)]
                append(out, new)  # as measured: a run cut short keeps the cases so far
                rows += new
                print(f"  {size} {case.name}: {time.perf_counter() - start:.1f} s", flush=True)
    except KeyboardInterrupt:  # SIGINT (a stage's time limit): the finished cases stay
        print_table(rows)
        print(f"interrupted: {len(rows)} rows appended to {os.path.relpath(out)}")
        sys.exit(130)
    print_table(rows)
    if INTERPRETED:
        print(f"!!! {WARNING} !!!")
    print(f"appended {len(rows)} rows to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
