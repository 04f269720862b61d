"""Packed seeds (`--seeds N`): N independent runs in one process, trained by one update.

    envs of seed 0..N-1 -> one actor thread: recv all, ONE vmapped policy step, send all,
                           each seed's steps into its own ring -> one rate limiter
    one learner thread:    a window batch from every ring (N, B, T+1) -> ONE vmapped update
                           (agent/packed.PackedAgents) -> each seed's latents back to its ring

Seed i is the run `--seed S+i` would be (S = --seed): its agent is built and its envs, replay
sampling and return normaliser seeded as that run's, and nothing in the update mixes seeds
(tests/test_packed.py). All seeds take the same number of agent steps and updates (one
limiter: the actor inserts every seed's steps together), so they stay in lockstep.

On disk, <logdir>/ holds the packed run (checkpoint.pt with every seed's state, config.json,
the pooled metrics.jsonl) and <logdir>/seed<i>/ each seed as a run of its own: its replay
folder, metrics.jsonl and TensorBoard, and a checkpoint.pt of the solo format, written at
every save point. So `--eval --logdir <logdir>/seed<i>` evaluates one seed and `--logdir
<logdir>/seed<i> --seed S+i` resumes it alone; the packed run resumes from <logdir>'s own
checkpoint, which is written first (one file, atomic: a kill leaves every seed at one save
point; the order and its repair: run/packed_saves.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from dreamer_fast.agent.agent import LOSSES, Agent
from dreamer_fast.agent.packed import PackedAgents
from dreamer_fast.checks import ConfigError
from dreamer_fast.config import Config
from dreamer_fast.data.capacity import replay_spec
from dreamer_fast.data.files import DiskFull
from dreamer_fast.data.limiter import RateLimiter
from dreamer_fast.data.ring import Ring
from dreamer_fast.data.store import ChunkStore
from dreamer_fast.envs import make_env
from dreamer_fast.envs.base import STEP_KEYS
from dreamer_fast.run import packed_saves, resolve, saves
from dreamer_fast.run import distributed as D
from dreamer_fast.run.actor import EpisodeTracker, check_finite, float_keys
from dreamer_fast.run.clocks import Timer
from dreamer_fast.run.device import set_cpu_threads, warn_large_on_cpu
from dreamer_fast.run.learner import Learner
from dreamer_fast.run.session import Run
from dreamer_fast.run.weights import POLICY_MODULES, Policy, PolicyWeights


def seed_config(cfg: Config, i: int) -> Config:
    """The config of seed i as a run of its own: --seed S+i, one seed, <logdir>/seed<i>."""
    return dataclasses.replace(cfg, seed=cfg.seed + i, seeds=1,
                               logdir=os.path.join(cfg.logdir, f"seed{i}"))


class Seed:
    """One seed's own objects: its config, envs, ring, replay folder, episode tracker,
    counters and run id (saves.fresh and saves.load_replay take it as a run of its own)."""

    world, rank = 1, 0

    def __init__(self, i: int, cfg: Config, env, spec: dict, limiter: RateLimiter):
        self.index, self.cfg, self.env, self.limiter = i, seed_config(cfg, i), env, limiter
        self.ring = Ring(spec, cfg.num_envs, cfg.replay.capacity, cfg.agent.batch_length + 1,
                         cfg.replay.online, self.cfg.seed)
        self.tracker = EpisodeTracker(env)
        self.store: ChunkStore | None = None
        self.run_id: str | None = None
        self.counters: dict = {}
        self.float_keys = float_keys(env)

    def fill(self) -> float:
        return min(1.0, self.ring.inserted / (self.ring.cap * self.ring.num_streams))


def open_run(cfg: Config) -> "PackedRun":
    """Every seed's envs (seeded as the run --seed S+i), the one resolve step, the run.
    Refused under torchrun before anything is built."""
    if D.world_size() > 1:
        raise ConfigError(f"--seeds {cfg.seeds} under torchrun: packed seeds run in one "
                          "process; launch python run.py --seeds N (one process per GPU, "
                          "each with its own --seed and --logdir), or torchrun with --seeds 1")
    envs = []
    try:
        for i in range(cfg.seeds):
            envs.append(make_env(cfg.env, cfg.num_envs, cfg.env_opts, cfg.seed + i))
    except ValueError as e:
        for env in envs:
            env.close()
        raise ConfigError(str(e)) from e
    try:
        spec = replay_spec(envs[0], cfg.net)
        return PackedRun(resolve.resolve(cfg, spec), envs)
    except BaseException:
        for env in envs:
            env.close()
        raise


class _PolicyCall(nn.Module):
    """A Policy's step as a module call, so functional_call can swap its tensors."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def forward(self, carry, obs, greedy: bool):
        return self.policy.policy_step(carry, obs, greedy)


