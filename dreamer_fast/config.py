"""Every setting of dreamer_fast, as typed tyro dataclasses, plus the named presets.

Model size presets are `NetConfig` instances in `SIZES`; domain presets are full `Config`
instances in `DOMAINS`. flags.py turns the command line into a Config (the chosen domain and
size, any field overridden); run/resolve.py picks the domain from the env's suite (`choose`)
and settles every "auto" (`resolve`, with machine.py's `settle_*` functions, the one place each
is decided).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from dreamer_fast.checks import require, require_positive


Preset = Literal["atari", "atari100k", "dmc_proprio", "dmc_vision", "crafter", "control",
                 "vision", "debug"]
Model = Literal["debug", "size300k", "size1m", "size12m", "size25m", "size50m", "size100m",
                "size200m", "size400m"]
DOMAIN_NAMES: tuple[str, ...] = get_args(Preset)


@dataclass(frozen=True)
class NetConfig:
    """Network widths and layer counts. Fields are module constructor arguments."""

    deter: int = 8192
    """Recurrent (deterministic) state size D of the block GRU."""
    hidden: int = 1024
    """Hidden size Hd of the RSSM embeddings and prior/posterior MLPs."""
    stoch: int = 32
    """Number S of categorical latent groups."""
    classes: int = 64
    """Classes K per latent group."""
    blocks: int = 8
    """Blocks G of the block-diagonal GRU and decoder projection."""
    depth: int = 64
    """CNN base depth d; stage channels are [2d, 3d, 4d, 4d]."""
    units: int = 1024
    """MLP units U of encoder, decoder and heads."""
    enc_layers: int = 3
    """Hidden layers of the vector encoder MLP."""
    dec_layers: int = 3
    """Hidden layers of the vector decoder MLP."""
    rew_layers: int = 1
    """Hidden layers of the reward head."""
    con_layers: int = 1
    """Hidden layers of the continue head."""
    actor_layers: int = 3
    """Hidden layers of the actor."""
    critic_layers: int = 3
    """Hidden layers of the critic (and slow critic)."""
    prior_layers: int = 2
    """Hidden layers of the prior (dynamics predictor) MLP."""
    post_layers: int = 1
    """Hidden layers of the posterior (representation) MLP."""
    dyn_layers: int = 1
    """Hidden BlockLinear layers inside the GRU cell."""
    bins: int = 255
    """Bins of the symexp twohot reward and critic heads (odd, symmetric around 0)."""
    unimix: float = 0.01
    """Uniform mixture of the latent categoricals (prior and posterior)."""
    actor_unimix: float = 0.01
    """Uniform mixture of the discrete actor (paper and 2024-04 code; 0 = current code)."""
    minstd: float = 0.1
    """Lower bound of the continuous actor's standard deviation."""
    maxstd: float = 1.0
    """Upper bound of the continuous actor's standard deviation."""
    strided: bool = False
    """Stride-2 convolutions in the image encoder and fractionally strided ones in the
    decoder, instead of stride 1 with max-pool / nearest upsampling (the official
    `enc.simple.strided` / `dec.simple.strided`): each conv computes a quarter of the
    outputs (encoder) or skips the inserted zeros (decoder), so about 4x fewer convolution
    multiply-adds; the same parameters."""

    def __post_init__(self):
        require_positive(self, "net.", ("deter", "hidden", "stoch", "classes", "blocks", "depth",
                                 "units", "bins"))
        for name in ("enc_layers", "dec_layers", "rew_layers", "con_layers", "actor_layers",
                     "critic_layers", "prior_layers", "post_layers", "dyn_layers"):
            require(getattr(self, name) >= 0, f"net.{name}", getattr(self, name), "an int >= 0")
        require(self.deter % self.blocks == 0, "net.deter", self.deter,
               f"a multiple of net.blocks={self.blocks}")
        require(self.depth * 4 % self.blocks == 0, "net.depth", self.depth,
               f"a value with 4*depth divisible by net.blocks={self.blocks}")
        require(self.bins % 2 == 1 and self.bins >= 3, "net.bins", self.bins, "an odd int >= 3")
        for name in ("unimix", "actor_unimix"):
            require(0.0 <= getattr(self, name) < 1.0, f"net.{name}", getattr(self, name), "[0, 1)")
        require(0 < self.minstd < self.maxstd, "net.minstd/maxstd", (self.minstd, self.maxstd),
               "0 < minstd < maxstd")


