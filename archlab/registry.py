"""Plugin discovery through Python entry points.

One entry-point group per slot (``archlab.attention``, ``archlab.ffn``, ...). A
plugin is a class with a ``Config`` dataclass attribute; installing the
distribution that announces it is the only step needed to make it selectable.

Entry points are read once and loaded lazily, one by one: a plugin that fails to
import is recorded with its distribution, entry point and error and never stops
the others, unless ``ARCHLAB_STRICT_PLUGINS=1`` asks for an error (CI does).
Two distributions claiming the same slot and name make that one name broken, with an
error naming both; the slot's other plugins are unaffected.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import cache, partial
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from omegaconf import DictConfig, OmegaConf

from archlab import deprecation, slots, typos
from archlab.errors import ConfigError, PluginError

#: Names moved to ``archlab.slots`` (kinds of slot there): still importable, with a warning, for one release.
_MOVED = {
    "MODEL_SLOTS": ("sublayer", "model"),
    "PIPELINE_SLOTS": ("pipeline",),
    "SLOTS": ("sublayer", "model", "pipeline"),
    "PART_SLOTS": ("part",),
}
__getattr__ = deprecation.forward(
    __name__,
    {
        name: (f"archlab.slots.names({', '.join(repr(k) for k in kinds)})", partial(slots.names, *kinds))
        for name, kinds in _MOVED.items()
    },
)


#: Entry-point group through which a distribution adds Hydra presets (``pkg://`` paths).
PRESETS_GROUP = "archlab.presets"


@dataclass
class Plugin:
    """One entry point of one slot; ``load()`` imports it on first use."""

    slot: str
    name: str
    entry_point: EntryPoint
    _obj: type | None = None
    _error: str | None = None

    @property
    def distribution(self) -> str:
        dist = self.entry_point.dist
        return f"{dist.name} {dist.version}" if dist is not None else "?"

    def load(self) -> type:
        """Import the plugin class and check that it carries a ``Config`` dataclass."""
        if self._obj is None and self._error is None:
            try:
                obj = self.entry_point.load()
            except Exception as exc:  # noqa: BLE001 - any import error is reported, not raised
                self._error = load_error(self.slot, self.entry_point, exc)
            else:
                self._error = config_error(self.entry_point, obj)
                self._obj = obj if self._error is None else None
        if self._error is not None:
            raise PluginError(
                f"plugin {self.slot}={self.name} (entry point '{self.entry_point.value}' "
                f"of {self.distribution}) is broken: {self._error}"
            )
        return self._obj

    @property
    def error(self) -> str | None:
        """The load error, or None if the plugin imports cleanly (loads it to find out)."""
        try:
            self.load()
        except PluginError:
            return self._error
        return None


def load_error(slot: str, ep: EntryPoint, exc: Exception) -> str:
    """What went wrong importing ``ep``; points at pyproject.toml when the entry point names nothing."""
    text = f"{type(exc).__name__}: {exc}"
    missing_module = isinstance(exc, ModuleNotFoundError) and exc.name is not None
    missing_module = missing_module and (ep.module == exc.name or ep.module.startswith(f"{exc.name}."))
    attrs = (ep.attr or "").split(".")
    missing_attr = isinstance(exc, AttributeError) and getattr(exc, "name", None) in attrs
    if not (missing_module or missing_attr):
        return text
    return (
        f"{text}; the entry point names a {'module' if missing_module else 'class'} that does not exist: "
        f'check [project.entry-points."archlab.{slot}"] in your pyproject.toml, then pip install -e . again'
    )


def config_error(ep: EntryPoint, obj: object) -> str | None:
    """None if ``obj`` carries a ``Config`` dataclass, else what to fix."""
    config = getattr(obj, "Config", None)
    if config is not None and dataclasses.is_dataclass(config):
        return None
    why = "" if config is None else " (its Config is not decorated with @dataclass)"
    fix = "give the plugin class a nested @dataclass named Config"
    return f"{ep.value} has no `Config` dataclass attribute{why}; {fix}"


def strict() -> bool:
    return os.environ.get("ARCHLAB_STRICT_PLUGINS", "0") not in ("", "0", "false")


@cache
def plugins(slot: str) -> dict[str, Plugin]:
    """All plugins announced for ``slot``, by name (not yet imported)."""
    if slot not in slots.names():
        raise ConfigError(slot, "?", f"one of the slots {', '.join(slots.names())}")
    found: dict[str, Plugin] = {}
    for ep in entry_points(group=f"archlab.{slot}"):
        plugin = Plugin(slot, ep.name, ep)
        other = found.setdefault(ep.name, plugin)
        if other is plugin or (
            other.entry_point.value == ep.value and other.distribution == plugin.distribution
        ):
            continue  # a new name, or the same distribution seen twice on sys.path
        other._error = (
            f"two plugins claim {slot}={ep.name}: '{other.entry_point.value}' from "
            f"{other.distribution} and '{ep.value}' from {plugin.distribution}; "
            "uninstall one or rename its entry point"
        )
    return found


def get(slot: str, name: str) -> type:
    """The plugin class for ``slot=name``; unknown names list what is available."""
    available = plugins(slot)
    if name not in available:
        names = ", ".join(sorted(available)) or "none installed"
        raise ConfigError(slot, name, f"one of: {names}")
    return available[name].load()


def configured(slot: str, node: DictConfig) -> tuple[type, Any]:
    """The plugin class a config node names (its ``plugin`` field) and its validated ``Config`` instance.

    Works for composed (structured) nodes and for plain ones read back from a checkpoint.
    """
    cls = get(slot, node.plugin)
    fields = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    fields.pop("plugin")
    typos.refuse_unread_keys(slot, fields, cls.Config, f"the {node.plugin} {slot} plugin")
    return cls, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Config), fields))


def loadable(slot: str) -> dict[str, type]:
    """Every plugin of ``slot`` that imports; broken ones are skipped (raised when strict)."""
    out = {}
    for name, plugin in plugins(slot).items():
        try:
            out[name] = plugin.load()
        except PluginError:
            if strict():
                raise
    return out


def preset_paths() -> list[str]:
    """``pkg://`` search paths announced by installed distributions for their YAML presets."""
    return [f"pkg://{ep.value}" for ep in entry_points(group=PRESETS_GROUP)]


def clear_cache() -> None:
    """Forget discovered plugins (after installing a distribution in the same process)."""
    plugins.cache_clear()