class PackedPolicy:
    """The acting modules of N seeds: their stacked tensors and one vmapped policy step.
    randomness: 'different' (a run: independent draws per seed) or 'same' (every seed the
    draws a solo step would take from the same generator state: the tests)."""

    def __init__(self, packed: PackedAgents, template: Agent, randomness: str = "different"):
        self.n = packed.n
        self.call = _PolicyCall(Policy(template))  # its own tensors are never read
        self.tensors = {f"policy.{k.removeprefix('agent.')}": v.clone()
                        for k, v in packed.tensors(POLICY_MODULES).items()}
        self.template = self.call.policy
        self._step = {greedy: vmap(self._one(greedy), randomness=randomness)
                      for greedy in (False, True)}

    def _one(self, greedy: bool):
        return lambda tensors, carry, obs: functional_call(self.call, tensors,
                                                           (carry, obs, greedy))

    def initial_carry(self, n: int) -> dict[str, torch.Tensor]:
        """Zero carries (N seeds, n envs, ...)."""
        return {k: v.expand(self.n, *v.shape).clone()
                for k, v in self.template.initial_carry(n).items()}

    @torch.no_grad()
    def step(self, carry: dict, obs: dict, greedy: bool = False):
        """policy_step of every seed at once: carry and obs with a leading seed dim."""
        return self._step[greedy](self.tensors, carry, obs)


class PackedWeights(PolicyWeights):
    """Two PackedPolicy copies handed from the learner to the actor (PolicyWeights)."""

    def __init__(self, packed: PackedAgents, template: Agent, randomness: str = "different"):
        self.copies = [PackedPolicy(packed, template, randomness) for _ in range(2)]
        self.locks = [threading.Lock(), threading.Lock()]
        self.events = [None, None]
        self.index = 0
        self.published = self.skipped = 0
        self._src = list(packed.tensors(POLICY_MODULES).values())
        self._dst = [list(c.tensors.values()) for c in self.copies]


@torch.no_grad()
def packed_act(policy: PackedPolicy, carry: dict, obs: list[dict], obs_keys,
               device: torch.device, greedy: bool = False):
    """policy_act for every seed: obs[i] is seed i's recv (the same number of envs each).
    Returns (action (N, n, A) as stored, latent {deter, stoch} (N, n, ...))."""
    stack = lambda key: torch.as_tensor(np.stack([o[key] for o in obs])).to(device)
    inp = {k: stack(k) for k in (*obs_keys, "is_first", "is_last")}
    ids = stack("env_id").long()
    seed = torch.arange(len(obs), device=device)[:, None]
    rows = {k: v[seed, ids] for k, v in carry.items()}
    action, rows, latent = policy.step(rows, {k: inp[k] for k in (*obs_keys, "is_first")},
                                       greedy)
    action = action * (~inp["is_last"])[..., None].to(action.dtype)
    rows["action"] = action
    for k, v in rows.items():
        carry[k][seed, ids] = v
    return action, latent


class PackedActor:
    """The actor thread of a packed run: steps every seed's envs with one policy step and
    writes each seed's steps into its own ring; one limiter insert for all (lockstep).
    `lock` as Actor's: hold it to pause the writer (saves)."""

    def __init__(self, seeds: list[Seed], limiter, weights: PackedWeights,
                 device: torch.device, steps: int):
        self.seeds, self.limiter, self.weights = seeds, limiter, weights
        self.device, self.steps = device, steps
        env = seeds[0].env
        self.discrete = env.act_space.discrete
        self.obs_keys = list(env.obs_space)
        self.carry = weights.copies[0].initial_carry(env.num_envs)
        self.lock = threading.Lock()
        self.timer = Timer()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.graph = None  # the packed policy step runs eagerly
        self.eager_steps = 0

    @property
    def inserted(self) -> int:
        return self.seeds[0].ring.inserted

    def run(self) -> None:
        try:
            stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for s in self.seeds:
                    s.env.start()
                while not self.stop.is_set() and self.inserted < self.steps:
                    if not self.step():
                        break
        except BaseException as e:  # surfaced by the run loop
            self.error = e
            self.limiter.close()
        finally:
            for s in self.seeds:
                if getattr(s.env, "close_in_stepping_thread", False):
                    s.env.close()

    def step(self) -> bool:
        with self.timer.section("env"):
            obs = [s.env.recv() for s in self.seeds]
            for s, o in zip(self.seeds, obs):
                check_finite(o, s.float_keys, s.ring.inserted,
                             f"seed {s.index} (--seed {s.cfg.seed}): env index")
        with self.timer.section("policy"):
            policy, lock = self.weights.acquire()
            try:
                action, latent = packed_act(policy, self.carry, obs, self.obs_keys,
                                            self.device)
                sent = (action.argmax(-1) if self.discrete else action).cpu().numpy()
            finally:
                lock.release()
        with self.timer.section("env"):
            for i, s in enumerate(self.seeds):
                s.env.send(sent[i], obs[i]["env_id"])
        steps = []
        for i, (s, o) in enumerate(zip(self.seeds, obs)):
            step = {k: o[k] for k in self.obs_keys}
            step.update({k: o[k] for k in STEP_KEYS if k != "env_id"})
            step.update(action=action[i], deter=latent["deter"][i], stoch=latent["stoch"][i])
            steps.append(step)
            s.tracker.track(o)
        with self.lock:
            with self.timer.section("replay"):
                for s, step, o in zip(self.seeds, steps, obs):
                    s.ring.add(step, o["env_id"])
            return self.limiter.insert(len(obs[0]["env_id"]))


