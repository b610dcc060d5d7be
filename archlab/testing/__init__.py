"""Conformance suite for archlab plugins (see docs/writing-a-plugin.md and STYLE.md §9).

    from archlab.testing import PluginSuite

    class TestGated(PluginSuite):
        slot = "attention"
        name = "gated"

or, outside pytest, ``archlab.testing.check_plugin("attention", "gated")``.
Names are imported on first use, so that the pytest plugin this package registers
(``archlab.testing.pytest_plugin``) costs nothing in test runs that do not use it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PluginSuite": "archlab.testing.suite",
    "check_plugin": "archlab.testing.suite",
    "conformance_params": "archlab.testing.suite",
    "requires_plugin": "archlab.testing.suite",
    "Case": "archlab.testing.checks",
    "CHECKS": "archlab.testing.checks",
    "TINY": "archlab.testing.checks",
    "hf_round_trip": "archlab.testing.hf",
    "scrambled": "archlab.testing.hf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'archlab.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
