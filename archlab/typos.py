"""Did-you-mean hints for a mistyped override: Hydra says what it could not find; this names the closest
thing that exists, so ``attention=mlq`` reads "did you mean 'mla'?" rather than a list to scan.

Hydra's texts are the input (``MissingConfigException`` for a group option, ``ConfigCompositionException``
for a key): matched by pattern, and when a pattern no longer matches (another Hydra version) the caller
prints Hydra's own line instead.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from archlab.errors import ConfigError

Compose = Callable[[list[str]], DictConfig]

# "Could not find 'attention/mlq'\n\nAvailable options in 'attention':\n\tmha\n\tmla\n"
_MISSING_OPTION = re.compile(
    r"Could not find '(?P<group>[\w/.\-]+)/(?P<name>[^']+)'\s*Available options in '[^']+':(?P<options>.*?)"
    r"(?:Config search path:|$)",
    re.S,
)


def hint(exc: Exception, overrides: Sequence[str], compose: Compose) -> str | None:
    """One line naming what a mistyped override meant, or None when ``exc`` is not such an error.

    ``overrides`` are the command's; a mistyped key is matched against the keys of the config that
    ``compose`` (``archlab.config.compose``) makes of the others (so ``ffn=moe ffn.routr=...`` is matched
    against the MoE's keys)."""
    if m := _MISSING_OPTION.search(str(exc)):
        group, name, options = m["group"].replace("/", "."), m["name"], m["options"].split()
        return f"{group}={name}: {group} has no option {name!r}{nearest(name, options, 'available')}"
    cause = exc if isinstance(exc, ConfigAttributeError | ConfigKeyError) else exc.__cause__
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        return _unknown_key(cause.full_key, overrides, compose)  # full_key: the first part missing
    return None


def _unknown_key(key: str, overrides: Sequence[str], compose: Compose) -> str:
    parent, _, name = key.rpartition(".")
    cfg = _composed_without(key, overrides, compose)
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
    where = f"in {parent}" if parent else "at the top level"
    line = f"{key}: no key {name!r} {where}{nearest(name, keys, 'its keys' if parent else 'keys')}"
    typed = isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None)
    if typed or not parent:
        return line  # a dataclass section, or the top level: a new key there would be ignored or refused
    return f"{line}; a key it does not have yet is added with +{key}=VALUE"


def nearest(wrong: str, candidates: list[str], label: str) -> str:
    """ "; did you mean 'X'?" for the nearest candidate within a third of ``wrong``'s length in edits,
    else " (LABEL: every candidate)": the tail of a message about ``wrong``."""
    near = sorted((_edits(wrong, c), c) for c in candidates)
    if near and near[0][0] <= max(1, len(wrong) // 3):
        return f"; did you mean {near[0][1]!r}?"
    return f" ({label}: {', '.join(candidates) or 'none'})"


def _edits(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions that turn a into b."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def _composed_without(key: str, overrides: Sequence[str], compose: Compose) -> DictConfig:
    """The config of ``overrides`` less the one that set ``key`` or a key under it (or, if those fail
    too, the defaults)."""

    def sets(override: str) -> bool:
        name = override.lstrip("+~").split("=", 1)[0]
        return name == key or name.startswith(f"{key}.")

    try:
        return compose([o for o in overrides if not sets(o)])
    except Exception:  # another override is wrong too: its own error comes on the next try
        return compose([])


def refuse_unread_keys(prefix: str, given: dict, schema: type, owner: str) -> None:
    """A ``ConfigError`` for the first key of ``given`` that the dataclass ``schema`` has no field for
    (named ``PREFIX.KEY``, with the nearest field): nothing would read it, so it must not pass silently.
    ``owner`` says whose keys they are ("trainer", "the mha attention plugin")."""
    known = [f.name for f in dataclasses.fields(schema)]
    for key in sorted(set(given) - set(known), key=str):
        raise ConfigError(
            f"{prefix}.{key}", given[key], f"a key of {owner}{nearest(str(key), known, 'its keys')}"
        )