class PackedLearner(Learner):
    """The learner thread of a packed run: a batch of windows from every seed's ring, one
    packed update, each seed's fresh latents back into its ring (Learner's pipeline)."""

    def __init__(self, packed: PackedAgents, rings: list, limiter, weights,
                 batch_size: int):
        super().__init__(packed, rings[0], limiter, weights, batch_size)
        self.rings = rings
        n, pin = len(rings), self.device.type == "cuda"
        ring = self.rings[0]
        self.staging = [{k: torch.empty((n, batch_size, ring.length, *shape), dtype=dtype,
                                        pin_memory=pin) for k, (shape, dtype) in ring.spec.items()}
                        for _ in range(2)]

    def sample_into(self, staging: dict[str, torch.Tensor]) -> list:
        """A batch of windows from every seed's ring into its row of the staging buffers."""
        return [ring.sample(self.batch_size, out={key: v[i] for key, v in staging.items()})[1]
                for i, ring in enumerate(self.rings)]

    def write_latents(self, keys: list, host: dict[str, torch.Tensor]) -> None:
        for i, ring in enumerate(self.rings):
            ring.write_latents(keys[i], {k: v[i] for k, v in host.items()})

    def pop_seed_metrics(self) -> list[dict[str, float]]:
        """Every seed's mean metrics since the last call (one host sync)."""
        metrics = self.pop_metrics()  # {name: [N values]}
        return [{k: v[i] for k, v in metrics.items()} for i in range(len(self.rings))]

    def seed_batch(self, i: int, n: int) -> dict[str, torch.Tensor] | None:
        """Seed i's first n windows of the last trained batch, on the device (hold `lock`)."""
        if not self.updates:
            return None
        staging = self.staging[1 - self.k]
        return {k: v[i, :n].to(self.device) for k, v in staging.items()}


