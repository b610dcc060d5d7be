"""Errors a plugin author meets, caught where the core calls the plugin and told with the fix.

``construct`` checks a plugin's constructor against the call the core is about to make
(``inspect.signature(cls).bind``) and ``check_forward`` its ``forward``; a mismatch names
the slot, the plugin and the expected signature of docs/plugins.md. ``note_where`` adds
to an exception raised inside a plugin's forward which slot, plugin and layer raised it.
"""

from __future__ import annotations

import inspect

from torch import nn

from archlab import registry
from archlab.errors import PluginError

DOCS = "see 'Slots and constructor signatures' in docs/plugins.md"


def plugin_label(slot: str, cls: type) -> str:
    """``attention=mha (archlab.baselines.attention:MultiHeadAttention)``; the name from its entry point."""
    value = f"{cls.__module__}:{cls.__qualname__}"
    names = [name for name, p in registry.plugins(slot).items() if p.entry_point.value == value]
    return f"{slot}={names[0] if names else '?'} ({value})"


def _call(args: tuple, kwargs: dict) -> str:
    parts = [*(type(a).__name__ for a in args), *(f"{k}=..." for k in kwargs)]
    return ", ".join(parts)


def construct(slot: str, cls: type, cfg: object, *args: object, **kwargs: object) -> nn.Module:
    """``cls(cfg, *args, **kwargs)``, after checking that the constructor accepts that call."""
    try:
        inspect.signature(cls).bind(cfg, *args, **kwargs)
    except TypeError as exc:
        raise PluginError(
            f"{plugin_label(slot, cls)} cannot be built: the core calls {cls.__name__}"
            f"({_call((cfg, *args), kwargs)}) and its __init__{inspect.signature(cls)} does not accept "
            f"that ({exc}); {DOCS}"
        ) from None
    return cls(cfg, *args, **kwargs)


def check_forward(slot: str, module: nn.Module, expected: str, n_args: int) -> None:
    """Check that ``module.forward`` takes ``n_args`` positional arguments (``expected`` names them)."""
    try:
        inspect.signature(module.forward).bind(*([None] * n_args))
    except TypeError:
        raise PluginError(
            f"{plugin_label(slot, type(module))} has forward{inspect.signature(module.forward)}; "
            f"the core calls forward({expected}); {DOCS}"
        ) from None


def note_where(exc: BaseException, where: str, plugins: dict[str, nn.Module]) -> None:
    """Note on ``exc`` (shown under its traceback; Python >= 3.11) where it was raised, which plugins ran."""
    if hasattr(exc, "add_note"):
        labels = [
            plugin_label(slot, type(m)) for slot, m in plugins.items() if not isinstance(m, nn.Identity)
        ]
        exc.add_note(f"archlab: raised in {where}, running {'; '.join(labels)}")
