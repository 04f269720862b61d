"""The errors a run ends with in one line, and the checks of a setting's value that raise them.

Every layer may import this module (as config.py): the message of a ConfigError names the
setting, the value given and what is allowed; a RunError's names why the run stopped, what
was kept and what to do.
"""

from __future__ import annotations

import re


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and what is allowed."""


class RunError(ConfigError):
    """A run stopped for a reason its one-line message names, with what was kept and what to
    do (non-finite losses or env data, a final save without disk space)."""


def require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {name}={value!r}; allowed: {allowed}")


def match_keys(keys, pattern: str, name: str) -> list[str]:
    """The keys that `pattern` (a regex) matches in full, in their order; ConfigError naming
    the field `name` for a bad regex or when none matches (--env-opts.obs-keys,
    --agent.enc-keys, --agent.dec-keys)."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"invalid config: {name}={pattern!r} is not a regex ({e})") from None
    out = [k for k in keys if regex.fullmatch(k)]
    if not out:
        raise ConfigError(f"invalid config: {name}={pattern!r} matches none of the "
                          f"observation keys {sorted(keys)}")
    return out


def require_positive(obj, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value > 0, f"{prefix}{name}", value, "a positive number")
