"""Environments behind one send/recv contract (`VecEnv`, see base.py), built by `make_env`.

Suites, picked from the id:
  * EnvPool Atari (`Pong-v5`): EnvPool async pool, images (C, H, W).
  * EnvPool DMC (`WalkerWalk-v1`): EnvPool pool of proprio vectors, or with `opts.pixels`
    dm_control rendering `image` only.
  * `crafter` (PyPI `crafter`): Crafter with rewards, 64x64 RGB, 17 actions; the 22
    achievements ride along as `log/achievement_<name>` step keys (crafter.py).
  * Any other id registered in Gymnasium (`CartPole-v1`, `Pendulum-v1`, `mymodule:MyEnv-v0`):
    a synchronous Gymnasium vector env.

May import: numpy, gymnasium, envpool, dm_control, opencv (cv2), crafter and
`dreamer_fast.config` and `.checks`. Imports nothing of `agent`, `data` or `run`.
"""

from __future__ import annotations

import difflib
import functools
import importlib

from dreamer_fast.config import EnvConfig
from dreamer_fast.envs.base import ActSpace, VecEnv

__all__ = ["ActSpace", "VecEnv", "make_env", "preset_for", "suite_of"]

_ENVPOOL_SUITES = {"envpool.atari": "atari", "envpool.mujoco.dmc": "dmc"}
"""EnvPool task family (the import path of its registry entry) -> our suite."""


def _envpool_family(env_id: str) -> str | None:
    """EnvPool's task family of env_id (None: not an EnvPool id, or EnvPool not installed:
    it has no wheels for some platforms and Pythons, and Gymnasium ids need none)."""
    try:
        from envpool.registration import registry
    except ImportError:
        return None
    entry = registry.specs.get(env_id)
    return entry[0] if entry else None


def _gymnasium_known(env_id: str) -> bool:
    import gymnasium

    if ":" in env_id:  # "module:Env-v0": importing the module registers its envs
        module, name = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as e:
            if e.name == module:
                raise ValueError(
                    f"env {env_id!r}: cannot import module {module!r} (No module named "
                    f"{module!r}); run from the folder that holds {module}.py, or add that "
                    f"folder to PYTHONPATH: PYTHONPATH=path/to/folder python run.py --env "
                    f"{env_id}") from None
            raise ValueError(f"env {env_id!r}: importing module {module!r} failed: {e}; install "
                             "what it needs") from None
        env_id = name
    try:
        gymnasium.spec(env_id)
    except gymnasium.error.Error:
        return False
    return True


def _unknown(env_id: str) -> ValueError:
    import gymnasium

    try:
        import envpool
        known = set(envpool.list_all_envs())
    except ImportError:
        known = set()
    known = sorted(known | set(gymnasium.registry))
    close = difflib.get_close_matches(env_id, known, n=5, cutoff=0.5)
    return ValueError(f"unknown env id {env_id!r}; closest: {', '.join(close) or 'none'}")


CRAFTER_IDS = ("crafter", "Crafter", "CrafterReward-v1")
"""Ids that build Crafter (with its rewards) through crafter.py."""


def suite_of(env_id: str) -> str:
    """'atari', 'dmc', 'crafter' or 'gymnasium' for a known id; ValueError naming close ids
    otherwise. Gymnasium's registry is asked first: EnvPool's loads every task family (JAX
    among them, about 1.5 s), and no EnvPool Atari or DMC id is a Gymnasium one ('Pong-v5'
    against Gymnasium's 'ALE/Pong-v5')."""
    if env_id in CRAFTER_IDS:
        return "crafter"
    if _gymnasium_known(env_id):
        return "gymnasium"
    family = _envpool_family(env_id)
    if family in _ENVPOOL_SUITES:
        return _ENVPOOL_SUITES[family]
    if family is not None:
        raise ValueError(f"env id {env_id!r} is an EnvPool {family} task, which dreamer_fast "
                         "does not support (EnvPool Atari, EnvPool DMC and Gymnasium ids do)")
    raise _unknown(env_id)


@functools.lru_cache(maxsize=None)
def preset_for(env_id: str, pixels: bool = False) -> tuple[str, str]:
    """(domain preset, why) for an env id, from its suite and observations, never its name.

    EnvPool Atari -> atari; EnvPool DMC -> dmc_proprio (dmc_vision with `pixels`); Crafter ->
    crafter; Gymnasium -> vision when any observation is an image (a uint8 Box of rank 2 or
    3) or `pixels` (--env-opts.render-image) adds one, else control. A Gymnasium env is built
    once (and closed) to read its observation space.
    """
    suite = suite_of(env_id)
    if suite == "crafter":
        return "crafter", "Crafter, the official crafter config"
    if suite == "atari":
        return "atari", "EnvPool Atari"
    if suite == "dmc":
        return (("dmc_vision", "EnvPool DMC, pixels") if pixels else
                ("dmc_proprio", "EnvPool DMC, proprioceptive vectors"))
    import gymnasium
    from gymnasium import spaces

    from dreamer_fast.envs.spaces import image_layout

    if pixels:
        return "vision", "Gymnasium, rendered frames"
    env = gymnasium.make(env_id)
    try:
        space = env.observation_space
    finally:
        env.close()
    subs = space.spaces.values() if isinstance(space, spaces.Dict) else [space]
    if any(image_layout(s) for s in subs):
        return "vision", "Gymnasium, image observations"
    return "control", "Gymnasium, vector observations"


def make_env(env_id: str, num_envs: int, opts: EnvConfig, seed: int = 0) -> VecEnv:
    """Build `num_envs` envs of `env_id` (seeded seed, seed+1, ...) behind the VecEnv contract.

    `opts.batch_size` (0 = num_envs) sets EnvPool's async batch; the other suites always
    return all envs per recv (check `env.batch_size`). `opts.time_limit` > 0 caps episodes at
    that many agent steps (truncation) in every suite; 0 keeps the default (Atari 27000 agent
    steps, DMC 1000 env steps, Gymnasium the registered limit).
    """
    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs} must be >= 1")
    suite = suite_of(env_id)
    if suite == "gymnasium":
        from dreamer_fast.envs.gym_vec import GymVecEnv

        return GymVecEnv(env_id, num_envs, opts, seed)
    if suite == "crafter":
        from dreamer_fast.envs.crafter import CrafterEnv

        return CrafterEnv(num_envs, opts, seed)
    if suite == "dmc" and opts.pixels:
        from dreamer_fast.envs.dmc import DMCPixels

        return DMCPixels(env_id, num_envs, opts, seed)
    from dreamer_fast.envs import pool

    kwargs = pool.atari_kwargs(opts) if suite == "atari" else pool.dmc_kwargs(opts)
    return pool.EnvPoolEnv(env_id, num_envs, opts.batch_size or num_envs, seed, **kwargs)