def _size(deter: int, hidden: int, classes: int, depth: int, units: int) -> NetConfig:
    return NetConfig(deter=deter, hidden=hidden, classes=classes, depth=depth, units=units)


SIZES: dict[str, NetConfig] = {
    "debug": _size(deter=64, hidden=32, classes=4, depth=4, units=32),
    "size300k": NetConfig(deter=128, hidden=64, stoch=16, classes=8, blocks=4, depth=4,
                          units=64),
    "size1m": _size(deter=512, hidden=64, classes=4, depth=4, units=64),
    "size12m": _size(deter=2048, hidden=256, classes=16, depth=16, units=256),
    "size25m": _size(deter=3072, hidden=384, classes=24, depth=24, units=384),
    "size50m": _size(deter=4096, hidden=512, classes=32, depth=32, units=512),
    "size100m": _size(deter=6144, hidden=768, classes=48, depth=48, units=768),
    "size200m": _size(deter=8192, hidden=1024, classes=64, depth=64, units=1024),
    "size400m": _size(deter=12288, hidden=1536, classes=96, depth=96, units=1536),
}
"""Model size presets (the official sizes). 'debug' is a tiny width for tests and CPU smoke
runs; 'size300k' (about 0.3M parameters on classic control) is the `control` preset's model."""


