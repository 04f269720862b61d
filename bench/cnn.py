"""The image encoder and decoder alone: convolution FLOPs and time of one update's worth.

    python bench/cnn.py                              # ours, strided and stride-1 (paper-S)
    SCRATCH/venv-sheeprl/bin/python bench/cnn.py --peer sheeprl   # sheeprl's, same counts

One update of the paper-S image learner (bench/throughput.py's learner-paper-s-img and
-strided: B16 x T64 = 1,024 images of 64x64x3, fp32) runs the encoder over every image and
the decoder back to every image, forward and backward. This bench does only that: the
FLOPs of the convolutions (torch.utils.flop_counter, forward and backward, over the same
1,024 images) and the time of encoder + decoder forward and backward (p50 of --iters after
--burnin), so the CNN's share of the update can be put next to the update's time. With
--peer sheeprl it builds sheeprl 0.8.4's own DreamerV3 world model (the config that
../shared/peer-bench/peer.sh w1 times: Atari MsPacman, 2023 stride-2 CNN) and measures its
encoder and decoder the same way; run it with the venv peer.sh sets up.

Rows (device, versions, commit, which CNN, GFLOP, seconds) go to bench/results/cnn-cpu.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

B, T = 16, 64


def ours(strided: bool):
    """(name, fn): one forward + backward of our encoder and decoder over B*T images."""
    from dataclasses import replace

    from bench.throughput import IMAGE, PAPER_S
    from dreamer_fast.agent.agent import Agent
    from dreamer_fast.config import AgentConfig
    from dreamer_fast.data.synthetic import ActSpace, make_batch
    from dreamer_fast.run.device import keep_freed_memory

    keep_freed_memory()  # as the learner runs (a fresh mmap per big activation otherwise)
    net = replace(PAPER_S, strided=strided)
    act = ActSpace(True, 9)
    cfg = AgentConfig(kernels="fused")
    agent = Agent(IMAGE, act, net, cfg)
    batch = make_batch(IMAGE, act, net, cfg.batch_size, cfg.batch_length + 1)
    obs = {k: batch[k][:, 1:] for k in agent.obs_space}
    deter = torch.randn(B, T, net.deter)
    stoch = torch.zeros(B, T, net.stoch, net.classes)

    def fn():
        tokens = agent.enc(obs)
        pred = agent.dec(deter, stoch)
        loss = tokens.square().mean() + sum(v.float().square().mean() for v in pred.values())
        loss.backward()
    return f"dreamer_fast paper-S {'strided' if strided else 'stride-1'}", fn


def sheeprl():
    """(name, fn) for sheeprl 0.8.4's world model encoder and decoder (peer.sh w1's)."""
    import gymnasium as gym
    import numpy as np
    from hydra import compose, initialize_config_module
    from lightning.fabric import Fabric
    from omegaconf import OmegaConf
    from sheeprl.algos.dreamer_v3.agent import build_agent
    from sheeprl.utils.utils import dotdict

    with initialize_config_module(config_module="sheeprl.configs", version_base="1.3"):
        cfg = compose("config", overrides=["exp=dreamer_v3_100k_ms_pacman",
                                           "fabric.accelerator=cpu"])
    cfg = dotdict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    space = gym.spaces.Dict({"rgb": gym.spaces.Box(0, 255, (3, 64, 64), np.uint8)})
    wm, _, _, _, _ = build_agent(Fabric(accelerator="cpu", devices=1), (9,), False, cfg, space)
    wm = getattr(wm, "module", wm)
    m = cfg.algo.world_model
    latent = m.stochastic_size * m.discrete_size + m.recurrent_model.recurrent_state_size
    obs = {"rgb": torch.rand(T, B, 3, 64, 64) - 0.5}
    states = torch.randn(T, B, latent)

    def fn():
        emb = wm.encoder(obs)
        rec = wm.observation_model(states)
        (emb.square().mean() + sum(v.square().mean() for v in rec.values())).backward()
    return "sheeprl 0.8.4 (2023 CNN)", fn


def measure(name: str, fn, iters: int, burnin: int) -> dict:
    with FlopCounterMode(display=False) as counter:
        fn()
    flops = counter.get_flop_counts()["Global"]
    conv = sum(v for k, v in flops.items() if "convolution" in str(k))
    for _ in range(burnin):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"bench": "cnn", "cnn": name, "images": B * T, "conv_gflop": conv / 1e9,
            "all_gflop": sum(flops.values()) / 1e9, "p50": times[len(times) // 2],
            "min": times[0], "max": times[-1], "iters": iters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer", choices=("sheeprl",), default=None,
                        help="measure the peer's CNN (run with the peer's venv)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--burnin", type=int, default=1)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from bench.common import append, environment

    env = environment()
    cases = [sheeprl()] if args.peer else [ours(True), ours(False)]
    rows = []
    for name, fn in cases:
        row = {**env, **measure(name, fn, args.iters, args.burnin)}
        rows.append(row)
        print(f"{name:<32} conv {row['conv_gflop']:7.1f} GFLOP  p50 {row['p50']:6.2f} s "
              f"(min {row['min']:.2f}, max {row['max']:.2f})", flush=True)
    if not args.no_record:
        append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            "cnn-cpu.jsonl"), rows)


if __name__ == "__main__":
    main()