class PackedRun:
    """The live objects of a packed run (session.Run's, per seed where a run has one)."""

    world, rank = 1, 0

    def __init__(self, cfg: Config, envs: list):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.budget = cfg.steps  # per seed
        self.graphs = cfg.graphs == "on"
        set_cpu_threads(self.device)
        spec = replay_spec(envs[0], cfg.net)
        warn_large_on_cpu(cfg)
        B, T = cfg.agent.batch_size, cfg.agent.batch_length
        self.limiter = RateLimiter(cfg.train_ratio, B * T, cfg.num_envs * (T + 1) + B * T)
        self.seeds = [Seed(i, cfg, env, spec, self.limiter) for i, env in enumerate(envs)]
        self.agents = []
        for s in self.seeds:  # each built as the run --seed S+i builds its agent
            torch.manual_seed(s.cfg.seed)
            np.random.seed(s.cfg.seed)
            self.agents.append(Agent(envs[0].obs_space, envs[0].act_space, cfg.net, cfg.agent,
                                     self.device))
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.counters = {"steps": 0, "updates": 0, "elapsed_s": 0.0, "save_id": 0}
        self.run_id: str | None = None
        self.evaluators: list = []
        self.packed: PackedAgents | None = None
        self.writer_error: BaseException | None = None
        self._writer_stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.threads: list[threading.Thread] = []

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def inserted(self) -> int:
        """Agent steps of each seed (the seeds move in lockstep)."""
        return self.seeds[0].ring.inserted

    def fill(self) -> float:
        return self.seeds[0].fill()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Pack the (built or resumed) agents, then start the threads."""
        self.packed = PackedAgents(self.agents)
        self.scratch = self.agents[0]  # a solo agent to unpack a seed into (saves, evals)
        self.agents = []
        self.weights = PackedWeights(self.packed, self.scratch)
        self.actor = PackedActor(self.seeds, self.limiter, self.weights, self.device,
                                 self.budget)
        self.learner = PackedLearner(self.packed, [s.ring for s in self.seeds], self.limiter,
                                     self.weights, self.cfg.agent.batch_size)
        self.learner.updates = int(self.counters["updates"])
        self.update_mode = self.prepare_update()
        self.threads = [threading.Thread(target=self.actor.run, name="actor", daemon=True),
                        threading.Thread(target=self.learner.run, name="learner", daemon=True)]
        for t in self.threads:
            t.start()
        self._writer = threading.Thread(target=self._write_replay, name="replay-writer",
                                        daemon=True)
        self._writer.start()
        self.t0 = time.time() - float(self.counters["elapsed_s"])

    def prepare_update(self) -> str:
        """With CUDA graphs, capture the packed update (falling back to eager with one line
        if the capture fails); the policy step runs eagerly. Returns the update mode."""
        mode = prepare_update(self.packed, self.learner, self.graphs,
                              self.scratch.ops.impl)
        self.weights.publish()  # the copies' weights again, in case warm-up touched them
        return mode

    def replay_stores(self) -> list[ChunkStore]:
        return [s.store for s in self.seeds]

    _write_replay = Run._write_replay  # the replay writer thread, over every seed's store
    check_threads = Run.check_threads

    def actor_alive(self) -> bool:
        return bool(self.threads) and self.threads[0].is_alive()

    def threads_alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def stop(self, finished: bool) -> None:
        """Stop both threads (a finished run's learner first catches up with the ratio)."""
        self.actor.stop.set()
        self.learner.stop.set()
        if not finished:
            self.limiter.close()
        for t in self.threads:
            t.join()
        if finished:
            self.learner.catch_up()
        self.learner.finish()
        self._writer_stop.set()
        if self._writer is not None:
            self._writer.join()
            try:
                for s in self.seeds:
                    s.store.write_ready()
            except DiskFull:
                pass  # the save point keeps those steps in its tail
        self.limiter.close()
        for s in self.seeds:
            s.env.close()

    # ------------------------------------------------------------ health
    def nonfinite(self) -> dict[int, list[str]]:
        """nonfinite_seeds of the packed agents ({} before start)."""
        return {} if self.packed is None else nonfinite_seeds(self.packed)

    def nonfinite_message(self, bad: dict[int, list[str]]) -> str:
        return nonfinite_message(bad, self.cfg.seed, self.learner.updates, self.kept(),
                                 "the env's rewards and observations")

    def unpack(self, i: int) -> Agent:
        """Seed i's state in the scratch solo Agent (hold the learner's lock)."""
        return self.packed.unpack(i, self.scratch)

    # ------------------------------------------------------------ saves
    def kept(self) -> str:
        return saves.kept(self)

    def resume(self) -> bool:
        return packed_saves.resume(self)

    def save(self) -> bool:
        return packed_saves.save(self)


def nonfinite_seeds(packed: PackedAgents) -> dict[int, list[str]]:
    """{seed index: names of its losses that were ever non-finite (or ['parameters'])} (host
    reads; call on the log and save clocks)."""
    flags = packed.tensors()["agent.nonfinite"].cpu()
    finite = torch.stack([torch.isfinite(p.flatten(1)).all(1)
                          for p in packed.parameters()]).all(0).cpu()
    bad = {}
    for i in range(packed.n):
        names = [k for k, f in zip(LOSSES, flags[i].tolist()) if f]
        if names or not bool(finite[i]):
            bad[i] = names or ["parameters"]
    return bad


def nonfinite_message(bad: dict[int, list[str]], seed: int, updates: int, kept: str,
                      check: str) -> str:
    """The line that stops a packed run: each non-finite seed with its --seed, what is kept."""
    seeds = "; ".join(f"seed {i} (--seed {seed + i}): {', '.join(names)}"
                      for i, names in bad.items())
    return (f"non-finite {seeds} by update {updates:,}; stopping every seed without saving "
            f"them: {kept}. Lower --agent.optim.lr or check {check}")


def prepare_update(packed: PackedAgents, learner: PackedLearner, graphs: bool,
                   impl: str) -> str:
    """The packed update: with CUDA graphs captured as one (graphs.GraphedTrainStep), eager
    with one line if the capture fails. Returns the update mode (start line, metrics)."""
    mode = "packed+eager" + ("+fused" if impl == "fused" else "")
    if not graphs:
        return mode
    from dreamer_fast.run.graphs import GraphedTrainStep

    example = {k: torch.zeros_like(v) for k, v in learner.staging[0].items()}
    try:
        learner.graph = GraphedTrainStep(packed, example)
    except Exception as e:  # noqa: BLE001 (the update runs eagerly instead)
        print(f"the packed update's graph failed ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200]}); it runs eagerly (--graphs off selects that "
              "directly)", flush=True)
        return mode
    return "packed+graph"