@dataclass(frozen=True)
class LossScales:
    """Scale of every loss term; the total loss is their weighted sum."""

    rec: float = 1.0
    """Reconstruction of every decoded observation key."""
    rew: float = 1.0
    """Reward head twohot cross-entropy."""
    con: float = 1.0
    """Continue head binary cross-entropy."""
    dyn: float = 1.0
    """Dynamics KL (trains the prior)."""
    rep: float = 0.1
    """Representation KL (trains the posterior)."""
    policy: float = 1.0
    """REINFORCE actor loss in imagination."""
    value: float = 1.0
    """Critic loss in imagination."""
    repval: float = 0.3
    """Critic loss on replayed sequences (gradient reaches the world model)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            require(getattr(self, f.name) >= 0, f"agent.loss.{f.name}", getattr(self, f.name),
                   "a float >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """AGC -> LaProp -> momentum -> warmed-up learning rate."""

    lr: float = 4e-5
    """Learning rate after warmup."""
    warmup: int = 1000
    """Updates of linear learning-rate warmup from 0."""
    agc: float = 0.3
    """Adaptive gradient clipping ratio per parameter tensor."""
    pmin: float = 1e-3
    """Floor of the parameter norm inside AGC."""
    beta2: float = 0.999
    """Decay of the squared-gradient average."""
    eps: float = 1e-20
    """Epsilon added to the RMS denominator."""
    momentum: float = 0.9
    """Momentum on the normalised update."""

    def __post_init__(self):
        require_positive(self, "agent.optim.", ("lr", "agc", "pmin", "eps"))
        require(self.warmup >= 0, "agent.optim.warmup", self.warmup, "an int >= 0")
        for name in ("beta2", "momentum"):
            require(0.0 <= getattr(self, name) < 1.0, f"agent.optim.{name}", getattr(self, name),
                   "[0, 1)")


@dataclass(frozen=True)
class AgentConfig:
    """The learning algorithm: losses, imagination, return normalisation."""

    batch_size: int = 16
    """Sequences per update (per process)."""
    batch_length: int = 64
    """Trained steps per sequence; each sample holds one more context step."""
    imag_horizon: int = 15
    """Imagination rollout length H."""
    horizon: int = 333
    """Discount horizon; gamma = 1 - 1/horizon is folded into the continue target."""
    lam: float = 0.95
    """Lambda of the lambda-returns."""
    free_nats: float = 1.0
    """Free bits on the KL summed over latent groups."""
    actent: float = 3e-4
    """Actor entropy regulariser."""
    slowreg: float = 1.0
    """Weight of the critic's regulariser towards the slow critic."""
    slow_rate: float = 0.02
    """EMA rate of the slow critic, applied every update."""
    retnorm_rate: float = 0.01
    """EMA rate of the return percentiles."""
    retnorm_limit: float = 1.0
    """Lower bound of the return scale."""
    perclo: float = 5.0
    """Lower return percentile."""
    perchi: float = 95.0
    """Upper return percentile."""
    enc_keys: str = ".*"
    """Regex (matched in full) of the observation keys the encoder reads (the official
    `enc.spaces`)."""
    dec_keys: str = ".*"
    """Regex (matched in full) of the observation keys the decoder reconstructs (the official
    `dec.spaces`)."""
    kernels: Literal["auto", "triton", "fused", "ref"] = "auto"
    """Fused ops: Triton kernels (GPU), fused PyTorch ops with hand-written backwards (the CPU
    fast path) or the plain PyTorch references; auto = triton on CUDA, fused elsewhere."""
    precision: Literal["auto", "bfloat16", "float32"] = "auto"
    """Matmul/conv precision (autocast); parameters, norms, distributions and losses stay
    float32. auto = bfloat16 on CUDA, float32 elsewhere."""
    loss: LossScales = field(default_factory=LossScales)
    """Loss scales."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""

    def __post_init__(self):
        require_positive(self, "agent.", ("batch_size", "batch_length", "imag_horizon", "horizon",
                                   "retnorm_limit"))
        for name in ("lam", "slow_rate", "retnorm_rate"):
            require(0.0 <= getattr(self, name) <= 1.0, f"agent.{name}", getattr(self, name),
                   "[0, 1]")
        require(0 <= self.perclo < self.perchi <= 100, "agent.perclo/perchi",
               (self.perclo, self.perchi), "0 <= perclo < perchi <= 100")
        require(self.kernels in ("auto", "triton", "fused", "ref"), "agent.kernels", self.kernels,
               "auto, triton, ref")
        require(self.precision in ("auto", "bfloat16", "float32"), "agent.precision",
               self.precision, "auto, bfloat16, float32")

    @property
    def discount(self) -> float:
        return 1.0 - 1.0 / self.horizon


@dataclass(frozen=True)
class EnvConfig:
    """How the environment is built."""

    repeat: int = 4
    """Action repeat (frame skip) of Atari; DMC uses 1."""
    image_size: int = 64
    """Side of the square images the model sees (a multiple of 16); images of another size or
    shape are resized to it with area interpolation (Atari and DMC render at it directly)."""
    gray: bool = False
    """Grayscale images (Atari-57 setting) instead of RGB."""
    sticky: float = 0.25
    """Sticky-action probability (Atari)."""
    full_action_space: bool = True
    """Full 18-action set on Atari; minimal set otherwise."""
    noops: int = 30
    """Maximum random no-ops at reset (Atari)."""
    time_limit: int = 27000
    """Agent steps per episode before truncation, in every suite (the atari presets: 27,000;
    the others: 0, which keeps the env's own limit)."""
    pixels: bool = False
    """DMC: observe 64x64 camera images instead of proprioceptive vectors."""
    camera: int = -1
    """DMC camera id; -1 picks as the official code (0; quadruped 2; rodent 4)."""
    batch_size: int = 0
    """EnvPool async batch (envs returned per recv); 0 = num_envs (synchronous)."""
    obs_keys: str = ".*"
    """Regex (matched in full) of the observation keys kept; the others are dropped at the env,
    never stored or modelled (e.g. 'image' keeps only the image of a Dict space)."""
    render_image: bool = False
    """Gymnasium: add the env's render() frame (render_mode rgb_array) as the observation key
    `image`, e.g. for an env whose observations are vectors only."""

    def __post_init__(self):
        require_positive(self, "env_opts.", ("repeat", "image_size"))
        require(self.image_size % 16 == 0, "env_opts.image_size", self.image_size,
               "a multiple of 16 (the CNN halves it 4 times), e.g. 64")
        require(0.0 <= self.sticky <= 1.0, "env_opts.sticky", self.sticky, "[0, 1]")
        for name in ("noops", "time_limit", "batch_size"):
            require(getattr(self, name) >= 0, f"env_opts.{name}", getattr(self, name),
                   "an int >= 0")


@dataclass(frozen=True)
class ReplayConfig:
    """The shared-memory ring buffer."""

    capacity: int = 0
    """Capacity in agent steps over all env streams; 0 = the official 5,000,000 or, when
    that does not fit, as many as fit in 75% (GPU) or 40% (CPU) of the RAM left free after
    the estimated training memory, never more than --steps, and at most 200,000 on a CPU
    (decided at start, kept on resume)."""
    online: bool = True
    """Train on every fresh non-overlapping window first, then sample uniformly."""
    resume_empty: bool = False
    """Resume a run whose replay folder is missing or unusable with an empty replay, keeping
    its weights and step and update counts (the replay refills before training goes on)."""
    keep_chunks: bool = False
    """Keep every replay chunk on disk (a dataset of the whole run) instead of removing the
    chunks that have left the in-memory replay."""

    def __post_init__(self):
        require(self.capacity >= 0, "replay.capacity", self.capacity,
               "an int >= 0 (0 = automatic)")


@dataclass(frozen=True)
class Config:
    """dreamer_fast: DreamerV3 with an asynchronous actor-learner per device. Defaults come
    from the preset of --env's suite (printed at start); `python run.py --eval --help` for
    evaluation."""

    env: str = "Pong-v5"
    """Environment id: an EnvPool Atari (Pong-v5) or DMC (WalkerWalk-v1) id, crafter, or
    any Gymnasium id (`module:Env-v0` imports module first). The defaults of every other
    field come from this env's preset (--help with --env shows them)."""
    num_envs: int = 16
    """Parallel environments."""
    preset: Preset | None = None
    """Domain preset; default from the env's suite: EnvPool Atari -> atari, EnvPool DMC -> dmc_proprio
    (with pixels dmc_vision), crafter -> crafter, Gymnasium -> control (vector observations)
    or vision (images, or --env-opts.render-image)."""
    model: Model | None = None
    """Model size preset; default from the domain preset (without a GPU, size12m and larger
    become size1m)."""
    steps: int = 51_000_000
    """Agent steps to train for (after action repeat)."""
    train_ratio: float = 32.0
    """Replayed steps per agent step; updates per agent step = ratio / (batch_size*length)."""
    seed: int = 0
    """Random seed."""
    seeds: int = 1
    """Independent runs packed into this one process (seeds seed, seed+1, ...): each its own
    agent, envs, replay and logs under <logdir>/seed<i>/, all trained by one vmapped update
    (one process). The logdir's own log pools them."""
    logdir: str | None = None
    """Run folder; default logdir/<name>-<timestamp>. Rerun with the same one to resume."""
    name: str | None = None
    """Run name (default: the env id): names the default logdir and the W&B run; the plot
    command pools runs of one name into a mean and spread."""
    track: bool = False
    """Also log scalars and videos to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str = "dreamer_fast"
    """W&B project (with --track)."""
    wandb_entity: str | None = None
    """W&B entity (team or user; default your W&B default)."""
    device: str = "auto"
    """Torch device: auto (cuda if available), cpu, cuda, cuda:N."""
    graphs: Literal["auto", "on", "off"] = "auto"
    """CUDA graphs for the learner update and the policy step: auto = on with CUDA, off on CPU."""
    compile: bool = False
    """torch.compile the loss (forward + backward) and the policy step (before any graph
    capture). Off by default: compiling the unrolled scans takes minutes."""
    net: NetConfig = field(default_factory=lambda: SIZES["size200m"])
    """Network sizes (set from --model; any field can be overridden)."""
    agent: AgentConfig = field(default_factory=AgentConfig)
    """Learning algorithm."""
    env_opts: EnvConfig = field(default_factory=EnvConfig)
    """Environment options."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay buffer."""
    eval_every: float = 0.0
    """Seconds between evaluations during training (0: off, the default: on a small machine
    an eval's env steps and policy steps take time from training, and training episodes
    already show the return). On envs of its own, in a thread of its own; logged as
    eval/return, eval/length and, for image envs, an eval/episode video."""
    eval_episodes: int = 10
    """Episodes per evaluation during training (with --eval-every)."""
    log_every: float = 120.0
    """Seconds between metric logs."""
    report_every: float = 300.0
    """Seconds between reports (open-loop video predictions)."""
    save_every: float = 900.0
    """Seconds between checkpoints."""
    offline: str | None = None
    """Train from a fixed dataset, no env stepping: a replay folder of this project (a run's
    logdir, or its replay/) or a Minari dataset (its folder, or its id in the local Minari
    store). --env gives the observation and action spaces (and the envs of --eval-every)."""
    updates: int = 0
    """With --offline: updates to train for; 0 = as many as an online run makes from that
    many steps (dataset steps x train_ratio / (batch_size x batch_length))."""

    def __post_init__(self):
        require(bool(self.env), "env", self.env, "a non-empty environment id")
        require(self.updates >= 0, "updates", self.updates, "an int >= 0")
        require(self.updates == 0 or self.offline is not None, "updates", self.updates,
               "0 without --offline (an online run stops at --steps)")
        require_positive(self, "", ("num_envs", "steps", "train_ratio", "log_every", "report_every",
                             "save_every"))
        require(self.preset is None or self.preset in DOMAIN_NAMES, "preset", self.preset,
               ", ".join(DOMAIN_NAMES))
        require(self.model is None or self.model in SIZES, "model", self.model, ", ".join(SIZES))
        require(self.seeds >= 1, "seeds", self.seeds, "an int >= 1")
        # What the packed update cannot run yet: torch.compile of the vmapped update.
        require(self.seeds == 1 or not self.compile, "seeds", self.seeds, "1 with --compile "
                "(packed seeds do not support it yet); leave out --compile, or run the seeds "
                "one by one")

    @property
    def updates_per_step(self) -> float:
        """Learner updates per agent step."""
        return self.train_ratio / (self.agent.batch_size * self.agent.batch_length)


_ATARI = EnvConfig(repeat=4, image_size=96, gray=True, sticky=0.25, full_action_space=True)
_ATARI100K = EnvConfig(repeat=4, image_size=64, gray=False, sticky=0.0,
                       full_action_space=False)
_DMC = EnvConfig(repeat=1, image_size=64, sticky=0.0, noops=0, time_limit=0)
_GYM = EnvConfig(repeat=1, image_size=64, sticky=0.0, noops=0, time_limit=0)
"""Gymnasium envs: no action repeat, the env's own registered time limit."""
CONTROL_DMC_RATIO = 32.0
"""train_ratio of the control preset on an EnvPool DMC id (Gymnasium ids keep 16; the official
configs set it per suite too). Measured by bench/learning.py on 2 CPU cores, DMC
CartpoleBalance-v1, target 800 in 45 min: 3 of 4 runs met it at 32, 1 of 3 at 64, none at 16
(bench/results/learning-history.jsonl, the ratio in each run's tag, and
learning-CartpoleBalance-v1--run24.json)."""
CONTROL_STEPS = 200_000
"""Step budget of the control preset: about 70 minutes at its ~50 agent steps/s on 2 CPU
cores, several times what CartPole-v1, Acrobot-v1 and CartpoleBalance-v1 took to reach their
targets (bench/results/summary-learning.md)."""

DOMAINS: dict[str, Config] = {
    "atari": Config(env="Pong-v5", num_envs=16, steps=51_000_000, train_ratio=32.0,
                    net=SIZES["size200m"], env_opts=_ATARI, preset="atari", model="size200m"),
    "atari100k": Config(env="Pong-v5", num_envs=1, steps=110_000, train_ratio=256.0,
                        net=SIZES["size200m"], env_opts=_ATARI100K, preset="atari100k",
                        model="size200m"),
    "dmc_proprio": Config(env="WalkerWalk-v1", num_envs=16, steps=1_100_000,
                          train_ratio=1024.0, net=SIZES["size1m"], env_opts=_DMC,
                          preset="dmc_proprio", model="size1m"),
    "dmc_vision": Config(env="WalkerWalk-v1", num_envs=16, steps=1_100_000, train_ratio=256.0,
                         net=SIZES["size200m"], env_opts=replace(_DMC, pixels=True),
                         preset="dmc_vision", model="size200m"),
    # The official `crafter` config: size200m defaults, 1 env, train_ratio 512, 1.1M steps,
    # Crafter's own 10,000-step episodes (danijar/dreamerv3, dreamerv3/configs.yaml).
    "crafter": Config(env="crafter", num_envs=1, steps=1_100_000, train_ratio=512.0,
                      net=SIZES["size200m"], env_opts=_GYM, preset="crafter",
                      model="size200m"),
    "control": Config(env="CartPole-v1", num_envs=4, steps=CONTROL_STEPS, train_ratio=16.0,
                      net=SIZES["size300k"], agent=AgentConfig(
                          batch_size=16, batch_length=16,
                          optim=OptimConfig(lr=3e-4, warmup=100)),
                      env_opts=_GYM, log_every=15.0,
                      report_every=600.0, save_every=300.0, preset="control",
                      model="size300k"),
    "vision": Config(env="CarRacing-v3", num_envs=16, steps=1_100_000, train_ratio=256.0,
                     net=SIZES["size12m"], env_opts=_GYM, preset="vision", model="size12m"),
    "debug": Config(env="CartPole-v1", num_envs=4, steps=10_000, train_ratio=64.0,
                    net=SIZES["debug"], agent=AgentConfig(batch_size=4, batch_length=16,
                                                          imag_horizon=5),
                    env_opts=_DMC, replay=ReplayConfig(capacity=100_000), log_every=10.0,
                    report_every=60.0, save_every=60.0, preset="debug", model="debug"),
}
"""Domain presets, each a full Config."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluate a trained run: python run.py --eval --logdir DIR [--episodes 10] [--greedy].

    Runs the checkpoint's policy on fresh envs of its config, prints one line per finished
    episode, and writes DIR/eval/returns.json, DIR/eval/episode.mp4 (the first --videos
    episodes of env 0, image envs or renderable Gymnasium envs) and the returns and video to
    DIR's TensorBoard under eval/. Ctrl-C stops and writes the episodes finished so far."""

    logdir: str
    """Run folder holding checkpoint.pt (or the checkpoint file itself)."""
    episodes: int = 10
    """Episodes to run (over up to 16 envs in parallel)."""
    greedy: bool = False
    """Take the policy's mode instead of sampling (DreamerV3 evaluates with samples)."""
    seed: int | None = None
    """Seed of the eval envs and of the policy's samples; default the run's seed + 10,000.
    The same seed and checkpoint give the same returns."""
    videos: int = 1
    """Episodes of env 0 to film (0: none)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    env: str | None = None
    """The checkpoint's env id, repeated to allow importing the module it names (`module:Id`
    imports `module`, running its code): a checkpoint from elsewhere runs no code you did not
    name. Not needed for registered ids (Gymnasium, EnvPool, crafter)."""
    trust_env_module: bool = False
    """Import the module the checkpoint's `module:Id` env names without repeating it (--env)."""
    seed_index: int | None = None
    """A packed run's logdir (--seeds N): evaluate seed i only (its folder seed<i>); default
    every seed, then their IQM and its bootstrap interval."""

    def __post_init__(self):
        require(self.episodes >= 1, "episodes", self.episodes, "an int >= 1")
        require(self.videos >= 0, "videos", self.videos, "an int >= 0")
        require(self.seed_index is None or self.seed_index >= 0, "seed_index",
                self.seed_index, "an int >= 0")


@dataclass(frozen=True)
class ExportConfig:
    """Write a run's replay as a Minari dataset: python -m dreamer_fast.export --logdir DIR
    --minari NAME. One Minari episode per stored episode (observations in Gymnasium layout,
    discrete actions as indices, continuous ones in the env's bounds), written to the local
    Minari store (MINARI_DATASETS_PATH, default ~/.minari/datasets)."""

    logdir: str
    """Run folder (or its replay/ folder) whose replay to export."""
    minari: str
    """Minari dataset id to create, e.g. cartpole/dreamer-v0 (must not exist yet)."""
    env: str | None = None
    """Env id the data was collected on; default the run's (from its config.json). A
    Gymnasium id is recorded in the dataset (recover_environment) and gives the action
    bounds."""
    jpeg: bool = False
    """JPEG-encode image observations (smaller, lossy); default raw arrays (lossless)."""
    description: str = ""
    """Free text stored with the dataset."""
