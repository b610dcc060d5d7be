"""Names kept for one release after they moved: a module ``__getattr__`` (PEP 562) that forwards.

    __getattr__ = deprecation.forward(__name__, deprecation.moved_to(new_module, ["Name", ...]))

The old name keeps working and gives the new object; its first access in a process raises one
``DeprecationWarning`` naming the replacement, later accesses are silent. The old module must not
define the name itself (``__getattr__`` only sees names a module lacks). docs/plugins.md lists the
names kept this way; tests/test_deprecated_names.py checks each.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from types import ModuleType
from typing import Any

#: ``module.name`` of each old name that has warned in this process.
warned: set[str] = set()


def moved_to(module: ModuleType, names: Iterable[str]) -> dict[str, tuple[str, Callable[[], Any]]]:
    """Each of ``names``, now ``module.<name>``: a mapping for ``forward``."""
    return {name: (f"{module.__name__}.{name}", partial(getattr, module, name)) for name in names}


def forward(module: str, moved: Mapping[str, tuple[str, Callable[[], Any]]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module``: ``moved`` maps each old name to (its replacement as
    written in the warning, a function returning the value); other names raise AttributeError."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        replacement, load = moved[name]
        value = load()
        if f"{module}.{name}" not in warned:
            warned.add(f"{module}.{name}")
            warnings.warn(
                f"{module}.{name} is deprecated; use {replacement} (removed in the next release)",
                DeprecationWarning,
                stacklevel=2,
            )
        return value

    return __getattr__
